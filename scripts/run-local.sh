#!/usr/bin/env bash
# Runs the gateway with gateway.toml in front of the reference local backend, both in the
# foreground of this shell; Ctrl-C stops both. Installs what the build needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh
cargo build --release --quiet
bin=target/release/agent-gateway

# The gateway requires the key for the local upstream, and the reference backend checks it is
# present, as the field's Worker did; neither calls OpenRouter here, so a placeholder serves
# when no real key is set.
export OPENROUTER_API_KEY="${OPENROUTER_API_KEY:-local-placeholder}"
"$bin" check -c gateway.toml >/dev/null
target/release/reference-backend --listen 127.0.0.1:8787 &
backend=$!
trap 'kill "$backend" 2>/dev/null || true' EXIT INT TERM
"$bin" run -c gateway.toml
