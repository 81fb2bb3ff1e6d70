"""docker-compose.yml, its GPU override and its monitoring profile are valid and say what docs/docker.md says."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.helpers import BASE_COMPOSE, GPU_COMPOSE, ROOT, compose_args, compose_model, run_compose

VARIANTS = {
    "base": ([BASE_COMPOSE], ()),
    "gpu-override": ([BASE_COMPOSE, GPU_COMPOSE], ()),  # not "gpu": that id would read as the gpu marker
    "monitoring": ([BASE_COMPOSE], ("monitoring",)),
    "gpu-override+monitoring": ([BASE_COMPOSE, GPU_COMPOSE], ("monitoring",)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compose_config_is_valid(variant: str) -> None:
    files, profiles = VARIANTS[variant]
    result = run_compose([*compose_args(files, profiles), "config", "-q"])
    assert result.returncode == 0, result.stderr


def test_compose_config_rejects_a_broken_file(tmp_path) -> None:  # the check can fail, so its passing means something
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  promptserve:\n    ports: 8000\n    shm_size: [1]\n")
    assert run_compose(["-f", str(broken), "config", "-q"]).returncode != 0


def test_base_runs_only_the_server_without_a_gpu() -> None:
    services = compose_model([BASE_COMPOSE])["services"]
    assert set(services) == {"promptserve"}
    assert "deploy" not in services["promptserve"]
    assert services["promptserve"]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_server_keeps_store_and_model_cache_in_named_volumes() -> None:
    model = compose_model([BASE_COMPOSE])
    mounts = {volume["target"]: volume for volume in model["services"]["promptserve"]["volumes"]}
    for target in ("/data/store", "/data/hf"):
        assert mounts[target]["type"] == "volume"
        assert mounts[target]["source"] in model["volumes"]


def test_model_and_admin_token_come_from_the_environment() -> None:
    environment = compose_model([BASE_COMPOSE])["services"]["promptserve"]["environment"]
    assert environment["PROMPTSERVE_MODEL"] == "" and environment["PROMPTSERVE_ADMIN_TOKEN"] == ""
    assert environment["HF_HUB_OFFLINE"] == "0"


def test_server_gets_shared_memory_for_pytorch() -> None:
    service = compose_model([BASE_COMPOSE])["services"]["promptserve"]
    assert service.get("ipc") == "host" or int(service["shm_size"]) >= 256 * 1024 * 1024


def test_gpu_override_reserves_an_nvidia_gpu_and_builds_cuda_torch() -> None:
    service = compose_model([BASE_COMPOSE, GPU_COMPOSE])["services"]["promptserve"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert service["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert service["environment"]["PROMPTSERVE_DEVICE"] == "cuda"


def test_monitoring_profile_adds_prometheus_scraping_the_server() -> None:
    services = compose_model([BASE_COMPOSE], ("monitoring",))["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    (config_mount,) = [v for v in services["prometheus"]["volumes"] if v["type"] == "bind"]
    assert config_mount["source"] == str(ROOT / "deploy" / "prometheus.yml")
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [job for job in scrape if job["job_name"] == "promptserve"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["promptserve:8000"]


def test_compose_leaves_every_setting_to_the_servers_own_default() -> None:
    """An unset variable reaches the server empty (its default, chosen by device), never a value of Compose's own."""
    environment = compose_model([BASE_COMPOSE])["services"]["promptserve"]["environment"]
    settings = {name: value for name, value in environment.items() if name.startswith("PROMPTSERVE_")}
    assert settings and all(value == "" for value in settings.values()), settings


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_published_port_is_bound_to_this_host_only(variant: str) -> None:
    files, profiles = VARIANTS[variant]
    for name, service in compose_model(files, profiles)["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port['published']} on every interface"


def test_grafana_takes_its_admin_password_from_the_environment_and_has_none_of_its_own() -> None:
    grafana = compose_model([BASE_COMPOSE], ("monitoring",))["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ""
    entrypoint = " ".join(grafana["entrypoint"]).replace("$$", "$")  # Compose writes its escape back
    assert 'test -n "$GF_SECURITY_ADMIN_PASSWORD" || {' in entrypoint and entrypoint.endswith("exec /run.sh")
