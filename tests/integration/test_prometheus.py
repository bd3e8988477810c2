"""A real Prometheus (Debian's `prometheus`, on a loopback port) scrapes an emulated parent's gateway
every second through the file_sd targets playbooks/monitoring.yml writes, with the project's alert
rules loaded; through its HTTP API the series exist, move with traffic, and show an enclave kill (the
enclave-up dip, the supervisor's relaunch count, the EnclaveDown alert pending); no card number or token
is in any series. The parent is the fault tests' (tests/bench/chaos.py): supervisor, local KMS, gateway.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.bench import chaos
from tests.conftest import REPO_ROOT, VENV_BIN, free_port, wait_for_port

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]

PANS = ["4111111111111111", "5500000000000004", "340000000000009", "6011000000000004", "3530111333300000"]
JOB = "nitro-enclaves-gateway"  # the alert rules' job


@pytest.fixture(scope="module")
def parent(docker_engine: str) -> Iterator[chaos.Parent]:
    # The base image only; the self-check every second: attestation age and canary move in seconds.
    with chaos.emulated_parent("prom", only=(), metrics_self_check_interval=1) as the_parent:
        yield the_parent


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> object:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None: no series)."""
        result = self.api("query", query=expr)["result"]  # type: ignore[index]
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def wait(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        start = time.monotonic()
        while not check():
            assert time.monotonic() - start < timeout, f"Prometheus did not show {what} within {timeout:.0f} s"
            time.sleep(0.5)
        return time.monotonic() - start

    def ready(self) -> bool:
        """Prometheus answers 503 on every route until its TSDB is open; /-/ready says when it is."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as answer:
                return answer.status == 200
        except urllib.error.HTTPError as error:
            if error.code == 503:
                return False
            raise


@pytest.fixture
def prometheus(parent: chaos.Parent, tmp_path: Path) -> Iterator[Prometheus]:
    inventory = tmp_path / "inventory.yml"
    listen = f"127.0.0.1:{parent.gateway_config['listen_port']}"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "prometheus": {"hosts": {"localhost": {"ansible_connection": "local"}}},
                        "enclave_hosts": {"hosts": {"emulated": {"vsock_tokenizer_gateway_listen": listen}}},
                    }
                }
            }
        )
    )
    play = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), "playbooks/monitoring.yml",
         "-e", f"monitoring_file_sd_path={tmp_path}/file_sd/nitro-enclaves.json",
         "-e", f"monitoring_rules_dir={tmp_path}",
         "-e", "ansible_python_interpreter=" + str(VENV_BIN / "python")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    assert play.returncode == 0, play.stdout[-3000:]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(tmp_path / "nitro-enclaves.yml")],
                "scrape_configs": [
                    {
                        "job_name": JOB,
                        "file_sd_configs": [
                            {"files": [str(tmp_path / "file_sd" / "nitro-enclaves.json")], "refresh_interval": "1s"}
                        ],
                    }
                ],
            }
        )
    )
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make setup` installs Debian's prometheus package"
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        server = Prometheus(f"http://127.0.0.1:{port}")
        server.wait("itself ready (/-/ready)", server.ready, 60)
        yield server
    finally:
        proc.terminate()
        proc.wait(20)


def tokenize(parent: chaos.Parent, body: dict[str, object]) -> dict[str, object]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(f"{parent.url}/v1/tokenize", data=data, method="POST")
    with urllib.request.urlopen(request, timeout=90) as answer:
        return json.loads(answer.read())


def test_prometheus_sees_traffic_and_an_enclave_kill(parent: chaos.Parent, prometheus: Prometheus) -> None:
    started = time.monotonic()
    p = prometheus
    p.wait(
        "the gateway up and the enclave up",
        lambda: p.value(f'up{{job="{JOB}"}}') == 1 and p.value("enclave_tokenizer_enclave_up") == 1,
        30,
    )
    assert p.value("enclave_tokenizer_key_provisioned") == 1
    assert (p.value("enclave_tokenizer_key_check") or 0) > 0
    assert p.value('enclave_tokenizer_supervisor_state{state="running"}') == 1
    tokens = 'sum(enclave_tokenizer_tokens_processed_total{op="tokenize"})'
    answered = 'sum(enclave_tokenizer_gateway_requests_total{route="/v1/tokenize",code="ok"})'
    tokens_before, answered_before = p.value(tokens) or 0, p.value(answered) or 0
    relaunches_before = p.value("enclave_tokenizer_supervisor_relaunches_total")
    assert relaunches_before is not None
    # Traffic: 20 single requests and a batch of 20.
    seen: list[str] = []
    for pan in PANS * 4:
        seen.append(str(tokenize(parent, {"pan": pan})["token"]))
    seen.extend(str(t) for t in tokenize(parent, {"pans": PANS * 4, "mode": "fpe"})["tokens"])  # type: ignore[union-attr]
    p.wait("the tokens counted", lambda: (p.value(tokens) or 0) >= tokens_before + 40, 15)
    assert (p.value(answered) or 0) >= answered_before + 21
    assert (p.value('sum(rate(enclave_tokenizer_enclave_request_duration_seconds_count{op="tokenize"}[30s]))') or 0) > 0
    latency = "enclave_tokenizer_gateway_request_duration_seconds_bucket"
    p99 = f'histogram_quantile(0.99, sum by (le) (rate({latency}{{route="/v1/tokenize"}}[30s])))'
    p.wait("a p99 latency of /v1/tokenize", lambda: p.value(p99) is not None, 15)  # a rate needs two scrapes
    # The gateway's self-check (every second here) attests the enclave and tokenizes the canary.
    p.wait(
        "a recent valid attestation and a good canary",
        lambda: (
            (p.value("enclave_tokenizer_attestation_age_seconds") or 1e9) < 30
            and p.value("enclave_tokenizer_canary_ok") == 1
        ),
        30,
    )
    traffic_done = time.monotonic()
    # The enclave is killed: the supervisor relaunches it, the gateway provisions it again.
    chaos.kill_enclave(parent)
    p.wait("the enclave down", lambda: p.value("enclave_tokenizer_enclave_up") == 0, 20)
    p.wait(
        "the relaunch counted",
        lambda: (p.value("enclave_tokenizer_supervisor_relaunches_total") or 0) >= relaunches_before + 1,
        60,
    )
    p.wait(
        "the enclave up and provisioned again",
        lambda: p.value("enclave_tokenizer_enclave_up") == 1 and p.value("enclave_tokenizer_key_provisioned") == 1,
        90,
    )
    recovered = time.monotonic()
    assert p.value("min_over_time(enclave_tokenizer_enclave_up[5m])") == 0
    assert p.value('sum(enclave_tokenizer_supervisor_last_relaunch_reason{reason=~"stopped|unresponsive"})') == 1
    # The alert rules are loaded and evaluated: EnclaveDown went pending while the enclave was down.
    assert p.value('max_over_time(ALERTS{alertname="EnclaveDown",alertstate="pending"}[5m])') == 1
    # Over before its `for: 1m`: it never fired, and it clears at the next rule evaluations (1 s apart).
    assert p.value('max_over_time(ALERTS{alertname="EnclaveDown",alertstate="firing"}[5m])') is None
    p.wait("EnclaveDown cleared", lambda: p.value('ALERTS{alertname="EnclaveDown"}') is None, 15)
    # No card number or token in any series Prometheus holds (names, labels, values).
    series = p.api("series", **{"match[]": f'{{job="{JOB}"}}', "start": str(time.time() - 600)})
    names = p.api("label/__name__/values")
    dump = json.dumps([series, names])
    assert "enclave_tokenizer_gateway_requests_total" in dump
    for secret in [*PANS, *seen]:
        assert secret not in dump
    print(
        f"\nprometheus: traffic seen in {traffic_done - started:.1f} s; enclave kill -> relaunch counted and "
        f"provisioned again in {recovered - traffic_done:.1f} s; {len(series)} series"  # type: ignore[arg-type]
    )
