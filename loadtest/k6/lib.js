// Shared helpers of the k6 scenarios. Every scenario reads its target from the
// environment that loadtest/run_k6.sh (loadtest/benchlib.py) sets: GATEWAY, ADMIN,
// ADMIN_TOKEN; the tenant keys are those of benchlib.TENANTS.
import http from 'k6/http';

export const GW = __ENV.GATEWAY || 'http://127.0.0.1:8080';
export const ADMIN = __ENV.ADMIN || 'http://127.0.0.1:9090';
export const ADMIN_TOKEN = __ENV.ADMIN_TOKEN || '';
export const KEYS = {
  alpha: 'sk-alpha', beta: 'sk-beta', gamma: 'sk-gamma',
  noisy: 'sk-noisy', quiet: 'sk-quiet', broke: 'sk-broke',
};
// Scale every scenario's rates and durations from the command line:
// RATE_SCALE=0.1 for a quick check, DURATION=60s for a longer run.
export const SCALE = Number(__ENV.RATE_SCALE || 1);
export const DURATION = __ENV.DURATION || '20s';
export const TREND_STATS = ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'];

export function rate(n) {
  return Math.max(1, Math.round(n * SCALE));
}

// An open-loop scenario: `perSecond` new requests every second whatever the latency,
// so a slow server shows as latency and dropped iterations, never as a lower offered load.
export function openLoop(exec, perSecond, extra = {}) {
  const r = rate(perSecond);
  return Object.assign({
    executor: 'constant-arrival-rate',
    exec,
    rate: r,
    timeUnit: '1s',
    duration: DURATION,
    preAllocatedVUs: Math.max(10, Math.ceil(r / 10)),
    maxVUs: Math.max(50, r * 2),
  }, extra);
}

// A threshold on dropped iterations (k6 had no free VU when a request was due): at
// most 1 % of the offered rate, so the load really was open loop at that rate.
export function droppedUnder(perSecond) {
  return `rate<${Math.max(0.5, rate(perSecond) * 0.01)}`;
}

export function headers(tenant, extra = {}) {
  return Object.assign({ Authorization: `Bearer ${KEYS[tenant]}`, 'content-type': 'application/json' }, extra);
}

export function chatBody(model, prompt, extra = {}) {
  return JSON.stringify(Object.assign({
    model, max_tokens: 16, messages: [{ role: 'user', content: prompt }],
  }, extra));
}

export function messagesBody(model, prompt, extra = {}) {
  return JSON.stringify(Object.assign({
    model, max_tokens: 16, messages: [{ role: 'user', content: prompt }],
  }, extra));
}

export function chat(tenant, body, params = {}) {
  return http.post(`${GW}/v1/chat/completions`, body, Object.assign({ headers: headers(tenant) }, params));
}

// Splits an SSE body into its `data:` payloads (k6 gets the whole body at once).
export function sseData(body) {
  const out = [];
  for (const line of String(body || '').split('\n')) {
    if (line.startsWith('data:')) out.push(line.slice(5).trim());
  }
  return out;
}

let seq = 0;
// A key unique to this request, for the mock's per-key `fail_first` directive.
export function uniqueKey() {
  seq += 1;
  return `${__VU}-${__ITER}-${seq}-${Date.now()}`;
}
