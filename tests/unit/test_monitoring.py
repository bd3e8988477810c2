"""The monitoring shipped with the project: alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`), and every metric the rules and the Grafana dashboard query is one the gateway
exports (names taken from a real gateway's registry)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from enclave_tokenizer.gateway import Gateway
from enclave_tokenizer.parent import GatewayConfig
from enclave_tokenizer.supervisor_state import StatusFile

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "monitoring" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "monitoring" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "nitro-enclaves-fleet.json"
# Series Prometheus itself adds to every scrape target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "unknown": ("",)}
_PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make setup` installs Debian's prometheus package (it ships promtool)"
    return path


def exported_names(tmp_path: Path) -> set[str]:
    """Every series name a gateway's /metrics can carry, from its registry (all optional parts present)."""
    status = tmp_path / "tok.json.status"
    report = StatusFile(status)
    report.relaunched("stopped")
    report.report("running", None)
    gateway = Gateway(GatewayConfig(enclave_cid=16, supervisor_status_file=str(status)))
    metrics = gateway.metrics
    assert metrics is not None
    metrics.health = {"provisioned": True, "key_check": "deadbeef", "key_generation": 1}
    metrics.attested_at, metrics.attest_ok, metrics.canary_ok, metrics.canary_at = time.time(), True, True, time.time()
    names = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left once strings, label matchers, grouping
    clauses, ranges, Grafana variables and function calls are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        if match.group(2) is None and match.group(1) not in _PROMQL_WORDS:
            names.add(match.group(1))
    return names


def test_metric_names_parser() -> None:
    assert metric_names('sum by (instance, le) (rate(a_total{route=~"/v1/.*",x="y z"}[5m])) / b > 0.25') == {
        "a_total",
        "b",
    }
    assert metric_names("histogram_quantile(0.99, c_bucket) and on(instance) d == 1") == {"c_bucket", "d"}


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    check = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 11 rules found" in check.stdout
    run = subprocess.run(
        [promtool(), "test", "rules", ALERTS_TEST.name], capture_output=True, text=True, cwd=ALERTS_TEST.parent
    )
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


def test_every_alert_is_unit_tested_and_required_alerts_exist() -> None:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert names == tested
    for required in ("EnclaveDown", "EnclaveNotProvisioned", "EnclaveAttestationFailing", "EnclaveAttestationStale"):
        assert required in names
    assert {"EnclaveGatewayErrorRate", "EnclaveGatewayLatencyHigh"} <= names


def test_alerts_and_dashboard_query_only_exported_metrics(tmp_path: Path) -> None:
    exported = exported_names(tmp_path) | PROMETHEUS_SERIES
    assert {"enclave_tokenizer_gateway_requests_total", "enclave_tokenizer_supervisor_relaunches_total"} <= exported
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert metric_names(rule["expr"]) <= exported, (rule["alert"], metric_names(rule["expr"]) - exported)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    # Grafana's label_values(metric, label): the metric is the query.
    variables = [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    exprs += [re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", v) for v in variables]
    assert len(exprs) >= 15
    used = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, (expr, names - exported)
        used |= names
    # The fleet view the issue asks for: state, throughput, latency, errors, relaunches.
    for name in (
        "enclave_tokenizer_enclave_up",
        "enclave_tokenizer_tokens_processed_total",
        "enclave_tokenizer_gateway_request_duration_seconds_bucket",
        "enclave_tokenizer_gateway_requests_total",
        "enclave_tokenizer_supervisor_relaunches_total",
    ):
        assert name in used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "nitro-enclaves-fleet"


@pytest.mark.parametrize("path", [ALERTS, ALERTS_TEST])
def test_rule_files_are_yaml(path: Path) -> None:
    assert isinstance(yaml.safe_load(path.read_text()), dict)


FLEET_INVENTORY = """
all:
  children:
    prometheus:
      hosts:
        localhost:
          ansible_connection: local
          ansible_python_interpreter: "{{ ansible_playbook_python }}"
    enclave_hosts:
      hosts:
        h1: {ansible_host: 10.0.0.5, vsock_tokenizer_gateway_listen: "0.0.0.0:9100"}
        h2: {}
        h3: {vsock_tokenizer_metrics: false}
        h4:
          monitoring_target_host: h4.internal
          vsock_tokenizer_gateway_listen: "127.0.0.1:8081"
          nitro_enclave_name: pay
"""


def run_monitoring_play(inventory: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [str(ROOT / ".venv" / "bin" / "ansible-playbook"), "-i", str(inventory), "playbooks/monitoring.yml"]
    command += ["-e", f"monitoring_file_sd_path={out}/file_sd/nitro-enclaves.json", "-e", f"monitoring_rules_dir={out}"]
    return subprocess.run([*command, *extra], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_monitoring_play_writes_the_fleet_file_sd_targets_and_rules(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(FLEET_INVENTORY)
    out = tmp_path / "prometheus"
    run = run_monitoring_play(inventory, out)
    assert run.returncode == 0, run.stdout[-3000:]
    targets = json.loads((out / "file_sd" / "nitro-enclaves.json").read_text())
    assert targets == [
        {"targets": ["10.0.0.5:9100"], "labels": {"host": "h1", "enclave_name": "tokenizer"}},  # wildcard: ansible_host
        {"targets": ["127.0.0.1:8080"], "labels": {"host": "h2", "enclave_name": "tokenizer"}},  # the role's default
        {"targets": ["h4.internal:8081"], "labels": {"host": "h4", "enclave_name": "pay"}},  # h3: metrics off
    ]
    assert (out / "nitro-enclaves.yml").read_text() == ALERTS.read_text()
    # Prometheus itself accepts the file_sd file and the installed rules.
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(out / "nitro-enclaves.yml")],
                "scrape_configs": [
                    {
                        "job_name": "nitro-enclaves-gateway",
                        "file_sd_configs": [{"files": [str(out / "file_sd" / "nitro-enclaves.json")]}],
                    }
                ],
            }
        )
    )
    check = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 11 rules found" in check.stdout, check.stdout + check.stderr
    again = run_monitoring_play(inventory, out)
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout[-3000:]
    wrong = run_monitoring_play(inventory, out, "-e", "monitoring_target_group=nope")
    assert wrong.returncode != 0 and "monitoring_target_group=nope is not an inventory group" in wrong.stdout
