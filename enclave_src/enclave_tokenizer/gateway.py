"""Local HTTP gateway (aiohttp) in front of the enclave, for apps in any language.

    POST /v1/tokenize    {"pan": "..."} | {"pans": [...]} [, "mode": "opaque|fpe|reversible"]
    POST /v1/detokenize  {"token": "..."} | {"tokens": [...]}; capability in the
                         X-Detokenize-Capability header (or "capability" in the body)
    GET  /healthz        200 only when the enclave is RUNNING, its key is provisioned and the app
                         answers; ?attest=1 also verifies a fresh attestation document (nonce) against
                         the expected measurements; ?canary=1 also tokenizes a test card number
                         through the enclave; ?wait=S (at most 300) holds the answer until the
                         report is healthy or S seconds passed (one request per rollout gate).
    GET  /metrics        Prometheus metrics (text exposition format; see .metrics)

A monitor task polls the enclave; when it answers but is unprovisioned (first start, or a restart:
its memory and key are gone) the gateway provisions it again. Requests are multiplexed over a pool of
persistent vsock connections. Request bodies are never logged. When the tools are upgraded the
gateway finishes its requests and re-executes itself (see .upgrade).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

from aiohttp import http_exceptions, web, web_protocol

from . import http_api, parent, protocol, redaction
from .client import AsyncClient, EnclaveUnavailable, TokenizerError
from .http_api import route_pattern as _route
from .metrics import GatewayMetrics, traffic_store
from .metrics_store import TrafficStore
from .parent import ConfigError, GatewayConfig
from .supervisor_state import read_status
from .tokens import MODES
from .upgrade import UpgradeWatch, default_stamp, reexec

log = logging.getLogger("enclave_tokenizer.gateway")

_STATUS = {
    "bad_json": 400,
    "bad_request": 400,
    "invalid_pan": 400,
    "invalid_token": 400,
    "batch_too_large": 413,
    "request_too_large": 413,
    "request_timeout": 408,
    "forbidden": 403,
    "not_provisioned": 503,
    "enclave_unavailable": 503,
    "busy": 503,
}
_DESCRIBE_TTL = 2.0
# While the app does not answer (an enclave booting or relaunching), nitro-cli is asked less often: each
# describe is a process, and with the usual fixed CID the new enclave shows by answering again.
_DESCRIBE_TTL_UNANSWERED = 5.0
_MAX_HEALTH_WAIT_S = 300.0
_HEALTH_WAIT_STEP_S = 0.5
_MAX_BACKOFF = 60.0
# Errors of an enclave that is relaunching or not yet re-provisioned: requests wait (hold_timeout) for it.
_HELD_CODES = ("enclave_unavailable", "not_provisioned")
_HOLD_STEP_S = 0.1
_UPGRADE_CHECK_S = 5.0
_MAX_REENCODE_GROWTH = 8
# A card-network test number (never a real card): what ?canary=1 tokenizes.
CANARY_PAN = "4111111111111111"


def _error(code: str, message: str, status: int | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status or _STATUS.get(code, 502))


def _flat_and_small(fields: dict[str, Any], body_size: int | None) -> bool:
    """Fields that are strings (or lists of strings) from a small body cannot encode past the enclave's frame
    limit, nor too deeply: re-encoding a JSON string grows it at most 3x (a UTF-8 char as a \\u escape), so
    the encoding pass that measures them is skipped (one JSON encode fewer per single-PAN request)."""
    if body_size is None or body_size * _MAX_REENCODE_GROWTH + 256 > protocol.MAX_REQUEST_BYTES:
        return False
    for value in fields.values():
        if type(value) is list:
            if not all(type(item) is str for item in value):
                return False
        elif type(value) is not str:
            return False
    return True


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


# ---------------------------------------------------------------- HTTP-level errors, always JSON
# aiohttp's own error answers are text/plain, and its parser errors quote the request bytes (card
# numbers included) in the exception it logs at ERROR and in the answer: the gateway names the kind of
# error only, and logs no request byte.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 414: "uri_too_long"}
_PARSER_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "request line or header too long"),
    (http_exceptions.BadHttpMethod, "unknown HTTP method"),
    (http_exceptions.BadStatusLine, "malformed request line"),
    (http_exceptions.InvalidURLError, "malformed request target"),
    (http_exceptions.InvalidHeader, "malformed header"),
    (http_exceptions.TransferEncodingError, "malformed chunked body"),
    (http_exceptions.ContentLengthError, "body does not match its Content-Length"),
    (http_exceptions.ContentEncodingError, "body does not match its Content-Encoding"),
    (web_protocol.RequestPayloadError, "request body could not be read"),
)


def _parser_error(exc: BaseException | None) -> str:
    for kind, text in _PARSER_ERRORS:
        if isinstance(exc, kind):
            return text
    return "malformed HTTP request"


def _json_errors(max_body: int) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = f"request body exceeds {max_body} bytes" if exc.status == 413 else exc.reason
            response = _error(_HTTP_CODES.get(exc.status, "bad_request"), message, exc.status)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except (web_protocol.RequestPayloadError, http_exceptions.HttpProcessingError) as exc:
            log.info("refused a request to %s: %s", _route(request), type(exc).__name__)
            return _error("bad_http", _parser_error(exc), 400)
        except ConnectionError:  # the client went away: nobody reads this answer
            log.debug("client disconnected during a request to %s", _route(request))
            return _error("bad_http", "connection lost", 400)
        except Exception as exc:  # a bug, never the client's input: logged (masked), answered as JSON
            log.error("internal error answering %s: %s", _route(request), type(exc).__name__, exc_info=exc)
            return _error("internal", "internal error in the gateway", 500)

    return middleware


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, with errors it answers itself (parser errors) answered as JSON."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):  # the client went away: not an error of the gateway
            log.debug("client disconnected: %s", type(exc).__name__)
        elif status >= 500:
            log.error("error answering a request: %s", type(exc).__name__, exc_info=exc)
        else:
            log.info("refused a malformed HTTP request: %s", type(exc).__name__)
        if request.writer.output_size > 0:  # as aiohttp: a response already started cannot be replaced
            raise ConnectionError("response already sent: cannot send an error response")
        if status >= 500:
            response = _error("internal", "internal error in the gateway", status)
        else:
            response = _error("bad_http", _parser_error(exc), status)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    """AppRunner whose connections use _RequestHandler (aiohttp 3.14 has no hook for the class)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **server._kwargs,
        )


class Gateway:
    def __init__(
        self, config: GatewayConfig, monitor: bool = True, store: TrafficStore | None = None, worker: int = 0
    ) -> None:
        self.config = config
        self._monitored = monitor  # one monitor per host: extra worker processes (gateway_workers) run none
        self.cid: int | None = config.enclave_cid
        self.client: AsyncClient = parent.async_client(config, self._current_cid)
        self.enclave: dict[str, Any] = {"state": None if config.enclave_name else "UNCHECKED"}
        self._described_at = 0.0
        self.provision_error: dict[str, str] | None = None
        self.provision_failures = 0
        self._next_provision = 0.0
        self._provision_lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        # The key check this gateway last saw: a change it did not ask for (no rotation) is reported.
        self.key_check: str | None = None
        self.unexpected_key_change: dict[str, str] | None = None
        self._rotating = False
        self._recovery: asyncio.Future[dict[str, Any]] | None = None  # the check held requests share
        # ``store``: the traffic counters all the gateway's processes share (``worker``: this one's slot).
        interval = config.metrics_self_check_interval
        self.metrics = GatewayMetrics(self, interval, store, worker) if config.metrics else None

    def _current_cid(self) -> int:
        if self.cid is None:
            raise ConnectionRefusedError("enclave CID unknown: is the enclave running?")
        return self.cid

    # ---------------------------------------------------------------- enclave state
    async def refresh_enclave(self, force: bool = False, ttl: float = _DESCRIBE_TTL) -> None:
        """Enclave state and CID from nitro-cli (cached for ``ttl`` s); a new CID means a restart."""
        if not self.config.enclave_name or (not force and time.monotonic() - self._described_at < ttl):
            return
        self._described_at = time.monotonic()
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

    def _watch_key(self, health: dict[str, Any] | None) -> None:
        """Log loudly when the enclave's key changes without a rotation this gateway asked for."""
        key_check = (health or {}).get("key_check")
        if not key_check:
            return
        known = self.key_check
        if known is not None and key_check != known and not self._rotating:
            self.unexpected_key_change = {"old_key_check": known, "new_key_check": key_check}
            event = {"event": "key_change", "expected": False, **self.unexpected_key_change}
            log.error("unexpected data key change in the enclave: key check %s -> %s", known, key_check, extra=event)
        elif known is not None and key_check != known:
            event = {"event": "key_change", "expected": True, "old_key_check": known, "new_key_check": key_check}
            log.warning("data key rotated in the enclave: key check %s -> %s", known, key_check, extra=event)
        self.key_check = key_check

    async def ensure_provisioned(self, health: dict[str, Any]) -> dict[str, Any]:
        """Provision an answering but unprovisioned enclave (backoff after failures, except for a fresh
        enclave that has never been asked), or one whose key an explicit rotation replaced. Returns the
        health after the attempt."""
        self._watch_key(health)
        self._rotating = self._rotation_due(health)
        if (health.get("provisioned") and not self._rotating) or not self.config.provisioning_configured:
            return health
        fresh = health.get("provision_attempts") == 0
        if not fresh and time.monotonic() < self._next_provision:
            return health
        async with self._provision_lock:
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
        after, _ = await self.app_health()
        self._watch_key(after)
        self._rotating = False
        return after or health

    async def check(self, provision: bool = True, force_describe: bool = False) -> dict[str, Any]:
        cid = self.cid
        health, app_error = await self.app_health()
        await self.refresh_enclave(force_describe, _DESCRIBE_TTL if health is not None else _DESCRIBE_TTL_UNANSWERED)
        if health is None and self.cid != cid:  # found under a new CID: ask it now
            health, app_error = await self.app_health()
        if health is not None and provision:
            health = await self.ensure_provisioned(health)
        running = self.enclave.get("state") in ("RUNNING", "UNCHECKED")
        provisioned = bool(health and health.get("provisioned"))
        key_error = (health or {}).get("last_provision_error") or self.provision_error
        if not provisioned and key_error is None and not self.config.provisioning_configured:
            key_error = {"code": "config_error", "message": "kms_region/kms_ciphertext_file not configured"}
        supervisor = read_status(self.config.supervisor_status_file)
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
                # poll on every host). Otherwise describe it (a restart may bring a new CID) and provision.
                health, _ = await self.app_health()
                if not (health and health.get("provisioned")) or self._rotation_due(health):
                    await self.check(force_describe=True)
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

    # ---------------------------------------------------------------- HTTP handlers
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            if request.content.is_eof():  # all received with the headers (the usual small body): no wait
                raw = await request.read()
            else:
                # A body that never completes (a huge chunk size, a slow sender) does not hold a handler.
                async with asyncio.timeout(self.config.request_timeout):
                    raw = await request.read()
        except TimeoutError:
            raise TokenizerError("request_timeout", "request body not received in time") from None
        try:
            body = protocol.loads_strict(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError and non-finite numbers included
            raise TokenizerError("bad_json", "request body must be JSON (UTF-8, finite numbers)") from None
        if not isinstance(body, dict):
            raise TokenizerError("bad_request", "request body must be a JSON object")
        return body

    async def _forward(self, enclave_request: dict[str, Any], many: str, body_size: int | None = None) -> web.Response:
        items = enclave_request.get(many)
        if items is not None and isinstance(items, list) and len(items) > self.config.max_batch:
            return _error("batch_too_large", f"at most {self.config.max_batch} items per request")
        try:
            size = 0 if _flat_and_small(enclave_request, body_size) else protocol.encoded_size(enclave_request)
        except (ValueError, RecursionError):
            return _error("bad_request", "request fields cannot be sent to the enclave (nesting too deep)")
        if size > protocol.MAX_REQUEST_BYTES:  # the enclave would drop the connection: refuse it here
            return _error(
                "request_too_large",
                f"request encodes to {size} bytes for the enclave; at most {protocol.MAX_REQUEST_BYTES}",
            )
        rid = redaction.request_id.get()
        if rid is not None:
            enclave_request["rid"] = rid  # echoed by the enclave; its own records carry it
        deadline = time.monotonic() + self.config.hold_timeout
        while True:
            try:
                return web.json_response(await self.client.request(enclave_request))
            except TokenizerError as exc:
                # An enclave being relaunched (or re-provisioned) comes back: hold the request rather than
                # answer 503. Every operation is idempotent, so sending it again is safe.
                if exc.code in _HELD_CODES and time.monotonic() < deadline and await self._recovered(deadline):
                    continue
                if isinstance(exc, EnclaveUnavailable):
                    log.warning("enclave unavailable: %s", exc.message)
                    return _error(exc.code, "the enclave is not answering")
                return _error(exc.code, exc.message)

    async def _recovered(self, deadline: float) -> bool:
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
            if remaining <= 0:
                return False
            await asyncio.sleep(min(_HOLD_STEP_S, remaining))

    async def handle_tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
        except TokenizerError as exc:
            return _error(exc.code, exc.message)
        forward: dict[str, Any] = {"op": "tokenize", "mode": body.get("mode", "opaque")}
        if forward["mode"] in MODES and forward["mode"] not in self.config.allowed_modes:
            return _error("mode_not_allowed", f"mode {forward['mode']} is not enabled on this gateway", 403)
        if "pans" in body:
            forward["pans"] = body["pans"]
        elif "pan" in body:
            forward["pan"] = body["pan"]
        else:
            return _error("bad_request", "'pan' or 'pans' is required")
        return await self._forward(forward, "pans", request.content_length)

    async def handle_detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
        except TokenizerError as exc:
            return _error(exc.code, exc.message)
        capability = request.headers.get("X-Detokenize-Capability", body.get("capability"))
        forward: dict[str, Any] = {"op": "detokenize", "capability": capability}
        if "tokens" in body:
            forward["tokens"] = body["tokens"]
        elif "token" in body:
            forward["token"] = body["token"]
        else:
            return _error("bad_request", "'token' or 'tokens' is required")
        return await self._forward(forward, "tokens")

    async def handle_health(self, request: web.Request) -> web.Response:
        raw_wait = request.query.get("wait", "0")
        try:
            wait = float(raw_wait)
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= _MAX_HEALTH_WAIT_S:
            return _error("bad_request", f"wait={raw_wait!r}: expected seconds from 0 to {_MAX_HEALTH_WAIT_S:g}", 400)
        attest = request.query.get("attest") in ("1", "true", "yes")
        canary = request.query.get("canary") in ("1", "true", "yes")
        deadline = time.monotonic() + wait
        while True:
            report = await self.check(provision=True)
            last = time.monotonic() >= deadline
            # An enclave that is not healthy yet cannot attest either: no attestation round trip (signing
            # and verifying a document) until it is, or until the answer is due.
            if attest and (report["status"] == "ok" or last):
                report["attestation"] = await self.attest()
                if not report["attestation"].get("valid"):
                    report["status"] = "unavailable"
            if canary and (report["status"] == "ok" or last):
                report["canary"] = await self.canary()
                if not report["canary"]["ok"]:
                    report["status"] = "unavailable"
            # The supervisor rejected the configuration on disk: waiting longer changes nothing.
            rejected = (report["supervisor"] or {}).get("state") == "fallback" and report["supervisor"]["current"]
            if report["status"] == "ok" or last or rejected:
                report["reason"] = health_reason(report)
                return web.json_response(report, status=200 if report["status"] in ("ok", "degraded") else 503)
            await asyncio.sleep(min(_HEALTH_WAIT_STEP_S, max(deadline - time.monotonic(), 0.0)))

    # ---------------------------------------------------------------- lifecycle
    def app(self) -> web.Application:
        middlewares = [http_api.middleware(self.config.access_log), _json_errors(self.config.max_body)]
        app = web.Application(client_max_size=self.config.max_body, middlewares=middlewares)
        http_api.add_routes(app)
        app.router.add_post("/v1/tokenize", self.handle_tokenize)
        app.router.add_post("/v1/detokenize", self.handle_detokenize)
        app.router.add_get("/healthz", self.handle_health)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        if self.metrics is not None:
            self.metrics.install(app)  # GET /metrics, a middleware and the enclave client's timing
        return app

    async def _on_startup(self, app: web.Application) -> None:
        if self._monitored:
            self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.client.close()


def _notify_systemd(message: str) -> None:
    """sd_notify without libsystemd: lets the unit be Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


async def serve(
    config: GatewayConfig,
    ready: asyncio.Event | None = None,
    signals: bool = False,
    upgrade: UpgradeWatch | None = None,
    worker: int = 0,
    *,
    store: TrafficStore | None = None,
) -> bool:
    """Run until cancelled (tests) or, with ``signals``, until SIGTERM/SIGINT (service). With ``upgrade``,
    also stop (after the in-flight requests) once the tools were upgraded: returns True then. ``worker``:
    this process's index among ``config.workers`` sharing the port (only worker 0 monitors the enclave),
    ``store`` the metrics they share (made before the fork)."""
    runner = _Runner(Gateway(config, monitor=worker == 0, store=store, worker=worker).app(), access_log=None)
    await runner.setup()
    reuse = config.workers > 1 or None  # several processes bind the port; the kernel spreads connections
    site = web.TCPSite(runner, config.listen_host, config.listen_port, backlog=1024, reuse_port=reuse)
    await site.start()
    log.info("gateway listening on http://%s:%s", config.listen_host, config.listen_port)
    if worker == 0:  # the service's main process
        _notify_systemd("READY=1")
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    signalled = asyncio.Event()  # a stop request wins over a hand-over to upgraded code
    if signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, lambda: (signalled.set(), stop.set()))
    upgraded = asyncio.Event()
    watcher = asyncio.get_running_loop().create_task(_watch_upgrade(upgrade, stop, upgraded)) if upgrade else None
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await runner.cleanup()
    return upgraded.is_set() and not signalled.is_set()


async def _watch_upgrade(upgrade: UpgradeWatch, stop: asyncio.Event, upgraded: asyncio.Event) -> None:
    while not upgrade.changed():
        await asyncio.sleep(_UPGRADE_CHECK_S)
    log.info("%s changed (tools upgraded): re-executing", upgrade.path)
    upgraded.set()
    stop.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enclave-tokenizer gateway", description="HTTP gateway to the enclave")
    parser.add_argument("--config")
    parser.add_argument("--metrics", action=argparse.BooleanOptionalAction, help="serve GET /metrics (default: config)")
    args = parser.parse_args(argv)
    # An explicit config must exist; the default one is optional (env-only configuration).
    path = args.config or parent.default_config()
    try:
        config = GatewayConfig.load(path, metrics=args.metrics)
    except ConfigError as exc:
        parser.exit(2, f"enclave-tokenizer gateway: {exc}\n")
    redaction.setup(config.log_level, log_format=config.log_format)  # every record masked, aiohttp's too
    from . import gateway_workers

    # The metrics every process counts into, then the extra worker processes (forked before any event loop
    # exists); this process is worker 0.
    store = traffic_store(config.workers) if config.metrics and config.workers > 1 else None
    children = gateway_workers.start(
        config.workers, lambda worker: serve(config, signals=True, worker=worker, store=store)
    )
    try:
        upgraded = asyncio.run(serve(config, signals=True, upgrade=UpgradeWatch(default_stamp()), store=store))
    finally:
        gateway_workers.stop(children)
    if upgraded:
        reexec()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
