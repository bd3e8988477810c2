"""plugins/modules/nitro_enclave_info.py under patch_module_args against the fake nitro-cli and a fake sysfs:
what it reports, that it never changes anything (check mode included), and its failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nitro_fakes import FakeHost, load_module, make_eif, make_sysfs, run_module

MODULE = load_module("nitro_enclave_info")
RUNNING = {
    "EnclaveName": "tok",
    "EnclaveID": "i-0000000000000000-enc1",
    "EnclaveCID": 16,
    "NumberOfCPUs": 2,
    "CPUIDs": [1, 5],
    "MemoryMiB": 512,
    "State": "RUNNING",
    "Flags": "NONE",
}


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    monkeypatch.setenv("NITRO_EMULATED", "1")
    return FakeHost(tmp_path, monkeypatch)


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, **args: Any) -> dict[str, Any]:
    sysfs = make_sysfs(tmp_path / "sysfs", cpus=8, threads=2)
    defaults = {"sysfs_root": str(sysfs), "allocator_config": str(tmp_path / "allocator.yaml")}
    return run_module(MODULE, {**defaults, **args}, capsys)


def test_reports_enclaves_eif_and_allocator(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    eif = tmp_path / "app.eif"
    measurements = make_eif(eif, b"APP-1")
    host.state.write_text(json.dumps({"enclaves": [RUNNING], "next": 2}))
    (tmp_path / "allocator.yaml").write_text("---\nmemory_mib: 1024\ncpu_count: 2\n")
    host.emulator_home.mkdir()
    (host.emulator_home / "allocator.json").write_text(json.dumps({"cpu_pool": [1, 5], "memory_mib": 1024}))

    result = run(capsys, tmp_path, path=str(eif))

    assert result["changed"] is False
    assert result["enclaves"] == [RUNNING]
    assert result["nitro_cli"] == str(host.cli)
    assert result["eif_exists"] is True
    assert result["eif"]["Measurements"]["PCR0"] == measurements["PCR0"]
    allocator = result["allocator"]
    assert allocator["config"] == {"memory_mib": 1024, "cpu_count": 2}
    assert allocator["config_error"] is None
    assert allocator["applied"]["cpu_pool"] == "1,5"
    assert allocator["applied"]["memory_mib"] == 1024
    assert allocator["topology"]["parent_cpus"] == "0,4"
    facts = result["ansible_facts"]["nitro_enclaves"]
    assert facts == {key: result[key] for key in ("enclaves", "nitro_cli", "eif_exists", "eif", "allocator")}
    # Read-only: only describe calls reached nitro-cli.
    assert sorted(set(host.subcommands())) == ["describe-eif", "describe-enclaves"]


def test_check_mode_same_answer_no_change(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    host.state.write_text(json.dumps({"enclaves": [RUNNING], "next": 2}))
    normal = run(capsys, tmp_path)
    checked = run(capsys, tmp_path, _ansible_check_mode=True)
    assert checked["changed"] is False
    assert checked["enclaves"] == normal["enclaves"] == [RUNNING]
    assert json.loads(host.state.read_text())["enclaves"] == [RUNNING]


def test_image_not_built_yet_is_not_a_failure(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path
) -> None:
    result = run(capsys, tmp_path, path=str(tmp_path / "missing.eif"))
    assert result.get("failed") is not True
    assert result["eif_exists"] is False
    assert result["eif"] is None
    assert result["allocator"]["config"] is None  # no allocator.yaml either
    assert "describe-eif" not in host.subcommands()


def test_invalid_allocator_config_reported(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    (tmp_path / "allocator.yaml").write_text("---\nmemory_mib: 1024\n")
    result = run(capsys, tmp_path)
    assert result["allocator"]["config"] is None
    assert "cpu_count" in result["allocator"]["config_error"]


def test_unreadable_eif_fails_naming_it(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    bad = tmp_path / "bad.eif"
    bad.write_bytes(b"not an eif")
    result = run(capsys, tmp_path, path=str(bad))
    assert result["failed"] is True
    assert result["msg"].startswith("nitro-cli failed:")
    assert result["cmd"][-1] == str(bad)


def test_explicit_missing_nitro_cli_fails(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    result = run(capsys, tmp_path, nitro_cli_path=str(tmp_path / "no-such-nitro-cli"))
    assert result["failed"] is True
    assert "no-such-nitro-cli" in result["msg"]
