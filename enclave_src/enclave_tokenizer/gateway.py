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

This module holds the routes and the service's lifecycle; the pieces live beside it: gateway_requests
(bodies parsed and checked), gateway_session (the enclave's state, provisioning, health and attestation
checks), gateway_http (JSON errors at every HTTP layer), gateway_workers (extra processes on the port).
Requests are multiplexed over a pool of persistent vsock connections. Request bodies are never logged.
When the tools are upgraded the gateway finishes its requests and re-executes itself (see .upgrade).
A stopping gateway answers at once the requests held for a relaunching enclave and the /healthz waits
(503; clients send them again), and gives the others _SHUTDOWN_TIMEOUT_S.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from typing import Any

from aiohttp import web

from . import gateway_requests, http_api, parent, redaction
from .client import EnclaveUnavailable, TokenizerError
from .gateway_coalesce import Coalescer
from .gateway_http import Runner, error, json_errors
from .gateway_session import EnclaveSession, health_reason
from .metrics import GatewayMetrics, traffic_store
from .metrics_store import TrafficStore
from .parent import ConfigError, GatewayConfig
from .upgrade import UpgradeWatch, default_stamp, reexec

log = logging.getLogger("enclave_tokenizer.gateway")

_MAX_HEALTH_WAIT_S = 300.0
_HEALTH_WAIT_STEP_S = 0.5
# Errors of an enclave that is relaunching or not yet re-provisioned: requests wait (hold_timeout) for it.
_HELD_CODES = ("enclave_unavailable", "not_provisioned")
_UPGRADE_CHECK_S = 5.0
# How long a stopping gateway waits for requests in flight (aiohttp's default is 60 s): held requests and
# /healthz waits end when it stops, an enclave round trip takes milliseconds, and systemd kills at 90 s.
_SHUTDOWN_TIMEOUT_S = 10.0
# Answers as the enclave encodes them (compact, ASCII): a batch's result passes through unchanged.
_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def _json_body(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json", charset="utf-8")


class Gateway(EnclaveSession):
    def __init__(
        self, config: GatewayConfig, monitor: bool = True, store: TrafficStore | None = None, worker: int = 0
    ) -> None:
        super().__init__(config, monitor)
        self.coalescer = Coalescer(lambda: self.client.request, config.max_batch)
        # ``store``: the traffic counters all the gateway's processes share (``worker``: this one's slot).
        interval = config.metrics_self_check_interval
        self.metrics = GatewayMetrics(self, interval, store, worker) if config.metrics else None

    # ---------------------------------------------------------------- HTTP handlers
    async def _body(self, request: web.Request) -> dict[str, Any]:
        return gateway_requests.parse_object(await gateway_requests.read_body(request, self.config.request_timeout))

    async def _forward(self, enclave_request: dict[str, Any], many: str, body_size: int | None = None) -> web.Response:
        try:
            gateway_requests.check_limits(enclave_request, many, self.config.max_batch, body_size)
        except TokenizerError as exc:
            return error(exc.code, exc.message)
        rid = redaction.request_id.get()
        coalesce = enclave_request["op"] == "tokenize" and Coalescer.accepts(enclave_request)
        if rid is not None and not coalesce:
            enclave_request["rid"] = rid  # echoed by the enclave; its own records carry it
        deadline = time.monotonic() + self.config.hold_timeout
        while True:
            try:
                if coalesce:
                    answer = await self.coalescer.tokenize(enclave_request["pan"], enclave_request["mode"], rid)
                elif type(enclave_request.get(many)) is list:  # a batch: its result answered as encoded
                    return _json_body(await self.client.request_json(enclave_request))
                else:
                    answer = await self.client.request(enclave_request)
                return _json_body(_encoder.encode(answer).encode())
            except TokenizerError as exc:
                # An enclave being relaunched (or re-provisioned) comes back: hold the request rather than
                # answer 503. Every operation is idempotent, so sending it again is safe.
                if exc.code in _HELD_CODES and time.monotonic() < deadline and await self.recovered(deadline):
                    continue
                if isinstance(exc, EnclaveUnavailable):
                    log.warning("enclave unavailable: %s", exc.message)
                    return error(exc.code, "the enclave is not answering")
                return error(exc.code, exc.message)

    async def handle_tokenize(self, request: web.Request) -> web.Response:
        try:
            forward = gateway_requests.tokenize_fields(await self._body(request), self.config.allowed_modes)
        except TokenizerError as exc:
            return error(exc.code, exc.message)
        return await self._forward(forward, "pans", request.content_length)

    async def handle_detokenize(self, request: web.Request) -> web.Response:
        try:
            forward = gateway_requests.detokenize_fields(await self._body(request), request.headers)
        except TokenizerError as exc:
            return error(exc.code, exc.message)
        return await self._forward(forward, "tokens")

    async def handle_health(self, request: web.Request) -> web.Response:
        raw_wait = request.query.get("wait", "0")
        try:
            wait = float(raw_wait)
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= _MAX_HEALTH_WAIT_S:
            return error("bad_request", f"wait={raw_wait!r}: expected seconds from 0 to {_MAX_HEALTH_WAIT_S:g}", 400)
        attest = request.query.get("attest") in ("1", "true", "yes")
        canary = request.query.get("canary") in ("1", "true", "yes")
        deadline = time.monotonic() + wait
        while True:
            report = await self.check(provision=True)
            last = time.monotonic() >= deadline or self.stopping.is_set()
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
            await self.stopped_within(min(_HEALTH_WAIT_STEP_S, max(deadline - time.monotonic(), 0.0)))

    # ---------------------------------------------------------------- lifecycle
    def app(self) -> web.Application:
        middlewares = [http_api.middleware(self.config.access_log), json_errors(self.config.max_body)]
        app = web.Application(client_max_size=self.config.max_body, middlewares=middlewares)
        http_api.add_routes(app)
        app.router.add_post("/v1/tokenize", self.handle_tokenize)
        app.router.add_post("/v1/detokenize", self.handle_detokenize)
        app.router.add_get("/healthz", self.handle_health)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)  # before aiohttp waits for the requests in flight
        app.on_cleanup.append(self._on_cleanup)
        if self.metrics is not None:
            self.metrics.install(app)  # GET /metrics, a middleware and the enclave client's timing
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.start_monitor()

    async def _on_shutdown(self, app: web.Application) -> None:
        self.stopping.set()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.coalescer.close()
        await self.close()


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
    gateway = Gateway(config, monitor=worker == 0, store=store, worker=worker)
    runner = Runner(gateway.app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
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
        # aiohttp then waits for the requests in flight (at most its shutdown timeout): say how many connections.
        connections = len(runner.server.connections) if runner.server is not None else 0
        log.info("gateway stopping: %d connection(s) open", connections)
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
