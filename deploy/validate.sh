#!/usr/bin/env bash
# Validates everything under deploy/ that can be validated without a Docker engine or a
# cluster: Prometheus config, rules and rule unit tests (promtool), the Kubernetes
# kustomization (rendered, schema-checked, cross-checked), the Grafana dashboard, the systemd
# unit (systemd-analyze verify) and the Dockerfile (by text).
#
# Installs what is missing, and only that: Debian packages with apt-get (prometheus for
# promtool, systemd for systemd-analyze, kubectl when a configured apt source has it), and
# PyPI packages (yamllint, kubernetes-validate) into a venv outside the repository, under
# ${AGENT_GATEWAY_DEPLOY_CACHE:-${XDG_CACHE_HOME:-~/.cache}/agent-gateway-deploy}.
#
# Prints one line per check; exits non-zero if any check fails.
#
# Environment:
#   AGENT_GATEWAY_BIN  a built agent-gateway; when set, `$AGENT_GATEWAY_BIN check` also
#                      validates deploy/kubernetes/gateway.toml with the gateway's own parser,
#                      as it is and with its commented-out [upstreams.local] example enabled.
#   KUBE_VERSION       Kubernetes version for the schema check (default 1.30.0, the first
#                      with the preStop sleep action enabled by default).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in the repository

KUBE_VERSION="${KUBE_VERSION:-1.30.0}"
CACHE="${AGENT_GATEWAY_DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/agent-gateway-deploy}"
VENV="$CACHE/venv"
# Pinned, so that a new release of a linter does not fail the build on its own.
PIP_PACKAGES=(yamllint==1.38.0 kubernetes-validate==1.37.0)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
failures=0

# check NAME COMMAND...: runs COMMAND, prints "ok NAME" or "FAIL NAME" and its output.
check() {
  local name="$1"
  shift
  if "$@" >"$WORK/out" 2>&1; then
    echo "ok    $name"
  else
    echo "FAIL  $name"
    sed 's/^/      /' "$WORK/out"
    failures=$((failures + 1))
  fi
}
skip() { echo "skip  $1"; }

# ---- tools --------------------------------------------------------------------------------
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
apt_updated=""
apt_update_once() {
  [ -n "$apt_updated" ] || { $SUDO apt-get update -qq >/dev/null && apt_updated=1; }
}
apt_install() {
  apt_update_once || return 1
  echo "setup install $* (apt-get)"
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v promtool >/dev/null 2>&1 || apt_install prometheus || true
command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd || true
if ! command -v kubectl >/dev/null 2>&1; then
  # Not in Debian itself; install it when a configured apt source carries it.
  apt_update_once || true
  if apt-cache policy kubectl 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt_install kubectl || true
  fi
fi

stamp="$VENV/.packages"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${PIP_PACKAGES[*]}" ]; then
  echo "setup install ${PIP_PACKAGES[*]} (pip, venv in $VENV)"
  mkdir -p "$CACHE"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    apt_install python3-venv && python3 -m venv "$VENV" >/dev/null
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_PACKAGES[@]}" >/dev/null &&
    echo "${PIP_PACKAGES[*]}" >"$stamp"
fi
PY="$VENV/bin/python"
if [ ! -x "$PY" ] || [ ! -f "$stamp" ]; then
  echo "FAIL  setup: the Python venv in $VENV could not be created"
  exit 1
fi
CHECKS=(deploy/checks.py)

# ---- files ----------------------------------------------------------------------------------
expected_files=(
  .dockerignore deploy/Dockerfile deploy/README.md deploy/checks.py
  deploy/systemd/agent-gateway.service
  deploy/kubernetes/kustomization.yaml deploy/kubernetes/gateway.toml
  deploy/kubernetes/agent-nodes.yaml
  deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml deploy/prometheus/alerts_test.yml
  deploy/grafana/agent-gateway.json
)
missing_files() {
  local f rc=0
  for f in "${expected_files[@]}"; do [ -f "$f" ] || { echo "missing $f"; rc=1; }; done
  return $rc
}
check "files present" missing_files

# ---- YAML -------------------------------------------------------------------------------------
cat >"$WORK/yamllint.yml" <<'EOF'
extends: default
rules:
  document-start: disable
  line-length: {max: 400}
  comments: {min-spaces-from-content: 1}
  comments-indentation: disable
  truthy: {check-keys: false}
EOF
mapfile -t yaml_files < <(find deploy -name '*.yml' -o -name '*.yaml' | sort)
check "yamllint (${#yaml_files[@]} files)" "$VENV/bin/yamllint" -s -c "$WORK/yamllint.yml" "${yaml_files[@]}"

# ---- Prometheus -------------------------------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
  check "promtool check config prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
  check "promtool check rules alerts.yml" promtool check rules deploy/prometheus/alerts.yml
  check "promtool test rules alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
else
  echo "FAIL  promtool: not installed and apt-get could not install prometheus"
  failures=$((failures + 1))
fi
check "alerts: contract metric names, a firing test per alert" \
  "$PY" "${CHECKS[@]}" alerts deploy/prometheus/alerts.yml deploy/prometheus/alerts_test.yml

# ---- Kubernetes -------------------------------------------------------------------------------
rendered="$WORK/kubernetes.yaml"
if command -v kubectl >/dev/null 2>&1; then
  check "kubectl kustomize deploy/kubernetes" sh -c "kubectl kustomize deploy/kubernetes >'$rendered'"
else
  skip "kubectl kustomize: no kubectl here or in the apt sources; rendering with checks.py instead"
  check "render kustomization (checks.py)" \
    sh -c "'$PY' deploy/checks.py render-kustomization deploy/kubernetes >'$rendered'"
fi
if [ -s "$rendered" ]; then
  # Built-in kinds against the Kubernetes OpenAPI schemas, rejecting unknown fields. The
  # ServiceMonitor is a CRD without a bundled schema: checks.py checks its fields.
  "$PY" - "$rendered" "$WORK/builtin.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
builtin = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
yaml.safe_dump_all(builtin, open(sys.argv[2], "w"))
EOF
  check "kubernetes-validate --strict (Kubernetes $KUBE_VERSION schemas)" \
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "$WORK/builtin.yaml"
  check "kubernetes cross-references (probes, ports, selectors, grace, security)" \
    "$PY" "${CHECKS[@]}" kubernetes "$rendered"
  check "kubernetes agent nodes (headless Service, StatefulSet; gateway.toml's srv and health_path)" \
    "$PY" "${CHECKS[@]}" agent-nodes "$rendered" deploy/kubernetes/gateway.toml
fi
if [ -n "${AGENT_GATEWAY_BIN:-}" ]; then
  check "agent-gateway check -c deploy/kubernetes/gateway.toml" \
    "$AGENT_GATEWAY_BIN" check -c deploy/kubernetes/gateway.toml
  # What an operator gets by enabling the example as its notes say. A local upstream wants the
  # key in the gateway's own credentials, which the pod mounts from the Secret and this machine
  # lacks: --warn-secrets keeps the check to the configuration.
  check "agent-gateway check: gateway.toml with [upstreams.local] enabled" \
    sh -c "'$PY' deploy/checks.py local-enabled deploy/kubernetes/gateway.toml >'$WORK/local.toml' &&
      '$AGENT_GATEWAY_BIN' check --warn-secrets -c '$WORK/local.toml'"
else
  skip "agent-gateway check deploy/kubernetes/gateway.toml (set AGENT_GATEWAY_BIN to a built binary)"
fi

# ---- Grafana ----------------------------------------------------------------------------------
check "grafana dashboard is JSON" python3 -m json.tool deploy/grafana/agent-gateway.json
check "grafana panels use only the contract's metrics" \
  "$PY" "${CHECKS[@]}" grafana deploy/grafana/agent-gateway.json

# ---- systemd ----------------------------------------------------------------------------------
# `verify` wants the unit's binaries and systemd's own units to exist, so it runs against a
# scratch root: systemd's units copied in, stand-ins for /usr/local/bin/agent-gateway and
# /bin/kill. It prints every problem (even "ignoring" ones it exits 0 for): any output fails.
verify_unit() {
  local root="$WORK/root" unit=agent-gateway.service units=/usr/lib/systemd/system
  [ -d "$units" ] || units=/lib/systemd/system
  mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/usr/local/bin" "$root/bin"
  cp -a "$units" "$root/usr/lib/systemd/"
  install -m 0755 /bin/true "$root/usr/local/bin/agent-gateway"
  install -m 0755 /bin/true "$root/bin/kill"
  cp deploy/systemd/$unit "$root/etc/systemd/system/$unit"
  SYSTEMD_LOG_COLOR=0 systemd-analyze verify --root="$root" "$root/etc/systemd/system/$unit" \
    >"$WORK/verify" 2>&1
  local rc=$?
  sed "s|$root||g" "$WORK/verify"
  if [ $rc -eq 0 ] && [ ! -s "$WORK/verify" ]; then return 0; fi
  # Problems of the unit name the unit; anything else is systemd-analyze unable to run here.
  if grep -q "$unit" "$WORK/verify"; then return 1; fi
  return 2
}
if command -v systemd-analyze >/dev/null 2>&1; then
  verify_unit >"$WORK/verify.out" 2>&1
  case $? in
    0) echo "ok    systemd-analyze verify agent-gateway.service" ;;
    1) echo "FAIL  systemd-analyze verify agent-gateway.service"
       sed 's/^/      /' "$WORK/verify.out"
       failures=$((failures + 1)) ;;
    *) skip "systemd-analyze verify cannot run in this environment: $(head -n 1 "$WORK/verify.out")"
       check "systemd unit static check (checks.py)" \
         "$PY" "${CHECKS[@]}" systemd-static deploy/systemd/agent-gateway.service ;;
  esac
else
  skip "systemd-analyze: not installed and apt-get could not install systemd"
  check "systemd unit static check (checks.py)" \
    "$PY" "${CHECKS[@]}" systemd-static deploy/systemd/agent-gateway.service
fi

# ---- Dockerfile -------------------------------------------------------------------------------
# No Docker engine on these machines: the build itself is not run.
check "Dockerfile and .dockerignore (by text; no Docker engine)" \
  "$PY" "${CHECKS[@]}" dockerfile deploy/Dockerfile .dockerignore

if [ "$failures" -ne 0 ]; then
  echo "deploy/validate.sh: $failures check(s) failed"
  exit 1
fi
echo "deploy/validate.sh: all checks passed"
