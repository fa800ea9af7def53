#!/usr/bin/env bash
# Installs what building and testing agent-gateway needs and a fresh machine lacks.
# Idempotent and quiet: it installs only what is missing. Debian packages via apt-get.
set -euo pipefail

need_packages=()
command -v cmake >/dev/null 2>&1 || need_packages+=(cmake)        # Pingora's build needs it
command -v promtool >/dev/null 2>&1 || need_packages+=(prometheus) # promtool and the server, for the metrics tests
command -v curl >/dev/null 2>&1 || need_packages+=(curl)
command -v npm >/dev/null 2>&1 || need_packages+=(nodejs npm)        # the workerd conformance suite

if ((${#need_packages[@]})); then
  echo "bootstrap: installing ${need_packages[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "bootstrap: cargo is missing; install Rust with rustup first" >&2
  exit 1
fi
