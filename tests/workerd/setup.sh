#!/usr/bin/env bash
# Installs the pinned npm packages of the workerd conformance suite (package-lock.json) into
# tests/workerd/node_modules (git-ignored), only when they are missing or older than
# package.json or package-lock.json. tests/workerd_conformance.rs calls it before anything
# starts; safe to run by hand. Needs Node >= 20 and npm; fails (never skips) without them.
set -euo pipefail
here="${BASH_SOURCE[0]%/*}"
[ "$here" != "${BASH_SOURCE[0]}" ] || here=.
cd "$here"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "tests/workerd/setup.sh: node and npm are required (Node 20 or newer), and not on PATH" >&2
  exit 1
fi
major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$major" -lt 20 ]; then
  echo "tests/workerd/setup.sh: Node $(node --version) is too old; Node 20 or newer is required" >&2
  exit 1
fi

# npm writes node_modules/.package-lock.json after every install: older than package.json or
# the lockfile means one of them changed since. (npm ci then refuses a package.json that the
# lockfile does not match, loudly.)
installed=node_modules/.package-lock.json
if [ -f "$installed" ] && [ ! package-lock.json -nt "$installed" ] && [ ! package.json -nt "$installed" ]; then
  exit 0
fi
echo "tests/workerd/setup.sh: installing the pinned npm packages (npm ci)" >&2
npm ci --no-audit --no-fund --silent
