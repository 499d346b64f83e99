"""deploy/helm/ferry renders (Helm's own engine), deploy/kubernetes/ferry.yaml is that rendering, every
manifest validates against the Kubernetes schemas, and the pods run ferry with flags it has."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from ferry.gateway.config import parse_config
from ferry.server.command import DrainingServer

# the chart's kubeVersion floor and the newest schemas kubernetes-validate ships
KUBE_VERSIONS = ("1.30.0", "1.37.0")

# NOTE: kubernetes-validate ships the core API's schemas only; the Prometheus operator's CRD gets
# the fields this chart uses, strictly (a misspelt key fails).
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": {"type": "object", "required": ["matchLabels"], "properties": {
                         "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["port"], "additionalProperties": False, "properties": {
                             "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                             "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m)$"}}}}}},
    },
}


def _validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def _docs(rendered: dict[str, str], chart_render) -> list[dict[str, Any]]:
    return [parsed for _, _, parsed in chart_render.split_documents(rendered)]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module")
def helm_python():
    return pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's engine) is not installed")


def test_committed_manifests_are_the_chart_rendered(helm_python, chart_render, root: Path) -> None:
    text = chart_render.manifests_text(chart_render.render_templates())
    committed = (root / "deploy" / "kubernetes" / "ferry.yaml").read_text()
    assert committed == text, "deploy/kubernetes/ferry.yaml is stale: run python deploy/helm/render.py"


def test_chart_lints_clean(helm_python, root: Path) -> None:
    report = helm_python.lint(str(root / "deploy" / "helm" / "ferry"), strict=True)
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert errors == [], errors


def test_every_committed_manifest_validates(manifests) -> None:
    kinds = {d["kind"] for d in manifests}
    assert kinds == {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler", "ConfigMap", "ServiceMonitor"}, kinds
    for doc in manifests:
        _validate(doc)


def test_a_wrong_manifest_fails_validation(manifests) -> None:
    """The validators bite: a misspelt field and a wrong ServiceMonitor key are refused."""
    import copy

    import kubernetes_validate

    deployment = copy.deepcopy(_by_kind(manifests, "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    monitor = copy.deepcopy(_by_kind(manifests, "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["metricsPath"] = "/metrics"
    with pytest.raises(jsonschema.ValidationError):
        _validate(monitor)


OTHER_VALUES = {
    "image": {"device": "cpu", "tag": "dev"},
    "models": [
        {"name": "smollm2", "model": "smollm2-135m-instruct", "replicas": 3,
         "cache": {"enabled": False}, "podDisruptionBudget": {"enabled": False},
         "resources": {"requests": {"cpu": "2", "memory": "2Gi"}}, "hfTokenSecret": "hf"},
        {"name": "qwen", "model": "Qwen/Qwen2.5-0.5B-Instruct", "servedModelName": "qwen-small",
         "shutdownTimeout": 120, "cache": {"existingClaim": "shared-hub", "accessModes": ["ReadWriteOnce"]},
         "autoscaling": {"enabled": True, "maxReplicas": 3}},
    ],
    "serviceMonitor": {"enabled": False},
    "gateway": {"extraBackends": [{"name": "openai", "url": "https://api.openai.com/v1", "location": "cloud",
                                   "api_key_env": "OPENAI_API_KEY"}],
                "extraDeployments": {"qwen-small": [{"backend": "openai", "model": "gpt-4o-mini"}]}},
}


@pytest.fixture(scope="module")
def other_render(helm_python, chart_render) -> list[dict[str, Any]]:
    return _docs(chart_render.render_templates(OTHER_VALUES), chart_render)


def test_other_values_render_valid_manifests(other_render) -> None:
    for doc in other_render:
        _validate(doc)
    assert _by_kind(other_render, "ServiceMonitor") == []
    assert [d["metadata"]["name"] for d in _by_kind(other_render, "PersistentVolumeClaim")] == []
    assert [d["metadata"]["name"] for d in _by_kind(other_render, "HorizontalPodAutoscaler")] == ["ferry-qwen"]
    smollm2 = _one(other_render, "Deployment", "ferry-smollm2")
    assert smollm2["spec"]["replicas"] == 3
    assert "replicas" not in _one(other_render, "Deployment", "ferry-qwen")["spec"], "the HPA owns replicas"
    volumes = {v["name"]: v for v in smollm2["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"] == {"name": "cache", "emptyDir": {}}
    qwen = _one(other_render, "Deployment", "ferry-qwen")["spec"]["template"]["spec"]
    assert qwen["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared-hub"
    assert qwen["containers"][0]["image"] == "ferry:dev"


def test_other_values_gateway_config_is_valid_for_ferry(other_render) -> None:
    config = parse_config(yaml.safe_load(_one(other_render, "ConfigMap", "ferry-gateway")["data"]["gateway.yaml"]))
    assert [b.name for b in config.backends] == ["smollm2", "qwen", "openai"]
    route = config.model("qwen-small")
    assert route is not None and [d.backend for d in route.deployments] == ["qwen", "openai"]
    assert config.missing_env({"FERRY_MASTER_KEY": "k"}) == ["backends[2].api_key_env: environment variable "
                                                             "OPENAI_API_KEY is not set"]


@pytest.fixture(params=["committed", "other"])
def docs(request, manifests) -> list[dict[str, Any]]:
    return manifests if request.param == "committed" else request.getfixturevalue("other_render")


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_serve_pods_run_ferry_serve_as_the_chart_says(docs, ferry_args, dockerfile) -> None:
    serves = [d for d in _by_kind(docs, "Deployment") if _pod_labels(d)["app.kubernetes.io/component"] == "serve"]
    assert serves
    uid = int([rest for k, rest in dockerfile.stage("runtime") if k == "USER"][0].split(":")[0])
    volume_path = dockerfile.env("runtime")["HF_HOME"].rsplit("/", 1)[0]
    for d in serves:
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert "command" not in c, "the image's ENTRYPOINT (ferry) runs; args pick the subcommand"
        args = ferry_args(c["args"])
        assert args.command == "serve" and args.host == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": args.port}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a model load may take minutes"
        # SIGTERM drain: the preStop sleep, --shutdown-timeout, then ferry's grace for ended streams
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + args.shutdown_timeout + DrainingServer.GRACE_S
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["cache"] == volume_path
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HF_HOME"] == dockerfile.env("runtime")["HF_HOME"]
        assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"] is True
        claim = next(v for v in pod["volumes"] if v["name"] == "cache").get("persistentVolumeClaim")
        if claim is not None and claim["claimName"] != "shared-hub":
            _one(docs, "PersistentVolumeClaim", claim["claimName"])


def test_default_model_asks_for_a_gpu(manifests) -> None:
    (d,) = [d for d in _by_kind(manifests, "Deployment") if "ferry-model" in _pod_labels(d)]
    resources = d["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    tolerations = d["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert d["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cuda")


def test_services_pdbs_hpas_and_monitors_select_the_right_pods(docs) -> None:
    deployments = _by_kind(docs, "Deployment")
    for svc in _by_kind(docs, "Service"):
        matched = [d for d in deployments if _selects(svc["spec"]["selector"], _pod_labels(d))]
        assert len(matched) == 1, svc["metadata"]["name"]
        (port,) = svc["spec"]["ports"]
        container_ports = {p["name"] for p in matched[0]["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert port["targetPort"] in container_ports
    for pdb in _by_kind(docs, "PodDisruptionBudget"):
        matched = [d for d in deployments if _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(d))]
        assert len(matched) == 1, pdb["metadata"]["name"]
    for hpa in _by_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        _one(docs, target["kind"], target["name"])
    for monitor in _by_kind(docs, "ServiceMonitor"):
        services = [s for s in _by_kind(docs, "Service")
                    if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert services, monitor["metadata"]["name"]
        for s in services:
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in s["spec"]["ports"]}


def test_hpa_scales_on_the_adapter_metric_of_ferry_queue(manifests, root: Path) -> None:
    adapter = yaml.safe_load((root / "deploy" / "helm" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith("ferry:num_requests_waiting{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    (hpa,) = _by_kind(manifests, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert not math.isnan(float(metric["pods"]["target"]["averageValue"]))


def test_gateway_pod_reads_its_config_from_the_configmap_and_keys_from_the_secret(docs, ferry_args) -> None:
    gw = _one(docs, "Deployment", "ferry-gateway")
    pod = gw["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = ferry_args(c["args"])
    assert args.command == "gateway" and args.action == "serve" and args.host == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": args.port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    mount = next(m for m in c["volumeMounts"] if args.config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = _one(docs, "ConfigMap", volume["configMap"]["name"])
    key = args.config[len(mount["mountPath"]) + 1:]
    config = parse_config(yaml.safe_load(configmap["data"][key]))
    assert [e["secretRef"]["name"] for e in c["envFrom"]] == ["ferry-gateway"]
    instance = next(e for e in c["env"] if e["name"] == "FERRY_GATEWAY_INSTANCE")
    assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "one ledger instance per pod"
    # every ferry backend is a rendered Service of a serve Deployment, on its port
    services = {s["metadata"]["name"]: s for s in _by_kind(docs, "Service")}
    for b in config.backends:
        if b.kind != "ferry":
            continue
        url = urlparse(b.url)
        assert url.hostname in services, b.url
        assert url.port == services[url.hostname]["spec"]["ports"][0]["port"]
        assert url.path == "/v1"
    db = urlparse(config.database)
    assert db.scheme == "postgresql" and db.password is None, "the password comes from PGPASSWORD in the Secret"
