// A mixed multi-tenant run, open loop, all scenarios at once:
// - alpha: OpenAI-format non-streams at temperature 0 over a small set of prompts, so
//   once the response cache is on (another issue, built in parallel) most are hits;
//   `x-gateway-cache` is tallied either way (cache_hits / cache_lookups counters).
// - beta: Anthropic-format streams on /v1/messages, served by the Anthropic-kind model.
// - gamma: requests whose first choice fails once (mock `fail_first=1` per request
//   key), so every one is served by the fallback model (`x-gateway-fallback: true`).
// Run: bash loadtest/run_k6.sh mixed [RATE_SCALE=1] [DURATION=30s]
import http from 'k6/http';
import { check } from 'k6';
import { Counter, Rate } from 'k6/metrics';
import { GW, chat, chatBody, headers, messagesBody, openLoop, sseData, uniqueKey, TREND_STATS } from './lib.js';

const cacheHits = new Counter('cache_hits');
const cacheLookups = new Counter('cache_lookups');
const fallbackServed = new Rate('fallback_served');

export const options = {
  scenarios: {
    alpha_cacheable: openLoop('alpha', 200),
    beta_messages_stream: openLoop('beta', 100),
    gamma_fallback: openLoop('gamma', 50),
  },
  summaryTrendStats: TREND_STATS,
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    fallback_served: ['rate>0.999'],
    'http_req_duration{scenario:alpha_cacheable}': ['p(99)<250'],
    'http_req_duration{scenario:beta_messages_stream}': ['p(99)<250'],
    'http_req_duration{scenario:gamma_fallback}': ['p(99)<250'],
  },
};

const PROMPTS = 20; // distinct cacheable prompts

export function alpha() {
  const body = chatBody('m1', `cacheable question ${__ITER % PROMPTS}`, { temperature: 0 });
  const r = chat('alpha', body);
  check(r, {
    'alpha 200': (x) => x.status === 200,
    'alpha has content': (x) => x.status === 200 && typeof x.json('choices.0.message.content') === 'string',
  });
  const cache = r.headers['X-Gateway-Cache'];
  cacheLookups.add(1);
  if (cache === 'hit') cacheHits.add(1);
}

export function beta() {
  const r = http.post(`${GW}/v1/messages`, messagesBody('m2', `stream me ${__VU}-${__ITER}`, { stream: true }), {
    headers: headers('beta', { 'anthropic-version': '2023-06-01' }),
  });
  const events = sseData(r.body);
  check(r, {
    'beta 200': (x) => x.status === 200,
    'beta ends with message_stop': () => events.some((d) => d.includes('"type":"message_stop"')),
    'beta served by the Anthropic model': (x) => x.headers['X-Gateway-Model'] === 'm2',
  });
}

export function gamma() {
  const prompt = `fall back [[mock: fail_first=1; status=503; key=${uniqueKey()}]]`;
  const r = chat('gamma', chatBody('m3', prompt));
  check(r, {
    'gamma 200': (x) => x.status === 200,
    'gamma took two attempts': (x) => x.headers['X-Gateway-Attempts'] === '2',
  });
  fallbackServed.add(r.status === 200 && r.headers['X-Gateway-Fallback'] === 'true');
}
