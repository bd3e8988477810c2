"""Placeholder EIFs (the emulator's stand-in kernel/init) never run on a host with the Nitro Enclaves device:
the metadata flag, its detection, and the refusals of nitro_enclave, nitro_eif and the supervisor. The
device is a stand-in file named by NITRO_ENCLAVES_DEVICE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif_provenance import (
    PlaceholderEifError,
    is_placeholder,
    metadata_says_placeholder,
    require_runnable_here,
)
from nitro_fakes import FakeHost, load_module, run_module

from nitro_emulator import build, eif_writer

ENCLAVE = load_module("nitro_enclave")
NITRO_EIF = load_module("nitro_eif")
STAND_IN_KERNEL = build.DEFAULT_BLOBS / "bzImage"
INFO = {
    "BuildTime": "1970-01-01T00:00:00+00:00",
    "BuildTool": "test",
    "BuildToolVersion": "0",
    "OperatingSystem": "Linux",
    "KernelVersion": "4.14",
}


def write(path: Path, *, kernel: bytes = b"REAL-LOOKING-KERNEL", flag: bool = False) -> Path:
    metadata = eif.make_metadata("t", "1.0", INFO, placeholder_blobs=flag)
    eif_writer.write_eif(path, kernel=kernel, cmdline="console=ttyS0", ramdisks=[b"BOOT", b"APP"], metadata=metadata)
    return path


@pytest.fixture
def nitro_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process sees a Nitro host: a stand-in device file, no NITRO_EMULATED override."""
    device = tmp_path / "nitro_enclaves"
    device.write_bytes(b"")
    monkeypatch.setenv("NITRO_ENCLAVES_DEVICE", str(device))
    monkeypatch.delenv("NITRO_EMULATED", raising=False)
    return device


@pytest.fixture
def emulated_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_ENCLAVES_DEVICE", str(tmp_path / "no-such-device"))
    monkeypatch.delenv("NITRO_EMULATED", raising=False)


def test_flag_survives_serialization_and_keeps_the_five_fields_first(tmp_path: Path) -> None:
    image = eif.read_eif(write(tmp_path / "p.eif", flag=True))
    assert metadata_says_placeholder(image.metadata)
    assert list(image.metadata["BuildMetadata"]) == [*eif.BUILD_INFO_KEYS, eif.PLACEHOLDER_BLOBS_KEY]
    plain = eif.read_eif(write(tmp_path / "r.eif"))
    assert eif.PLACEHOLDER_BLOBS_KEY not in plain.metadata["BuildMetadata"]
    assert not is_placeholder(plain)
    # Metadata is not measured: the flag changes no PCR.
    assert image.measurements == plain.measurements


def test_stand_in_kernel_alone_marks_an_eif_built_before_the_flag(tmp_path: Path) -> None:
    image = eif.read_eif(write(tmp_path / "old.eif", kernel=STAND_IN_KERNEL.read_bytes()))
    assert not metadata_says_placeholder(image.metadata)
    assert is_placeholder(image)


def test_emulator_knows_its_stand_in_blobs_from_real_ones(tmp_path: Path) -> None:
    assert build.placeholder_blobs(build.DEFAULT_BLOBS) is True
    real = tmp_path / "blobs"
    real.mkdir()
    for name in (build.kernel_name(), "init", "nsm.ko"):
        (real / name).write_bytes(b"\x7fELF not a stand-in " + name.encode())
    assert build.placeholder_blobs(real) is False
    # One stand-in among real blobs is enough to make the EIF useless on a Nitro host.
    (real / "init").write_bytes((build.DEFAULT_BLOBS / "init").read_bytes())
    assert build.placeholder_blobs(real) is True


def test_helper_refuses_only_on_a_nitro_host(tmp_path: Path, nitro_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = eif.read_eif(write(tmp_path / "p.eif", flag=True))
    with pytest.raises(PlaceholderEifError) as caught:
        require_runnable_here(image)
    message = str(caught.value)
    assert str(nitro_host) in message
    assert "NITRO_CLI_BLOBS=/usr/share/nitro_enclaves/blobs" in message
    assert "enclave_image_build_host" in message
    require_runnable_here(eif.read_eif(write(tmp_path / "r.eif")))  # a real EIF runs
    monkeypatch.setenv("NITRO_EMULATED", "1")  # forced emulation: the emulator runs it, not the hardware
    require_runnable_here(image)


def enclave_args(path: Path) -> dict[str, Any]:
    return {"name": "tok", "eif_path": str(path), "cpu_count": 1, "memory_mib": 256}


def test_nitro_enclave_refuses_a_placeholder_eif_on_a_nitro_host(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nitro_host: Path
) -> None:
    host = FakeHost(tmp_path, monkeypatch)
    result = run_module(ENCLAVE, enclave_args(write(tmp_path / "p.eif", flag=True)), capsys)
    assert result["failed"] is True
    assert "placeholder kernel and init" in result["msg"]
    assert host.calls() == []  # refused before nitro-cli was asked anything
    result = run_module(ENCLAVE, enclave_args(write(tmp_path / "r.eif")), capsys)
    assert result.get("failed") is not True, result
    assert "run-enclave" in host.subcommands()


def test_nitro_enclave_runs_a_placeholder_eif_on_an_emulated_host(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulated_host: None
) -> None:
    host = FakeHost(tmp_path, monkeypatch)
    result = run_module(ENCLAVE, enclave_args(write(tmp_path / "p.eif", flag=True)), capsys)
    assert result.get("failed") is not True, result
    assert host.enclaves()[0]["EnclaveName"] == "tok"


def build_args(tmp_path: Path) -> dict[str, Any]:
    return {"path": str(tmp_path / "out" / "app.eif"), "docker_uri": "app:1"}


def test_nitro_eif_keeps_no_placeholder_eif_on_a_nitro_host(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nitro_host: Path
) -> None:
    host = FakeHost(tmp_path, monkeypatch)
    host.set_image("app:1", "sha256:" + "1" * 64)
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("FAKE_NITRO_KERNEL", str(STAND_IN_KERNEL))
    result = run_module(NITRO_EIF, build_args(tmp_path), capsys)
    assert result["failed"] is True
    assert result["placeholder_blobs"] is True
    assert "NITRO_CLI_BLOBS" in result["msg"]
    assert "build-enclave" in host.subcommands()
    assert list((tmp_path / "out").iterdir()) == []  # neither the EIF nor a temporary file is left


def test_nitro_eif_reports_placeholder_blobs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emulated_host: None
) -> None:
    host = FakeHost(tmp_path, monkeypatch)
    host.set_image("app:1", "sha256:" + "1" * 64)
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("FAKE_NITRO_KERNEL", str(STAND_IN_KERNEL))
    built = run_module(NITRO_EIF, build_args(tmp_path), capsys)
    assert built["built"] is True
    assert built["placeholder_blobs"] is True
    again = run_module(NITRO_EIF, build_args(tmp_path), capsys)
    assert again["changed"] is False
    assert again["placeholder_blobs"] is True
    described = run_module(NITRO_EIF, {"path": str(write(tmp_path / "r.eif")), "state": "described"}, capsys)
    assert described["placeholder_blobs"] is False


def test_supervisor_refuses_a_placeholder_eif_on_a_nitro_host(tmp_path: Path, nitro_host: Path) -> None:
    from enclave_tokenizer.supervisor import Supervisor

    path = write(tmp_path / "p.eif", flag=True)
    supervisor = Supervisor.__new__(Supervisor)  # only the measuring step is exercised
    supervisor._measured = {}
    with pytest.raises(PlaceholderEifError):
        supervisor.measurements(str(path), (1, 2, 3))
    assert supervisor._measured == {}
    real = write(tmp_path / "r.eif")
    assert supervisor.measurements(str(real), (1, 2, 4)) == json.loads(json.dumps(eif.read_eif(real).measurements))
