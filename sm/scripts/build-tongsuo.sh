#!/usr/bin/env bash
# Builds the Tongsuo `openssl` command-line tool (Tongsuo 8.5, which implements RFC 8998 TLS 1.3 with
# TLS_SM4_GCM_SM3, curveSM2 and sm2sig_sm3) for the interop test `sm/tests/tongsuo_interop.rs`.
#
# The source comes from the `tongsuo-src` crate on crates.io (it carries the whole Tongsuo tree): a throwaway
# manifest that depends on it is `cargo fetch`ed, so the only network used is the crates.io registry, and the
# version is pinned here. The build is static (`no-shared`), so the binary never mixes with the system OpenSSL.
#
# Output: ${CARGO_TARGET_DIR:-<repo>/target}/tongsuo/bin/openssl. Skips the build when that binary exists.
# Prints one line: the path of the binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
TONGSUO_SRC_VERSION="850.1.1"
OUT="${CARGO_TARGET_DIR:-$PWD/target}/tongsuo"
BIN="$OUT/bin/openssl"

if [ -x "$BIN" ] && [ -f "$OUT/ssl/openssl.cnf" ] && "$BIN" version 2>/dev/null | grep -q Tongsuo; then
  echo "tongsuo: $BIN (already built: $("$BIN" version | head -1))"
  exit 0
fi

WORK="$(mktemp -d /tmp/trustline-tongsuo.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/fetch/src"
cat > "$WORK/fetch/Cargo.toml" <<TOML
[package]
name = "tongsuo-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
tongsuo-src = "=$TONGSUO_SRC_VERSION"

[workspace]
TOML
: > "$WORK/fetch/src/lib.rs"
cargo fetch --quiet --manifest-path "$WORK/fetch/Cargo.toml"
SRC_MANIFEST="$(cargo metadata --quiet --format-version 1 --manifest-path "$WORK/fetch/Cargo.toml" |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="tongsuo-src"))')"
cp -a "$(dirname "$SRC_MANIFEST")/tongsuo" "$WORK/build"

(
  cd "$WORK/build"
  # enable-ntls: Tongsuo's TLCP (GB/T 38636) stack; SM2, SM3 and SM4 (and with them RFC 8998 in TLS 1.3) are
  # enabled by default in Tongsuo 8.x. no-tests: the test programs are not needed, and take long to build.
  ./config enable-ntls no-shared no-tests no-module --prefix="$OUT" --openssldir="$OUT/ssl" >"$WORK/config.log" 2>&1 ||
    { tail -20 "$WORK/config.log"; exit 1; }
  make -j"$(nproc)" build_programs >"$WORK/make.log" 2>&1 || { tail -40 "$WORK/make.log"; exit 1; }
)
mkdir -p "$OUT/bin" "$OUT/ssl"
# `req`, `x509 -req` and `ca` read the default config; ship Tongsuo's own.
cp "$WORK/build/apps/openssl.cnf" "$OUT/ssl/openssl.cnf"
cp "$WORK/build/apps/openssl" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "tongsuo: $BIN (built: $("$BIN" version | head -1))"
