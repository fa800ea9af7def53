#!/usr/bin/env bash
# Fuzzes the WebSocket frame parser with cargo-fuzz (libFuzzer) for a bounded time:
#   scripts/fuzz.sh [SECONDS]   (default 60)
# cargo-fuzz needs nightly-only compiler flags; this machine has only the stable toolchain,
# so RUSTC_BOOTSTRAP=1 lets stable accept them. Crashes land in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --quiet --locked cargo-fuzz
cd fuzz
RUSTC_BOOTSTRAP=1 cargo fuzz run frame_parser -- -max_total_time="$seconds" -print_final_stats=1 2>&1 \
  | grep -E "^(Done|INFO: Running|stat::number_of_executed_units|==|SUMMARY|thread)" || true
# cargo fuzz exits non-zero on a crash; the pipeline above hides that, so check for artifacts.
if ls artifacts/frame_parser/crash-* >/dev/null 2>&1; then
  echo "fuzz: crash found, see fuzz/artifacts/frame_parser/" >&2
  exit 1
fi
