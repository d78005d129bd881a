#!/usr/bin/env bash
# Runs every fuzz target (fuzz/: cargo-fuzz + libFuzzer, coverage-guided) for SECONDS each (default 30), from the
# checked-in seeds (fuzz/seeds/<target>) and the target's dictionary (fuzz/dict/<target>.dict) if any. Installs
# cargo-fuzz when missing. Builds without a sanitizer (`-s none`: the stable toolchain has no -Z flags), with
# debug assertions on. A crash stops the run with libFuzzer's report; the input that caused it is saved under
# fuzz/artifacts/<target>/ and this prints the command that reproduces it. Exit status: 0 when no target crashed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET ...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
shift || true
if ! command -v cargo-fuzz >/dev/null; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
cd fuzz
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
echo "== fuzz: building ${#targets[@]} targets (cargo fuzz build -s none)"
cargo fuzz build -s none 2>&1 | grep -Ev '^\s+(Compiling|Checking|Fresh)' || true
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "fuzz: build failed" >&2; exit 1; }
failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  args=(-max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1)
  [ -f "dict/$t.dict" ] && args+=(-dict="dict/$t.dict")
  log="$(mktemp)"
  if cargo fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- "${args[@]}" >"$log" 2>&1; then
    runs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
    echo "fuzz $t: ok, ${runs:-?} runs in ${secs} s ($(( ${runs:-0} / secs )) per second)"
  else
    echo "fuzz $t: FAILED"
    grep -m5 -E 'panicked at|attempt to|ERROR: libFuzzer|SUMMARY' "$log" || true
    grep -A3 -m1 'Failing input' "$log" || tail -20 "$log"
    artifact=$(grep -o 'artifacts/[^ ]*' "$log" | tail -1 || true)
    [ -n "$artifact" ] && echo "reproduce: (cd fuzz && cargo fuzz run -s none $t $artifact)"
    failed+=("$t")
  fi
  rm -f "$log"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} of ${#targets[@]} targets crashed: ${failed[*]}"
  exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
