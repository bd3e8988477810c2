"""enclave-supervisor against a fake stateful nitro-cli: launch, adopt, apply config changes, relaunch
an enclave that stops answering on vsock, terminate on stop, never launch while stopping."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.nitro_cli import NitroCli
from enclave_tokenizer import supervisor as supervisor_module
from enclave_tokenizer import upgrade
from enclave_tokenizer.supervisor import (
    FULL_CHECK_EVERY,
    REEXEC,
    WATCHED_FULL_CHECK_EVERY,
    ConfigError,
    Supervisor,
    load_config,
    run,
)
from enclave_tokenizer.supervisor_state import StatusFile, read_status, status_path_for, wait_settled
from enclave_tokenizer.upgrade import UpgradeWatch
from nitro_fakes import FakeHost, make_eif


def write_config(path: Path, eif: Path, **overrides: object) -> Path:
    config = {"eif_path": str(eif), "memory_mib": 128, "cpu_count": 2, "enclave_cid": 16, "enclave_name": "tok"}
    config.update(overrides)
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    return FakeHost(tmp_path, monkeypatch)


@pytest.fixture
def eif(tmp_path: Path) -> Path:
    path = tmp_path / "tok.eif"
    make_eif(path)
    return path


def supervisor(config: Path, health_port: int | None = None) -> Supervisor:
    return Supervisor(config_path=config, health_port=health_port, failures_allowed=2, startup_grace=0, cli=NitroCli())


def test_launches_then_adopts_a_matching_enclave(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    sup = supervisor(write_config(tmp_path / "tok.json", eif))
    assert sup.check() == "launched"
    assert sup.check() == "ok"
    assert sup.check() == "ok"
    assert host.subcommands().count("run-enclave") == 1
    (record,) = host.enclaves()
    assert (record["EnclaveName"], record["EnclaveCID"], record["NumberOfCPUs"]) == ("tok", 16, 2)


def test_a_changed_configuration_is_applied_by_relaunching(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "tok.json", eif)
    sup = supervisor(config)
    sup.check()
    write_config(config, eif, memory_mib=256)
    assert sup.check() == "relaunched"
    (record,) = host.enclaves()
    assert record["MemoryMiB"] == 256
    assert host.subcommands().count("terminate-enclave") == 1


def test_a_new_eif_is_a_change_of_measurements(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    sup = supervisor(write_config(tmp_path / "tok.json", eif))
    sup.check()
    before = host.enclaves()[0]["Measurements"]["PCR0"]
    make_eif(eif, payload=b"NEW APP")
    assert sup.check() == "relaunched"
    assert host.enclaves()[0]["Measurements"]["PCR0"] != before


def test_a_new_image_is_logged_as_an_event_with_both_pcr0(
    host: FakeHost, eif: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = supervisor(write_config(tmp_path / "tok.json", eif))
    sup.check()
    assert sup.check() == "ok"
    before = host.enclaves()[0]["Measurements"]["PCR0"]
    assert not [r for r in caplog.records if getattr(r, "event", None) == "image_change"]  # a first launch
    make_eif(eif, payload=b"NEW APP")
    with caplog.at_level("WARNING", logger="enclave-supervisor"):
        assert sup.check() == "relaunched"
    (event,) = [r for r in caplog.records if getattr(r, "event", None) == "image_change"]
    after = host.enclaves()[0]["Measurements"]["PCR0"]
    assert (event.old_pcr0, event.new_pcr0, event.enclave) == (before, after, "tok")
    assert before in event.getMessage() and after in event.getMessage()


def test_an_enclave_that_died_is_relaunched(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    sup = supervisor(write_config(tmp_path / "tok.json", eif))
    sup.check()
    host.state.write_text(json.dumps({"enclaves": [], "next": 9}))
    assert sup.check() == "launched"
    assert len(host.enclaves()) == 1


class AppPort:
    """The enclave app's vsock port 5000 on CID 16, emulated: a UNIX socket under the fake host's vsock dir."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "vsock" / "16" / "5000"
        self.path.parent.mkdir(parents=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(16)

    def stop(self) -> None:
        self.listener.close()
        self.path.unlink()


def test_an_enclave_that_stops_answering_is_relaunched(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    app = AppPort(tmp_path)
    sup = supervisor(write_config(tmp_path / "tok.json", eif), health_port=5000)
    sup.check()
    assert sup.check() == "ok"
    app.stop()
    assert sup.check() == "unhealthy"
    assert sup.check() == "relaunched"
    assert host.subcommands().count("run-enclave") == 2


def test_a_healthy_enclave_is_confirmed_without_nitro_cli(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    app = AppPort(tmp_path)
    config = write_config(tmp_path / "tok.json", eif)
    sup = supervisor(config, health_port=5000)
    assert sup.check() == "launched"
    assert sup.check() == "ok"
    describes = host.subcommands().count("describe-enclaves")
    # The next FULL_CHECK_EVERY - 1 checks only knock on the vsock port; the one after asks nitro-cli.
    assert [sup.check() for _ in range(FULL_CHECK_EVERY - 1)] == ["ok"] * (FULL_CHECK_EVERY - 1)
    assert host.subcommands().count("describe-enclaves") == describes
    assert sup.check() == "ok"
    assert host.subcommands().count("describe-enclaves") == describes + 1
    # A changed configuration is never taken on trust: the next check is a full one and applies it.
    write_config(config, eif, memory_mib=256)
    assert sup.check() == "relaunched"
    # Nor is a silent enclave: the full check counts the failure.
    assert sup.check() == "ok"
    app.stop()
    assert sup.check() == "unhealthy"


def test_stopping_terminates_and_never_launches(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    sup = supervisor(write_config(tmp_path / "tok.json", eif))
    sup.check()
    sup.stopping.set()
    assert run(sup, interval=0.01) == 0
    assert host.enclaves() == []
    # A check racing with the stop must not start a new enclave that would outlive the service.
    assert sup.check() == "stopping"
    assert host.enclaves() == []


def test_only_the_expected_image_is_launched(
    host: FakeHost, eif: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = {k: v for k, v in make_eif(eif).items() if k in ("PCR0", "PCR1", "PCR2")}
    new_eif = tmp_path / "new.eif"
    new = {k: v for k, v in make_eif(new_eif, payload=b"NEW APP").items() if k in ("PCR0", "PCR1", "PCR2")}
    # Uppercase hex in the configuration is the same measurement.
    config = write_config(tmp_path / "tok.json", eif, measurements={k: v.upper() for k, v in old.items()})
    sup = supervisor(config)
    assert sup.check() == "launched"

    # A rollout writes the EIF first: it is not the image the configuration expects, so the enclave
    # running the old one is left alone (no terminate, no launch), and that is logged once.
    new_eif.replace(eif)
    assert [sup.check(), sup.check()] == ["waiting", "waiting"]
    assert host.enclaves()[0]["Measurements"]["PCR0"] == old["PCR0"]
    assert "terminate-enclave" not in host.subcommands()
    assert sum("is not the image" in r.getMessage() for r in caplog.records) == 1
    assert "PCR0" in caplog.text

    # Then the configuration: both agree, and the enclave is relaunched on the new image.
    write_config(config, eif, measurements=new)
    assert sup.check() == "relaunched"
    assert host.enclaves()[0]["Measurements"]["PCR0"] == new["PCR0"]

    # A missing enclave is not launched from an EIF the configuration does not expect either.
    write_config(config, eif, measurements=old)
    host.state.write_text(json.dumps({"enclaves": [], "next": 9}))
    assert sup.check() == "waiting"
    assert host.enclaves() == []


def answering(app: AppPort) -> AppPort:
    """Accepts (and closes) every connection, so that many quick checks never fill the backlog."""

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                app.listener.accept()[0].close()

    threading.Thread(target=serve, daemon=True).start()
    return app


def enclave_process_stand_in() -> subprocess.Popen[bytes]:
    """A live process whose command line names the emulator's enclave process, as a real one does."""
    code = "import time; time.sleep(120)"
    return subprocess.Popen([sys.executable, "-c", code, "nitro_emulator.enclave_process"])


def test_the_enclave_process_is_watched_instead_of_asking_nitro_cli(
    host: FakeHost, eif: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("enclave_tokenizer.supervisor.WATCH_STEP_S", 0.05)
    app = answering(AppPort(tmp_path))
    sup = supervisor(write_config(tmp_path / "tok.json", eif), health_port=5000)
    assert sup.check() == "launched"
    process = enclave_process_stand_in()
    try:
        state = json.loads(host.state.read_text())
        state["enclaves"][0]["ProcessID"] = process.pid
        host.state.write_text(json.dumps(state))
        assert sup.check() == "ok" and sup.process.pid == process.pid
        describes = host.subcommands().count("describe-enclaves")
        # Watched: many more quick checks (vsock only) pass before nitro-cli is asked as a fallback.
        quick = WATCHED_FULL_CHECK_EVERY - 1
        assert quick > FULL_CHECK_EVERY
        assert [sup.check() for _ in range(quick)] == ["ok"] * quick
        assert host.subcommands().count("describe-enclaves") == describes
        assert sup.check() == "ok"
        assert host.subcommands().count("describe-enclaves") == describes + 1

        # The process exits: the wait ends at once (not at the next interval) and a full check follows,
        # which finds the enclave gone and relaunches it.
        threading.Timer(0.2, process.kill).start()
        start = time.monotonic()
        sup.wait_for_next_check(60)
        assert time.monotonic() - start < 10
        process.wait()
        host.state.write_text(json.dumps({"enclaves": [], "next": 9}))
        assert sup.check() == "launched"
        assert not sup.process.active
    finally:
        process.kill()
        process.wait()
        app.stop()


def test_a_booting_enclave_is_waited_for_without_asking_nitro_cli(
    host: FakeHost, eif: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    process = enclave_process_stand_in()
    monkeypatch.setenv("FAKE_NITRO_PID", str(process.pid))  # run-enclave's ProcessID: a live enclave process
    config = write_config(tmp_path / "tok.json", eif)
    sup = Supervisor(config_path=config, health_port=5000, startup_grace=60, cli=NitroCli())
    app = None
    try:
        assert sup.check() == "launched"
        describes = host.subcommands().count("describe-enclaves")
        # It boots (its process lives, its port does not answer yet): checks knock on the port only.
        assert [sup.check() for _ in range(5)] == ["starting"] * 5
        assert host.subcommands().count("describe-enclaves") == describes
        # It answers: one full check confirms it is the configuration's enclave; then it is watched as healthy.
        app = answering(AppPort(tmp_path))
        assert sup.check() == "ok"
        assert host.subcommands().count("describe-enclaves") == describes + 1
        assert sup.process.pid == process.pid
        # A configuration changed while an enclave boots is a full check at once: relaunched, booting again.
        write_config(config, eif, memory_mib=256)
        app.stop()
        app = None
        assert sup.check() == "relaunched"
        describes = host.subcommands().count("describe-enclaves")
        assert sup.check() == "starting"
        assert host.subcommands().count("describe-enclaves") == describes
        # Its process exits while it boots: the next check asks nitro-cli (the enclave is gone or failing).
        process.kill()
        process.wait()
        sup.check()
        assert host.subcommands().count("describe-enclaves") == describes + 1
    finally:
        process.kill()
        process.wait()
        if app is not None:
            app.stop()


def test_a_pid_that_is_not_an_enclave_process_is_not_watched(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    app = answering(AppPort(tmp_path))
    sup = supervisor(write_config(tmp_path / "tok.json", eif), health_port=5000)
    sup.check()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        state = json.loads(host.state.read_text())
        state["enclaves"][0]["ProcessID"] = other.pid
        host.state.write_text(json.dumps(state))
        assert sup.check() == "ok"
        assert not sup.process.active  # polled as before: nitro-cli every FULL_CHECK_EVERY checks
        describes = host.subcommands().count("describe-enclaves")
        assert [sup.check() for _ in range(FULL_CHECK_EVERY)] == ["ok"] * FULL_CHECK_EVERY
        assert host.subcommands().count("describe-enclaves") == describes + 1
    finally:
        other.kill()
        other.wait()
        app.stop()


def test_a_tools_upgrade_re_executes_and_keeps_the_enclave(
    host: FakeHost, eif: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("enclave_tokenizer.supervisor.WATCH_STEP_S", 0.02)
    stamp = tmp_path / "venv" / ".wheelhouse.sha256"
    stamp.parent.mkdir()
    stamp.write_text("old\n")
    config = write_config(tmp_path / "tok.json", eif)
    sup = Supervisor(config_path=config, health_port=None, cli=NitroCli(), upgrade=UpgradeWatch(stamp))
    assert sup.check() == "launched"
    enclave = host.enclaves()[0]["EnclaveID"]

    # install-tools.sh writes the record elsewhere and renames it over the old one once pip is done.
    new = stamp.with_name("record.tmp")
    new.write_text("new\n")
    threading.Timer(0.1, new.replace, args=(stamp,)).start()
    assert run(sup, interval=60) == REEXEC
    assert [r["EnclaveID"] for r in host.enclaves()] == [enclave]  # not terminated
    assert "terminate-enclave" not in host.subcommands()

    # The new process (same command line, same PID) adopts the running enclave.
    after = Supervisor(config_path=config, health_port=None, cli=NitroCli(), upgrade=UpgradeWatch(stamp))
    assert after.check() == "ok" and not after.upgrade.changed()
    assert host.subcommands().count("run-enclave") == 1


def test_main_re_executes_itself_with_its_own_command_line(
    tmp_path: Path, eif: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    execs: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(supervisor_module, "run", lambda *_: REEXEC)
    monkeypatch.setattr(upgrade.os, "execv", lambda path, argv: execs.append((path, argv)))
    monkeypatch.setattr(supervisor_module.signal, "signal", lambda *_: None)  # keep pytest's handlers
    supervisor_module.main(["--config", str(write_config(tmp_path / "tok.json", eif))])
    assert execs == [(sys.executable, sys.orig_argv)]
    parser = supervisor_module.build_parser()
    assert parser.parse_args(["--config", "x", "--upgrade-stamp", "/s"]).upgrade_stamp == Path("/s")


def test_a_stop_during_the_hand_over_wins(
    host: FakeHost, eif: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    execs: list[object] = []
    monkeypatch.setattr(upgrade.os, "execv", lambda *args: execs.append(args))
    monkeypatch.setattr(supervisor_module.signal, "signal", lambda *_: None)

    def upgraded_then_stopped(sup: Supervisor, interval: float) -> int:
        sup.stopping.set()  # SIGTERM arrived just as the upgrade was noticed
        return REEXEC

    config = write_config(tmp_path / "tok.json", eif)
    assert supervisor(config).check() == "launched"
    monkeypatch.setattr(supervisor_module, "run", upgraded_then_stopped)
    assert supervisor_module.main(["--config", str(config)]) == 0
    assert execs == []  # no re-exec: the service stops, and so does its enclave
    assert host.enclaves() == []


def test_bad_configurations_name_the_problem(tmp_path: Path, eif: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of cpu_count and cpu_ids"):
        load_config(write_config(tmp_path / "a.json", eif, cpu_ids=[1]))
    with pytest.raises(ConfigError, match="missing enclave_name"):
        load_config(write_config(tmp_path / "b.json", eif, enclave_name=""))
    (tmp_path / "c.json").write_text("[1]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(tmp_path / "c.json")
    for bad in ({"PCR0": "ab"}, {"PCR9": "a" * 96}, ["PCR0"]):
        with pytest.raises(ConfigError, match=r"measurements .* must map PCR0, PCR1 or PCR2 to 96 hex"):
            load_config(write_config(tmp_path / "d.json", eif, measurements=bad))


def test_between_checks_a_settled_change_ends_the_wait(
    host: FakeHost, eif: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("enclave_tokenizer.supervisor.WATCH_STEP_S", 0.02)
    config = write_config(tmp_path / "tok.json", eif)
    sup = supervisor(config)
    sup.check()
    checks_before = host.subcommands().count("describe-enclaves")

    # Nothing changed: the wait lasts its whole interval and calls no nitro-cli.
    start = time.monotonic()
    sup.wait_for_next_check(0.3)
    assert time.monotonic() - start >= 0.3
    assert host.subcommands().count("describe-enclaves") == checks_before

    # A new EIF (written elsewhere and renamed over, as Ansible's copy does) ends the wait long before
    # the interval, and the check that follows relaunches on it.
    replacement = tmp_path / "new.eif"
    make_eif(replacement, payload=b"NEW APP")
    threading.Timer(0.1, replacement.replace, args=(eif,)).start()
    start = time.monotonic()
    sup.wait_for_next_check(60)
    assert time.monotonic() - start < 30
    assert sup.check() == "relaunched"

    # Stopping the service ends the wait at once.
    sup.stopping.set()
    start = time.monotonic()
    sup.wait_for_next_check(60)
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------------------------
# The last good configuration: a change that cannot run never takes the healthy enclave down for long.


def status_of(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_configuration_that_cannot_launch_falls_back_to_the_last_good(
    host: FakeHost, eif: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NITRO_CPU_POOL", "2")
    config = write_config(tmp_path / "tok.json", eif)
    status = tmp_path / "run" / "tok.status.json"
    sup = Supervisor(config_path=config, health_port=None, startup_grace=0, cli=NitroCli(), status_path=status)
    assert sup.check() == "launched"
    assert sup.check() == "ok"
    assert status_of(status)["state"] == "running"
    kept = load_config(config.with_name("tok.json.last-good"))
    assert kept["cpu_count"] == 2 and Path(kept["eif_path"]).samefile(eif)  # a hard link to the EIF that ran

    # A bad variable: more CPUs than the pool. The relaunch fails with E22, the previous one runs again.
    write_config(config, eif, cpu_count=3)
    assert sup.check() == "launched"  # the last good one, after the failed attempt
    (record,) = host.enclaves()
    assert record["NumberOfCPUs"] == 2
    report = status_of(status)
    assert report["state"] == "fallback" and report["running"] == "last-good"
    assert report["reason"].startswith("E22: Insufficient CPUs available in the pool. User provided `cpu-count` is 3")
    assert report["reason"].endswith("more than the configured CPU pool size; running the previous configuration")
    assert report["config_sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()
    # Rejected until the inputs change: no launch attempt per check, the last good one is left running.
    launches = host.subcommands().count("run-enclave")
    assert [sup.check(), sup.check()] == ["fallback", "fallback"]
    assert host.subcommands().count("run-enclave") == launches
    assert load_config(config.with_name("tok.json.last-good"))["cpu_count"] == 2

    # A fixed configuration is tried again, runs, and becomes the last good one.
    write_config(config, eif, cpu_count=1)
    assert sup.check() == "relaunched"
    assert sup.check() == "ok"
    assert host.enclaves()[0]["NumberOfCPUs"] == 1
    assert status_of(status)["state"] == "running" and status_of(status)["reason"] is None
    assert load_config(config.with_name("tok.json.last-good"))["cpu_count"] == 1


def _rolled_to_new_image(host: FakeHost, eif: Path, tmp_path: Path, app: AppPort) -> tuple[Supervisor, str, Path]:
    status = tmp_path / "tok.status.json"
    config = write_config(tmp_path / "tok.json", eif)
    sup = Supervisor(config_path=config, health_port=5000, startup_grace=0, cli=NitroCli(), status_path=status)
    assert sup.check() == "launched"
    assert sup.check() == "ok"
    old = host.enclaves()[0]["Measurements"]["PCR0"]
    new = tmp_path / "new.eif"
    make_eif(new, payload=b"NEW APP")
    new.replace(eif)  # the rollout's copy: a new file renamed over the old one
    assert sup.check() == "relaunched"
    assert host.enclaves()[0]["Measurements"]["PCR0"] != old
    return sup, old, status


def test_a_new_image_that_never_answers_falls_back(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    app = AppPort(tmp_path)
    sup, old, status = _rolled_to_new_image(host, eif, tmp_path, app)
    app.stop()  # the new image's app never answers (startup_grace 0: the bound has passed)
    assert sup.check() == "launched"  # the last good one, from its own copy of the old EIF
    assert host.enclaves()[0]["Measurements"]["PCR0"] == old
    report = status_of(status)
    assert report["state"] == "fallback"
    assert "did not answer on vsock port 5000 within 0 s of its launch; running the previous" in report["reason"]


def test_a_new_image_that_crashes_at_start_falls_back(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    app = AppPort(tmp_path)
    config = tmp_path / "tok.json"
    sup, old, status = _rolled_to_new_image(host, eif, tmp_path, app)
    host.state.write_text(json.dumps({"enclaves": [], "next": 9}))  # its app exited: the enclave is gone
    assert sup.check() == "launched"
    assert host.enclaves()[0]["Measurements"]["PCR0"] == old
    assert re.fullmatch(
        r"enclave tok stopped \d+ s after its launch; running the previous configuration", status_of(status)["reason"]
    )
    assert sup.check() == "fallback"  # healthy again, on the old image

    # Rolling back (the old EIF and configuration put back) adopts the enclave running them: no relaunch.
    launches = host.subcommands().count("run-enclave")
    make_eif(tmp_path / "old.eif")
    (tmp_path / "old.eif").replace(eif)
    write_config(config, eif, memory_mib=128)
    assert sup.check() == "ok"
    assert host.subcommands().count("run-enclave") == launches
    assert status_of(status)["state"] == "running"


def test_wait_reports_what_the_supervisor_settled(tmp_path: Path, eif: Path) -> None:
    config = write_config(tmp_path / "tok.json", eif)
    status = tmp_path / "tok.status.json"
    sha = hashlib.sha256(config.read_bytes()).hexdigest()
    assert wait_settled(status, config, 0, step=0.01) == (False, f"no report from the supervisor in {status} after 0 s")
    StatusFile(status, config).report("running", "stale")
    assert wait_settled(status, config, 0, step=0.01) == (False, f"the supervisor has not applied {config} after 0 s")
    StatusFile(status, config).report("starting", sha, "launched 3 s ago")
    assert wait_settled(status, config, 0, step=0.01) == (False, "starting after 0 s: launched 3 s ago")
    StatusFile(status, config).report("fallback", sha, "E22: ...; running the previous configuration")
    assert wait_settled(status, config, 60, step=0.01) == (False, "E22: ...; running the previous configuration")
    StatusFile(status, config).report("running", sha)
    assert wait_settled(status, config, 60, step=0.01) == (True, "")
    assert read_status(status)["current"] is True
    write_config(config, eif, memory_mib=256)
    assert read_status(status)["current"] is False
    # The CLI: exit 0 when the configuration on disk runs, 1 with the reason on stderr otherwise.
    assert supervisor_module.main(["--config", str(config), "--status-file", str(status), "--wait", "0"]) == 1
    assert status_path_for(config) == tmp_path / "tok.json.status"


def test_relaunches_are_counted_with_their_reason_in_the_status_file(host: FakeHost, eif: Path, tmp_path: Path) -> None:
    """The gateway's /metrics exports these: the first launch is not a relaunch; each later one is, with
    its cause from a fixed vocabulary."""
    config = write_config(tmp_path / "tok.json", eif)
    status = tmp_path / "tok.status"
    sup = Supervisor(config_path=config, health_port=None, cli=NitroCli(), status_path=status)
    assert sup.check() == "launched"
    sup.check()
    assert (read_status(status) or {})["relaunches"] == 0
    host.state.write_text(json.dumps({"enclaves": [], "next": 9}))  # the enclave died
    assert sup.check() == "launched"
    report = read_status(status) or {}
    assert report["relaunches"] == 1 and report["last_relaunch"]["reason"] == "stopped"
    assert time.time() - report["last_relaunch"]["at"] < 60
    write_config(config, eif, memory_mib=256)
    assert sup.check() == "relaunched"
    report = read_status(status) or {}
    assert report["relaunches"] == 2 and report["last_relaunch"]["reason"] == "config_changed"
    # An enclave that stops answering is relaunched for that reason.
    app = AppPort(tmp_path)
    watched = Supervisor(
        config_path=config, health_port=5000, failures_allowed=1, startup_grace=0, cli=NitroCli(), status_path=status
    )
    assert watched.check() == "ok"
    app.stop()
    assert watched.check() == "relaunched"
    report = read_status(status) or {}
    assert report["relaunches"] == 1 and report["last_relaunch"]["reason"] == "unresponsive"
