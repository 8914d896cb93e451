// Non-streaming chat completions at a constant arrival rate (open loop).
// Run: bash loadtest/run_k6.sh nonstream [RATE=2000] [DURATION=30s]
import { check } from 'k6';
import { chat, chatBody, droppedUnder, openLoop, TREND_STATS } from './lib.js';

const RATE = Number(__ENV.RATE || 500);

export const options = {
  scenarios: { nonstream: openLoop('run', RATE) },
  summaryTrendStats: TREND_STATS,
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    dropped_iterations: [droppedUnder(RATE)],
    'http_req_duration{scenario:nonstream}': ['p(99)<250'],
  },
};

export function run() {
  const r = chat('alpha', chatBody('m1', `bench non-stream ${__VU}-${__ITER}`));
  check(r, {
    'status 200': (x) => x.status === 200,
    'has a choice': (x) => x.status === 200 && x.json('choices.0.message.content') !== undefined,
    'usage counted': (x) => x.status === 200 && x.json('usage.completion_tokens') > 0,
  });
}
