"""plugins/modules/nitro_enclave.py under ansible-core's patch_module_args harness, against a fake stateful
nitro-cli: argument rules, idempotence on measurements/resources, check mode, diff, errors, lock, wait."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.nitro_cli import launch_lock
from nitro_fakes import FakeHost, load_module, make_eif, run_module

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
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import read_eif

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
        (
            {"eif_path": "/nonexistent.eif"},
            "eif_path /nonexistent.eif: cannot open EIF /nonexistent.eif: No such",
        ),
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


# ---------------------------------------------------------------------------------------------
# hostile input: bounds, measurement keys, EIF paths that are not files (issue 20)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"memory_mib": 2**63}, "memory_mib 9223372036854775808 is above 25165824 MiB (24 TiB"),
        ({"cpu_count": 10**9}, "cpu_count 1000000000 is above 448 (the largest EC2 instance's vCPUs); use 1 to 448"),
        ({"cpu_count": None, "cpu_ids": [2, 448]}, "cpu_ids [2, 448] has a CPU id above 447"),
        ({"timeout": 10**12}, "timeout 1000000000000 is not allowed: use 0 to 86400 seconds"),
        ({"wait_for": {"port": 5000, "timeout": 10**9}}, "wait_for.timeout 1000000000 is above 86400 seconds"),
        ({"measurements": {"pcr0": "0" * 96}}, "measurements key(s) 'pcr0' not allowed: use HashAlgorithm, PCR0, PCR1"),
        ({"measurements": {"PCR0": "0" * 96, "PCR3": "0" * 96}}, "key(s) 'PCR3' not allowed"),
        ({"measurements": {"PCR8": "zz"}}, "measurements PCR8: expected 96 hexadecimal characters"),
    ],
)
@pytest.mark.parametrize("state", ["running", "configured"])
def test_bounds_and_measurement_keys(
    capsys: pytest.CaptureFixture[str],
    host: FakeHost,
    eif: Path,
    tmp_path: Path,
    state: str,
    extra: dict[str, Any],
    message: str,
) -> None:
    config = tmp_path / "tok.json"
    args = {k: v for k, v in base(eif, state=state, config_path=str(config), **extra).items() if v is not None}
    result = run(capsys, **args)
    assert result["failed"] is True
    assert message in result["msg"]
    assert host.calls() == [] and not config.exists()


def test_nitro_eif_measurements_are_accepted_as_returned(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path
) -> None:
    given = {**pcrs(eif), "PCR8": "ab" * 48}  # HashAlgorithm and a signing PCR8, as nitro_eif returns them
    assert "HashAlgorithm" in given
    result = run(capsys, **base(eif, state="configured", config_path=str(tmp_path / "tok.json"), measurements=given))
    assert result["changed"] is True
    assert sorted(result["config"]["measurements"]) == ["PCR0", "PCR1", "PCR2"]


def _not_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo.eif"
    os.mkfifo(fifo)
    return {"directory": tmp_path, "character device": Path("/dev/zero"), "FIFO": fifo}


@pytest.mark.timeout(60)  # a FIFO without a writer used to block here for ever
@pytest.mark.parametrize("kind", ["directory", "character device", "FIFO"])
@pytest.mark.parametrize(("state", "check"), [("configured", False), ("configured", True), ("running", False),
                                              ("running", True)])  # fmt: skip
def test_eif_path_must_be_a_regular_file(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path, kind: str, state: str, check: bool
) -> None:
    path = _not_files(tmp_path)[kind]
    config = tmp_path / "tok.json"
    args = {"name": "tok", "state": state, "eif_path": str(path), "cpu_count": 2, "memory_mib": 256}
    result = run(capsys, **args, config_path=str(config), _ansible_check_mode=check)
    assert result["failed"] is True
    assert f"eif_path {path}: " in result["msg"] and f"is not a regular file (a {kind})" in result["msg"]
    assert not config.exists() and host.calls() == []


@pytest.mark.timeout(60)
def test_nitro_eif_described_refuses_a_fifo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fifo = _not_files(tmp_path)["FIFO"]
    result = run_module(load_module("nitro_eif"), {"path": str(fifo), "state": "described"}, capsys)
    assert result["failed"] is True
    assert result["msg"] == f"path {fifo}: {fifo} is not a regular file (a FIFO): an EIF must be one"


def test_run_configuration_not_utf8_is_replaced_with_a_warning(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path
) -> None:
    config = tmp_path / "tok.json"
    config.write_bytes(b'{"memory_mib": \xff}')
    result = run(capsys, **base(eif, state="configured", config_path=str(config)))
    assert result["changed"] is True
    assert "is not UTF-8 text (byte offset 15: invalid start byte); replacing it" in json.dumps(result["warnings"])
    assert json.loads(config.read_text())["memory_mib"] == 256


# ---------------------------------------------------------------------------------------------
# the allocator's pool is checked before anything changes (issue 15)


def _pool(host: FakeHost, cpus: list[int], memory_mib: int) -> Path:
    """The emulated allocator's record, as `nitro-cli-emulator allocator apply` writes it."""
    host.emulator_home.mkdir(exist_ok=True)
    record = host.emulator_home / "allocator.json"
    record.write_text(json.dumps({"cpu_pool": cpus, "memory_mib": memory_mib, "mode": "cpu_pool"}))
    return record


def _other(host: FakeHost, cpus: list[int], memory_mib: int, cid: int) -> None:
    other = {
        "EnclaveName": "other",
        "EnclaveID": "i-0000000000000000-enc9",
        "EnclaveCID": cid,
        "NumberOfCPUs": len(cpus),
        "CPUIDs": cpus,
        "MemoryMiB": memory_mib,
        "State": "RUNNING",
        "Flags": "NONE",
    }
    host.state.write_text(json.dumps({"enclaves": [other], "next": 10}))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"cpu_count": 4}, "cpu_count 4: the allocator's pool has 2 CPUs (cpu_pool 1,5, 512 MiB, from {record}); "
         "raise the allocator's cpu_count (nitro_allocator_cpu_count) or lower cpu_count (nitro_enclave_cpu_count)"),
        ({"memory_mib": 1024}, "memory_mib 1024: the allocator's pool has 512 MiB (cpu_pool 1,5, 512 MiB, from "
         "{record}); raise the allocator's memory (nitro_allocator_min_memory_mib) or lower memory_mib"),
        ({"cpu_count": None, "cpu_ids": [2, 6]}, "cpu_ids [2, 6]: CPU(s) 2,6 not in the allocator's pool (cpu_pool"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("check", [False, True])
def test_configured_refuses_what_the_pool_cannot_hold(
    capsys: pytest.CaptureFixture[str],
    host: FakeHost,
    eif: Path,
    tmp_path: Path,
    extra: dict[str, Any],
    message: str,
    check: bool,
) -> None:
    record = _pool(host, [1, 5], 512)
    config = tmp_path / "tok.json"
    good = base(eif, state="configured", config_path=str(config), backup=True)
    assert run(capsys, **good)["changed"] is True  # fits: 2 CPUs, 256 MiB
    before = config.read_bytes()
    args = {k: v for k, v in {**good, **extra}.items() if v is not None}
    result = run(capsys, **args, _ansible_check_mode=check)
    assert result["failed"] is True
    assert message.format(record=record) in result["msg"]
    assert result["msg"].endswith("Nothing was changed (the running enclave, if any, keeps its configuration)")
    assert result["pool"] == {"cpu_ids": [1, 5], "memory_mib": 512, "source": str(record)}
    assert config.read_bytes() == before and sorted(p.name for p in tmp_path.glob("tok.json*")) == ["tok.json"]


def test_other_enclaves_hold_part_of_the_pool(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path
) -> None:
    _pool(host, [1, 2, 5, 6], 512)
    _other(host, [1, 5], 384, cid=16)
    args = base(eif, state="configured", config_path=str(tmp_path / "tok.json"), memory_mib=128)
    result = run(capsys, **{**args, "cpu_count": 4})
    assert "cpu_count 4: the allocator's pool has 4 CPUs (cpu_pool 1-2,5-6, 512 MiB, from " in result["msg"]
    assert "), 2 held by other (i-0000000000000000-enc9); raise" in result["msg"]
    result = run(capsys, **{**args, "memory_mib": 256})
    assert "memory_mib 256: the allocator's pool has 512 MiB (" in result["msg"]
    assert ", 384 MiB held by running enclave(s); raise" in result["msg"]
    result = run(capsys, **{**{k: v for k, v in args.items() if k != "cpu_count"}, "cpu_ids": [2, 5]})
    assert "cpu_ids [2, 5]: CPU(s) 5 held by running enclave(s) other (i-0000000000000000-enc9)" in result["msg"]
    result = run(capsys, **args, enclave_cid=16)
    assert "enclave_cid 16 is used by running enclave other (i-0000000000000000-enc9); choose another" in result["msg"]
    assert not (tmp_path / "tok.json").exists()
    assert run(capsys, **args, enclave_cid=17)["changed"] is True  # 2 free CPUs, 128 of 128 MiB free


def test_an_unchanged_configuration_asks_nitro_cli_nothing(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path
) -> None:
    _pool(host, [1, 5], 512)
    args = base(eif, state="configured", config_path=str(tmp_path / "tok.json"))
    assert run(capsys, **args)["changed"] is True
    assert host.subcommands().count("describe-enclaves") == 1  # the pool check of the new configuration
    again = run(capsys, **args)
    assert again["changed"] is False and again["path"] == str(tmp_path / "tok.json")
    assert host.subcommands().count("describe-enclaves") == 1  # an idempotent run: no nitro-cli process
    changed = run(capsys, **{**args, "memory_mib": 512})
    assert changed["changed"] is True and host.subcommands().count("describe-enclaves") == 2


def test_running_enclave_is_not_terminated_for_a_change_that_cannot_fit(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path
) -> None:
    _pool(host, [1, 2], 512)
    assert run(capsys, **base(eif))["changed"] is True  # the fake launches on CPUs 1-2
    running = host.enclaves()
    for check in (True, False):
        result = run(capsys, **base(eif, cpu_count=4), _ansible_check_mode=check)
        assert result["failed"] is True and result["msg"].startswith("cpu_count 4: the allocator's pool has 2 CPUs")
    assert host.enclaves() == running
    assert "terminate-enclave" not in host.subcommands()


def test_real_host_pool_is_ne_cpus_and_hugepages(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NITRO_EMULATED", "0")
    sysfs = tmp_path / "sysfs"
    params = sysfs / "sys/module/nitro_enclaves/parameters"
    params.mkdir(parents=True)
    (params / "ne_cpus").write_text("1,5\n")
    for size, pages in (("2048kB", 64), ("1048576kB", 0)):
        (sysfs / f"sys/kernel/mm/hugepages/hugepages-{size}").mkdir(parents=True)
        (sysfs / f"sys/kernel/mm/hugepages/hugepages-{size}/nr_hugepages").write_text(f"{pages}\n")
    args = base(eif, state="configured", config_path=str(tmp_path / "tok.json"), sysfs_root=str(sysfs))
    result = run(capsys, **args)
    assert result["failed"] is True
    assert (
        f"memory_mib 256: the allocator's pool has 128 MiB (cpu_pool 1,5, 128 MiB, from {params}/ne_cpus)"
        in (result["msg"])
    )
    (params / "ne_cpus").write_text("\n")  # the allocator has not run: no pool to check against
    assert run(capsys, **args)["changed"] is True


@pytest.mark.timeout(60)
def test_config_path_that_is_not_a_file_is_refused(
    capsys: pytest.CaptureFixture[str], host: FakeHost, eif: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "tok.json"
    os.mkfifo(fifo)
    result = run(capsys, **base(eif, state="configured", config_path=str(fifo)))
    assert result["failed"] is True
    assert result["msg"] == f"config_path {fifo} is not a regular file; remove it or choose another path"
