"""plugins/modules/nitro_allocator.py under patch_module_args: argument rules, host validation on fake sysfs,
atomic write + backup, check/diff mode, restart via command or systemctl, refusal with running enclaves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.allocator import (
    AllocatorConfig,
    parse_allocator_yaml,
)
from nitro_fakes import FakeHost, load_module, make_sysfs, run_module, write_script

MODULE = load_module("nitro_allocator")

# A stand-in for `nitro-cli-emulator allocator apply|show`: it parses the file it is pointed at and records
# it; `show` prints what the emulator's `allocator show` prints (the keys the module reads).
FAKE_ALLOCATOR = r"""
import json, os, sys
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.allocator import (
    AllocatorConfigError, parse_allocator_yaml)
state = os.environ["FAKE_ALLOCATOR_STATE"]
with open(state + ".log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
if os.environ.get("FAKE_ALLOCATOR_FAIL"):
    sys.stderr.write("Error: " + os.environ["FAKE_ALLOCATOR_FAIL"] + "\n"); sys.exit(1)
if sys.argv[-1] == "show":
    if not os.path.exists(state):
        sys.stderr.write("Error: No CPU pool has been allocated yet\n"); sys.exit(1)
    print(open(state).read()); sys.exit(0)
path = os.environ["NITRO_ALLOCATOR_CONFIG"]
try:
    config = parse_allocator_yaml(open(path).read(), path)
except AllocatorConfigError as exc:
    sys.stderr.write(f"Error: {exc}\n"); sys.exit(1)
ids = list(config.cpu_pool) if config.cpu_pool else list(range(1, 1 + config.cpu_count))
json.dump({"requested_memory_mib": config.memory_mib, "memory_mib": config.memory_mib,
           "mode": "cpu_pool" if config.cpu_pool else "cpu_count", "cpu_ids": ids}, open(state, "w"))
print(f"Successfully allocated Nitro Enclaves resources: {config.memory_mib} MiB")
"""

# systemctl stand-in: remembers active/enabled units in a JSON file.
FAKE_SYSTEMCTL = r"""
import json, os, sys
state_path = os.environ["FAKE_SYSTEMD_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {"active": [], "enabled": []}
with open(state_path + ".log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
args = [a for a in sys.argv[1:] if not a.startswith("--")]
verb, unit = args[0], args[-1]
if verb == "is-active":
    sys.exit(0 if unit in state["active"] else 3)
if verb == "is-enabled":
    sys.exit(0 if unit in state["enabled"] else 1)
if verb == "restart":
    if os.environ.get("FAKE_SYSTEMD_FAIL"):
        sys.stderr.write("Job for " + unit + " failed because the control process exited with error code.\n")
        sys.exit(1)
    state["active"] = sorted(set(state["active"]) | {unit})
if verb == "enable":
    state["enabled"] = sorted(set(state["enabled"]) | {unit})
json.dump(state, open(state_path, "w"))
"""


class Env:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.host = FakeHost(tmp_path, monkeypatch)
        self.sysfs = make_sysfs(tmp_path / "sysfs", cpus=8, threads=2, mem_available_mib=8192)
        self.config = tmp_path / "etc" / "allocator.yaml"
        self.config.parent.mkdir()
        self.alloc_state = tmp_path / "allocator.json"
        self.allocator = write_script(tmp_path / "bin" / "fake-allocator", FAKE_ALLOCATOR)
        self.systemd_state = tmp_path / "systemd.json"
        write_script(tmp_path / "bin" / "systemctl", FAKE_SYSTEMCTL)
        monkeypatch.setenv("FAKE_ALLOCATOR_STATE", str(self.alloc_state))
        monkeypatch.setenv("FAKE_SYSTEMD_STATE", str(self.systemd_state))
        monkeypatch.setenv("NITRO_ALLOCATOR_CONFIG", str(self.config))
        monkeypatch.setenv("NITRO_EMULATED", "1")
        monkeypatch.delenv("NITRO_EMULATOR_SYSFS_ROOT", raising=False)

    def args(self, **extra: Any) -> dict[str, Any]:
        return {
            "memory_mib": 512,
            "cpu_count": 2,
            "sysfs_root": str(self.sysfs),
            "service_manager": "command",
            "allocator_command": [str(self.allocator), "allocator", "apply"],
            **extra,
        }

    def allocator_calls(self) -> list[str]:
        log = Path(str(self.alloc_state) + ".log")
        return log.read_text().splitlines() if log.exists() else []

    def systemctl_calls(self) -> list[str]:
        log = Path(str(self.systemd_state) + ".log")
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


def run(capsys: pytest.CaptureFixture[str], args: dict[str, Any]) -> dict[str, Any]:
    return run_module(MODULE, args, capsys)


# ---------------------------------------------------------------------------------------------
# argument rules


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        (("memory_mib",), {}, "one of the following is required: memory_mib, min_memory_mib"),
        ((), {"min_memory_mib": 256}, "parameters are mutually exclusive: memory_mib|min_memory_mib"),
        (("cpu_count",), {}, "one of the following is required: cpu_count, cpu_pool"),
        ((), {"cpu_pool": "2,6"}, "parameters are mutually exclusive: cpu_count|cpu_pool"),
        ((), {"service_manager": "upstart"}, "value of service_manager must be one of: auto, systemd, command"),
        ((), {"memory_mib": "much"}, "memory_mib"),
    ],
)
def test_argument_spec_rules(
    capsys: pytest.CaptureFixture[str], env: Env, drop: tuple[str, ...], extra: dict[str, Any], message: str
) -> None:
    args = {k: v for k, v in env.args(**extra).items() if k not in drop}
    result = run(capsys, args)
    assert result["failed"] is True
    assert message in result["msg"]
    assert not env.config.exists()


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ("2-x", "cpu_pool '2-x' is not a CPU list"),
        ("", "cpu_pool '' is not a CPU list"),
        ([1, -5], "cpu_pool [1, -5] is not a CPU list"),
        (["a"], "allowed: a cpu-list string like '2,3,6-9' or a list of CPU numbers"),
    ],
)
def test_bad_cpu_pool_values(capsys: pytest.CaptureFixture[str], env: Env, pool: Any, message: str) -> None:
    args = env.args(cpu_pool=pool)
    del args["cpu_count"]
    result = run(capsys, args)
    assert result["failed"] is True
    assert message in result["msg"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"cpu_count": 0}, "cpu_count 0 must be greater than 0"),
        ({"cpu_count": 8}, "cpu_count 8 is more than the 6 CPU(s) available for enclaves"),
        ({"cpu_count": 3}, "cpu_count 3 is not a multiple of 2 (threads per core)"),
        ({"cpu_count": None, "cpu_pool": "0,4"}, "cpu_pool 0,4 includes CPU 0, which the parent instance keeps"),
        ({"cpu_count": None, "cpu_pool": [1, 2, 5]}, "cpu_pool 1,2,5 leaves out sibling CPU(s) 6"),
        ({"memory_mib": 16}, "memory_mib 16 is below the 64 MiB"),
        ({"memory_mib": 100000}, "memory_mib 100000 is more than the host can give: 8192 MiB"),
    ],
)
def test_host_rules(capsys: pytest.CaptureFixture[str], env: Env, extra: dict[str, Any], message: str) -> None:
    args = {k: v for k, v in env.args(**extra).items() if v is not None}
    result = run(capsys, args)
    assert result["failed"] is True
    assert result["msg"].startswith("allocator settings rejected for this host: ")
    assert message in result["msg"]
    assert result["topology"]["parent_cpus"] == "0,4"
    assert not env.config.exists()
    assert env.allocator_calls() == []


def test_cpu_0_message_on_a_host_without_smt(capsys: pytest.CaptureFixture[str], env: Env, tmp_path: Path) -> None:
    flat = make_sysfs(tmp_path / "flat", cpus=4, threads=1)
    args = env.args(cpu_pool="0,1", sysfs_root=str(flat))
    del args["cpu_count"]
    result = run(capsys, args)
    assert result["msg"] == (
        "allocator settings rejected for this host: cpu_pool 0,1 includes CPU 0, which the parent instance keeps"
    )


# ---------------------------------------------------------------------------------------------
# behaviour (command mode, emulated host)


def test_write_apply_and_idempotence(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    first = run(capsys, {**env.args(), "_ansible_diff": True})
    assert first["changed"] is True and first["file_changed"] is True and first["restarted"] is True
    assert first["config"] == {"memory_mib": 512, "cpu_count": 2}
    assert first["path"] == str(env.config)  # from NITRO_ALLOCATOR_CONFIG
    assert first["service_manager"] == "command"
    assert "Successfully allocated" in first["allocator_output"]
    assert first["diff"]["before"] == "" and first["diff"]["after"].startswith("---\n")
    text = env.config.read_text()
    assert parse_allocator_yaml(text) == AllocatorConfig(memory_mib=512, cpu_count=2)
    assert env.config.stat().st_mode & 0o777 == 0o644
    assert env.allocator_calls() == ["allocator apply"]

    second = run(capsys, {**env.args(), "_ansible_diff": True})
    assert second["changed"] is False and second["restarted"] is False and "diff" not in second
    assert env.allocator_calls() == ["allocator apply", "allocator show"]

    pool_args = env.args(cpu_pool="1-2,5-6", memory_mib=1024)
    del pool_args["cpu_count"]
    third = run(capsys, {**pool_args, "_ansible_diff": True})
    assert third["changed"] is True and third["config"] == {"memory_mib": 1024, "cpu_pool": "1-2,5-6"}
    assert "cpu_count: 2" in third["diff"]["before"] and "cpu_pool: 1-2,5-6" in third["diff"]["after"]
    assert json.loads(env.alloc_state.read_text())["cpu_ids"] == [1, 2, 5, 6]
    assert run(capsys, {**pool_args, "cpu_pool": [6, 5, 2, 1]})["changed"] is False


def test_same_values_other_layout_is_kept_but_applied(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    shipped = "---\n# Enclave configuration file.\nmemory_mib: 512\n#\ncpu_count: 2\n"
    env.config.write_text(shipped)
    result = run(capsys, env.args())
    assert result["file_changed"] is False
    assert result["restarted"] is True  # never applied on this host yet
    assert result["changed"] is True
    assert env.config.read_text() == shipped


def test_check_mode(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    env.config.write_text("---\nmemory_mib: 256\ncpu_count: 2\n")
    result = run(capsys, {**env.args(), "_ansible_check_mode": True, "_ansible_diff": True})
    assert result["changed"] is True and result["file_changed"] is True and result["restarted"] is True
    assert "memory_mib: 256" in result["diff"]["before"] and "memory_mib: 512" in result["diff"]["after"]
    assert env.config.read_text() == "---\nmemory_mib: 256\ncpu_count: 2\n"
    assert env.allocator_calls() == []


def test_backup(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    env.config.write_text("---\nmemory_mib: 256\ncpu_count: 2\n")
    result = run(capsys, env.args(backup=True))
    backup = Path(result["backup_file"])
    assert backup.parent == env.config.parent
    assert backup.read_text() == "---\nmemory_mib: 256\ncpu_count: 2\n"
    assert "memory_mib: 512" in env.config.read_text()


def test_no_restart(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    result = run(capsys, env.args(restart=False))
    assert result["changed"] is True and result["restarted"] is False
    assert env.config.exists()
    assert env.allocator_calls() == []


def test_invalid_existing_file_is_replaced_with_a_warning(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    env.config.write_text("---\n\nmemory_mib: 512\ncpu_count: 2\n")  # blank line: the service rejects it
    result = run(capsys, env.args())
    assert result["changed"] is True and result["file_changed"] is True
    assert any("unexpected" in str(w) for w in result["warnings"]), result["warnings"]
    assert parse_allocator_yaml(env.config.read_text()).memory_mib == 512


def test_huge_cpu_range_is_refused_before_expanding(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    for check in (True, False):
        args = {k: v for k, v in env.args(cpu_pool="0-1000000000", _ansible_check_mode=check).items()}
        del args["cpu_count"]
        result = run(capsys, args)
        assert result["failed"] is True
        assert "cpu_pool '0-1000000000' is not a CPU list: '0-1000000000' names CPU 1000000000" in result["msg"]
        assert "above the highest CPU 7 this host has (online: 0-7)" in result["msg"]
    assert not env.config.exists() and env.allocator_calls() == []


def test_existing_file_not_utf8_fails_naming_it(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    env.config.write_bytes(b"---\nmemory_mib: 5\xe912\ncpu_count: 2\n")
    before = env.config.read_bytes()
    result = run(capsys, env.args())
    assert result["failed"] is True
    assert result["msg"].startswith(f"{env.config} is not UTF-8 text: byte 0xe9 at offset 17")
    assert "Traceback" not in json.dumps(result)
    assert env.config.read_bytes() == before and env.allocator_calls() == []


def test_allocator_failure_is_reported(
    capsys: pytest.CaptureFixture[str], env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ALLOCATOR_FAIL", "Failed to configure entire amount of requested memory.")
    result = run(capsys, env.args())
    assert result["failed"] is True
    assert "rejected" in result["msg"] and "Failed to configure entire amount" in result["msg"]


def test_default_command_on_emulated_host_is_the_emulator(
    capsys: pytest.CaptureFixture[str], env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator = write_script(env.host.bin / "nitro-cli-emulator", FAKE_ALLOCATOR)
    args = env.args()
    del args["allocator_command"]
    result = run(capsys, args)
    assert result["restarted"] is True
    assert env.allocator_calls() == ["allocator apply"]
    assert emulator.exists()


def test_real_host_command_mode_uses_the_real_allocator(
    capsys: pytest.CaptureFixture[str], env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NITRO_EMULATED", "0")
    args = env.args(_ansible_check_mode=True)
    del args["allocator_command"]
    result = run(capsys, args)
    # The driver's ne_cpus is empty (no such file in the fake sysfs): the allocator must run.
    assert result["restarted"] is True and result["service_manager"] == "command"
    ne_cpus = env.sysfs / "sys/module/nitro_enclaves/parameters/ne_cpus"
    ne_cpus.parent.mkdir(parents=True)
    ne_cpus.write_text("1,5\n")
    env.config.write_text("---\nmemory_mib: 512\ncpu_count: 2\n")
    assert run(capsys, args)["changed"] is False


# ---------------------------------------------------------------------------------------------
# running enclaves


def _start_enclave(env: Env) -> None:
    env.host.state.write_text(
        json.dumps(
            {
                "next": 2,
                "enclaves": [
                    {"EnclaveName": "tok", "EnclaveID": "i-0000000000000000-enc1", "State": "RUNNING", "EnclaveCID": 16}
                ],
            }
        )
    )


def test_refuses_while_enclaves_run(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    run(capsys, env.args())
    _start_enclave(env)
    before = env.config.read_text()
    for check_mode in (True, False):
        result = run(capsys, {**env.args(memory_mib=1024), "_ansible_check_mode": check_mode})
        assert result["failed"] is True
        assert "1 enclave(s) running (tok (i-0000000000000000-enc1))" in result["msg"]
        assert "terminate_running: true" in result["msg"]
        assert result["running"] == ["i-0000000000000000-enc1"]
    assert env.config.read_text() == before
    assert env.host.enclaves() != []
    # Nothing to restart: no refusal.
    assert run(capsys, env.args())["changed"] is False


def test_min_memory_grows_but_never_shrinks(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    run(capsys, env.args())  # 512 MiB
    _start_enclave(env)
    minimum = {k: v for k, v in env.args().items() if k != "memory_mib"}
    # A smaller need (a smaller EIF) keeps the reservation: no re-sizing, so no refusal while enclaves run.
    kept = run(capsys, {**minimum, "min_memory_mib": 256, "_ansible_diff": True})
    assert kept["changed"] is False and kept["config"] == {"memory_mib": 512, "cpu_count": 2}
    assert "failed" not in kept
    # A larger one grows it (here the running enclave is terminated to let the allocator re-size).
    grown = run(capsys, {**minimum, "min_memory_mib": 1024, "terminate_running": True})
    assert grown["changed"] is True and grown["config"] == {"memory_mib": 1024, "cpu_count": 2}
    assert parse_allocator_yaml(env.config.read_text()).memory_mib == 1024
    # No file yet: the minimum is what gets reserved.
    env.config.unlink()
    assert run(capsys, {**minimum, "min_memory_mib": 256})["config"] == {"memory_mib": 256, "cpu_count": 2}


def test_terminate_running(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    run(capsys, env.args())
    _start_enclave(env)
    would = run(capsys, {**env.args(memory_mib=1024, terminate_running=True), "_ansible_check_mode": True})
    assert would["changed"] is True and would["terminated"] == ["i-0000000000000000-enc1"]
    assert env.host.enclaves() != []
    result = run(capsys, env.args(memory_mib=1024, terminate_running=True))
    assert result["changed"] is True and result["restarted"] is True
    assert result["terminated"] == ["i-0000000000000000-enc1"]
    assert env.host.enclaves() == []
    assert ["terminate-enclave", "--all"] in env.host.calls()
    assert json.loads(env.alloc_state.read_text())["requested_memory_mib"] == 1024


# ---------------------------------------------------------------------------------------------
# systemd mode


def test_systemd_restart_and_enable(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    args = env.args(service_manager="systemd")
    first = run(capsys, args)
    assert first["changed"] is True and first["restarted"] is True and first["service_manager"] == "systemd"
    calls = env.systemctl_calls()
    assert "restart nitro-enclaves-allocator.service" in calls
    assert "enable nitro-enclaves-allocator.service" in calls
    second = run(capsys, args)
    assert second["changed"] is False
    assert not any(c.startswith(("restart", "enable")) for c in env.systemctl_calls()[len(calls) :])
    # A config change restarts; enabled stays.
    third = run(capsys, env.args(service_manager="systemd", memory_mib=768))
    assert third["restarted"] is True
    assert env.systemctl_calls().count("restart nitro-enclaves-allocator.service") == 2
    assert env.allocator_calls() == []


def test_systemd_enabled_false(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    run(capsys, env.args(service_manager="systemd", enabled=False))
    assert "enable nitro-enclaves-allocator.service" not in env.systemctl_calls()


def test_systemd_failure(capsys: pytest.CaptureFixture[str], env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SYSTEMD_FAIL", "1")
    result = run(capsys, env.args(service_manager="systemd"))
    assert result["failed"] is True
    assert "nitro-enclaves-allocator.service failed to apply" in result["msg"]
    assert "journalctl -u nitro-enclaves-allocator.service" in result["msg"]


def test_auto_picks_command_without_systemd(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    result = run(capsys, {**env.args(service_manager="auto"), "_ansible_check_mode": True})
    expected = "systemd" if Path("/run/systemd/system").is_dir() else "command"
    assert result["service_manager"] == expected
