"""`enclave-tokenizer` without --config or NITRO_VSOCK_DIR finds what the roles set up: the gateway
configuration vsock_tokenizer writes and, on an emulated host, the emulator's vsock directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import vsock as vsock_transport
from enclave_tokenizer import cli, parent
from enclave_tokenizer.tokens import Tokenizer
from tokenizer_harness import TEST_KEY, running_server

PAN = "4111111111111111"


def test_default_config_is_the_roles_then_the_legacy_path_and_the_env_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    role, legacy = tmp_path / "role.yaml", tmp_path / "legacy.yaml"
    monkeypatch.setattr(parent, "CONFIG_PATHS", (str(role), str(legacy)))
    monkeypatch.delenv(parent.CONFIG_ENV, raising=False)
    assert parent.default_config() is None
    legacy.write_text("enclave_cid: 16\n")
    assert parent.default_config() == str(legacy)
    role.write_text("enclave_cid: 16\n")
    assert parent.default_config() == str(role)
    monkeypatch.setenv(parent.CONFIG_ENV, "/elsewhere.yaml")
    assert parent.default_config() == "/elsewhere.yaml"
    assert parent.DEFAULT_CONFIG == "/etc/nitro-enclaves/tokenizer/gateway.yaml"  # roles' vsock_tokenizer_config_dir


def test_emulated_vsock_dir_is_adopted_only_on_an_emulated_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(vsock_transport.ENV_DIR, raising=False)
    monkeypatch.setattr(vsock_transport, "DEFAULT_VSOCK_DIR", str(tmp_path / "vsock"))
    monkeypatch.setattr(parent, "NITRO_DEVICE", str(tmp_path / "nitro_enclaves"))
    assert parent.adopt_emulated_vsock() is None  # no emulator directory: AF_VSOCK
    (tmp_path / "vsock").mkdir()
    (tmp_path / "nitro_enclaves").touch()
    assert parent.adopt_emulated_vsock() is None  # a real Nitro host: never the emulator
    (tmp_path / "nitro_enclaves").unlink()
    assert parent.adopt_emulated_vsock() == str(tmp_path / "vsock")
    monkeypatch.setenv(vsock_transport.ENV_DIR, "/explicit")
    assert parent.adopt_emulated_vsock() == "/explicit"


def test_the_cli_talks_to_the_enclave_with_no_option_and_no_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    vsock_dir = tmp_path / "vsock"
    vsock_dir.mkdir()
    config = tmp_path / "gateway.yaml"
    config.write_text("enclave_cid: 16\nenclave_port: 5000\n")
    monkeypatch.setattr(parent, "CONFIG_PATHS", (str(config),))
    monkeypatch.setattr(parent, "NITRO_DEVICE", str(tmp_path / "nitro_enclaves"))
    monkeypatch.setattr(vsock_transport, "DEFAULT_VSOCK_DIR", str(vsock_dir))
    monkeypatch.delenv(parent.CONFIG_ENV, raising=False)
    monkeypatch.delenv("NITRO_ENCLAVE_CID", raising=False)
    monkeypatch.setenv(vsock_transport.ENV_DIR, str(vsock_dir))  # the server in this process listens there
    with running_server(vsock_dir) as srv:
        srv.provision_directly()
        time.sleep(0.05)
        monkeypatch.delenv(vsock_transport.ENV_DIR)  # what a shell on the host has: nothing
        assert cli.main(["tokenize", PAN]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["token"] == Tokenizer.from_data_key(TEST_KEY).opaque(PAN)


def test_the_gateway_command_takes_the_metrics_switch_the_role_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    from enclave_tokenizer import gateway

    seen: list[list[str]] = []
    monkeypatch.setattr(gateway, "main", lambda argv: seen.append(argv) or 0)
    for switch in ("--metrics", "--no-metrics"):
        assert cli.main(["gateway", "--config", "/etc/x.yaml", switch]) == 0
    assert cli.main(["gateway"]) == 0
    assert seen[0] == ["--config", "/etc/x.yaml", "--metrics"] and seen[1][-1] == "--no-metrics"
    assert not {"--metrics", "--no-metrics"} & set(seen[2])  # no switch: the configuration decides
    for value in (True, False):
        config = parent.GatewayConfig.load(None, enclave_cid=16, metrics=value)
        assert config.metrics is value
