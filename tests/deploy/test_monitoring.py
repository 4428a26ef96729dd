"""The monitoring files: Prometheus's config and alert rules pass promtool (and the rules' unit tests), the config
scrapes the metrics ports `make run` opens, and the Grafana dashboard is a well-formed dashboard over
logbroker's metrics. (That every metric they name exists in a real scrape: tests/cluster/test_metrics.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from logbroker.server.cli import DEV_BASE_PORT, DEV_BROKERS, DEV_HOST
from logbroker.server.dev import METRICS_PORT_OFFSET

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "logbroker-dashboard.json"

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool is not installed: install Debian's prometheus package: "
                             "apt-get install prometheus")


def run_promtool(*args: str) -> str:
    assert promtool is not None
    done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    assert "SUCCESS" in run_promtool("check", "rules", str(ALERTS))


@needs_promtool
def test_promtool_accepts_the_prometheus_config() -> None:
    assert "SUCCESS" in run_promtool("check", "config", str(CONFIG))


@needs_promtool
def test_the_alert_rules_fire_as_their_unit_tests_say() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", str(ALERT_TESTS))


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel's PromQL, its Grafana variables filled in, as a recording rule: promtool parses it."""
    exprs = [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
             for target in panel.get("targets", [])]
    rules = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "1m").replace("$topic", ".*")}
             for i, expr in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run_promtool("check", "rules", str(path))


def test_the_alerts_cover_what_operators_watch() -> None:
    rules = {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    for alert, metric in (("LogbrokerQueueDepthHigh", "logbroker_share_available_records"),
                          ("LogbrokerConsumerLagHigh", "logbroker_group_lag_records"),
                          ("LogbrokerOldestMessageOld", "logbroker_share_oldest_available_age_seconds"),
                          ("LogbrokerErrorRateHigh", "logbroker_request_errors_total"),
                          ("LogbrokerOfflinePartitions", "logbroker_partition_offline"),
                          ("LogbrokerUnderReplicatedPartitions", "logbroker_partition_under_replicated")):
        assert alert in rules, f"no {alert} rule"
        assert metric in rules[alert]["expr"]
        assert rules[alert]["annotations"]["summary"]


def test_the_config_scrapes_the_metrics_ports_of_make_run() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "logbroker"]
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == [f"{DEV_HOST}:{DEV_BASE_PORT + METRICS_PORT_OFFSET + n}" for n in range(DEV_BROKERS)]
    assert config["rule_files"] == ["alerts.yml"]


def test_the_dashboard_is_a_grafana_dashboard_over_logbroker_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    exprs = []
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["refId"] and target["expr"]
            exprs.append(target["expr"])
            used = set(re.findall(r"\b(logbroker_[a-z_]+|up)\b", target["expr"]))
            assert used, f"panel {panel['title']!r} queries no logbroker metric: {target['expr']}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    for wanted in ("logbroker_group_lag_records", "logbroker_share_available_records",
                   "logbroker_share_oldest_available_age_seconds", "logbroker_partition_produced_records_total",
                   "logbroker_request_duration_seconds_bucket", "logbroker_request_errors_total",
                   "logbroker_fsync_duration_seconds_bucket", "logbroker_partition_offline"):
        assert any(wanted in expr for expr in exprs), f"the dashboard shows no {wanted}"
