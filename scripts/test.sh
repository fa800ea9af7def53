#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (real gateway, real
# reference backend, real sockets on 127.0.0.1). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== module structure: no import cycle, no file over 600 lines before its tests"
python3 scripts/check-module-cycles.py
echo "== bench/results/RESULTS.md is what bench/report.py makes of the raw data"
raw=$(ls bench/results/raw-*-full.jsonl | sort | tail -n 1)
python3 bench/report.py "$raw" "${raw%.jsonl}.meta.json" | diff -u bench/results/RESULTS.md -
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --all-targets -- -D warnings
echo "== cargo test (unit, integration, workerd conformance)"
cargo test --all-targets 2>&1

echo "== deploy/validate.sh"
AGENT_GATEWAY_BIN=target/debug/agent-gateway deploy/validate.sh

echo "== fuzz the frame parser (bounded)"
scripts/fuzz.sh 30
