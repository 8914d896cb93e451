// Streaming chat completions at a constant arrival rate (open loop), with time to
// first token and inter-token gaps measured client-side.
//
// k6's HTTP client is not incremental: it hands over the body when the stream ends.
// What it can time is `timings.waiting` (request sent -> first response byte). The
// gateway holds a stream's response head until the first content byte is ready (so it
// can still fail over), so that is the time to first token. The inter-token gap is
// `timings.receiving` (first byte -> last byte) over the number of content chunks
// after the first: a mean per stream, not each gap. loadtest/bench.py and
// loadtest/ttft_bench.py time every chunk with an incremental client.
// Run: bash loadtest/run_k6.sh stream [RATE=200] [GAP_MS=5] [TOKENS=16]
import { check } from 'k6';
import { Trend } from 'k6/metrics';
import { chat, chatBody, droppedUnder, openLoop, sseData, TREND_STATS } from './lib.js';

const RATE = Number(__ENV.RATE || 200);
const GAP_MS = Number(__ENV.GAP_MS || 5);
const TOKENS = Number(__ENV.TOKENS || 16);

const ttft = new Trend('ttft_ms', true);
const gap = new Trend('inter_token_gap_ms', true);
const total = new Trend('stream_total_ms', true);

export const options = {
  // A stream holds its VU for its whole duration (~TOKENS x GAP_MS, more on a busy
  // machine): start with three times that many, since starting VUs mid-run drops requests.
  scenarios: { stream: openLoop('run', RATE, { preAllocatedVUs: Math.ceil((3 * RATE * (TOKENS * GAP_MS + 50)) / 1000) + 10 }) },
  summaryTrendStats: TREND_STATS,
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    dropped_iterations: [droppedUnder(RATE)],
    ttft_ms: ['p(99)<250'],
    // The mock sends a token every GAP_MS: the mean gap seen by the client must stay close.
    inter_token_gap_ms: [`p(50)<${GAP_MS * 3 + 5}`],
  },
};

export function run() {
  const r = chat('alpha', chatBody('m1', `bench stream ${__VU}-${__ITER}`, { stream: true }), {
    headers: { Authorization: 'Bearer sk-alpha', 'content-type': 'application/json', 'x-mock': `gap_ms=${GAP_MS};tokens=${TOKENS}` },
  });
  const data = sseData(r.body);
  const content = data.filter((d) => d.includes('"content":"') && !d.includes('"content":""'));
  const ok = check(r, {
    'status 200': (x) => x.status === 200,
    'ends with [DONE]': () => data.length > 0 && data[data.length - 1] === '[DONE]',
    'every token arrived': () => content.length === TOKENS,
  });
  if (!ok) return;
  ttft.add(r.timings.waiting);
  total.add(r.timings.duration);
  if (content.length > 1) gap.add(r.timings.receiving / (content.length - 1));
}
