#!/usr/bin/env bash
# Prepares the real-browser CORS test (tests/browser_cors.rs): Debian's Chromium and its
# driver (apt-get, only when missing) and the pinned playwright-core (npm ci, only when
# tests/browser/node_modules is missing or older than package.json or package-lock.json).
# Safe to run by hand and to run twice at once (an flock serialises it). Fails loudly, never
# skips: without node, npm or a working /usr/bin/chromium the test cannot prove anything.
# Environment: CHROMIUM (default /usr/bin/chromium) names the browser to check.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"
[ "$here" != "${BASH_SOURCE[0]}" ] || here=.
cd "$here"

say() { echo "tests/browser/setup.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# One setup at a time: two test binaries (or a person and a test) must not race apt or npm.
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/agent-gateway-browser-setup.lock"
  flock -w 600 9 || die "another setup held the lock for over 10 minutes"
fi

chromium="${CHROMIUM:-/usr/bin/chromium}"

# Chromium and chromium-driver from Debian, only when missing.
if [ ! -x "$chromium" ] || ! command -v chromedriver >/dev/null 2>&1; then
  [ "$chromium" = /usr/bin/chromium ] || [ -x "$chromium" ] \
    || die "CHROMIUM=$chromium is not an executable"
  command -v apt-get >/dev/null 2>&1 \
    || die "chromium is missing and there is no apt-get to install it (Debian packages chromium, chromium-driver)"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "chromium is missing; installing it needs root or sudo"
    sudo="sudo -n"
  fi
  say "installing chromium and chromium-driver (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # apt's chatter (debconf notices) is shown only when a step fails.
  apt_log="$(mktemp)"
  trap 'rm -f "$apt_log"' EXIT
  $sudo apt-get update -qq >"$apt_log" 2>&1 \
    || { cat "$apt_log" >&2; die "apt-get update failed; cannot install chromium"; }
  $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >"$apt_log" 2>&1 \
    || { cat "$apt_log" >&2; die "apt-get install chromium chromium-driver failed"; }
fi
[ -x "$chromium" ] || die "$chromium is still missing after installing chromium"
# A browser that cannot even print its version (missing libraries) fails here, not mid-test.
version="$("$chromium" --version 2>/dev/null)" || die "$chromium --version fails; the browser is broken"
case "$version" in
  Chromium*|Google\ Chrome*) ;;
  *) die "$chromium --version printed '$version', not a Chromium" ;;
esac

# Node and the pinned playwright-core.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  die "node and npm are required (Node 20 or newer, for playwright-core), and not on PATH"
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$major" -ge 20 ] || die "Node $(node --version) is too old; playwright-core needs Node 20 or newer"

# npm writes node_modules/.package-lock.json after every install: older than package.json or
# the lockfile means one of them changed since (npm ci then refuses a mismatch, loudly).
installed=node_modules/.package-lock.json
if [ ! -f "$installed" ] || [ package-lock.json -nt "$installed" ] || [ package.json -nt "$installed" ]; then
  say "installing the pinned npm packages (npm ci)"
  if ! npm ci --no-audit --no-fund --silent; then
    # --silent hides the reason; say it once more with the errors shown.
    npm ci --no-audit --no-fund --loglevel=error >&2 || true
    die "npm ci failed"
  fi
fi
[ -f node_modules/playwright-core/package.json ] || die "playwright-core is missing after npm ci"
