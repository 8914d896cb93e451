#!/usr/bin/env bash
# First set-up command of the README: build and run the gateway on its embedded
# defaults next to the mock provider. Needs only the Rust toolchain; installs cmake
# (needed to build Pingora) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cmake >/dev/null 2>&1; then
  echo "== installing cmake (needed to build Pingora)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y cmake >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y cmake >/dev/null; }
fi
cargo build --release --features jemalloc --bin llm-gateway
exec ./target/release/llm-gateway demo "$@"
