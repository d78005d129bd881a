#!/bin/sh
# Side by side: the Trustline sidecar pair, an nginx pair and an HAProxy pair on loopback (docs/benchmarks.md,
# "Side by side: Trustline, nginx, HAProxy"). One command: installs nginx and haproxy if missing (Debian packages),
# builds the release binaries, runs the benchmark. Knobs (environment): TRUSTLINE_BENCH_RATES=1000,2000,4000
# TRUSTLINE_BENCH_SECS=5 TRUSTLINE_BENCH_CONNS=16 TRUSTLINE_BENCH_MAX_CONNS=32 TRUSTLINE_BENCH_HS_THREADS=4
# TRUSTLINE_BENCH_IDLE=10000 TRUSTLINE_BENCH_LOAD_CPU=0 TRUSTLINE_BENCH_PROXY_CPU=1
# TRUSTLINE_BENCH_ONLY=trustline,nginx,haproxy,floor|idle TRUSTLINE_BENCH_TL_LOG=0 TRUSTLINE_BENCH_TL_FSYNC=batch|10ms|never
set -eu
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! have nginx || ! have haproxy; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nginx haproxy
fi
# Debian's packages start system services where an init system runs them; the benchmark starts its own.
export PATH="$PATH:/usr/sbin:/sbin"

cargo build --release --workspace --bins
exec cargo bench -p trustline-bench --bench side_by_side
