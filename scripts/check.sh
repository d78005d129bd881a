#!/usr/bin/env bash
# Formatting and lints, as required before every commit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The TPM backend and the national algorithms are features (they need libtss2-dev and libssl-dev): lint them too
# where the libraries are present.
features=()
pkg-config --exists tss2-esys 2>/dev/null && features+=(trustline-hsm/tpm)
pkg-config --exists openssl 2>/dev/null && features+=(trustline-hsm/sm)
if [ ${#features[@]} -gt 0 ]; then
  cargo clippy --workspace --all-targets --locked --features "$(IFS=,; echo "${features[*]}")" -- -D warnings
fi
