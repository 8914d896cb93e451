#!/usr/bin/env bash
# Runs one k6 scenario (loadtest/k6/NAME.js) against a private mock provider + gateway
# started on free loopback ports with the multi-tenant bench config
# (loadtest/benchlib.py, TENANTS), and writes k6's end-of-test summary as JSON.
#
# Usage: bash loadtest/run_k6.sh NAME [VAR=VALUE ...]
#   NAME: nonstream | stream | mixed | noisy_neighbour | budget_exhaustion
#   VAR=VALUE are passed to the script (k6 -e), e.g. RATE=2000 DURATION=60s RATE_SCALE=0.1
# Environment: LLM_GATEWAY_BIN (default target/release/llm-gateway; build it with
#   cargo build --release --features jemalloc --bin llm-gateway), K6 (default: loadtest/install_k6.sh's),
#   OUT_DIR (default loadtest/results).
# Output: OUT_DIR/NAME-summary.json (--summary-export); exit status is k6's, so a
# crossed threshold fails the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
name="${1:?usage: run_k6.sh NAME [VAR=VALUE ...]}"
shift
script="loadtest/k6/$name.js"
[ -f "$script" ] || { echo "no scenario $script" >&2; exit 2; }
BIN="${LLM_GATEWAY_BIN:-target/release/llm-gateway}"
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release --features jemalloc --bin llm-gateway" >&2; exit 2; }
K6="${K6:-$(bash loadtest/install_k6.sh 2>/dev/null)}"
OUT_DIR="${OUT_DIR:-loadtest/results}"
mkdir -p "$OUT_DIR"
vars=()
for kv in "$@"; do vars+=(-e "$kv"); done
exec python3 loadtest/benchlib.py --bin "$BIN" --config tenants -- \
    "$K6" run --quiet --summary-export "$OUT_DIR/$name-summary.json" "${vars[@]}" "$script"
