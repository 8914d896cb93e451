#!/usr/bin/env bash
# The whole test suite: `bash tests/run.sh` (README's test command; CI runs it too).
#
# Works on a fresh Debian 12 machine with only the Rust toolchain, python3 (with
# venv/pip) and gcc: installs what is missing (as root, or through sudo), then
#   1. cargo build --bin llm-gateway
#   2. cargo test                      (unit tests + Rust integration tests, tests/it)
#   3. pytest tests/e2e                (the real binary + mock provider, official SDKs;
#                                       with promtool for the Prometheus rule tests)
# Re-runs are quick: nothing is reinstalled while present and unchanged.
#
# Environment: LLM_GATEWAY_BIN  binary for the e2e suite (default: target/debug/llm-gateway)
#              PYTEST_ARGS      extra pytest arguments, e.g. "-k streaming -x"
#              PROMTOOL         promtool binary (default: on PATH, else unpacked into
#                               .cache/promtool/ from Debian's prometheus package)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

section() { printf '\n==== %s ====\n' "$*"; }
die() { printf 'tests/run.sh: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi

APT_UPDATED=0
apt_install() {
    # Try from the current package lists first; refresh them only if that fails.
    if ! $SUDO apt-get install -y -q --no-install-recommends "$@"; then
        if [ "$APT_UPDATED" = 0 ]; then
            $SUDO apt-get update -q
            APT_UPDATED=1
        fi
        $SUDO apt-get install -y -q --no-install-recommends "$@"
    fi
}

# need_pkg CMD PKG: install Debian package PKG unless command CMD is already on PATH.
need_pkg() {
    local cmd="$1" pkg="$2"
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "installing $pkg (no '$cmd' on PATH)"
        apt_install "$pkg" || die "could not install $pkg"
        command -v "$cmd" >/dev/null 2>&1 || die "$pkg installed but '$cmd' is still not on PATH"
    fi
}

section "prerequisites"
command -v cargo >/dev/null 2>&1 || die "cargo not found: the Rust toolchain is required"
need_pkg cmake cmake      # pingora-core builds zlib-ng
need_pkg redis-server redis-server  # the shared counter store, started privately by tests/it/limits_redis.rs
# Debian's ClickHouse (18.16) for the audit tests (tests/e2e/chserver.py starts a private
# server); it installs to /usr/sbin, which a non-root PATH may lack.
if ! command -v clickhouse-server >/dev/null 2>&1 && [ ! -x /usr/sbin/clickhouse-server ]; then
    echo "installing clickhouse-server (no 'clickhouse-server' found)"
    apt_install clickhouse-server || die "could not install clickhouse-server"
    [ -x /usr/sbin/clickhouse-server ] || command -v clickhouse-server >/dev/null 2>&1 \
        || die "clickhouse-server installed but not found"
fi
# Debian's PostgreSQL for the store tests (tests/e2e/pgserver.py and tests/it/pg.rs start
# a private cluster): its server binaries live in /usr/lib/postgresql/<version>/bin, off
# PATH, so they are looked for there by glob, whatever the version.
pg_bin_dir() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && [ -x "$d/pg_isready" ] && [ -x "$d/psql" ]; then
            echo "$d"
        fi
    done | sort -V | tail -n1
}
if [ -z "$(pg_bin_dir)" ]; then
    echo "installing postgresql (no /usr/lib/postgresql/*/bin/initdb found)"
    apt_install postgresql || die "could not install postgresql"
    [ -n "$(pg_bin_dir)" ] || die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb found"
fi
need_pkg cc gcc
need_pkg openssl openssl  # test-time TLS certificates (tests/e2e/certs.py)
need_pkg python3 python3
echo "cargo: $(cargo --version)"
echo "cmake: $(cmake --version | head -n1)"
echo "python3: $(python3 --version 2>&1)"
echo "postgresql: $("$(pg_bin_dir)/postgres" --version)"

section "python virtualenv (.venv)"
VENV="$ROOT/.venv"
REQ="$ROOT/tests/e2e/requirements.txt"
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "stale virtualenv (its python no longer runs): recreating"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV"; then
        # Debian's python3 needs python3-venv for ensurepip.
        rm -rf "$VENV"
        pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        apt_install "python${pyver}-venv" || apt_install python3-venv || die "cannot create a virtualenv"
        python3 -m venv "$VENV"
    fi
fi
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    echo "$want" >"$STAMP"
    echo "installed tests/e2e/requirements.txt"
else
    echo "requirements unchanged: nothing to install"
fi

section "promtool (Prometheus rule tests)"
# tests/e2e/test_prometheus_rules.py runs `promtool check rules` and `promtool test rules`
# on conf/prometheus/. Installing Debian's `prometheus` package would also enable and
# start a Prometheus server (on :9090, the admin port of the demo), so the package is
# only downloaded and promtool unpacked from it into .cache/promtool/ (gitignored);
# nothing is installed and nothing is started. Skipped when PROMTOOL is set, a promtool
# is on PATH, or the unpacked one is there and runs.
PROMTOOL_DIR="$ROOT/.cache/promtool"
if [ -n "${PROMTOOL:-}" ]; then
    echo "PROMTOOL set: $PROMTOOL"
elif command -v promtool >/dev/null 2>&1; then
    PROMTOOL="$(command -v promtool)"
    echo "promtool on PATH: $PROMTOOL"
elif [ -x "$PROMTOOL_DIR/promtool" ] && "$PROMTOOL_DIR/promtool" --version >/dev/null 2>&1; then
    PROMTOOL="$PROMTOOL_DIR/promtool"
    echo "promtool already unpacked: $PROMTOOL"
else
    echo "downloading Debian's prometheus package for promtool (not installing it)"
    mkdir -p "$PROMTOOL_DIR"
    rm -rf "$PROMTOOL_DIR/deb" "$PROMTOOL_DIR/root"
    mkdir -p "$PROMTOOL_DIR/deb"
    # apt-get download writes into the current directory and needs no root; as root it
    # warns that the _apt user cannot write there, which is harmless.
    apt_download() { (cd "$PROMTOOL_DIR/deb" && apt-get download -q prometheus); }
    if ! apt_download; then
        if [ "$APT_UPDATED" = 0 ]; then
            $SUDO apt-get update -q && APT_UPDATED=1
        fi
        apt_download || true
    fi
    deb="$(ls "$PROMTOOL_DIR"/deb/prometheus_*.deb 2>/dev/null | head -n1 || true)"
    if [ -n "$deb" ] && dpkg-deb -x "$deb" "$PROMTOOL_DIR/root" \
        && [ -x "$PROMTOOL_DIR/root/usr/bin/promtool" ]; then
        mv "$PROMTOOL_DIR/root/usr/bin/promtool" "$PROMTOOL_DIR/promtool"
        basename "$deb" >"$PROMTOOL_DIR/from-package"
        PROMTOOL="$PROMTOOL_DIR/promtool"
    else
        # Not fatal here: under CI=true the rule tests then fail, naming what is missing.
        echo "tests/run.sh: could not get promtool from Debian's prometheus package" >&2
    fi
    rm -rf "$PROMTOOL_DIR/deb" "$PROMTOOL_DIR/root"
fi
if [ -n "${PROMTOOL:-}" ]; then
    export PROMTOOL
    echo "promtool: $("$PROMTOOL" --version 2>&1 | head -n1)"
fi

section "cargo build --bin llm-gateway"
cargo build --bin llm-gateway

FAILED=()

section "cargo test (unit + Rust integration tests)"
if ! cargo test; then
    FAILED+=("cargo test")
fi

section "pytest tests/e2e (end-to-end)"
if [ -z "${LLM_GATEWAY_BIN:-}" ]; then
    LLM_GATEWAY_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/llm-gateway"
fi
export LLM_GATEWAY_BIN
echo "binary: $LLM_GATEWAY_BIN"
# pytest exits non-zero on failures and also (code 5) when no test ran.
# shellcheck disable=SC2086
if ! "$VENV/bin/python" -m pytest -q tests/e2e ${PYTEST_ARGS:-}; then
    FAILED+=("pytest tests/e2e")
fi

section "result"
if [ "${#FAILED[@]}" -ne 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all test steps passed"
