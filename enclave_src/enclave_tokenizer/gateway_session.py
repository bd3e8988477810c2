"""The gateway's view of its enclave: state and CID (nitro-cli), provisioning, health, attestation.

A monitor task polls the enclave; when it answers but is unprovisioned (first start, or a restart: its
memory and key are gone) the gateway provisions it again, with a backoff after failures. A rotation (a
delivered data key record of a newer generation) provisions it too, and a key change nobody asked for is
logged loudly. ``check`` builds the /healthz report; ``recovered`` is what held requests wait on while the
enclave relaunches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from . import parent
from .client import AsyncClient, TokenizerError
from .parent import ConfigError, GatewayConfig
from .supervisor_state import parse_status, read_status_bytes

log = logging.getLogger("enclave_tokenizer.gateway")

_DESCRIBE_TTL = 2.0
# While the app does not answer (an enclave booting or relaunching), nitro-cli is asked less often: each
# describe is a process, and with the usual fixed CID the new enclave shows by answering again.
_DESCRIBE_TTL_UNANSWERED = 5.0
# With a supervisor's status file to watch, a relaunch is an event: the supervisor rewrites the file when it
# launches the enclave and when the enclave passes its health bound, and nitro-cli is asked then (a new CID
# shows at once); without a change, only this often, in case the supervisor itself is gone.
_DESCRIBE_TTL_SUPERVISED = 30.0
_MAX_BACKOFF = 60.0
_HOLD_STEP_S = 0.1
# A card-network test number (never a real card): what ?canary=1 tokenizes.
CANARY_PAN = "4111111111111111"


def health_reason(report: dict[str, Any]) -> str | None:
    """Why /healthz is not ok, in one line: the supervisor's reason first (it knows why the enclave is not
    what the configuration says), then what the gateway saw."""
    if report["status"] == "ok":
        return None
    supervisor = report.get("supervisor") or {}
    if supervisor.get("reason") and supervisor.get("current") and supervisor.get("state") != "running":
        return f"supervisor: {supervisor['state']}: {supervisor['reason']}"
    enclave = report["enclave"]
    if enclave.get("state") not in ("RUNNING", "UNCHECKED"):
        detail = enclave.get("error") or f"nitro-cli describe-enclaves shows no enclave {enclave.get('name')!r}"
        return f"enclave {enclave.get('state')}: {detail}"
    if not report["app"]["answering"]:
        return f"the enclave app does not answer: {report['app']['error']}"
    error = report["key"]["last_error"]
    if not report["key"]["provisioned"]:
        return f"key not provisioned: {error['code']}: {error['message']}" if error else "key not provisioned yet"
    for check in ("attestation", "canary"):
        if check in report and not report[check].get("valid", report[check].get("ok")):
            return f"{check} failed: {report[check].get('error')}"
    return None


class EnclaveSession:
    """What one gateway knows of its enclave (state, CID, key check, provisioning) and the checks on it."""

    def __init__(self, config: GatewayConfig, monitor: bool = True) -> None:
        self.config = config
        self._monitored = monitor  # one monitor per host: extra worker processes (gateway_workers) run none
        self.cid: int | None = config.enclave_cid
        self.client: AsyncClient = parent.async_client(config, self._current_cid)
        self.enclave: dict[str, Any] = {"state": None if config.enclave_name else "UNCHECKED"}
        self._described_at = 0.0
        self._described_report: bytes | None = None  # the supervisor's status file then
        self.provision_error: dict[str, str] | None = None
        self.provision_failures = 0
        self._next_provision = 0.0
        self._provision_lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        # The key check this gateway last saw: a change it did not ask for (no rotation) is reported.
        self.key_check: str | None = None
        self.unexpected_key_change: dict[str, str] | None = None
        # Provisioning attempts finished so far: a check whose health predates one re-reads it (a stale key
        # check would look like an unexpected change, a stale "unprovisioned" would provision twice).
        self._provision_attempts = 0
        self._recovery: asyncio.Future[dict[str, Any]] | None = None  # the check held requests share
        # Set when the gateway stops: waits (held requests, /healthz?wait) end so it stops promptly.
        self.stopping = asyncio.Event()

    def _current_cid(self) -> int:
        if self.cid is None:
            raise ConnectionRefusedError("enclave CID unknown: is the enclave running?")
        return self.cid

    # ---------------------------------------------------------------- enclave state
    def _describe_due(self, answering: bool, report: bytes | None) -> bool:
        """Whether to ask nitro-cli again: every few seconds, or, while the app does not answer and the
        supervisor reports, when its report changed (``report``: the status file now)."""
        elapsed = time.monotonic() - self._described_at
        if answering:
            return elapsed >= _DESCRIBE_TTL
        if report is None:
            return elapsed >= _DESCRIBE_TTL_UNANSWERED
        return report != self._described_report or elapsed >= _DESCRIBE_TTL_SUPERVISED

    async def refresh_enclave(self, answering: bool, report: bytes | None) -> None:
        """Enclave state and CID from nitro-cli, asked when due (``_describe_due``; ``report``: the supervisor's
        status file as read for this check); a new CID means a restart."""
        if not self.config.enclave_name:
            return
        if not self._describe_due(answering, report):
            return
        self._described_at = time.monotonic()
        self._described_report = report
        try:
            entry = await parent.describe_enclave(self.config.nitro_cli, self.config.enclave_name)
        except (OSError, RuntimeError) as exc:
            self.enclave = {"state": "UNKNOWN", "error": str(exc)[:300]}
            return
        if entry is None:
            self.enclave = {"state": "NOT_FOUND", "name": self.config.enclave_name}
            return
        self.enclave = {
            "state": entry.get("State"),
            "name": entry.get("EnclaveName"),
            "id": entry.get("EnclaveID"),
            "cid": entry.get("EnclaveCID"),
        }
        if self.config.enclave_cid is None and isinstance(entry.get("EnclaveCID"), int):
            self.cid = entry["EnclaveCID"]

    async def app_health(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            return await self.client.health(timeout=min(self.config.request_timeout, 3.0)), None
        except TokenizerError as exc:
            return None, exc.message

    def _rotation_due(self, health: dict[str, Any]) -> bool:
        """The delivered data key record is of a newer generation than the enclave's key (a rotation)."""
        if not (health.get("provisioned") and self.config.provisioning_configured):
            return False
        try:
            record = parent.read_data_key(self.config.kms_ciphertext_file or "")
        except (ConfigError, OSError):
            return False
        return record["generation"] > (health.get("key_generation") or 0)

    def _watch_key(self, health: dict[str, Any] | None, rotated: bool) -> None:
        """Log loudly when the enclave's key changes without a rotation this gateway asked for
        (``rotated``: this gateway has just provisioned a newer generation)."""
        key_check = (health or {}).get("key_check")
        if not key_check:
            return
        known = self.key_check
        if known is not None and key_check != known and not rotated:
            self.unexpected_key_change = {"old_key_check": known, "new_key_check": key_check}
            event = {"event": "key_change", "expected": False, **self.unexpected_key_change}
            log.error("unexpected data key change in the enclave: key check %s -> %s", known, key_check, extra=event)
        elif known is not None and key_check != known:
            event = {"event": "key_change", "expected": True, "old_key_check": known, "new_key_check": key_check}
            log.warning("data key rotated in the enclave: key check %s -> %s", known, key_check, extra=event)
        self.key_check = key_check

    async def ensure_provisioned(self, health: dict[str, Any], attempts_seen: int) -> dict[str, Any] | None:
        """Provision an answering but unprovisioned enclave (backoff after failures, except for a fresh
        enclave that has never been asked), or one whose key an explicit rotation replaced. ``health`` was
        read when ``attempts_seen`` provisioning attempts had been made. Returns the health after the attempt
        (None: the enclave stopped answering)."""
        # One check at a time: concurrent checks (monitor, /healthz, a held request) would otherwise each
        # provision, and judge the key against what another one is changing.
        async with self._provision_lock:
            if attempts_seen != self._provision_attempts:
                fresh_health, _ = await self.app_health()
                if fresh_health is None:
                    return None
                health = fresh_health
            self._watch_key(health, rotated=False)
            rotation = self._rotation_due(health)
            if (health.get("provisioned") and not rotation) or not self.config.provisioning_configured:
                return health
            fresh = health.get("provision_attempts") == 0
            if not fresh and time.monotonic() < self._next_provision:
                return health
            try:
                request = parent.provision_request(self.config)
                result = await self.client.provision(request)
            except (TokenizerError, ConfigError, OSError) as exc:
                code = getattr(exc, "code", "config_error")
                message = getattr(exc, "message", str(exc))
                self.provision_error = {"code": code, "message": message}
                self.provision_failures += 1
                self._next_provision = time.monotonic() + min(_MAX_BACKOFF, 2.0**self.provision_failures)
                log.warning("provisioning the enclave failed: %s: %s", code, message)
            else:
                log.info("enclave provisioned (key check %s)", result.get("key_check"))
                self.provision_error = None
                self.provision_failures = 0
            finally:
                self._provision_attempts += 1
            after, _ = await self.app_health()
            self._watch_key(after, rotated=rotation)
            return after or health

    async def check(self, provision: bool = True) -> dict[str, Any]:
        cid = self.cid
        attempts_seen = self._provision_attempts
        health, app_error = await self.app_health()
        # One read of the supervisor's report per check: the describe decision and the reported state agree.
        report = read_status_bytes(self.config.supervisor_status_file)
        await self.refresh_enclave(answering=health is not None, report=report)
        if health is None and self.cid != cid:  # found under a new CID: ask it now
            health, app_error = await self.app_health()
        if health is not None and provision:
            health = await self.ensure_provisioned(health, attempts_seen)
            if health is None:
                app_error = "the enclave stopped answering during the check"
        running = self.enclave.get("state") in ("RUNNING", "UNCHECKED")
        provisioned = bool(health and health.get("provisioned"))
        key_error = (health or {}).get("last_provision_error") or self.provision_error
        if not provisioned and key_error is None and not self.config.provisioning_configured:
            key_error = {"code": "config_error", "message": "kms_region/kms_ciphertext_file not configured"}
        supervisor = parse_status(report)
        status = "ok" if running and health is not None and provisioned else "unavailable"
        if status == "ok" and supervisor and supervisor["current"] and supervisor["state"] == "fallback":
            status = "degraded"  # serving, but not the configuration on disk: the supervisor says why
        return {
            "status": status,
            "supervisor": supervisor,
            "enclave": self.enclave,
            "app": {
                "answering": health is not None,
                "error": app_error,
                "version": (health or {}).get("version"),
                "uptime_s": (health or {}).get("uptime_s"),
            },
            "key": {
                "provisioned": provisioned,
                "key_check": (health or {}).get("key_check"),
                "generation": (health or {}).get("key_generation"),
                "unexpected_change": self.unexpected_key_change,
                "detokenize_enabled": (health or {}).get("detokenize_enabled"),
                "last_error": None if provisioned else key_error,
            },
        }

    async def _monitor_loop(self) -> None:
        while True:
            try:
                # An enclave that answers holding its key needs nothing: no nitro-cli call (a process per
                # poll on every host). Otherwise check it (describing it when due: a restart may bring a new
                # CID) and provision it.
                health, _ = await self.app_health()
                if not (health and health.get("provisioned")) or self._rotation_due(health):
                    await self.check()
            except Exception as exc:  # the monitor must outlive any single failure
                log.error("monitor: %s", type(exc).__name__)
            await asyncio.sleep(self.config.monitor_interval)

    async def attest(self) -> dict[str, Any]:
        nonce = parent.fresh_nonce()
        try:
            document = await self.client.attest(nonce)
        except TokenizerError as exc:
            return {"valid": False, "check": "request", "error": f"{exc.code}: {exc.message}"}
        from .attestation import AttestationError

        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, parent.verify_document, document, nonce, self.config
            )
        except AttestationError as exc:
            return {"valid": False, "check": exc.check, "error": exc.message}
        except (ConfigError, OSError) as exc:
            return {"valid": False, "check": "config", "error": str(exc)}

    async def canary(self) -> dict[str, Any]:
        """Tokenize CANARY_PAN as /v1/tokenize would (same client, same enclave operation)."""
        try:
            answer = await self.client.request({"op": "tokenize", "mode": "opaque", "pan": CANARY_PAN})
        except TokenizerError as exc:
            return {"ok": False, "error": f"{exc.code}: {exc.message}"}
        token = answer.get("token")
        ok = isinstance(token, str) and len(token) >= 32 and answer.get("last_four") == CANARY_PAN[-4:]
        return {"ok": ok} if ok else {"ok": False, "error": "unexpected answer to the canary tokenization"}

    async def recovered(self, deadline: float) -> bool:
        """Wait (until ``deadline``) for the enclave to answer provisioned again; False at once when it
        answers but its provisioning failed (nothing will change by waiting). Held requests share one
        check at a time."""
        while True:
            if self._recovery is None or self._recovery.done():
                self._recovery = asyncio.ensure_future(self.check(provision=True))
            try:
                report = await asyncio.shield(self._recovery)
            except Exception:  # a failed check means "not yet"
                report = None
            if report is not None and report["status"] in ("ok", "degraded"):  # degraded: the previous one serves
                return True
            if report is not None and report["app"]["answering"] and report["key"]["last_error"]:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0 or await self.stopped_within(min(_HOLD_STEP_S, remaining)):
                return False

    async def stopped_within(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if the gateway starts stopping: True then."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    # ---------------------------------------------------------------- lifecycle
    def start_monitor(self) -> None:
        if self._monitored:
            self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.client.close()
