"""The gateway's GET /metrics against the real tokenizer server on emulated vsock: series move with
traffic and enclave state, the supervisor's status file is exported, and no card number, token, key or
capability appears anywhere in a scrape."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import test_client_gateway as gateway_tests
from aiohttp import web
from enclave_tokenizer.metrics import key_check_number, result_code
from enclave_tokenizer.supervisor_state import StatusFile
from prometheus_client.parser import text_string_to_metric_families
from test_client_gateway import TK, GatewayThread, _gateway_config
from tokenizer_harness import CAPABILITY, TEST_KEY, running_server

PANS = ["4111111111111111", "5500000000000004", "340000000000009", "6011000000000004"]


vsock_dir = gateway_tests.vsock_dir  # the emulated vsock directory of the gateway tests


@pytest.fixture(autouse=True)
def no_nsm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NITRO_NSM_SOCKET", raising=False)  # attestation fails fast: no NSM here


def scrape(gw: GatewayThread) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    with urllib.request.urlopen(gw.url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def requests(samples: dict, route: str, op: str, code: str) -> float | None:
    return value(samples, "enclave_tokenizer_gateway_requests_total", route=route, op=op, code=code)


def test_metrics_follow_traffic_and_enclave_state_and_never_carry_secrets(vsock_dir: Path, tmp_path: Path) -> None:
    status = tmp_path / "tok.json.status"
    config = _gateway_config(tmp_path, supervisor_status_file=str(status), metrics_self_check_interval=0.2)
    with GatewayThread(config) as gw:
        with running_server(vsock_dir) as srv:
            srv.provision_directly()
            gw.wait_health(200)
            for pan in PANS:
                assert gw.request("POST", "/v1/tokenize", {"pan": pan})[0] == 200
            code, batch = gw.request("POST", "/v1/tokenize", {"pans": [*PANS, "4111111111111112"], "mode": "fpe"})
            assert code == 200 and len(batch["errors"]) == 1
            code, rev = gw.request("POST", "/v1/tokenize", {"pan": PANS[0], "mode": "reversible"})
            headers = {"X-Detokenize-Capability": CAPABILITY}
            assert gw.request("POST", "/v1/detokenize", {"token": rev["token"]}, headers)[0] == 200
            assert gw.request("POST", "/v1/detokenize", {"token": rev["token"]})[0] == 403
            assert gw.request("POST", "/v1/tokenize", {"pan": "4111111111111112"})[0] == 400
            assert gw.request("GET", "/no/such/4111111111111111")[0] == 404
            # The supervisor's report: one relaunch of an enclave that stopped.
            report = StatusFile(status)
            report.relaunched("stopped")
            report.report("running", None, running="current")
            deadline = time.monotonic() + 10
            while True:  # the self-check has run once (attestation fails here: no NSM)
                text, samples = scrape(gw)
                if value(samples, "enclave_tokenizer_canary_ok") is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            tokens = [t for t in batch["tokens"] if t] + [rev["token"]]
            secrets = [*PANS, "4111111111111112", *tokens, TEST_KEY.hex(), CAPABILITY]
            for secret in [*secrets, config.detokenize_capability_sha256]:
                assert secret not in text
            assert requests(samples, "/v1/tokenize", "tokenize", "ok") == 6
            assert requests(samples, "/v1/tokenize", "tokenize", "invalid_pan") == 1
            assert requests(samples, "/v1/detokenize", "detokenize", "forbidden") == 1
            assert requests(samples, "unmatched", "none", "not_found") == 1
            assert value(samples, "enclave_tokenizer_gateway_request_duration_seconds_count", route="/v1/tokenize") == 7
            # 4 singles + 4 of the batch + the reversible one (+ canaries); the refused batch item apart.
            assert value(samples, "enclave_tokenizer_tokens_processed_total", op="tokenize") >= 9
            assert value(samples, "enclave_tokenizer_token_errors_total", op="tokenize") == 1
            assert value(samples, "enclave_tokenizer_tokens_processed_total", op="detokenize") == 1
            assert value(samples, "enclave_tokenizer_enclave_requests_total", op="detokenize", code="forbidden") == 1
            assert value(samples, "enclave_tokenizer_enclave_request_duration_seconds_count", op="tokenize") >= 7
            assert value(samples, "enclave_tokenizer_enclave_up") == 1
            assert value(samples, "enclave_tokenizer_key_provisioned") == 1
            assert value(samples, "enclave_tokenizer_key_check") == int(TK.key_check, 16)
            assert value(samples, "enclave_tokenizer_pool_connections") >= 1
            assert value(samples, "enclave_tokenizer_pool_size") == config.pool_size
            assert value(samples, "enclave_tokenizer_canary_ok") == 1
            assert value(samples, "enclave_tokenizer_attestation_ok") == 0
            assert value(samples, "enclave_tokenizer_attestation_age_seconds") == float("inf")
            assert value(samples, "enclave_tokenizer_attestation_failures_total") >= 1
            assert value(samples, "enclave_tokenizer_supervisor_relaunches_total") == 1
            assert value(samples, "enclave_tokenizer_supervisor_state", state="running") == 1
            assert value(samples, "enclave_tokenizer_supervisor_last_relaunch_reason", reason="stopped") == 1
            assert value(samples, "enclave_tokenizer_supervisor_last_relaunch_timestamp_seconds") > time.time() - 60
        # The enclave is gone: the next scrape says so at once.
        _, samples = scrape(gw)
        assert value(samples, "enclave_tokenizer_enclave_up") == 0
        assert value(samples, "enclave_tokenizer_key_provisioned") == 0
        assert value(samples, "enclave_tokenizer_key_check") is None


def test_metrics_off_is_a_404(vsock_dir: Path, tmp_path: Path) -> None:
    with GatewayThread(_gateway_config(tmp_path, metrics=False)) as gw:
        try:
            urllib.request.urlopen(gw.url + "/metrics", timeout=10)
        except urllib.error.HTTPError as err:
            assert err.code == 404 and json.loads(err.read())["error"]["code"] == "not_found"
        else:
            raise AssertionError("/metrics answered with metrics off")


def test_result_codes_and_key_check_are_bounded() -> None:
    # A body quoting a token or a card number as its "code" never becomes a label.
    for body in ({"error": {"code": "4111111111111111"}}, {"error": {"code": "ab" * 16}}, ["x"], "not json"):
        response = web.Response(body=json.dumps(body).encode() if body != "not json" else b"{", status=400)
        assert result_code(response) == "other"
    assert result_code(web.json_response({"error": {"code": "invalid_pan"}}, status=400)) == "invalid_pan"
    assert result_code(web.json_response({"status": "unavailable"}, status=503)) == "unavailable"
    assert result_code(web.json_response({}, status=200)) == "ok"
    assert key_check_number("deadbeef") == 0xDEADBEEF
    assert key_check_number("4111111111111111") is None and key_check_number(None) is None


def test_metrics_options_are_checked(tmp_path: Path) -> None:
    from enclave_tokenizer.parent import ConfigError, GatewayConfig

    config = tmp_path / "gateway.yaml"
    for text, message in (
        ("metrics: 'yes please'", "metrics='yes please': expected true or false"),
        ("metrics_self_check_interval: -1", "metrics_self_check_interval must be seconds >= 0 (0: off), not -1"),
    ):
        config.write_text(f"enclave_cid: 16\n{text}\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            GatewayConfig.load(config)
    config.write_text("enclave_cid: 16\nmetrics: false\nmetrics_self_check_interval: 0\n")
    assert GatewayConfig.load(config).metrics is False
