#!/usr/bin/env bash
# Runs every Trustline test. Installs what the tests need when missing (Debian packages: postgresql, openssl,
# chromium, softhsm2, swtpm, libtss2-dev, libssl-dev, cmake, clang, strace), starts a throwaway PostgreSQL on
# loopback for the store tests, and prints cargo's own summary lines.
set -euo pipefail
cd "$(dirname "$0")/.."

# Disk: a clean debug build of the workspace with its test binaries, Tongsuo and the Python client takes about
# 8 GiB under target/. Say how much is free, and stop before the build fills the disk half-way (cargo then fails
# with "No space left on device" and exit 101, far from the cause).
TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
mkdir -p "$TARGET_DIR"
free_kib="$(df -Pk "$TARGET_DIR" | awk 'NR==2 {print $4}')"
need_gib="${TRUSTLINE_TEST_MIN_FREE_GIB:-10}"
echo "== disk: $((free_kib / 1048576)) GiB free for $TARGET_DIR ($(du -sh "$TARGET_DIR" 2>/dev/null | cut -f1) used by it)"
if [ "$free_kib" -lt $((need_gib * 1048576)) ]; then
  echo "error: only $((free_kib / 1048576)) GiB free on the disk holding $TARGET_DIR; the tests need about $need_gib GiB" >&2
  echo "       (free space, e.g. 'cargo clean --release' or 'cargo clean', or set TRUSTLINE_TEST_MIN_FREE_GIB)" >&2
  exit 2
fi

need_apt=()
PG_BIN=""
for v in 17 16 15; do
  if [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then PG_BIN="/usr/lib/postgresql/$v/bin"; break; fi
done
[ -n "$PG_BIN" ] || need_apt+=(postgresql)
command -v openssl >/dev/null || need_apt+=(openssl)
# Headless Chromium renders the audit tool's HTML call graph in the caller-chain test.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
# SoftHSM2 is the PKCS#11 token of the CA key-custody tests.
[ -f /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
# swtpm is the TPM 2.0 of the TPM tests; libtss2-dev (found through pkg-config) builds the `tpm` feature.
command -v swtpm >/dev/null || need_apt+=(swtpm swtpm-tools)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# strace traces a workload in the agent's attestation tests (a traced caller gets no identity by binary).
command -v strace >/dev/null || need_apt+=(strace)
pkg-config --exists tss2-esys 2>/dev/null || need_apt+=(libtss2-dev)
# The national algorithms (SM2/SM3/SM4, cargo feature `sm`) link Debian's OpenSSL 3.
pkg-config --exists openssl 2>/dev/null || need_apt+=(libssl-dev)
# BoringSSL (the `boring` crate, an independent TLS stack in interop/boring) builds with cmake, and bindgen needs
# libclang.
command -v cmake >/dev/null || need_apt+=(cmake)
command -v clang >/dev/null || need_apt+=(clang)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing: ${need_apt[*]}"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  for v in 17 16 15; do
    if [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then PG_BIN="/usr/lib/postgresql/$v/bin"; break; fi
  done
fi

# A private PostgreSQL on a free loopback port, removed on exit.
PG_DIR="$(mktemp -d /tmp/trustline-pg.XXXXXX)"
PG_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cleanup() {
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then
    run_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$PG_DIR"
}
trap cleanup EXIT
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$PG_DIR"
  run_pg() { su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; }
else
  run_pg() { "$@"; }
fi
run_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U postgres >/dev/null
# One role authenticates with SCRAM over TLS only, for the channel-binding test; every other connection is trusted.
run_pg sed -i '1i hostssl all trustline_scram 127.0.0.1/32 scram-sha-256' "$PG_DIR/data/pg_hba.conf"
# TLS for the store tests: a throwaway CA and a server certificate for 127.0.0.1 and localhost.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$PG_DIR/ca.key" \
  -out "$PG_DIR/ca.crt" -days 2 -subj "/CN=trustline test PostgreSQL CA" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$PG_DIR/server.key" \
  -out "$PG_DIR/server.csr" -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName = IP:127.0.0.1, DNS:localhost\n' > "$PG_DIR/server.ext"
openssl x509 -req -in "$PG_DIR/server.csr" -CA "$PG_DIR/ca.crt" -CAkey "$PG_DIR/ca.key" -CAcreateserial \
  -days 2 -extfile "$PG_DIR/server.ext" -out "$PG_DIR/server.crt" 2>/dev/null
chmod 600 "$PG_DIR/server.key"
if [ "$(id -u)" -eq 0 ]; then chown postgres "$PG_DIR/server.key" "$PG_DIR/server.crt"; fi
run_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
  -o "-k $PG_DIR -p $PG_PORT -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on -c ssl_cert_file=$PG_DIR/server.crt -c ssl_key_file=$PG_DIR/server.key" start >/dev/null
export TRUSTLINE_TEST_POSTGRES="host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres"
export TRUSTLINE_TEST_POSTGRES_CA="$PG_DIR/ca.crt"
echo "== PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT"

# The Python SPIFFE client (py-spiffe, unmodified) for the Workload API compatibility test, in a virtualenv.
PY_VENV="target/pyvenv"
if [ ! -x "$PY_VENV/bin/python" ] || ! "$PY_VENV/bin/python" -c 'import spiffe' 2>/dev/null; then
  echo "== installing the Python spiffe client into $PY_VENV"
  python3 -m venv "$PY_VENV"
  "$PY_VENV/bin/pip" install -q --disable-pip-version-check "spiffe==0.3.2" "grpcio==1.85.1"
fi
export TRUSTLINE_TEST_PYTHON="$PWD/$PY_VENV/bin/python"
export TRUSTLINE_TEST_CHROMIUM=/usr/bin/chromium
export TRUSTLINE_TEST_SOFTHSM=/usr/lib/softhsm/libsofthsm2.so
export TRUSTLINE_TEST_SWTPM=1
# Tongsuo (Ant Group's OpenSSL fork, RFC 8998) is the independent peer of the SM TLS interop test: its command-line
# tool is built once from the tongsuo-src crate's sources (about 4 minutes on 2 cores) into target/tongsuo.
echo "== $(sm/scripts/build-tongsuo.sh)"
export TRUSTLINE_TEST_TONGSUO="${CARGO_TARGET_DIR:-$PWD/target}/tongsuo/bin/openssl"
# The TPM 2.0 key backend and the national algorithms are cargo features (they link libtss2 and OpenSSL); the
# tests build with both.
FEATURES=(--features trustline-hsm/tpm,trustline-hsm/sm)

# Every parser of untrusted bytes, fuzzed briefly (coverage-guided, from the checked-in seeds): a crash fails the
# run and prints its reproducer. TRUSTLINE_FUZZ_SECONDS per target (default 15: under 5 minutes for all);
# scripts/fuzz.sh runs them longer.
echo "== scripts/fuzz.sh ${TRUSTLINE_FUZZ_SECONDS:-15}"
scripts/fuzz.sh "${TRUSTLINE_FUZZ_SECONDS:-15}"

# End-to-end tests run the real binaries: build them first.
echo "== cargo build --workspace --bins ${FEATURES[*]}"
cargo build --workspace --bins --locked "${FEATURES[@]}" 2>&1
echo "== cargo test --workspace ${FEATURES[*]}"
cargo test --workspace --locked "${FEATURES[@]}" 2>&1
