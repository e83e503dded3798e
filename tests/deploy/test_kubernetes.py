"""deploy/: the Kubernetes manifests validate against Kubernetes' schemas and agree with quadrant
(CLI arguments, metric names), with the image (deploy/Dockerfile) and with each other; the
registrar sidecar (deploy/register_worker.py) keeps a worker registered with a real router app.
No cluster and no image build: a few seconds.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from quadrant.cli import build_parser
from quadrant.disagg.router import RouterConfig, build_router_app, router_config_from_args
from quadrant.serve.metrics import ServerMetrics
from tests.serve.conftest import free_port

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFEST_DIR = DEPLOY / "kubernetes"
IMAGE_ROOT = "/opt/quadrant/"  # where deploy/Dockerfile puts the repository
MIN_KUBERNETES = "1.30.0"  # the oldest version deploy/README.md names
POD_IP = "10.1.2.3"
MANIFEST_FILES = sorted(p for p in MANIFEST_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
DOCS: list[tuple[str, dict[str, Any]]] = [
    (p.name, doc) for p in MANIFEST_FILES for doc in yaml.safe_load_all(p.read_text()) if doc is not None]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def pod_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, container) for every container of every Deployment."""
    return [(d, c) for d in of_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]


def expand(words: list[str], container: dict[str, Any]) -> list[str]:
    """Kubernetes' $(VAR) expansion of command/args, with POD_IP as the downward API would set it."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    values = {name: POD_IP if name == "POD_IP" else value for name, value in env.items()}

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in values, f"{container['name']}: $({m.group(1)}) is not in its env"
        return str(values[m.group(1)])
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, w) for w in words]


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def load_registrar() -> ModuleType:
    spec = importlib.util.spec_from_file_location("register_worker", DEPLOY / "register_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adapter_rules() -> list[dict[str, Any]]:
    (cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "quadrant-prometheus-adapter"]
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def series_name(rule: dict[str, Any]) -> str:
    m = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*\{", rule["seriesQuery"])
    assert m, f"seriesQuery {rule['seriesQuery']!r} should name one metric"
    return m.group(1)


def served_name(rule: dict[str, Any]) -> str:
    """The custom metric name prometheus-adapter serves for a rule (Go's ${1} is Python's \\g<1>)."""
    name = rule.get("name", {})
    replacement = re.sub(r"\$\{(\d+)\}", r"\\g<\1>", name.get("as", "")) or r"\g<0>"
    return re.sub(name.get("matches", "^(.*)$"), replacement, series_name(rule))


@pytest.mark.parametrize("version", [MIN_KUBERNETES, "latest"])
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    import jsonschema  # kubernetes_validate's; it raises jsonschema's errors as they are
    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    assert DOCS
    errors = []
    for file, doc in DOCS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except jsonschema.ValidationError as e:
            errors.append(f"{file}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFEST_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFEST_FILES]


def test_services_and_autoscalers_find_their_pods() -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    for svc in of_kind("Service"):
        selector = svc["spec"]["selector"].items()
        matches = [d for d in deployments.values() if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {svc['metadata']['name']} selects {len(matches)} Deployments"
        named_ports = {name for c in matches[0]["spec"]["template"]["spec"]["containers"] for name in ports(c)}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named_ports, f"Service {svc['metadata']['name']}: no port {port['targetPort']}"
    for hpa in of_kind("HorizontalPodAutoscaler"):
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "the HPA owns the replica count; apply would reset it"
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0


def test_quadrant_containers_parse_with_the_cli() -> None:
    checked = set()
    for deployment, c in pod_containers():
        if "command" in c:  # not the image's `quadrant` entrypoint: the registrar, checked below
            continue
        args = build_parser().parse_args(expand(c["args"], c))
        assert args.port == ports(c)["http"] and args.host == "0.0.0.0"
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "router":
            assert args.command == "router"
            router_config_from_args(args)  # checks itself
        else:
            assert (args.command, args.role) == ("serve", component)
            if component == "prefill":  # decode pods pull from the address it advertises
                assert (args.kv_host, args.kv_port) == (POD_IP, ports(c)["kv"])
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] == "http"
        checked.add(component)
    assert checked == {"router", "prefill", "decode"}


def test_workers_register_with_every_router_pod() -> None:
    registrar = load_registrar()
    router_pods = {s["metadata"]["name"]: s for s in of_kind("Service") if s["spec"].get("clusterIP") == "None"}
    roles = set()
    for deployment, c in pod_containers():
        role = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        if "command" not in c:
            if role != "router":  # the worker leaves the routers before it drains
                prestop = shlex.split(c["lifecycle"]["preStop"]["exec"]["command"][-1])
                assert prestop[:3] == ["python", IMAGE_ROOT + "deploy/register_worker.py", "deregister"]
                assert registrar.build_parser().parse_args(prestop[2:]).url == "http://$POD_IP:8000"
            continue
        script = c["command"][1]
        assert c["command"][0] == "python" and (DEPLOY.parent / script.removeprefix(IMAGE_ROOT)).is_file()
        args = registrar.build_parser().parse_args(expand(c["args"], c))
        assert (args.action, args.role, args.url) == ("register", role, f"http://{POD_IP}:8000")
        host, port = args.router.rsplit(":", 1)
        svc = router_pods[host]
        assert svc["spec"]["publishNotReadyAddresses"], "routers are not ready before workers register"
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
        roles.add(role)
    assert roles == {"prefill", "decode"}


def test_autoscalers_read_metrics_the_adapter_serves() -> None:
    served = {served_name(rule) for rule in adapter_rules()}
    hpa_metrics = {m["pods"]["metric"]["name"] for hpa in of_kind("HorizontalPodAutoscaler")
                   for m in hpa["spec"]["metrics"]}
    assert hpa_metrics == {"quadrant_num_requests_waiting", "quadrant_kv_cache_usage_ratio"}
    assert hpa_metrics <= served
    assert {"quadrant_time_to_first_token_seconds_p90", "quadrant_time_per_output_token_seconds_p90"} <= served


def test_adapter_queries_series_quadrant_exports() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {family.name + suffix for family in ServerMetrics().registry.collect()
                for suffix in suffixes.get(family.type, ("",))}
    for rule in adapter_rules():
        assert series_name(rule) in exported, f"{series_name(rule)} is not a metric of quadrant serve"


def test_dockerfile_installs_quadrant_and_the_served_model() -> None:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    runs = [line for line in lines if line.startswith("RUN ")]
    assert lines[0].startswith("FROM python:3.11-slim")
    (install,) = [i for i, r in enumerate(runs) if "sh scripts/install.sh" in r]
    models = {c["args"][1] for _, c in pod_containers() if c.get("args", [None])[0] == "serve"}
    for model in models:  # pulled at build time: pods start without network
        (pull,) = [i for i, r in enumerate(runs) if f"quadrant pull {model}" in r]
        assert pull > install
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert {"8000", "8001"} <= {p for line in lines if line.startswith("EXPOSE ") for p in line.split()[1:]}
    assert any(line.startswith("HEALTHCHECK ") and "/health" in line for line in lines)


@pytest.fixture
def router_url():
    import uvicorn

    port = free_port()
    app = build_router_app(RouterConfig(host="127.0.0.1", port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the router did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def listed(router: str) -> list[tuple[str, str]]:
    return sorted((w["url"], w["role"]) for w in httpx.get(router + "/workers").json()["data"])


def test_registrar_keeps_one_registration_and_leaves_on_stop(router_url: str) -> None:
    registrar = load_registrar()
    worker = "http://127.0.0.1:1"  # nothing listens: the router keeps it, marked unhealthy
    # a pod of the other role that had this IP before, never deregistered
    httpx.post(router_url + "/workers", json={"url": worker, "role": "prefill"}).raise_for_status()
    port = int(router_url.rsplit(":", 1)[1])
    assert registrar.router_urls("127.0.0.1", port) == [router_url]
    stop = threading.Event()
    loop = threading.Thread(target=registrar.run_loop, args=("127.0.0.1", port, worker, "decode", 0.05, stop))
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while listed(router_url) != [(worker, "decode")]:
            assert time.monotonic() < deadline, listed(router_url)
            time.sleep(0.05)
        time.sleep(0.3)  # several more rounds: registered once, no errors
        assert listed(router_url) == [(worker, "decode")]
    finally:
        stop.set()
        loop.join(timeout=10)
    assert listed(router_url) == []
    assert registrar.deregister(router_url, worker)  # a second deregistration (preStop and SIGTERM) is fine
