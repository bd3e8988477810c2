"""library/nitro_enclave.py under ansible-core's patch_module_args harness, against a fake stateful
nitro-cli: argument rules, idempotence on measurements/resources, check mode, diff, errors, lock, wait."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from nitro_fakes import FakeHost, load_module, make_eif, run_module
from nitro_module_utils.nitro_cli import launch_lock

MODULE = load_module("nitro_enclave")


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    return FakeHost(tmp_path, monkeypatch)


@pytest.fixture
def eif(tmp_path: Path) -> Path:
    path = tmp_path / "app.eif"
    make_eif(path, b"APP-1")
    return path


def run(capsys: pytest.CaptureFixture[str], **args: Any) -> dict[str, Any]:
    return run_module(MODULE, args, capsys)


def base(eif: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "tok", "eif_path": str(eif), "cpu_count": 2, "memory_mib": 256, **extra}


# ---------------------------------------------------------------------------------------------
# argument rules


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "missing required arguments: name"),
        ({"name": "tok"}, "state is running but all of the following are missing: eif_path, memory_mib"),
        (
            {"name": "tok", "eif_path": "/x.eif", "memory_mib": 256},
            "state is running but any of the following are missing: cpu_count, cpu_ids",
        ),
        (
            {"name": "tok", "state": "restarted", "eif_path": "/x.eif", "cpu_count": 2},
            "state is restarted but all of the following are missing: memory_mib",
        ),
        (
            {"name": "tok", "eif_path": "/x.eif", "memory_mib": 256, "cpu_count": 2, "cpu_ids": [1, 2]},
            "parameters are mutually exclusive: cpu_count|cpu_ids",
        ),
        (
            {"name": "tok", "state": "stopped"},
            "value of state must be one of: running, absent, restarted, configured, got: stopped",
        ),
        ({"name": "tok", "state": "absent", "memory_mib": "lots"}, "memory_mib"),
        ({"name": "tok", "state": "absent", "wait_for": {"timeout": 3}}, "missing required arguments: port"),
        ({"name": "tok", "state": "absent", "bogus": 1}, "Unsupported parameters for"),
        (
            {"name": "tok", "state": "configured", "eif_path": "/x.eif", "memory_mib": 256, "cpu_count": 1},
            "state is configured but all of the following are missing: config_path",
        ),
    ],
)
def test_argument_spec_rules(capsys: pytest.CaptureFixture[str], args: dict[str, Any], message: str) -> None:
    result = run(capsys, **args)
    assert result["failed"] is True
    assert message in result["msg"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"name": "bad name"}, "name 'bad name' is not allowed: use letters, digits"),
        ({"name": "x" * 65}, "at most 64 characters"),
        ({"memory_mib": 32}, "memory_mib 32 is below the minimum enclave memory of 64 MiB"),
        ({"cpu_count": 0}, "cpu_count 0 must be greater than 0"),
        ({"cpu_count": None, "cpu_ids": []}, "cpu_ids is empty"),
        ({"cpu_count": None, "cpu_ids": [1, 1]}, "cpu_ids [1, 1] names a CPU more than once"),
        ({"cpu_count": None, "cpu_ids": [-1]}, "negative CPU id"),
        ({"enclave_cid": 3}, "enclave_cid 3 is not allowed: CIDs 0-2 are reserved, 3 is the parent instance"),
        ({"enclave_cid": 2**32 - 1}, "use 4 to 4294967294"),
        ({"wait_for": {"port": 0}}, "wait_for.port 0 is not a vsock port"),
        ({"wait_for": {"port": 5000, "timeout": -1}}, "wait_for.timeout -1 must not be negative"),
        ({"measurements": {"PCR0": "abc"}}, "measurements PCR0: expected 96 hexadecimal characters"),
    ],
)
def test_value_rules(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, extra: dict[str, Any], message: str
) -> None:
    args = {k: v for k, v in base(eif, **extra).items() if v is not None}
    result = run(capsys, **args)
    assert result["failed"] is True
    assert message in result["msg"]
    assert host.calls() == []


def test_debug_mode_refused_without_allow(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    result = run(capsys, **base(eif, debug_mode=True))
    assert result["failed"] is True
    assert "all-zero PCR0, PCR1 and PCR2" in result["msg"]
    assert "kms:RecipientAttestation" in result["msg"]
    assert "allow_debug_mode: true" in result["msg"]
    assert host.calls() == []


def test_debug_mode_allowed(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    result = run(capsys, **base(eif, debug_mode=True, allow_debug_mode=True))
    assert result["changed"] is True
    assert result["enclave"]["Flags"] == "DEBUG_MODE"
    assert run(capsys, **base(eif, debug_mode=True, allow_debug_mode=True))["changed"] is False
    # Same image without debug is a different enclave.
    again = run(capsys, **base(eif))
    assert again["changed"] is True
    assert any("debug_mode True -> False" in a for a in again["actions"])


def test_memory_below_four_times_eif(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    big = tmp_path / "big.eif"
    make_eif(big, b"X", size_pad=20 << 20)
    result = run(capsys, **base(big, memory_mib=64))
    assert result["failed"] is True
    assert "needs at least 4 times the EIF size, 84 MiB" in result["msg"]


def test_unreadable_eif(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.eif"
    bogus.write_bytes(b"not an eif" * 100)
    result = run(capsys, **base(bogus))
    assert result["failed"] is True
    assert result["msg"].startswith(f"eif_path {bogus}:")


# ---------------------------------------------------------------------------------------------
# behaviour


def test_run_rerun_change_absent(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    first = run(capsys, **base(eif))
    assert first["changed"] is True
    assert first["actions"] == ["run tok"]
    record = first["enclave"]
    assert record["EnclaveName"] == "tok" and record["State"] == "RUNNING" and record["NumberOfCPUs"] == 2
    assert record["Measurements"]["PCR0"] == first["measurements"]["PCR0"]
    assert len(host.enclaves()) == 1

    second = run(capsys, **base(eif))
    assert second["changed"] is False
    assert second["enclave"]["EnclaveID"] == record["EnclaveID"]
    assert host.subcommands().count("run-enclave") == 1

    third = run(capsys, _ansible_diff=True, **base(eif, memory_mib=512))
    assert third["changed"] is True
    assert third["terminated"] == [record["EnclaveID"]]
    assert third["actions"][0].endswith("(memory_mib 256 -> 512)")
    assert third["diff"]["before"]["memory_mib"] == 256
    assert third["diff"]["after"]["memory_mib"] == 512
    assert [e["MemoryMiB"] for e in host.enclaves()] == [512]

    gone = run(capsys, name="tok", state="absent")
    assert gone["changed"] is True and gone["enclave"] == {}
    assert host.enclaves() == []
    again = run(capsys, name="tok", state="absent")
    assert again["changed"] is False and again["terminated"] == []


def test_other_enclaves_untouched(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    run(capsys, **base(eif, name="other", memory_mib=128))
    run(capsys, **base(eif))
    run(capsys, name="tok", state="absent")
    assert [e["EnclaveName"] for e in host.enclaves()] == ["other"]


def test_new_image_relaunches(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path) -> None:
    run(capsys, **base(eif))
    newer = tmp_path / "app2.eif"
    make_eif(newer, b"APP-2")
    result = run(capsys, _ansible_diff=True, **base(newer))
    assert result["changed"] is True
    assert "PCR0" in result["actions"][0] and "PCR2" in result["actions"][0]
    assert "PCR1" not in result["actions"][0]  # same kernel/cmdline/bootstrap ramdisk
    assert result["diff"]["before"]["pcr0"] != result["diff"]["after"]["pcr0"]
    assert host.enclaves()[0]["Measurements"]["PCR0"] == result["measurements"]["PCR0"]


def test_cpu_ids_and_cid(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    args = base(eif, cpu_ids=[3, 1], enclave_cid=20)
    del args["cpu_count"]
    first = run(capsys, **args)
    assert first["enclave"]["CPUIDs"] == [3, 1] and first["enclave"]["EnclaveCID"] == 20
    assert run(capsys, **{**args, "cpu_ids": [1, 3]})["changed"] is False  # order does not matter
    moved = run(capsys, **{**args, "cpu_ids": [1, 3], "enclave_cid": 21})
    assert moved["changed"] is True and "enclave_cid 20 -> 21" in moved["actions"][0]
    # Without enclave_cid the assigned CID is not compared; cpu_count 2 matches CPUIDs [1, 3].
    assert run(capsys, **base(eif))["changed"] is False


def test_memory_rounded_up_by_hugepages_is_no_change(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path
) -> None:
    first = run(capsys, **base(eif, memory_mib=257))
    assert first["enclave"]["MemoryMiB"] == 258
    assert run(capsys, **base(eif, memory_mib=257))["changed"] is False


def test_restarted_always_relaunches(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    first = run(capsys, **base(eif))
    again = run(capsys, **base(eif, state="restarted"))
    assert again["changed"] is True
    assert again["terminated"] == [first["enclave"]["EnclaveID"]]
    assert again["enclave"]["EnclaveID"] != first["enclave"]["EnclaveID"]
    assert len(host.enclaves()) == 1


def test_check_mode_changes_nothing(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    would = run(capsys, _ansible_check_mode=True, _ansible_diff=True, **base(eif))
    assert would["changed"] is True and would["actions"] == ["run tok"]
    assert would["diff"]["before"] == {} and would["diff"]["after"]["cpu_count"] == 2
    assert host.subcommands() == ["describe-enclaves"]
    assert not (host.sockets / ".ansible-launch.lock").exists()  # check mode takes no lock, writes nothing
    run(capsys, **base(eif))
    before = host.enclaves()
    change = run(capsys, _ansible_check_mode=True, **base(eif, memory_mib=512))
    assert change["changed"] is True and change["enclave"]["MemoryMiB"] == 256
    gone = run(capsys, _ansible_check_mode=True, name="tok", state="absent")
    assert gone["changed"] is True
    assert host.enclaves() == before
    assert "terminate-enclave" not in host.subcommands()
    assert host.subcommands().count("run-enclave") == 1


def test_nitro_cli_error_is_reported(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NITRO_FAIL", "run-enclave:22:Insufficient CPUs available in the pool. User provided")
    result = run(capsys, **base(eif))
    assert result["failed"] is True
    assert result["msg"].startswith("run-enclave tok failed: [ E22 ] Insufficient CPUs available")
    assert result["nitro_cli_error"]["code"] == 22


def test_explicit_nitro_cli_path(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    result = run(capsys, **base(eif, nitro_cli_path="/does/not/exist"))
    assert result["failed"] is True
    assert "nitro-cli not found or not executable: /does/not/exist" in result["msg"]
    assert run(capsys, **base(eif, nitro_cli_path=str(host.cli)))["changed"] is True


def test_launch_lock_timeout(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    with launch_lock():
        result = run(capsys, **base(eif, lock_timeout=0))
    assert result["failed"] is True
    assert "another enclave launch on this host held" in result["msg"]
    assert "run-enclave" not in host.subcommands()


def test_custom_lock_file(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "launch.lock"
    assert run(capsys, **base(eif, lock_file=str(lock)))["changed"] is True
    assert lock.exists()


def test_wait_for_vsock(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path) -> None:
    listener_dir = tmp_path / "vsock" / "20"
    listener_dir.mkdir(parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(listener_dir / "5000"))
    server.listen(4)
    try:
        ok = run(capsys, **base(eif, enclave_cid=20, wait_for={"port": 5000, "timeout": 5}))
        assert ok["changed"] is True and ok["waited"] >= 0
        late = run(capsys, **base(eif, enclave_cid=20, wait_for={"port": 5001, "timeout": 0}))
    finally:
        server.close()
    assert late["failed"] is True
    assert "enclave tok is running but nothing accepted on vsock 20:5001" in late["msg"]


def test_duplicate_names_keep_one(capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path) -> None:
    first = run(capsys, **base(eif))["enclave"]
    state = json.loads(host.state.read_text())
    state["enclaves"].append({**first, "EnclaveID": "i-0000000000000000-enc99", "ProcessID": 99})
    host.state.write_text(json.dumps(state))
    result = run(capsys, **base(eif))
    assert result["changed"] is True
    assert result["enclave"]["EnclaveID"] == first["EnclaveID"]
    assert result["terminated"] == ["i-0000000000000000-enc99"]
    assert "duplicate name" in result["actions"][0]
    assert "run-enclave" not in host.subcommands()[-3:]
    assert [e["EnclaveID"] for e in host.enclaves()] == [first["EnclaveID"]]


# ---------------------------------------------------------------------------------------------
# expected measurements and state=configured (the run configuration enclave-supervisor applies)


def pcrs(eif: Path) -> dict[str, str]:
    from nitro_module_utils.eif import read_eif

    return read_eif(eif).measurements


def test_an_eif_other_than_expected_is_refused(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.eif"
    make_eif(other, b"APP-2")
    result = run(capsys, **base(eif, measurements=pcrs(other)))
    assert result["failed"] is True
    assert f"eif_path {eif} is not the expected image: PCR0 " in result["msg"]
    assert host.enclaves() == []
    # Matching measurements (any case, extra keys such as HashAlgorithm ignored) launch as usual.
    good = {k: v.upper() for k, v in pcrs(eif).items()}
    assert run(capsys, **base(eif, measurements=good))["changed"] is True


def test_configured_writes_the_run_configuration(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path
) -> None:
    from enclave_tokenizer.supervisor import load_config

    path = tmp_path / "enclaves" / "tok.json"
    path.parent.mkdir()
    args = base(eif, state="configured", config_path=str(path), enclave_cid=16, measurements=pcrs(eif), backup=True)

    checked = run(capsys, **args, _ansible_check_mode=True, _ansible_diff=True)
    assert checked["changed"] is True and checked["diff"]["before"] == "" and not path.exists()

    first = run(capsys, **args, _ansible_diff=True)
    assert first["changed"] is True and "backup_file" not in first
    assert path.stat().st_mode & 0o777 == 0o644
    assert first["config"] == json.loads(path.read_text()) == json.loads(first["diff"]["after"])
    # What the supervisor reads back is what the module was given.
    spec = load_config(path)
    assert (spec["name"], spec["eif_path"], spec["memory_mib"], spec["cpu_count"], spec["enclave_cid"]) == (
        "tok", str(eif), 256, 2, 16,
    )  # fmt: skip
    expected = {k: v for k, v in pcrs(eif).items() if k in ("PCR0", "PCR1", "PCR2")}
    assert spec["measurements"] == expected
    assert host.calls() == []  # no nitro-cli

    assert run(capsys, **args)["changed"] is False

    changed = run(capsys, **{**args, "memory_mib": 512}, _ansible_diff=True)
    assert changed["changed"] is True
    assert '"memory_mib": 256' in changed["diff"]["before"] and '"memory_mib": 512' in changed["diff"]["after"]
    assert json.loads(Path(changed["backup_file"]).read_text())["memory_mib"] == 256
    assert load_config(path)["memory_mib"] == 512


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"memory_mib": 64, "size_pad": 20 << 20}, "memory_mib 64 is too small for"),
        ({"eif_path": "/nonexistent.eif"}, "eif_path /nonexistent.eif: No such file or directory"),
        ({"config_path": "/nonexistent-dir/tok.json"}, "the directory /nonexistent-dir does not exist"),
        ({"debug_mode": True}, "debug_mode: true refused"),
    ],
)
def test_configured_refuses_bad_input(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    eif = tmp_path / "big.eif"
    make_eif(eif, b"APP", size_pad=extra.pop("size_pad", 0))
    args = {**base(eif, state="configured", config_path=str(tmp_path / "tok.json")), **extra}
    result = run(capsys, **args)
    assert result["failed"] is True
    assert message in result["msg"]
    assert not (tmp_path / "tok.json").exists()
