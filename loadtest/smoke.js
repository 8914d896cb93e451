// k6 smoke scenario: streaming and non-streaming chat completions through the gateway.
// Run: k6 run -e GATEWAY=http://127.0.0.1:8080 -e KEY=sk-demo-key loadtest/smoke.js
import http from 'k6/http';
import { check } from 'k6';

export const options = {
  vus: 4,
  duration: '10s',
  thresholds: { checks: ['rate>0.99'] },
};

const gw = __ENV.GATEWAY || 'http://127.0.0.1:8080';
const key = __ENV.KEY || 'sk-demo-key';
const headers = { Authorization: `Bearer ${key}`, 'content-type': 'application/json' };

export default function () {
  const stream = Math.random() < 0.5;
  const body = JSON.stringify({
    model: 'gpt-4o-mini',
    stream,
    messages: [{ role: 'user', content: `hello ${__VU}-${__ITER}` }],
  });
  const r = http.post(`${gw}/v1/chat/completions`, body, { headers });
  check(r, {
    'status 200': (x) => x.status === 200,
    'served by the gateway': (x) => !!x.headers['X-Gateway-Model'],
    'stream ends with [DONE]': (x) => !stream || x.body.trimEnd().endsWith('data: [DONE]'),
  });
}
