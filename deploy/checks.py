#!/usr/bin/env python3
"""Consistency checks for deploy/, run by deploy/validate.sh (with its venv's PyYAML).

Each subcommand prints nothing and exits 0 when the check holds, or prints one line per
problem and exits 1. The checks cover what the generic linters cannot: that the files agree
with each other and with the gateway's metric names.

  checks.py metric-names                      the names of the metrics contract
  checks.py kubernetes RENDERED.yaml          cross-references of the rendered kustomization
  checks.py agent-nodes RENDERED.yaml GATEWAY.toml
                                              the agent nodes' Service and StatefulSet against
                                              gateway.toml's [upstreams.local] (SRV, health)
  checks.py local-enabled GATEWAY.toml        gateway.toml with that example enabled, for
                                              `agent-gateway check`
  checks.py render-kustomization DIR          kustomization.yaml rendered without kubectl
  checks.py grafana DASHBOARD.json            panels use only the contract's metrics
  checks.py alerts ALERTS.yml TESTS.yml       metric names, and a firing test for every alert
  checks.py dockerfile Dockerfile .dockerignore
  checks.py systemd-static UNIT               the unit's syntax, when systemd-analyze cannot run
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

# The metrics contract of the admin listener's /metrics (docs/metrics.md).
COUNTERS = {
    "agent_gateway_migrations_total",
    "agent_gateway_discovery_failures_total",
    "agent_gateway_ws_closes_total",
    "agent_gateway_ws_close_causes_total",
    "agent_gateway_ws_messages_total",
    "agent_gateway_ws_bytes_total",
    "agent_gateway_ws_protocol_errors_total",
    "agent_gateway_ws_handshakes_total",
    "agent_gateway_ws_rate_limited_total",
    "agent_gateway_ws_throttled_seconds_total",
    "agent_gateway_http_requests_total",
    "agent_gateway_upstream_errors_total",
    "agent_gateway_config_reloads_total",
    "agent_gateway_origin_refusals_total",
    "agent_gateway_limit_refusals_total",
    "agent_gateway_auth_decisions_total",
    "agent_gateway_auth_jwks_fetch_failures_total",
}
GAUGES = {
    "agent_gateway_node_healthy",
    "agent_gateway_node_instances",
    "agent_gateway_node_connections",
    "agent_gateway_fleet_nodes",
    "agent_gateway_ws_connections_active",
    "agent_gateway_secret_present",
    "agent_gateway_build_info",
    "agent_gateway_auth_jwks_last_success_timestamp_seconds",
}
HISTOGRAMS = {
    "agent_gateway_ws_connection_duration_seconds",
    "agent_gateway_upstream_request_duration_seconds",
    "agent_gateway_auth_forward_duration_seconds",
}
ALLOWED = (
    COUNTERS
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
METRIC_TOKEN = re.compile(r"\bagent_gateway_[A-Za-z0-9_]+")

DRAIN_GRACE_SECONDS = 30


def unknown_metrics(expr: str) -> list[str]:
    return sorted({m for m in METRIC_TOKEN.findall(expr) if m not in ALLOWED})


def finish(problems: list[str]) -> int:
    for p in problems:
        print(p)
    return 1 if problems else 0


# ---- Kubernetes -------------------------------------------------------------------------

def render_kustomization(directory: str) -> int:
    """A minimal `kustomize build` for this kustomization: resources, namespace and the
    configMapGenerator (without the hash suffix). Used only when kubectl is unavailable."""
    base = Path(directory)
    k = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = []
    for resource in k.get("resources", []):
        docs += [d for d in yaml.safe_load_all((base / resource).read_text()) if d]
    for gen in k.get("configMapGenerator", []):
        data = {}
        for f in gen.get("files", []):
            key, _, path = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (base / path).read_text()
        labels = gen.get("options", {}).get("labels", {})
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"], "labels": labels}, "data": data})
    for d in docs:
        if k.get("namespace") and d["kind"] != "Namespace":
            d["metadata"]["namespace"] = k["namespace"]
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_kubernetes(rendered: str) -> int:
    problems: list[str] = []
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        for field in ("apiVersion", "kind", "metadata"):
            if field not in d:
                problems.append(f"a resource has no {field}: {str(d)[:80]}")
        if "name" not in d.get("metadata", {}):
            problems.append(f"{d.get('kind')} without metadata.name")
        by_kind.setdefault(d.get("kind"), []).append(d)
    expected = {
        "Namespace": "v1", "ConfigMap": "v1", "Secret": "v1", "Deployment": "apps/v1",
        "Service": "v1", "HorizontalPodAutoscaler": "autoscaling/v2",
        "PodDisruptionBudget": "policy/v1", "ServiceMonitor": "monitoring.coreos.com/v1",
    }
    # The agent nodes are optional: a Cloudflare-only deployment drops agent-nodes.yaml.
    optional = {"StatefulSet": "apps/v1"}
    for kind, api in (expected | optional).items():
        if not by_kind.get(kind) and kind not in optional:
            problems.append(f"no {kind} rendered")
        for d in by_kind.get(kind, []):
            if d["apiVersion"] != api:
                problems.append(f"{kind} {d['metadata']['name']}: apiVersion {d['apiVersion']}, expected {api}")
    if problems:
        return finish(problems)

    deployment = by_kind["Deployment"][0]
    name = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    if not selects(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("Deployment selector does not match its pod template labels")
    containers = spec["containers"]
    container = containers[0]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if ports.get("http") != 8080 or ports.get("admin") != 9091:
        problems.append(f"container ports should be http=8080 and admin=9091, are {ports}")

    # Probes on the admin listener.
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("admin", 9091):
            problems.append(f"{probe} should GET {path} on port admin, is {get}")

    # Termination: the kubelet's grace must cover the preStop pause and the drain.
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pause = pre_stop.get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not pause:
        problems.append("no preStop pause: the load balancer may still send traffic during the drain")
    if grace <= DRAIN_GRACE_SECONDS + pause:
        problems.append(f"terminationGracePeriodSeconds {grace} <= drain grace {DRAIN_GRACE_SECONDS} + preStop {pause}")

    # Security context.
    sc_pod = spec.get("securityContext", {})
    sc = container.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or sc_pod.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if not sc.get("readOnlyRootFilesystem"):
        problems.append("readOnlyRootFilesystem is not set")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities are not drop: [ALL]")
    if not container.get("resources", {}).get("requests"):
        problems.append("the container has no resource requests (the HPA needs a CPU request)")

    # Volumes point at rendered objects (kustomize rewrites the hashed ConfigMap name).
    configmaps = {d["metadata"]["name"]: d for d in by_kind["ConfigMap"]}
    secrets = {d["metadata"]["name"]: d for d in by_kind["Secret"]}
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    gateway_toml = None
    for volume in spec.get("volumes", []):
        if volume["name"] not in mounts:
            problems.append(f"volume {volume['name']} is not mounted")
        if "configMap" in volume:
            cm = configmaps.get(volume["configMap"]["name"])
            if cm is None:
                problems.append(f"volume {volume['name']}: no ConfigMap {volume['configMap']['name']}")
            elif mounts.get(volume["name"]) == "/etc/agent-gateway":
                gateway_toml = cm["data"].get("gateway.toml")
        if "secret" in volume:
            secret = secrets.get(volume["secret"]["secretName"])
            if secret is None:
                problems.append(f"volume {volume['name']}: no Secret {volume['secret']['secretName']}")
            else:
                keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
                if "openrouter-api-key" not in keys:
                    problems.append("the Secret has no openrouter-api-key")
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if env.get("CREDENTIALS_DIRECTORY") != mounts.get(volume["name"]):
                problems.append("CREDENTIALS_DIRECTORY is not the Secret's mount path")
    # The image's ENTRYPOINT is the whole command line: `args` without `command` would be
    # appended to it.
    command = container.get("command", []) + container.get("args", [])
    if container.get("args") and not container.get("command"):
        problems.append("args without command are appended to the image's ENTRYPOINT")
    elif command != ["agent-gateway", "run", "-c", "/etc/agent-gateway/gateway.toml"]:
        problems.append(f"the container runs {command}, not agent-gateway run -c /etc/agent-gateway/gateway.toml")

    # The configuration the pods get listens where the ports and probes expect.
    if gateway_toml is None:
        problems.append("no ConfigMap with gateway.toml is mounted at /etc/agent-gateway")
    else:
        config = tomllib.loads(gateway_toml)
        for section, port in (("server", "http"), ("admin", "admin")):
            listen = config.get(section, {}).get("listen", "")
            host, _, p = listen.rpartition(":")
            if host not in ("0.0.0.0", "[::]") or not p.isdigit() or int(p) != ports.get(port):
                problems.append(f"gateway.toml [{section}] listen {listen!r} is not 0.0.0.0:{ports.get(port)}")

    # The gateway's Services select its pods and target existing ports; the agent nodes'
    # Service (selecting a StatefulSet's pods) is check_agent_nodes' business.
    node_pods = [s["spec"]["template"]["metadata"].get("labels", {}) for s in by_kind.get("StatefulSet", [])]
    gateway_services = [s for s in by_kind["Service"]
                        if not any(selects(s["spec"].get("selector", {}), labels) for labels in node_pods)]
    service_ports = {}
    for svc in gateway_services:
        if not selects(svc["spec"].get("selector", {}), pod_labels):
            problems.append(f"Service {svc['metadata']['name']} does not select the gateway pods")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
                problems.append(f"Service {svc['metadata']['name']} targets unknown port {p.get('targetPort')}")
            service_ports.setdefault(p["name"], []).append(svc)
    public = [s for s in gateway_services if any(p.get("targetPort") in ("http", 8080) for p in s["spec"]["ports"])]
    for svc in public:
        if any(p.get("targetPort") in ("admin", 9091) for p in svc["spec"]["ports"]):
            problems.append(f"Service {svc['metadata']['name']} exposes the admin port next to the public one")

    hpa = by_kind["HorizontalPodAutoscaler"][0]
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("Deployment", name):
        problems.append(f"HPA targets {ref['kind']}/{ref['name']}, not Deployment/{name}")
    if "replicas" in deployment["spec"]:
        problems.append("Deployment sets replicas although the HPA owns the count")
    if hpa["spec"].get("minReplicas", 1) < 2:
        problems.append("HPA minReplicas below 2: a rollout or node loss can leave no replica")

    pdb = by_kind["PodDisruptionBudget"][0]
    if not selects(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("PodDisruptionBudget does not select the gateway pods")

    for sm in by_kind["ServiceMonitor"]:
        selected = [s for s in by_kind["Service"] if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        if not selected:
            problems.append("ServiceMonitor selects no Service")
        for ep in sm["spec"]["endpoints"]:
            if ep.get("path") != "/metrics":
                problems.append(f"ServiceMonitor endpoint path {ep.get('path')}, expected /metrics")
            for s in selected:
                if ep.get("port") not in {p["name"] for p in s["spec"]["ports"]}:
                    problems.append(f"ServiceMonitor port {ep.get('port')} is not a port of Service {s['metadata']['name']}")
    return finish(problems)


LOCAL_HEADER = re.compile(r"#\s?\[upstreams\.local\]\s*")


def enable_local_example(text: str) -> str | None:
    """gateway.toml with its commented-out [upstreams.local] block enabled the way its notes
    say: the first "# " of each line of the block removed (the block runs from the header to
    the first line that is not a comment), so its own "# # ..." notes stay comments. None
    when there is no such block."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if LOCAL_HEADER.fullmatch(l)), None)
    if start is None:
        return None
    end = start
    while end < len(lines) and lines[end].startswith("#"):
        end += 1
    block = [l[2:] if l.startswith("# ") else l[1:] for l in lines[start:end]]
    return "\n".join(lines[:start] + block + lines[end:]) + "\n"


def local_upstream(text: str) -> dict | None:
    """The [upstreams.local] of gateway.toml: the live section, else the commented example."""
    local = tomllib.loads(text).get("upstreams", {}).get("local")
    if local is None:
        enabled = enable_local_example(text)
        if enabled is not None:
            local = tomllib.loads(enabled).get("upstreams", {}).get("local")
    return local


def local_enabled(gateway_toml: str) -> int:
    """Prints gateway.toml with the local example enabled and the agents routed to it."""
    enabled = enable_local_example(Path(gateway_toml).read_text())
    if enabled is None:
        return finish([f"{gateway_toml}: no [upstreams.local] block, live or commented out"])
    routed = re.sub(r'(?m)^(upstream\s*=\s*)"[^"]*"', r'\1"local"', enabled)
    sys.stdout.write(routed)
    return 0


def check_agent_nodes(rendered: str, gateway_toml: str) -> int:
    """The agent nodes' headless Service and StatefulSet agree with each other and with
    gateway.toml's local upstream: the SRV name it resolves, and the path it checks."""
    problems: list[str] = []
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    secrets = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret"}
    sets = [d for d in docs if d.get("kind") == "StatefulSet"]
    if not sets:
        # Without agent-nodes.yaml, only a live local upstream over SRV would miss them.
        live = tomllib.loads(Path(gateway_toml).read_text()).get("upstreams", {}).get("local", {})
        if live.get("srv"):
            return finish([f"{gateway_toml} resolves {live['srv']}, but no agent nodes are rendered"])
        return 0
    if len(sets) != 1:
        return finish([f"expected one StatefulSet (the agent nodes), found {len(sets)}"])
    sts = sets[0]
    name = sts["metadata"]["name"]
    spec = sts["spec"]
    pod = spec["template"]
    labels = pod["metadata"].get("labels", {})
    if not selects(spec["selector"]["matchLabels"], labels):
        problems.append(f"StatefulSet {name}: selector does not match its pod template labels")
    if spec.get("replicas", 1) < 2:
        problems.append(f"StatefulSet {name}: fewer than 2 replicas is not a fleet")
    if spec.get("podManagementPolicy") != "Parallel":
        problems.append(f"StatefulSet {name}: podManagementPolicy should be Parallel (independent nodes)")

    # The governing Service: headless, ready pods only, selecting these pods.
    svc = services.get(spec.get("serviceName"))
    if svc is None:
        return finish(problems + [f"StatefulSet {name}: serviceName {spec.get('serviceName')!r} is not a rendered Service"])
    svc_name = svc["metadata"]["name"]
    namespace = svc["metadata"].get("namespace", "default")
    if svc["spec"].get("clusterIP") != "None":
        problems.append(f"Service {svc_name} is not headless (clusterIP: None): no per-pod SRV targets")
    if svc["spec"].get("publishNotReadyAddresses"):
        problems.append(f"Service {svc_name} publishes not-ready pods: the gateway would place instances on them")
    if not selects(svc["spec"].get("selector", {}), labels):
        problems.append(f"Service {svc_name} does not select the StatefulSet's pods")
    for other in services.values():
        if other is not svc and selects(other["spec"].get("selector", {}), labels):
            problems.append(f"Service {other['metadata']['name']} selects the agent nodes too")

    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p for p in container.get("ports", [])}
    svc_ports = {p["name"]: p for p in svc["spec"].get("ports", [])}
    for p in svc_ports.values():
        target = p.get("targetPort", p["port"])
        if target not in ports and target not in {c["containerPort"] for c in ports.values()}:
            problems.append(f"Service {svc_name} port {p['name']} targets unknown container port {target}")

    # gateway.toml's local upstream resolves exactly this Service's SRV name.
    local = local_upstream(Path(gateway_toml).read_text())
    if local is None:
        return finish(problems + [f"{gateway_toml}: no [upstreams.local], live or as the commented example"])
    if local.get("kind") != "local":
        problems.append(f"{gateway_toml}: [upstreams.local] kind is {local.get('kind')!r}, not local")
    srv = local.get("srv", "")
    match = re.fullmatch(r"_([a-z0-9-]+)\._(tcp|udp)\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local\.?", srv)
    if not match:
        problems.append(f"{gateway_toml}: srv {srv!r} is not _<port>._tcp.<service>.<namespace>.svc.cluster.local")
    else:
        port_name, proto, host, ns = match.groups()
        if (host, ns) != (svc_name, namespace):
            problems.append(f"{gateway_toml}: srv names Service {host}.{ns}, the agent nodes' is {svc_name}.{namespace}")
        port = svc_ports.get(port_name)
        if port is None:
            problems.append(f"{gateway_toml}: srv port label {port_name!r} is not a port name of Service {svc_name} ({sorted(svc_ports)})")
        elif proto != "tcp" or port.get("protocol", "TCP") != "TCP":
            problems.append(f"{gateway_toml}: srv protocol _{proto} does not match port {port_name}'s {port.get('protocol', 'TCP')}")

    # The kubelet and the gateway check the same path, on the port the SRV records name.
    health_path = local.get("health_path")
    agent_port = svc_ports.get(match.group(1) if match else "", {}).get("targetPort")
    for probe in ("readinessProbe", "livenessProbe"):
        get = container.get(probe, {}).get("httpGet")
        if not get:
            problems.append(f"StatefulSet {name}: no {probe} httpGet")
            continue
        if probe == "readinessProbe" and get.get("path") != health_path:
            problems.append(f"StatefulSet {name}: readinessProbe path {get.get('path')!r} is not gateway.toml's health_path {health_path!r}")
        if agent_port is not None and get.get("port") != agent_port:
            problems.append(f"StatefulSet {name}: {probe} port {get.get('port')!r} is not the agent port {agent_port!r}")

    # Restricted Pod Security (namespace.yaml), as for the gateway.
    sc_pod = pod["spec"].get("securityContext", {})
    sc = container.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or sc_pod.get("runAsNonRoot")):
        problems.append(f"StatefulSet {name}: runAsNonRoot is not set")
    if (sc.get("seccompProfile") or sc_pod.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"StatefulSet {name}: seccompProfile is not RuntimeDefault")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"StatefulSet {name}: allowPrivilegeEscalation is not false")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append(f"StatefulSet {name}: capabilities are not drop: [ALL]")
    if not sc.get("readOnlyRootFilesystem"):
        problems.append(f"StatefulSet {name}: readOnlyRootFilesystem is not set")
    if not container.get("resources", {}).get("requests"):
        problems.append(f"StatefulSet {name}: the container has no resource requests")

    # The key comes from a rendered Secret that holds it.
    env = {e["name"]: e for e in container.get("env", [])}
    ref = env.get("OPENROUTER_API_KEY", {}).get("valueFrom", {}).get("secretKeyRef")
    if ref is None:
        problems.append(f"StatefulSet {name}: OPENROUTER_API_KEY does not come from a Secret")
    else:
        secret = secrets.get(ref.get("name"))
        keys = set(secret.get("stringData", {})) | set(secret.get("data", {})) if secret else set()
        if ref.get("key") not in keys:
            problems.append(f"StatefulSet {name}: OPENROUTER_API_KEY names {ref.get('name')}/{ref.get('key')}, not a rendered Secret key")
    return finish(problems)


# ---- Grafana ----------------------------------------------------------------------------

def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def check_grafana(path: str) -> int:
    problems: list[str] = []
    dashboard = json.loads(Path(path).read_text())
    for field in ("title", "uid", "panels", "schemaVersion"):
        if field not in dashboard:
            problems.append(f"dashboard has no {field}")
    ids = set()
    used = set()
    for panel in walk_panels(dashboard.get("panels", [])):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problems.append(f"panel {title!r}: duplicate id {panel.get('id')}")
        ids.add(panel.get("id"))
        if "gridPos" not in panel:
            problems.append(f"panel {title!r}: no gridPos")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"panel {title!r}: no queries")
        for t in targets:
            expr = t.get("expr", "")
            names = set(METRIC_TOKEN.findall(expr))
            if not names:
                problems.append(f"panel {title!r}: query uses no agent_gateway_ metric: {expr}")
            for bad in unknown_metrics(expr):
                problems.append(f"panel {title!r}: {bad} is not in the metrics contract")
            used |= names
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for bad in unknown_metrics(text + " " + var.get("definition", "")):
            problems.append(f"variable {var.get('name')}: {bad} is not in the metrics contract")
    # The panels the dashboard is for.
    for required in (
        "agent_gateway_ws_connections_active", "agent_gateway_ws_handshakes_total",
        "agent_gateway_ws_closes_total", "agent_gateway_upstream_request_duration_seconds_bucket",
        "agent_gateway_secret_present", "agent_gateway_ws_protocol_errors_total",
    ):
        if required not in used:
            problems.append(f"no panel shows {required}")
    return finish(problems)


# ---- Prometheus rules -------------------------------------------------------------------

def check_alerts(rules_path: str, tests_path: str) -> int:
    problems: list[str] = []
    rules = yaml.safe_load(Path(rules_path).read_text())
    tests = yaml.safe_load(Path(tests_path).read_text())
    alerts = set()
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            if "alert" not in rule:
                continue
            alerts.add(rule["alert"])
            for bad in unknown_metrics(rule["expr"]):
                problems.append(f"alert {rule['alert']}: {bad} is not in the metrics contract")
            for field in ("summary", "description"):
                if field not in rule.get("annotations", {}):
                    problems.append(f"alert {rule['alert']}: no {field} annotation")
            if "severity" not in rule.get("labels", {}):
                problems.append(f"alert {rule['alert']}: no severity label")
    firing = set()
    for test in tests.get("tests", []):
        for case in test.get("alert_rule_test", []):
            if case.get("exp_alerts"):
                firing.add(case["alertname"])
    for missing in sorted(alerts - firing):
        problems.append(f"alert {missing}: no test expects it to fire")
    for unknown in sorted(firing - alerts):
        problems.append(f"alerts_test.yml tests {unknown}, which alerts.yml does not define")
    return finish(problems)


# ---- Dockerfile -------------------------------------------------------------------------

def run_stage_problems(what: str, stage: list[tuple[str, str]], entrypoint: list[str],
                       exposed_ports: list[str]) -> list[str]:
    """A runtime stage runs as non-root, exposes exactly its ports, and has its ENTRYPOINT."""
    problems = []
    base = stage[0][1] if stage else ""
    users = [args for op, args in stage if op == "USER"]
    if users and users[-1].split(":")[0] in ("0", "root"):
        problems.append(f"{what} runs as root")
    if not users and ":nonroot" not in base:
        problems.append(f"{what}: no USER and no nonroot base, so it runs as root")
    exposed = " ".join(args for op, args in stage if op == "EXPOSE").split()
    if sorted(exposed) != sorted(exposed_ports):
        problems.append(f"{what}: EXPOSE {exposed}, expected {' '.join(exposed_ports)}")
    entry = [args for op, args in stage if op == "ENTRYPOINT"]
    try:
        if not entry or json.loads(entry[-1]) != entrypoint:
            problems.append(f"{what}: ENTRYPOINT is not {json.dumps(entrypoint)}")
    except json.JSONDecodeError:
        problems.append(f"{what}: ENTRYPOINT is not in exec (JSON) form")
    return problems


def check_dockerfile(dockerfile: str, dockerignore: str) -> int:
    """No Docker engine here: check the instructions the deployment relies on, by text."""
    problems: list[str] = []
    text = Path(dockerfile).read_text()
    # Join continuation lines, drop comments.
    lines = [l for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.lstrip().startswith("#")]
    instructions = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l.strip() else "") for l in lines]
    froms = [args for op, args in instructions if op == "FROM"]
    if len(froms) < 2:
        problems.append("not a multi-stage build (fewer than two FROM)")
    else:
        if not re.match(r"rust:\S+\s+AS\s+build", froms[0], re.I):
            problems.append(f"first stage is not a rust image named build: {froms[0]}")
        if "distroless" not in froms[-1] and "slim" not in froms[-1]:
            problems.append(f"run stage is not a small base: {froms[-1]}")
    runs = " ".join(args for op, args in instructions if op == "RUN")
    if "cmake" not in runs:
        problems.append("the build stage does not install cmake")
    if "cargo build --release --locked" not in runs:
        problems.append("no `cargo build --release --locked`")
    copies = [args for op, args in instructions if op == "COPY"]
    if not any("--from=build" in c and c.endswith("/usr/local/bin/agent-gateway") for c in copies):
        problems.append("the binary is not copied to /usr/local/bin/agent-gateway")
    # The build context is the repository root (docker build -f deploy/Dockerfile .).
    root = Path(dockerfile).resolve().parent.parent
    config_copied = False
    for c in copies:
        parts = [p for p in c.split() if not p.startswith("--")]
        if "--from=" in c or len(parts) < 2:
            continue
        for src in parts[:-1]:
            if src != "." and not (root / src).exists():
                problems.append(f"COPY source {src} does not exist in the build context")
        config_copied |= parts[-1] == "/etc/agent-gateway/gateway.toml"
    if not config_copied:
        problems.append("no configuration is copied to /etc/agent-gateway/gateway.toml")
    # Per stage: the last one is the default target, the gateway image; a stage named
    # agent-node is the reference backend as a trial agent node (kubernetes/agent-nodes.yaml).
    stages: list[list[tuple[str, str]]] = []
    for op, args in instructions:
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, args))
    final = stages[-1] if stages else []
    problems += run_stage_problems("the image", final,
                                   ["agent-gateway", "run", "-c", "/etc/agent-gateway/gateway.toml"], ["8080", "9091"])
    node = [st for st in stages if re.search(r"\sAS\s+agent-node\s*$", st[0][1], re.I)]
    if node:
        if "--bin reference-backend" not in runs:
            problems.append("the agent-node stage needs `--bin reference-backend` in the build")
        if not any(op == "COPY" and "--from=build" in args and args.endswith("/usr/local/bin/reference-backend")
                   for op, args in node[0]):
            problems.append("the agent-node stage does not copy reference-backend to /usr/local/bin")
        problems += run_stage_problems("the agent-node stage", node[0],
                                       ["reference-backend", "--listen", "0.0.0.0:8787"], ["8787"])
    ignored = {l.strip().rstrip("/") for l in Path(dockerignore).read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    for entry_ in ("target", ".git", "node_modules", "tests/workerd/node_modules"):
        if entry_ not in ignored:
            problems.append(f".dockerignore does not list {entry_}")
    return finish(problems)


# ---- systemd (fallback) -----------------------------------------------------------------

# Directives a reviewer has checked against systemd.unit(5), systemd.service(5),
# systemd.exec(5), systemd.kill(5) and systemd.resource-control(5). A key outside this list
# is most likely a typo; add it here after checking the man page.
SYSTEMD_KEYS = {
    "Unit": {"Description", "Documentation", "Wants", "Requires", "After", "Before",
             "StartLimitIntervalSec", "StartLimitBurst", "ConditionPathExists"},
    "Service": {
        "Type", "DynamicUser", "User", "Group", "ExecStartPre", "ExecStart", "ExecReload",
        "ExecStop", "LoadCredential", "SetCredential", "Environment", "EnvironmentFile",
        "KillSignal", "KillMode", "TimeoutStopSec", "TimeoutStartSec", "Restart", "RestartSec",
        "LimitNOFILE", "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities",
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
        "ProtectHostname", "ProtectProc", "ProcSubset", "RestrictAddressFamilies",
        "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
        "MemoryDenyWriteExecute", "SystemCallArchitectures", "SystemCallFilter",
        "SystemCallErrorNumber", "UMask", "RuntimeDirectory", "StateDirectory",
        "WorkingDirectory", "ReadWritePaths",
    },
    "Install": {"WantedBy", "RequiredBy", "Alias"},
}
BOOLEAN_KEYS = {"DynamicUser", "NoNewPrivileges", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "ProtectClock", "ProtectHostname",
                "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                "LockPersonality", "MemoryDenyWriteExecute"}
BOOLEANS = {"yes", "no", "true", "false", "on", "off", "1", "0"}


def check_systemd_static(path: str) -> int:
    problems: list[str] = []
    section = None
    seen = {}
    logical = ""
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if logical:
            line = logical + " " + line
            logical = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            logical = line[:-1]
            continue
        if line.startswith("["):
            if not re.fullmatch(r"\[[A-Za-z]+\]", line) or line[1:-1] not in SYSTEMD_KEYS:
                problems.append(f"{path}:{number}: unknown section {line}")
            section = line[1:-1]
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        value = value.strip()
        if not eq or section is None:
            problems.append(f"{path}:{number}: not a Key=Value line in a section: {raw}")
            continue
        if key not in SYSTEMD_KEYS.get(section, set()):
            problems.append(f"{path}:{number}: unknown key {key} in [{section}]")
        if key in BOOLEAN_KEYS and value.lower() not in BOOLEANS:
            problems.append(f"{path}:{number}: {key} expects a boolean, got {value!r}")
        if key.startswith("Exec") and value and not value.lstrip("-@:+!").startswith("/"):
            problems.append(f"{path}:{number}: {key} needs an absolute path")
        seen.setdefault(section, set()).add(key)
    for required in ("ExecStart",):
        if required not in seen.get("Service", set()):
            problems.append(f"{path}: no {required}")
    return finish(problems)


def main(argv: list[str]) -> int:
    commands = {
        "metric-names": (0, lambda: print("\n".join(sorted(ALLOWED))) or 0),
        "render-kustomization": (1, render_kustomization),
        "kubernetes": (1, check_kubernetes),
        "agent-nodes": (2, check_agent_nodes),
        "local-enabled": (1, local_enabled),
        "grafana": (1, check_grafana),
        "alerts": (2, check_alerts),
        "dockerfile": (2, check_dockerfile),
        "systemd-static": (1, check_systemd_static),
    }
    if len(argv) < 2 or argv[1] not in commands or len(argv) - 2 != commands[argv[1]][0]:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return commands[argv[1]][1](*argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
