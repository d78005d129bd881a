#!/usr/bin/env bash
# Formatting and lints, as required before every commit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The TPM backend is behind a feature (it needs libtss2-dev): lint it too where the library is present.
if pkg-config --exists tss2-esys 2>/dev/null; then
  cargo clippy --workspace --all-targets --locked --features trustline-hsm/tpm -- -D warnings
fi
