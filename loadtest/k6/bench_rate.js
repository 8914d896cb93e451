// One open-loop latency run for loadtest/bench.py: POST BODY to TARGET at RATE
// requests/s for DURATION (constant-arrival-rate). bench.py reads the p50/p99 of
// http_req_duration and dropped_iterations from --summary-export.
import http from 'k6/http';

const RATE = Number(__ENV.RATE || 500);

export const options = {
  scenarios: {
    rate: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.DURATION || '10s',
      preAllocatedVUs: Math.max(20, Math.ceil(RATE / 20)),
      maxVUs: Math.max(100, RATE),
    },
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(99)'],
  thresholds: { http_req_failed: ['rate<0.001'] },
};

const params = {
  headers: { 'content-type': 'application/json', authorization: `Bearer ${__ENV.KEY}` },
};

export default function () {
  http.post(__ENV.TARGET, __ENV.BODY, params);
}
