// A mixed multi-tenant run, open loop, all scenarios at once:
// - alpha: OpenAI-format non-streams at temperature 0 over a small set of prompts, so
//   once the response cache is on (another issue, built in parallel) most are hits;
//   `x-gateway-cache` is tallied either way (cache_hits / cache_lookups counters).
// - beta: Anthropic-format streams on /v1/messages, served by the Anthropic-kind model.
// - gamma: one request in ten has its first choice fail once (mock `fail_first=1` per
//   request key) and must be served by the fallback model (`x-gateway-fallback: true`,
//   two attempts); the other nine are served by the first choice. (Failing them all
//   would, correctly, open the provider's circuit and drain the node's retry budget.)
// Run: bash loadtest/run_k6.sh mixed [RATE_SCALE=1] [DURATION=30s]
import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';
import { Counter, Rate } from 'k6/metrics';
import { GW, chat, chatBody, droppedUnder, headers, messagesBody, openLoop, sseData, uniqueKey, TREND_STATS } from './lib.js';

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
    dropped_iterations: [droppedUnder(350)],
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
  // Every tenth across all VUs, so failures never come five in a row (the circuit's trip).
  const failover = exec.scenario.iterationInTest % 10 === 0;
  const prompt = failover
    ? `fall back [[mock: fail_first=1; status=503; key=${uniqueKey()}]]`
    : `first choice ${__VU}-${__ITER}`;
  const r = chat('gamma', chatBody('m3', prompt));
  check(r, {
    'gamma 200': (x) => x.status === 200,
    'gamma attempts as expected': (x) => x.headers['X-Gateway-Attempts'] === (failover ? '2' : '1'),
    'gamma served by the right model': (x) => x.headers['X-Gateway-Model'] === (failover ? 'm1' : 'm3'),
  });
  if (failover) fallbackServed.add(r.status === 200 && r.headers['X-Gateway-Fallback'] === 'true');
}
