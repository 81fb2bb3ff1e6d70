"""The Grafana of the Compose `monitoring` profile: provisioned with the Compose Prometheus, and every panel of its
dashboard queries series a real server exports (after one request to a task, on the real tiny engine)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import BASE_COMPOSE, ROOT, compose_model

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "promptserve.json"
METRIC_NAME = re.compile(r"\bpromptserve_[a-z0-9_]+")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    found = []
    for panel in dashboard()["panels"]:
        found += [panel, *panel.get("panels", [])]
    return [panel for panel in found if panel["type"] != "row"]


def queries() -> list[str]:
    """Every PromQL query of the dashboard: its panels' targets and its template variables."""
    exprs = [target["expr"] for panel in panels() for target in panel["targets"]]
    return exprs + [variable["query"] for variable in query_variables()]


def query_variables() -> list[dict[str, Any]]:
    return [variable for variable in dashboard()["templating"]["list"] if variable["type"] == "query"]


def unexported(names: set[str], exposition: set[str]) -> set[str]:
    """Names a query uses that no sample has. Samples are what Prometheus stores (`_total`, `_bucket`, `_count`,
    `_sum`), so the comparison is exact: a family name such as `promptserve_requests` matches nothing."""
    return names - exposition


def provisioned_datasource() -> dict[str, Any]:
    files = sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
    (datasource,) = [source for file in files for source in yaml.safe_load(file.read_text())["datasources"]]
    return datasource


def test_every_panel_has_a_query() -> None:
    for panel in panels():
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} has a target without expr"


@pytest.mark.slow
def test_every_query_names_a_series_the_server_exports(exported: set[str]) -> None:
    for query in queries():
        names = set(METRIC_NAME.findall(query))
        assert names, f"expected a promptserve_ series in {query!r}"
        assert not unexported(names, exported), f"{query!r} names series the server does not export"


@pytest.mark.slow
def test_every_series_of_the_adapter_host_tier_is_on_the_dashboard(exported: set[str]) -> None:
    """The CPU tier of LoRA and IA3 weights (max_cpu_loras): its hits, misses, entries, capacity and bytes."""
    host_tier = {name for name in exported if name.startswith("promptserve_adapter_host_cache_")}
    host_tier -= {name for name in host_tier if name.endswith("_created")}  # a counter's creation time
    assert host_tier, "expected the server to export promptserve_adapter_host_cache_* series"
    shown = {name for query in queries() for name in METRIC_NAME.findall(query)}
    assert host_tier <= shown, f"not on the dashboard: {sorted(host_tier - shown)}"


def test_a_family_name_without_its_sample_suffix_is_refused() -> None:  # so the check above can fail
    exposition = {"promptserve_requests_total", "promptserve_task_load_seconds_bucket"}
    assert unexported({"promptserve_requests", "promptserve_task_load_seconds"}, exposition) == {
        "promptserve_requests",
        "promptserve_task_load_seconds",
    }


def test_panels_query_the_data_source_variable_which_defaults_to_any_prometheus() -> None:
    """Imported into a Grafana whose Prometheus has another uid, the dashboard still works: it names no uid."""
    datasource = provisioned_datasource()
    assert (datasource["type"], datasource["url"]) == ("prometheus", "http://prometheus:9090")
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["type"] == "datasource"]
    assert (variable["name"], variable["query"]) == ("datasource", "prometheus")
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for item in [*panels(), *(t for panel in panels() for t in panel["targets"]), *query_variables()]:
        assert item["datasource"] == expected, f"{item.get('title') or item.get('refId')}: {item['datasource']}"
    assert datasource["uid"] not in DASHBOARD.read_text()


def test_every_series_a_panel_reads_is_scoped_to_the_chosen_instances_and_replicas() -> None:
    names = {variable["name"] for variable in query_variables()}
    assert {"instance", "replica"} <= names
    for query in [target["expr"] for panel in panels() for target in panel["targets"]]:
        for selector in re.findall(r"promptserve_[a-z0-9_]+(\{[^}]*\})?", query):
            assert 'instance=~"$instance"' in selector and 'replica=~"$replica"' in selector, query


def test_dashboard_has_the_promised_panels() -> None:
    titles = " | ".join(panel["title"] for panel in panels()).lower()
    for subject in ("request rate", "tokens/s", "latency", "first token", "queue", "batch size", "kv cache",
                    "hit ratio", "resident", "evictions", "load time", "host tier"):  # fmt: skip
        assert subject in titles, f"no panel about {subject}"


def test_monitoring_profile_mounts_grafana_provisioning_and_dashboards() -> None:
    services = compose_model([BASE_COMPOSE], ("monitoring",))["services"]
    grafana = services["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    assert re.fullmatch(r"grafana/grafana:12\.\d+\.\d+", grafana["image"])
    binds = {Path(v["source"]): v["target"] for v in grafana["volumes"] if v["type"] == "bind"}
    assert binds[GRAFANA / "provisioning"] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "promptserve.yml").read_text())["providers"]
    assert binds[DASHBOARD.parent] == provider["options"]["path"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == (
        f"{provider['options']['path']}/{DASHBOARD.name}"
    )
    assert "prometheus" in services and grafana["ports"][0]["target"] == 3000
