"""What the enclave supervisor keeps and what it tells.

The last good configuration: once an enclave ran healthily from a run configuration, the supervisor keeps
a copy of it (``<config>.last-good``) and of its EIF (``<config>.last-good.<pcr0 prefix>.eif``, a hard
link where the file system allows, else a copy). A new configuration or EIF that cannot be launched,
or does not answer within the bound, is rejected and the last good one runs instead, until the inputs
change again. The configuration file's rename is the commit point: it always names an EIF that exists.

The status file (``<config>.status`` unless told otherwise; JSON, written atomically on every change)
says what runs and why it is not the configuration on disk: ``state`` is one of running, starting,
waiting, fallback, failed; ``reason`` names the cause (nitro-cli's error code and message, a missed
health bound); ``config_sha256`` is the digest of the configuration it is about, so a reader tells a
stale report (the supervisor has not seen a new configuration yet) from a current one. The gateway's
/healthz and ``enclave-supervisor --wait`` read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.atomic_file import write_atomic
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_spec import (
    parse_run_config,
    render_run_config,
)

log = logging.getLogger("enclave-supervisor")

STATES = ("running", "starting", "waiting", "fallback", "failed")
# A settled answer for the configuration on disk: it runs, or it was rejected for a reason.
SETTLED = ("running", "fallback")
# Why an enclave this supervisor had seen was launched again (a bounded vocabulary: a metric label).
RELAUNCH_REASONS = ("stopped", "unresponsive", "config_changed", "other")


def status_path_for(config_path: Path) -> Path:
    """Where the supervisor of ``config_path`` reports by default (the role's services need no option)."""
    return config_path.with_name(config_path.name + ".status")


def digest_of(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def file_digest(path: Path | str | None) -> str | None:
    """SHA-256 of a (small) file, None when it cannot be read."""
    try:
        return digest_of(Path(path).read_bytes()) if path else None
    except OSError:
        return None


@dataclass
class LastGood:
    """The copy of the last configuration (and EIF) that ran healthily, next to the configuration."""

    config_path: Path

    @property
    def path(self) -> Path:
        return self.config_path.with_name(self.config_path.name + ".last-good")

    def load(self) -> dict[str, Any] | None:
        """The last good spec (module option names), None when there is none or it is unusable."""
        try:
            spec = parse_run_config(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s is unusable, ignored: %s", self.path, exc)
            return None
        return spec if Path(spec["eif_path"]).is_file() else None

    def save(self, spec: dict[str, Any], measurements: dict[str, str]) -> None:
        """Keep ``spec`` (which just ran healthily) and its EIF. The EIF first, under a name of its own; the
        configuration's rename commits; older EIF copies go last."""
        eif = self.config_path.with_name(f"{self.config_path.name}.last-good.{measurements['PCR0'][:16]}.eif")
        if not (eif.exists() and os.path.samefile(eif, spec["eif_path"])):
            tmp = eif.with_name(f".{eif.name}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(spec["eif_path"], tmp)  # the EIF is replaced by a rename: the link keeps this content
            except OSError:  # another file system
                shutil.copyfile(spec["eif_path"], tmp)
            os.replace(tmp, eif)
        text = render_run_config({**spec, "eif_path": str(eif)}, measurements)
        write_atomic(self.path, text.encode(), dir_mode=0o777)
        for old in self.config_path.parent.glob(f"{self.config_path.name}.last-good.*.eif"):
            if old != eif:
                old.unlink(missing_ok=True)
        log.info("kept %s (and its EIF) as the last good configuration", self.path)


@dataclass
class StatusFile:
    """The supervisor's report about ``config`` (its path is in the report); written when it changes."""

    path: Path | None
    config: Path | None = None
    _last: dict[str, Any] | None = None
    # Relaunches by this supervisor process (a counter: it restarts from 0 with the service) and the last
    # one's cause, one of RELAUNCH_REASONS: the gateway's /metrics exports both from this file.
    relaunches: int = 0
    last_relaunch: dict[str, Any] | None = None

    def relaunched(self, reason: str) -> None:
        """Count a relaunch; the next report carries it."""
        self.relaunches += 1
        self.last_relaunch = {"reason": reason if reason in RELAUNCH_REASONS else "other", "at": time.time()}

    def report(self, state: str, config_sha256: str | None, reason: str | None = None, **extra: Any) -> None:
        config = None if self.config is None else str(self.config)
        body = {"state": state, "reason": reason, "config": config, "config_sha256": config_sha256, **extra}
        body.update(relaunches=self.relaunches, last_relaunch=self.last_relaunch)
        if self.path is None or body == self._last:
            return
        try:
            write_atomic(
                self.path, json.dumps({**body, "pid": os.getpid(), "updated": time.time()}).encode(), dir_mode=0o777
            )
        except OSError as exc:  # the report must never stop the supervision itself
            log.warning("cannot write the status file %s: %s", self.path, exc)
            return
        self._last = body


def read_status_bytes(status_path: Path | str | None) -> bytes | None:
    """The status file's bytes (a few hundred), None when there is none. Every report carries its time
    (``updated``), so a reader tells a new report from the last one it saw by comparing these; and
    ``parse_status`` of the same bytes gives the report that was compared."""
    if not status_path:
        return None
    try:
        return Path(status_path).read_bytes()
    except OSError:
        return None


def parse_status(raw: bytes | None) -> dict[str, Any] | None:
    """The supervisor's report as a reader sees it: ``current`` is False when the report is about another
    configuration than the one on disk now (the supervisor has not applied it yet). None: no report."""
    if raw is None:
        return None
    try:
        status = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(status, dict) or status.get("state") not in STATES:
        return None
    config_path = status.get("config")
    current = file_digest(config_path) if config_path else None
    return {
        "state": status["state"],
        "reason": status.get("reason"),
        "running": status.get("running"),
        "config": config_path,
        "current": current is None or status.get("config_sha256") == current,
        "updated": status.get("updated"),
        "relaunches": status.get("relaunches") if isinstance(status.get("relaunches"), int) else 0,
        "last_relaunch": status.get("last_relaunch") if isinstance(status.get("last_relaunch"), dict) else None,
    }


def read_status(status_path: Path | str | None) -> dict[str, Any] | None:
    """The supervisor's report in ``status_path`` now (``parse_status``); None: no report."""
    return parse_status(read_status_bytes(status_path))


def wait_settled(status_path: Path, config_path: Path, timeout: float, step: float = 1.0) -> tuple[bool, str]:
    """Wait until the supervisor settled ``config_path`` as it is on disk now: (True, "") when it runs healthily,
    (False, reason) when it was rejected (the last good one runs) or still not running at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        status = read_status(status_path)
        if status and status["config"] != str(config_path):
            status = None  # another enclave's report
        if status and status["current"] and status["state"] in SETTLED:
            return status["state"] == "running", status["reason"] or ""
        if time.monotonic() >= deadline:
            if status is None:
                return False, f"no report from the supervisor in {status_path} after {timeout:.0f} s"
            if not status["current"]:
                return False, f"the supervisor has not applied {config_path} after {timeout:.0f} s"
            return False, f"{status['state']} after {timeout:.0f} s: {status['reason'] or 'no reason given'}"
        time.sleep(step)
