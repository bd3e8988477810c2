"""`enclave-supervisor`: keeps one enclave running as its configuration says.

nitro-cli's run-enclave detaches and returns, so a oneshot unit that calls it loses track of the enclave
(a reported user trap). This process is what the per-enclave service runs instead: it launches the
enclave through nitro-cli, watches `describe-enclaves` and the app's vsock port, and relaunches the
enclave when it disappears, stops answering, or no longer matches its configuration (re-read every
check, so a changed configuration is applied without restarting the service). Between checks it
watches the configuration file and the EIF (a stat per second, no nitro-cli call): a change is applied
as soon as it has settled, not at the next check. While the enclave answers and nothing changed, a
check is a vsock connect; nitro-cli is asked every FULL_CHECK_EVERY checks and whenever something
looks different. Stopping the service terminates the enclave.

The configuration is nitro-cli's `run-enclave --config` JSON, plus an optional `measurements` object
(PCR0/PCR1/PCR2 as the build host recorded them; nitro-cli ignores unknown keys). With it, the
supervisor launches only an EIF that measures exactly so: until the EIF and the configuration agree
(a rollout writes one, then the other), the running enclave is left alone. "Matches" is decided by the
same comparison the nitro_enclave module uses (nitro_module_utils.enclave_spec).

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

from nitro_module_utils.eif import EifError, read_eif
from nitro_module_utils.eif_provenance import require_runnable_here
from nitro_module_utils.enclave_spec import differences, parse_run_config, unexpected_measurements
from nitro_module_utils.nitro_cli import NitroCli, NitroCliError, launch_lock, vsock_connect

from . import redaction
from .upgrade import INSTALL_RECORD, UpgradeWatch, default_stamp, file_key, reexec

log = logging.getLogger("enclave-supervisor")

WATCH_STEP_S = 1.0  # how often the configuration and the EIF are stat()ed between checks
# A healthy enclave with unchanged inputs is confirmed by its vsock port alone; every Nth check still
# asks nitro-cli (describe-enclaves is a process per call, on every host, every interval).
FULL_CHECK_EVERY = 6
REEXEC = -1  # run()'s answer when the tools were upgraded under it (see .upgrade)


class ConfigError(Exception):
    """The run configuration cannot be used; names the file and the problem."""


def load_config(path: Path) -> dict[str, Any]:
    """Reads a run configuration and returns it as nitro_enclave module parameters (plus measurements)."""
    try:
        return parse_run_config(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


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
    _failures: int = 0
    _launched_at: float = 0.0
    _measured: tuple[tuple[str, tuple[int, int, int] | None], dict[str, str]] | None = None
    _eif_path: str | None = None
    _healthy_cid: int | None = None  # CID of the enclave the last full check found matching and answering
    _quick_checks: int = 0
    _checked_inputs: tuple[tuple[int, int, int] | None, ...] | None = None
    _held: tuple[tuple[int, int, int] | None, ...] | None = None  # inputs last found disagreeing (logged once)

    def inputs(self) -> tuple[tuple[int, int, int] | None, ...]:
        """(inode, mtime, size) of the configuration, of the EIF it named at the last check and of the
        upgrade stamp."""
        return file_key(self.config_path), file_key(self._eif_path), self.upgrade.key()

    def wait_for_next_check(self, seconds: float) -> None:
        """Sleeps until the next check is due, or until the configuration or the EIF changed and then
        stayed the same for a watch step (a rollout writes the EIF, then the configuration)."""
        deadline = time.monotonic() + seconds
        seen = self._checked_inputs
        while not self.stopping.wait(min(WATCH_STEP_S, max(deadline - time.monotonic(), 0.0))):
            if time.monotonic() >= deadline:
                return
            now = self.inputs()
            if now != self._checked_inputs and now == seen:
                return
            seen = now

    def measurements(self, eif_path: str, eif_key: tuple[int, int, int] | None) -> dict[str, str]:
        """The EIF's PCRs, recomputed only when the file changed (a GiB EIF takes seconds to hash)."""
        key = (eif_path, eif_key)
        if self._measured is None or self._measured[0] != key:
            image = read_eif(eif_path)
            require_runnable_here(image)  # a placeholder EIF never runs on a Nitro host
            self._measured = (key, dict(image.measurements))
        return self._measured[1]

    def check(self) -> str:
        """One reconciliation. Returns what it did: ok, starting, unhealthy, launched, relaunched, stopping,
        or waiting (the EIF is not the image the configuration expects)."""
        if self._quick_check():
            return "ok"
        self._quick_checks = 0
        self._healthy_cid = None
        result, cid = self._full_check()
        if result == "ok":
            self._healthy_cid = cid
        return result

    def _quick_check(self) -> bool:
        """True when the enclave the last full check found healthy still answers and nothing changed."""
        if self._healthy_cid is None or self.health_port is None or self._quick_checks >= FULL_CHECK_EVERY - 1:
            return False
        if self.inputs() != self._checked_inputs:
            return False
        try:
            vsock_connect(self._healthy_cid, self.health_port, timeout=2.0).close()
        except OSError:
            return False
        self._quick_checks += 1
        return True

    def _full_check(self) -> tuple[str, int | None]:
        # Stat before reading: a change made while this check runs is seen by the next watch step.
        config_key = file_key(self.config_path)
        spec = load_config(self.config_path)
        self._eif_path = spec["eif_path"]
        self._checked_inputs = (config_key, file_key(self._eif_path), self.upgrade.key())
        measurements = self.measurements(spec["eif_path"], self._checked_inputs[1])
        unexpected = unexpected_measurements(measurements, spec["measurements"])
        if unexpected:
            if self._held != self._checked_inputs:
                self._held = self._checked_inputs
                log.warning(
                    "%s is not the image %s expects (%s): leaving enclave %s as it is until they agree",
                    spec["eif_path"], self.config_path, "; ".join(unexpected), spec["name"],
                )  # fmt: skip
            return "waiting", None
        self._held = None
        records = self.cli.enclaves_named(spec["name"])
        if len(records) > 1:
            self.terminate(spec["name"], f"{len(records)} enclaves share the name")
            records = []
        if records:
            changed = differences(records[0], spec, measurements)
            if changed:
                self.terminate(spec["name"], "configuration changed: " + "; ".join(changed))
                return ("relaunched" if self.launch(spec) else "stopping"), None
            return self.watch_health(spec, records[0]), int(records[0]["EnclaveCID"])
        log.info("enclave %s is not running: launching", spec["name"])
        return ("launched" if self.launch(spec) else "stopping"), None

    def watch_health(self, spec: dict[str, Any], record: dict[str, Any]) -> str:
        if self.health_port is None:
            return "ok"
        try:
            vsock_connect(int(record["EnclaveCID"]), self.health_port, timeout=2.0).close()
        except OSError as exc:
            if time.monotonic() - self._launched_at < self.startup_grace:
                return "starting"
            self._failures += 1
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
                return "relaunched" if self.launch(spec) else "stopping"
            return "unhealthy"
        self._failures = 0
        return "ok"

    def launch(self, spec: dict[str, Any]) -> bool:
        """Launches the enclave; False (and nothing launched) once the service is stopping."""
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
        log.info(
            "launched enclave %s: id %s, CID %s, CPUs %s, %s MiB",
            spec["name"],
            record.get("EnclaveID"),
            record.get("EnclaveCID"),
            record.get("CPUIDs"),
            record.get("MemoryMiB"),
        )
        return True

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
        "--upgrade-stamp",
        type=Path,
        default=default_stamp(),
        help=f"re-execute (keeping the enclave) when this file changes (default: <venv>/{INSTALL_RECORD})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    redaction.setup(logging.INFO, "%(levelname)s %(name)s: %(message)s")  # every record masked
    supervisor = Supervisor(
        config_path=args.config,
        health_port=args.health_port,
        failures_allowed=args.failures,
        startup_grace=args.startup_grace,
        cli=NitroCli(args.nitro_cli),
        upgrade=UpgradeWatch(args.upgrade_stamp),
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
