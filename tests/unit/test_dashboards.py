"""The dashboard and the alert rules name only metrics the code defines, and every
service serves its metrics over HTTP on the port bus.yaml gives it
(bus/metrics_http.py). Whether each query returns data from a running
bus is tests/integration/test_dashboards.py."""
from __future__ import annotations

import json
import logging
import re
import urllib.request
from pathlib import Path

import pytest
import yaml

from bus import metrics as _bus_metrics  # noqa: F401  (its series are in the registry)
from bus.metrics_http import ENV_PORT, MetricsHttp, metrics_port
from bus.settings import load_config, retailbus_settings
from services.up import scrape_targets
from tests.conftest import free_port

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "config" / "dashboards" / "retailbus.json"
ALERTS = ROOT / "config" / "alerts.yml"
METRIC = re.compile(r"\bretailbus_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum")


def dashboard_exprs() -> list[str]:
    """Every PromQL query of the dashboard, wherever a panel keeps it."""
    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield node["expr"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)
    return list(walk(json.loads(DASHBOARD.read_text())))


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def defined_metrics() -> set[str]:
    """Metric names given to prometheus_client in the product code."""
    names = set()
    for folder in ("services", "routing", "legacy_wrappers", "bus"):
        for path in (ROOT / folder).rglob("*.py"):
            names.update(re.findall(r"""["'](retailbus_[a-z0-9_]+)["']""", path.read_text()))
    return names


def undefined(exprs: list[str]) -> set[str]:
    known = defined_metrics()
    missing = set()
    for expr in exprs:
        for name in METRIC.findall(expr):
            base = next((name[: -len(s)] for s in SUFFIXES if name.endswith(s)), name)
            if name not in known and base not in known:
                missing.add(name)
    return missing


def test_the_dashboard_covers_what_issue_7_asks_for():
    exprs = " ".join(dashboard_exprs())
    for metric in ("retailbus_route_messages_total", "retailbus_shadow_parity_ratio", "retailbus_outbox_depth",
                   "retailbus_outbox_oldest_unsent_seconds", "retailbus_dlq_depth", "retailbus_breaker_open",
                   "retailbus_cdc_lag_seconds", "retailbus_filedrop_rows_total", "retailbus_filedrop_files_total",
                   "retailbus_reconciliation_gap"):
        assert metric in exprs, metric


def test_the_dashboard_shows_what_retention_pruned_by_kind_as_issue_25_asks():
    assert any("retailbus_pruned_total" in e and "by (what)" in e for e in dashboard_exprs())


def test_the_dashboard_and_the_alerts_cover_loyalty_and_crm_as_issue_18_asks():
    exprs = " ".join(dashboard_exprs())
    alerts = " ".join(r["expr"] for r in alert_rules())
    for metric in ("retailbus_loyalty_authorisation_seconds", "retailbus_agent_loyalty_authorisation_seconds",
                   "retailbus_loyalty_authorisations_total", "retailbus_loyalty_accrual_lag_seconds",
                   "retailbus_legacy_calls_total", "retailbus_loyalty_shadow_parity_ratio"):
        assert metric in exprs and metric in alerts, metric
    assert 'system=~"loyalty_platform|crm"' in exprs and "retailbus_breaker_open" in alerts
    assert 'outcome="offline"' in alerts and "retailbus_outbox_unroutable_events" in alerts


def test_the_dashboard_and_the_alerts_cover_business_exception_cases_as_issue_19_asks():
    exprs = " ".join(dashboard_exprs())
    alerts = {r["alert"]: r["expr"] for r in alert_rules()}
    assert "retailbus_cases_open" in exprs and "retailbus_cases_overdue" in exprs
    assert "retailbus_cases_overdue" in alerts["RetailbusCaseOverdue"]


def test_the_dashboard_and_the_alerts_cover_process_instances_as_issue_19_asks():
    """Instances by process and state, step latency, compensations and timeouts (bus/process)."""
    exprs, alerts = " ".join(dashboard_exprs()), {r["alert"]: r["expr"] for r in alert_rules()}
    for metric in ("retailbus_process_instances", "retailbus_process_step_seconds_bucket",
                   "retailbus_process_transitions_total"):
        assert metric in exprs, metric
    assert "retailbus_process_timeouts_total" in alerts["RetailbusProcessStepTimeouts"]
    assert "retailbus_process_compensations_total" in alerts["RetailbusProcessCompensationFailed"]


def test_dashboard_queries_name_only_defined_metrics():
    assert undefined(dashboard_exprs()) == set()


def test_alert_rules_name_only_defined_metrics_and_say_what_to_do():
    rules = alert_rules()
    assert undefined([r["expr"] for r in rules]) == set()
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    assert len({r["alert"] for r in rules}) == len(rules)


def test_every_panel_reads_the_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_shipped_config_gives_every_service_a_distinct_metrics_port():
    config = load_config(ROOT / "config" / "bus.yaml")
    services = config["RETAILBUS"]["services"]
    ports = [s.get("metrics_port") for s in services.values()]
    assert None not in ports, services
    stores = [int(s["http"].rsplit(":", 1)[1]) for s in config["RETAILBUS"]["stores"]]
    assert len(set(ports + stores)) == len(ports) + len(stores)
    scraped = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    assert scraped["scrape_configs"][0]["file_sd_configs"][0]["files"] == ["../var/prometheus_targets.json"]
    targets = {t for group in scrape_targets(retailbus_settings(config, ROOT / "config" / "bus.yaml"))
               for t in group["targets"]}
    assert targets == {f"127.0.0.1:{p}" for p in ports + stores}


def test_each_of_a_services_processes_is_scraped_on_its_own_port():
    config = load_config(ROOT / "config" / "bus.yaml")
    config["RETAILBUS"]["services"]["erp"]["processes"] = 3
    groups = scrape_targets(retailbus_settings(config, ROOT / "config" / "bus.yaml"))
    erp = [g for g in groups if g["labels"]["service"] == "erp"]
    port = config["RETAILBUS"]["services"]["erp"]["metrics_port"]
    assert erp == [{"targets": [f"127.0.0.1:{port + 100 * i}"], "labels": {"service": "erp", "process": f"erp-{i}"}}
                   for i in range(3)]
    every = [t for g in groups for t in g["targets"]]
    assert len(every) == len(set(every)), "two processes on one port"


def test_metrics_port_comes_from_bus_yaml_or_the_environment(monkeypatch):
    config = {"RETAILBUS": {"services": {"erp": {"module": "services.erp", "metrics_port": 9110},
                                         "files": {"module": "services.files"}}}}
    monkeypatch.delenv(ENV_PORT, raising=False)
    assert metrics_port(config, "erp") == 9110
    assert metrics_port(config, "files") is None
    assert metrics_port(config, "unknown") is None
    monkeypatch.setenv(ENV_PORT, "9199")
    assert metrics_port(config, "files") == 9199
    monkeypatch.setenv(ENV_PORT, "nine")
    with pytest.raises(ValueError, match=f"{ENV_PORT}: 'nine' is not a port number"):
        metrics_port(config, "erp")


class Probe:
    name = "probe"
    metrics = MetricsHttp()


def probe_config(port: int) -> dict:
    return {"AMQP_URI": "amqp://unused", "RETAILBUS": {"services": {"probe": {"module": "x", "metrics_port": port}}}}


def test_a_service_serves_the_process_metrics_while_it_runs(container_factory, monkeypatch):
    monkeypatch.delenv(ENV_PORT, raising=False)
    port = free_port()
    container = container_factory(Probe, probe_config(port))
    container.start()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "retailbus_messages_published_total" in text
    container.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_taken_port_is_logged_and_the_service_still_runs(container_factory, monkeypatch, caplog):
    import eventlet

    monkeypatch.delenv(ENV_PORT, raising=False)
    port = free_port()
    taken = eventlet.listen(("127.0.0.1", port), reuse_port=False)
    try:
        container = container_factory(Probe, probe_config(port))
        with caplog.at_level(logging.ERROR, logger="bus.metrics_http"):
            container.start()
        assert f"metrics of probe not served: 127.0.0.1:{port}" in caplog.text
        assert container.started
        container.stop()
    finally:
        taken.close()


def test_the_dashboard_and_the_alerts_cover_click_and_collect_as_issue_20_asks():
    exprs = " ".join(dashboard_exprs())
    for metric in ("retailbus_orders", "retailbus_order_ready_seconds_bucket", "retailbus_orders_closed_total",
                   "retailbus_orders_stuck", "retailbus_agent_fulfilment_open"):
        assert metric in exprs, metric
    assert any("retailbus_orders_stuck" in rule["expr"] for rule in alert_rules())
