// Budget exhaustion: tenant `broke` has a monthly budget of $0.001 (about a hundred
// small requests) and asks for far more, open loop. It must get 200s until the budget
// is spent, then 402 `budget_exceeded` with retry-after; nothing else (no 5xx, no
// hang), and the settled spend must never pass the budget (checked in teardown from
// the admin usage endpoint).
// Run: bash loadtest/run_k6.sh budget_exhaustion
import { check } from 'k6';
import http from 'k6/http';
import { Counter, Rate } from 'k6/metrics';
import { ADMIN, ADMIN_TOKEN, chat, chatBody, openLoop, TREND_STATS } from './lib.js';

const served = new Counter('served_200');
const refused = new Counter('refused_402');
const unexpected = new Rate('unexpected_status');

const BUDGET_NANOUSD = 1000000; // $0.001, as in benchlib.TENANTS["broke"]

export const options = {
  scenarios: { broke: openLoop('run', 100) },
  summaryTrendStats: TREND_STATS,
  thresholds: {
    unexpected_status: ['rate<0.001'],
    served_200: ['count>0'],
    refused_402: ['count>0'],
    checks: ['rate>0.999'],
  },
};

export function run() {
  const r = chat('broke', chatBody('m1', `spend ${__VU}-${__ITER}`), {
    responseCallback: http.expectedStatuses(200, 402),
  });
  if (r.status === 200) served.add(1);
  else if (r.status === 402) refused.add(1);
  unexpected.add(r.status !== 200 && r.status !== 402);
  check(r, {
    '402 is budget_exceeded with retry-after': (x) =>
      x.status !== 402 || (x.json('error.code') === 'budget_exceeded' && !!x.headers['Retry-After']),
  });
}

export function teardown() {
  const r = http.get(`${ADMIN}/admin/v1/tenants/broke/usage`, {
    headers: { Authorization: `Bearer ${ADMIN_TOKEN}` },
  });
  check(r, {
    'usage readable': (x) => x.status === 200,
    'spend never passed the budget': (x) => {
      const body = JSON.stringify(x.json());
      const m = body.match(/"spent_nanousd":(\d+)/) || body.match(/"spend_nanousd":(\d+)/);
      console.log(`usage of broke: ${body}`);
      return m !== null && Number(m[1]) <= BUDGET_NANOUSD && Number(m[1]) > 0;
    },
  });
}
