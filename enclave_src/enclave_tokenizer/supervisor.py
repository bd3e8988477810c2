"""`enclave-supervisor`: keeps one enclave running as its configuration says.

nitro-cli's run-enclave detaches and returns, so a oneshot unit that calls it loses track of the enclave
(a reported user trap). This process is what the per-enclave service runs instead: it launches the
enclave through nitro-cli, watches the enclave process (a pidfd, see .process_watch), `describe-enclaves`
and the app's vsock port, and relaunches the enclave when it disappears, stops answering, or no longer
matches its configuration (re-read every check, so a changed configuration is applied without restarting
the service). Between checks it
watches the configuration file and the EIF (a stat per second, no nitro-cli call): a change is applied
as soon as it has settled, not at the next check. While the enclave answers and nothing changed, a
check is a vsock connect; nitro-cli is asked when the enclave process exits (at once, not at the next
check), whenever something looks different, and every WATCHED_FULL_CHECK_EVERY checks as a fallback
(FULL_CHECK_EVERY where the enclave process cannot be watched). So is a check while an enclave it just
launched boots (its process watched, within the startup grace): nitro-cli is asked again once it answers.
Stopping the service terminates the enclave.

The configuration is nitro-cli's `run-enclave --config` JSON, plus an optional `measurements` object
(PCR0/PCR1/PCR2 as the build host recorded them; nitro-cli ignores unknown keys). With it, the
supervisor launches only an EIF that measures exactly so: until the EIF and the configuration agree
(a rollout writes one, then the other), the running enclave is left alone. "Matches" is decided by the
same comparison the nitro_enclave module uses (plugins/module_utils/enclave_spec.py).

An upgrade of the tools (the nitro_cli role re-installs the venv and rewrites its install record) makes
the supervisor re-execute itself between checks: the new code takes over and adopts the running enclave,
with no relaunch. Stopping the service is the only thing that terminates the enclave.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import EifError, read_eif
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif_provenance import require_runnable_here
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_spec import (
    differences,
    parse_run_config,
    unexpected_measurements,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.nitro_cli import (
    NitroCli,
    NitroCliError,
    launch_lock,
    vsock_connect,
)

from . import redaction
from .process_watch import ProcessWatch
from .supervisor_state import LastGood, StatusFile, digest_of, status_path_for, wait_settled
from .upgrade import INSTALL_RECORD, UpgradeWatch, default_stamp, file_key, reexec

log = logging.getLogger("enclave-supervisor")

WATCH_STEP_S = 1.0  # how often the configuration and the EIF are stat()ed between checks
# A healthy enclave with unchanged inputs is confirmed by its vsock port alone; every Nth check still
# asks nitro-cli (describe-enclaves is a process per call, on every host, every interval).
FULL_CHECK_EVERY = 6
# With the enclave process watched (its exit ends the wait at once) nitro-cli is only the fallback: every
# 5 min at the default interval, which keeps an idle host's services well under 0.5 % of a core.
WATCHED_FULL_CHECK_EVERY = 60
REEXEC = -1  # run()'s answer when the tools were upgraded under it (see .upgrade)


class ConfigError(Exception):
    """The run configuration cannot be used; names the file and the problem."""


def load_config(path: Path, text: bytes | None = None) -> dict[str, Any]:
    """Reads a run configuration (or parses its ``text``, already read) and returns it as nitro_enclave
    module parameters (plus measurements)."""
    try:
        return parse_run_config(path.read_text() if text is None else text.decode())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def error_reason(exc: NitroCliError) -> str:
    """nitro-cli's error as one line: ``E22: Insufficient CPUs available in the pool. ...``."""
    lines = exc.message.strip().splitlines()
    first = lines[0].rstrip(".") if lines else str(exc)
    return f"E{exc.code:02d}: {first}" if exc.code is not None else first


@dataclass
class Supervisor:
    config_path: Path
    health_port: int | None
    failures_allowed: int = 3
    startup_grace: float = 60.0
    cli: NitroCli = field(default_factory=NitroCli)
    # Set when the service stops: no launch may start after that (systemd has already signalled the
    # enclave; a relaunch now would outlive the service).
    stopping: threading.Event = field(default_factory=threading.Event)
    # The tools' install record: run() hands over to a re-executed process when it changes.
    upgrade: UpgradeWatch = field(default_factory=lambda: UpgradeWatch(None))
    # Where the report for the gateway and the roles goes (None: nowhere).
    status_path: Path | None = None
    _failures: int = 0
    _launched_at: float = 0.0
    _measured: dict[tuple[str, tuple[int, int, int] | None], dict[str, str]] = field(default_factory=dict)
    _eif_path: str | None = None
    _healthy_cid: int | None = None  # CID of the enclave the last full check found matching and answering
    _seen_pid: object = None  # ProcessID of the enclave the last full check found (or launched)
    _starting_cid: int | None = None  # CID of the enclave the last full check launched, until it answers
    process: ProcessWatch = field(default_factory=ProcessWatch)  # that enclave's process, healthy or booting
    _quick_checks: int = 0
    _checked_inputs: tuple[tuple[int, int, int] | None, ...] | None = None
    _held: tuple[tuple[int, int, int] | None, ...] | None = None  # inputs last found disagreeing (logged once)
    config_sha256: str | None = None  # of the configuration the last full check read
    # (config digest, EIF key) of a configuration that failed, and why: the last good one runs instead.
    _rejected: tuple[tuple[Any, ...], str] | None = None
    _trial: tuple[tuple[Any, ...], float] | None = None  # an unproven configuration launched at (monotonic)
    _pending_reason: str | None = None
    _seen_enclave: bool = False  # a launch after this supervisor saw its enclave is a relaunch (counted)
    _running_pcr0: str | None = None  # of the image last launched or found running healthily
    last_good: LastGood = field(init=False)
    status: StatusFile = field(init=False)

    def __post_init__(self) -> None:
        self.last_good = LastGood(self.config_path)
        self.status = StatusFile(self.status_path, self.config_path)

    def inputs(self) -> tuple[tuple[int, int, int] | None, ...]:
        """(inode, mtime, size) of the configuration, of the EIF it named at the last check and of the
        upgrade stamp."""
        return file_key(self.config_path), file_key(self._eif_path), self.upgrade.key()

    def wait_for_next_check(self, seconds: float) -> None:
        """Sleeps until the next check is due, or until the configuration or the EIF changed and then
        stayed the same for a watch step (a rollout writes the EIF, then the configuration), or until the
        watched enclave process exited."""
        deadline = time.monotonic() + seconds
        seen = self._checked_inputs
        while True:
            step = min(WATCH_STEP_S, max(deadline - time.monotonic(), 0.0))
            if self.process.wait(step, self.stopping) or self.stopping.is_set():
                return
            if time.monotonic() >= deadline:
                return
            now = self.inputs()
            if now != self._checked_inputs and now == seen:
                return
            seen = now

    def measurements(self, eif_path: str, eif_key: tuple[int, int, int] | None) -> dict[str, str]:
        """The EIF's PCRs, recomputed only when the file changed (a GiB EIF takes seconds to hash)."""
        key = (eif_path, eif_key)
        if key not in self._measured:
            if len(self._measured) > 4:  # the current EIF, the last good one, and a replaced one or two
                self._measured.clear()
            image = read_eif(eif_path)
            require_runnable_here(image)  # a placeholder EIF never runs on a Nitro host
            self._measured[key] = dict(image.measurements)
        return self._measured[key]

    def check(self) -> str:
        """One reconciliation. Returns what it did: ok, starting, unhealthy, launched, relaunched, stopping,
        or waiting (the EIF is not the image the configuration expects)."""
        if self._quick_check():
            return "ok"
        if self._still_starting():
            return "starting"
        self._quick_checks = 0
        self._healthy_cid = None
        self._seen_pid = None
        self._starting_cid = None
        result, cid = self._full_check()
        if result == "ok":
            self._healthy_cid = cid
            self.process.watch(self._seen_pid)
        elif self._starting_cid is None or not self.process.watch(self._seen_pid):
            self._starting_cid = None
            self.process.close()
        return result

    def _still_starting(self) -> bool:
        """True while the enclave this supervisor just launched boots: within its startup grace, its process
        alive (watched), nothing changed, not answering yet. No nitro-cli call then (a process per check on
        every host of a rollout); once it answers, or any of that changes, a full check takes over."""
        if self._starting_cid is None or self.health_port is None or not self.process.active:
            return False
        if self.process.exited() or self.inputs() != self._checked_inputs:
            return False
        if time.monotonic() - self._launched_at >= self.startup_grace:
            return False
        # Once it answers, the full check confirms it is the configuration's enclave and reports it running.
        return not self._answers(self._starting_cid)

    def _quick_check(self) -> bool:
        """True when the enclave the last full check found healthy still answers and nothing changed."""
        every = WATCHED_FULL_CHECK_EVERY if self.process.active else FULL_CHECK_EVERY
        if self._healthy_cid is None or self.health_port is None or self._quick_checks >= every - 1:
            return False
        if self.inputs() != self._checked_inputs or self.process.exited():
            return False
        if not self._answers(self._healthy_cid):
            return False
        self._quick_checks += 1
        return True

    def _answers(self, cid: int) -> bool:
        """Whether the enclave app at ``cid`` accepts a connection on the health port."""
        if self.health_port is None:
            return False
        try:
            vsock_connect(cid, self.health_port, timeout=2.0).close()
        except OSError:
            return False
        return True

    def _full_check(self) -> tuple[str, int | None]:
        # Stat before reading: a change made while this check runs is seen by the next watch step.
        config_key = file_key(self.config_path)
        try:
            text = self.config_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self.config_path}: {exc}") from None
        self.config_sha256 = digest_of(text)
        spec = load_config(self.config_path, text)
        self._eif_path = spec["eif_path"]
        self._checked_inputs = (config_key, file_key(self._eif_path), self.upgrade.key())
        inputs = (self.config_sha256, self._checked_inputs[1])
        measurements = self.measurements(spec["eif_path"], self._checked_inputs[1])
        unexpected = unexpected_measurements(measurements, spec["measurements"])
        if unexpected:
            if self._held != self._checked_inputs:
                self._held = self._checked_inputs
                log.warning(
                    "%s is not the image %s expects (%s): leaving enclave %s as it is until they agree",
                    spec["eif_path"], self.config_path, "; ".join(unexpected), spec["name"],
                )  # fmt: skip
            reason = f"{spec['eif_path']} is not the image the configuration expects: " + "; ".join(unexpected)
            self.status.report("waiting", self.config_sha256, reason)
            return "waiting", None
        self._held = None
        if self._rejected is not None and self._rejected[0] == inputs:
            return self._run_last_good(self._rejected[1])
        self._rejected = None
        last_good = self.last_good.load()
        trial = last_good is not None and not self._same_as(spec, measurements, last_good)
        if not trial and self._trial is not None:
            self._trial = None
        result, cid = self._reconcile(spec, measurements, inputs if trial else None)
        if result == "ok":
            self._trial = None
            self._running_pcr0 = self._running_pcr0 or measurements.get("PCR0")
            if last_good is None or trial:
                self.last_good.save(spec, measurements)
            self.status.report("running", self.config_sha256, running="current")
        elif self._rejected is None:
            self.status.report("starting", self.config_sha256, self._pending_reason, running="current")
        return result, cid

    def _same_as(self, spec: dict[str, Any], measurements: dict[str, str], other: dict[str, Any]) -> bool:
        """Whether ``spec`` (with its EIF's measurements) is what ``other`` runs, wherever its EIF lives."""
        if {k: v for k, v in spec.items() if k not in ("eif_path", "measurements")} != {
            k: v for k, v in other.items() if k not in ("eif_path", "measurements")
        }:
            return False
        theirs = self.measurements(other["eif_path"], file_key(other["eif_path"]))
        return all(measurements.get(pcr) == theirs.get(pcr) for pcr in ("PCR0", "PCR1", "PCR2"))

    def _reconcile(
        self, spec: dict[str, Any], measurements: dict[str, str], trial: tuple[Any, ...] | None
    ) -> tuple[str, int | None]:
        """Make the enclave run ``spec``. ``trial`` (the inputs' identity) marks a configuration that never
        ran healthily while a last good one exists: it is rejected rather than retried when it fails."""
        self._pending_reason = None
        records = self.cli.enclaves_named(spec["name"])
        if len(records) > 1:
            self.terminate(spec["name"], f"{len(records)} enclaves share the name")
            records = []
        if records:
            changed = differences(records[0], spec, measurements)
            if changed:
                self.terminate(spec["name"], "configuration changed: " + "; ".join(changed))
                return self._launch(spec, trial, "relaunched", "config_changed"), None
            self._seen_pid = records[0].get("ProcessID")
            self._seen_enclave = True
            return self.watch_health(spec, records[0], trial), int(records[0]["EnclaveCID"])
        if trial is not None and self._trial is not None and self._trial[0] == trial:
            since = time.monotonic() - self._trial[1]
            return self._fall_back(
                spec["name"], trial, f"enclave {spec['name']} stopped {since:.0f} s after its launch"
            )
        log.info("enclave %s is not running: launching", spec["name"])
        return self._launch(spec, trial, "launched"), None

    def _launch(self, spec: dict[str, Any], trial: tuple[Any, ...] | None, done: str, why: str = "stopped") -> str:
        try:
            launched = self.launch(spec, why)
        except NitroCliError as exc:
            if trial is None:
                raise
            return self._fall_back(spec["name"], trial, error_reason(exc))[0]
        if trial is not None:
            self._trial = (trial, time.monotonic())
        return done if launched else "stopping"

    def _fall_back(self, name: str, inputs: tuple[Any, ...], cause: str) -> tuple[str, int | None]:
        """Reject the configuration on disk (until its inputs change) and run the last good one."""
        reason = f"{cause}; running the previous configuration"
        log.error("%s: %s", self.config_path, reason)
        self._rejected = (inputs, reason)
        self._trial = None
        self.terminate(name, "the new configuration failed")
        return self._run_last_good(reason)

    def _run_last_good(self, reason: str) -> tuple[str, int | None]:
        spec = self.last_good.load()
        if spec is None:
            raise ConfigError(f"{reason}, but {self.last_good.path} is gone")
        self.status.report("fallback", self.config_sha256, reason, running="last-good")
        measurements = self.measurements(spec["eif_path"], file_key(spec["eif_path"]))
        result, cid = self._reconcile(spec, measurements, None)
        return ("fallback" if result == "ok" else result), cid

    def watch_health(self, spec: dict[str, Any], record: dict[str, Any], trial: tuple[Any, ...] | None = None) -> str:
        if self.health_port is None:
            return "ok"
        try:
            vsock_connect(int(record["EnclaveCID"]), self.health_port, timeout=2.0).close()
        except OSError as exc:
            waited = time.monotonic() - self._launched_at
            if waited < self.startup_grace:
                self._pending_reason = (
                    f"launched {waited:.0f} s ago, not answering on vsock port {self.health_port} yet"
                )
                return "starting"
            if trial is not None:
                port, grace = self.health_port, self.startup_grace
                cause = f"enclave {spec['name']} did not answer on vsock port {port} within {grace:.0f} s of its launch"
                return self._fall_back(spec["name"], trial, cause)[0]
            self._failures += 1
            self._pending_reason = f"not answering on vsock port {self.health_port} ({exc})"
            log.warning(
                "enclave %s does not answer on vsock port %d (%s), %d/%d",
                spec["name"],
                self.health_port,
                exc,
                self._failures,
                self.failures_allowed,
            )
            if self._failures >= self.failures_allowed:
                self.terminate(spec["name"], f"not answering on vsock port {self.health_port}")
                return "relaunched" if self.launch(spec, "unresponsive") else "stopping"
            return "unhealthy"
        self._failures = 0
        return "ok"

    def launch(self, spec: dict[str, Any], why: str = "stopped") -> bool:
        """Launches the enclave; False (and nothing launched) once the service is stopping. ``why``: the
        relaunch reason counted when this supervisor had seen its enclave before."""
        if self.stopping.is_set():
            log.info("not launching enclave %s: the service is stopping", spec["name"])
            return False
        with launch_lock():
            record = self.cli.run_enclave(
                spec["eif_path"],
                spec["memory_mib"],
                cpu_count=spec["cpu_count"],
                cpu_ids=spec["cpu_ids"],
                enclave_cid=spec["enclave_cid"],
                enclave_name=spec["name"],
                debug_mode=spec["debug_mode"],
            )
        self._failures = 0
        self._launched_at = time.monotonic()
        if isinstance(record.get("EnclaveCID"), int):  # watched while it boots (see _still_starting)
            self._starting_cid, self._seen_pid = record["EnclaveCID"], record.get("ProcessID")
        if self._seen_enclave:
            self.status.relaunched(why)
        self._seen_enclave = True
        log.info(
            "launched enclave %s: id %s, CID %s, CPUs %s, %s MiB",
            spec["name"],
            record.get("EnclaveID"),
            record.get("EnclaveCID"),
            record.get("CPUIDs"),
            record.get("MemoryMiB"),
        )
        self._image_event(spec)
        return True

    def _image_event(self, spec: dict[str, Any]) -> None:
        """Log a launch of another image than the one that ran (a rollout, a fallback) as an event."""
        try:
            pcr0 = self.measurements(spec["eif_path"], file_key(spec["eif_path"])).get("PCR0")
        except (EifError, OSError, ValueError):
            return
        old, self._running_pcr0 = self._running_pcr0, pcr0
        if old and pcr0 and old != pcr0:
            event = {"event": "image_change", "enclave": spec["name"], "old_pcr0": old, "new_pcr0": pcr0}
            log.warning("enclave %s runs another image: PCR0 %s -> %s", spec["name"], old, pcr0, extra=event)

    def terminate(self, name: str, reason: str) -> None:
        """Terminates every enclave of that name, by id (the name may be shared after a failed launch)."""
        for record in self.cli.enclaves_named(name):
            log.warning("terminating enclave %s (%s): %s", name, record.get("EnclaveID"), reason)
            try:
                self.cli.terminate_enclave(enclave_id=record["EnclaveID"])
            except NitroCliError as exc:
                # Gone in the meantime (E11: no such enclave process) is what terminating wanted.
                if exc.code != 11:
                    raise


def run(supervisor: Supervisor, interval: float) -> int:
    """Checks until the service stops (then terminates the enclave and returns 0 or 1) or the tools
    are upgraded (returns REEXEC, leaving the enclave running)."""
    stop = supervisor.stopping
    backoff = interval
    while not stop.is_set():
        if supervisor.upgrade.changed():
            log.info("%s changed (tools upgraded): re-executing; the enclave keeps running", supervisor.upgrade.path)
            return REEXEC
        try:
            supervisor.check()
            backoff = interval
        except (ConfigError, EifError, NitroCliError, OSError) as exc:
            # Keep trying with a growing delay: the cause (a bad EIF, an exhausted pool) may be fixed by ops.
            log.error("%s; retrying in %.0f s", exc, backoff)
            reason = error_reason(exc) if isinstance(exc, NitroCliError) else str(exc)
            supervisor.status.report("failed", supervisor.config_sha256, f"{reason}; retrying in {backoff:.0f} s")
            stop.wait(backoff)
            backoff = min(backoff * 2, 60.0)
            continue
        supervisor.wait_for_next_check(interval)
    return stop_enclave(supervisor)


def stop_enclave(supervisor: Supervisor) -> int:
    """The service stops: so does its enclave."""
    try:
        name = load_config(supervisor.config_path)["name"]
        supervisor.terminate(name, "service stopping")
    except (ConfigError, NitroCliError) as exc:
        log.error("could not terminate on stop: %s", exc)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enclave-supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="run-enclave --config JSON file")
    parser.add_argument("--health-port", type=int, help="vsock port the app answers on (no health check if unset)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between checks (default 5)")
    parser.add_argument("--failures", type=int, default=3, help="failed health checks before a relaunch (default 3)")
    parser.add_argument("--startup-grace", type=float, default=60.0, help="seconds a new enclave may take to answer")
    parser.add_argument("--nitro-cli", help="nitro-cli binary (default: nitro-cli on PATH)")
    parser.add_argument(
        "--status-file", type=Path, help="where to report what runs and why (JSON; default: <config>.status)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="do not supervise: wait until the running supervisor settled --config (exit 0: it runs healthily; "
        "1: rejected or not running in time, the reason on stderr)",
    )
    parser.add_argument(
        "--upgrade-stamp",
        type=Path,
        default=default_stamp(),
        help=f"re-execute (keeping the enclave) when this file changes (default: <venv>/{INSTALL_RECORD})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status_path = args.status_file or status_path_for(args.config)
    if args.wait is not None:
        ok, reason = wait_settled(status_path, args.config, args.wait)
        if not ok:
            sys.stderr.write(f"{args.config}: {reason}\n")
        return 0 if ok else 1
    redaction.setup(logging.INFO, log_format="json")  # JSON lines, every record masked
    supervisor = Supervisor(
        config_path=args.config,
        health_port=args.health_port,
        failures_allowed=args.failures,
        startup_grace=args.startup_grace,
        cli=NitroCli(args.nitro_cli),
        upgrade=UpgradeWatch(args.upgrade_stamp),
        status_path=status_path,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stopping.set())
    code = run(supervisor, args.interval)
    if code == REEXEC and supervisor.stopping.is_set():
        code = stop_enclave(supervisor)  # a stop request that came meanwhile wins over the hand-over
    if code == REEXEC:
        reexec()  # the new code adopts the enclave
    return code


if __name__ == "__main__":
    sys.exit(main())
