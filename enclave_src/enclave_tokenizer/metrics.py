"""Prometheus metrics of the gateway (``GET /metrics``, text exposition format, prometheus_client).

The gateway only calls :meth:`GatewayMetrics.install`; everything else is here: an aiohttp middleware
counts and times every HTTP request, a wrapper around the enclave client times every enclave round trip
and counts the items processed, and a collector reads the state (enclave, key, supervisor, attestation,
canary, connection pool) at scrape time. A scrape asks the enclave for its health once (bounded by
PROBE_TIMEOUT_S) so "enclave up" is current, not the monitor's last poll.

Labels come from fixed vocabularies only (route patterns, operation names, result codes, states): no
request byte, card number, token or key ever becomes a label or a value. The key check value (4 bytes
of an HKDF of the data key, a one-way public check value; see tokens.Tokenizer) is exported as a
label-free gauge whose value is that 32-bit number, so a key change is ``changes()`` of one series.

The supervisor reports through its status file (supervisor_state.StatusFile), which the gateway already
reads for /healthz: relaunch count, last relaunch reason and time, state. No second listener per host.

Several gateway processes (``workers``): the traffic is counted in shared memory, one slot per process,
summed at scrape time (metrics_store); the state only the main process (worker 0) observes (nitro-cli's
enclave state, provisioning, the self-check's attestation and canary, which only it runs) is published by
it every second for the others' scrapes. Whichever process answers a scrape, it gives the gateway's figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .client import TokenizerError
from .metrics_store import LATENCY_BUCKETS as _LATENCY_BUCKETS
from .metrics_store import TrafficStore
from .supervisor_state import RELAUNCH_REASONS, STATES, read_status

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger("enclave_tokenizer.metrics")

PREFIX = "enclave_tokenizer"
PROBE_TIMEOUT_S = 0.5
# Result codes a label may take (the gateway's and the enclave's error codes); anything else is "other".
RESULT_CODES = frozenset(
    {
        "ok", "bad_json", "bad_request", "invalid_pan", "invalid_token", "batch_too_large", "request_too_large",
        "request_timeout", "forbidden", "not_provisioned", "enclave_unavailable", "busy", "not_found",
        "method_not_allowed", "uri_too_long", "bad_http", "internal", "unavailable", "frame_too_large",
        "unknown_op", "unsupported_version", "nsm_error", "provision_refused", "cms_error", "bad_key",
        "config_error", "kms_denied", "kms_error",
    }
)  # fmt: skip
ENCLAVE_OPS = frozenset({"tokenize", "detokenize", "health", "attest", "provision"})
_ROUTE_OPS = {"/v1/tokenize": "tokenize", "/v1/detokenize": "detokenize", "/healthz": "health", "/metrics": "metrics"}
NITRO_STATES = ("RUNNING", "TERMINATING", "NOT_FOUND", "UNKNOWN", "UNCHECKED")
_ROUTES = (*_ROUTE_OPS, "unmatched")
_CODES = (*sorted(RESULT_CODES), "other")
_PUBLISH_S = 1.0


def series() -> list[tuple[str, str, str]]:
    """Every series of the traffic store: ("http", route, code) and ("enclave", op, code)."""
    http = [("http", route, code) for route in _ROUTES for code in _CODES]
    return http + [("enclave", op, code) for op in (*sorted(ENCLAVE_OPS), "other") for code in _CODES]


def traffic_store(processes: int = 1) -> TrafficStore:
    """The shared counters of ``processes`` gateway processes (made before they are forked)."""
    return TrafficStore(series(), processes)


def result_code(response: web.StreamResponse) -> str:
    """ "ok" for a success, else the JSON error's code (a /healthz report: "unavailable"); bounded."""
    if response.status < 400:
        return "ok"
    body = getattr(response, "body", None)
    try:
        data = json.loads(body) if isinstance(body, bytes) and len(body) < 1 << 16 else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        code = error.get("code") if isinstance(error, dict) else data.get("status")
        if code in RESULT_CODES:
            return str(code)
    return "other"


def _route(request: web.BaseRequest) -> str:
    """The route's pattern (never the request's own path), for the known routes only."""
    info = request.match_info
    resource = info.route.resource if info is not None else None
    route = resource.canonical if resource is not None else None
    return route if route in _ROUTE_OPS else "unmatched"


def key_check_number(key_check: object) -> float | None:
    """The 8-hex-digit key check value as a number (exact in a float64), None when absent or malformed."""
    if not isinstance(key_check, str) or len(key_check) != 8:
        return None
    try:
        return float(int(key_check, 16))
    except ValueError:
        return None


def _items(request: dict[str, Any], result: dict[str, Any]) -> tuple[int, int]:
    """(items processed, items refused) of a tokenize/detokenize answer."""
    many = "pans" if request.get("op") == "tokenize" else "tokens"
    if isinstance(request.get(many), list):
        errors = result.get("errors")
        refused = len(errors) if isinstance(errors, list) else 0
        return len(request[many]) - refused, refused
    return 1, 0


def _items_json(request: dict[str, Any], result: bytes) -> tuple[int, int]:
    """_items of a result left encoded: its errors counted by their "index" keys (only batch errors have
    one, and in JSON text a quote inside a string is escaped, so the bytes cannot occur in a value)."""
    many = "pans" if request.get("op") == "tokenize" else "tokens"
    if isinstance(request.get(many), list):
        refused = result.count(b'"index":')
        return len(request[many]) - refused, refused
    return 1, 0


def _histogram(
    name: str, doc: str, label: str, series: dict[str, list[tuple[int, list[int], float]]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, parts in sorted(series.items()):
        counts = [sum(part[1][i] for part in parts) for i in range(len(_LATENCY_BUCKETS) + 1)]
        cumulative = list(itertools.accumulate(counts))
        buckets = [(repr(b), c) for b, c in zip(_LATENCY_BUCKETS, cumulative, strict=False)]
        family.add_metric([value], [*buckets, ("+Inf", cumulative[-1])], sum(part[2] for part in parts))
    return family


class GatewayMetrics:
    """One gateway's metrics, in a registry of its own (tests run several gateways in one process).

    ``store``: the traffic counters shared by the gateway's processes (traffic_store, made before the fork),
    ``worker`` this process's index among them; without it, counters of this process alone."""

    def __init__(
        self, gateway: Gateway, self_check_interval: float = 300.0, store: TrafficStore | None = None, worker: int = 0
    ) -> None:
        self.gateway = gateway
        self.self_check_interval = self_check_interval
        self.registry = CollectorRegistry(auto_describe=False)
        self.store = store if store is not None else traffic_store()
        self.store.use(worker)
        self.worker = worker
        # (route, code) and (op, code) -> this process's series; the counters by code are their counts.
        self.requests = {(k[1], k[2]): v for k, v in self.store.series.items() if k[0] == "http"}
        self.enclave_requests = {(k[1], k[2]): v for k, v in self.store.series.items() if k[0] == "enclave"}
        self.answering: bool = False
        self.health: dict[str, Any] = {}
        self.attested_at: float | None = None  # time.time() of the last valid attestation
        self.attest_ok: bool | None = None
        self.canary_ok: bool | None = None
        self.canary_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self.registry.register(_TrafficCollector(self))
        self.registry.register(_StateCollector(self))
        self._wrap_enclave_calls()

    # ---------------------------------------------------------------- hooks
    def install(self, app: web.Application) -> None:
        """Add the middleware (outermost: it sees the final JSON answers), GET /metrics, the periodic
        attestation + canary self-check (worker 0 only: one per host) and, with several processes, the
        publication of what each observes alone."""
        app.middlewares.insert(0, self._middleware)
        app.router.add_get("/metrics", self.handle)
        if (self.self_check_interval > 0 and self.worker == 0) or self.store.processes > 1:
            app.on_startup.append(self._start)
            app.on_cleanup.append(self._stop)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Awaitable[Any]]) -> web.StreamResponse:
        start = time.perf_counter()
        code = "internal"
        try:
            response = await handler(request)
            code = "ok" if response.status < 400 else result_code(response)
            return response
        except web.HTTPException as exc:  # only redirects and the like escape the JSON error middleware
            code = "ok" if exc.status < 400 else "other"
            raise
        finally:
            route = _route(request)
            timings = self.requests.get((route, code)) or self.requests[(route, "other")]
            timings.observe(time.perf_counter() - start)

    def _wrap_enclave_calls(self) -> None:
        """Time every enclave round trip (the client's two entry points: decoded results, and the JSON of
        batch results passed through) and record attest/canary results."""
        gateway = self.gateway
        store = self.store

        def observe(op: str, code: str, seconds: float) -> None:
            (self.enclave_requests.get((op, code)) or self.enclave_requests[(op, "other")]).observe(seconds)

        def timed(call: Callable[..., Awaitable[Any]], items: Callable[[dict[str, Any], Any], tuple[int, int]]) -> Any:
            async def request(enclave_request: dict[str, Any], timeout: float | None = None) -> Any:
                op = enclave_request.get("op")
                op = op if op in ENCLAVE_OPS else "other"
                start = time.perf_counter()
                store.add("in_flight", 1)
                try:
                    result = await call(enclave_request, timeout)
                except TokenizerError as exc:
                    observe(op, exc.code if exc.code in RESULT_CODES else "other", time.perf_counter() - start)
                    raise
                finally:
                    store.add("in_flight", -1)
                observe(op, "ok", time.perf_counter() - start)
                if op in ("tokenize", "detokenize"):
                    done, refused = items(enclave_request, result)
                    store.add(f"{op}_items", done)
                    if refused:
                        store.add(f"{op}_errors", refused)
                return result

            return request

        gateway.client.request = timed(gateway.client.request, _items)  # type: ignore[method-assign]
        gateway.client.request_json = timed(gateway.client.request_json, _items_json)  # type: ignore[method-assign]
        attest, canary = gateway.attest, gateway.canary

        async def attested() -> dict[str, Any]:
            result = await attest()
            self.attest_ok = bool(result.get("valid"))
            if self.attest_ok:
                self.attested_at = time.time()
            else:
                store.add("attest_failures", 1)
            return result

        async def canaried() -> dict[str, Any]:
            result = await canary()
            self.canary_ok, self.canary_at = bool(result.get("ok")), time.time()
            return result

        gateway.attest, gateway.canary = attested, canaried  # type: ignore[method-assign]

    # ---------------------------------------------------------------- scrape
    async def probe(self) -> None:
        """The enclave's health now (one round trip, bounded): up, provisioned, key check."""
        health = None
        with contextlib.suppress(TokenizerError, TimeoutError):
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                health = await self.gateway.client.health(timeout=PROBE_TIMEOUT_S)
        self.answering = health is not None
        self.health = health or {}

    async def handle(self, request: web.Request) -> web.Response:
        await self.probe()
        self._publish()
        # The classic text format (0.0.4): what every Prometheus 2.x (Debian 12 ships 2.42) parses.
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    # ---------------------------------------------------------------- self-check
    async def _start(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        if self.self_check_interval > 0 and self.worker == 0:
            self._task = loop.create_task(self._self_check_loop())
        if self.store.processes > 1:
            self._publisher = loop.create_task(self._publish_loop())

    async def _stop(self, app: web.Application) -> None:
        for task in (self._task, self._publisher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def state(self) -> dict[str, Any]:
        """What worker 0 alone observes, as the state collector reads it (published for the other workers)."""
        if self.worker != 0:
            return self.store.read_state() or {"enclave": {}, "provision_failures": 0, "unexpected": False}
        gateway = self.gateway
        return {
            "enclave": gateway.enclave,
            "provision_failures": gateway.provision_failures,
            "unexpected": bool(gateway.unexpected_key_change),
            "attested_at": self.attested_at,
            "attest_ok": self.attest_ok,
            "canary_ok": self.canary_ok,
            "canary_at": self.canary_at,
        }

    def _publish(self) -> None:
        """This process's pool in its slot; worker 0's state for the others' scrapes."""
        slots = getattr(self.gateway.client, "_slots", [])
        self.store.set("pool_size", len(slots))
        self.store.set("pool_connections", sum(1 for c in slots if c is not None and not c.closed))
        if self.worker == 0 and self.store.processes > 1:
            self.store.publish_state(self.state())

    async def _publish_loop(self) -> None:
        while True:
            try:
                self._publish()
            except Exception as exc:  # the loop must outlive any single failure
                log.error("metrics publication: %s", type(exc).__name__)
            await asyncio.sleep(_PUBLISH_S)

    async def _self_check_loop(self) -> None:
        """Attest and tokenize the canary every interval once the enclave holds its key, so "seconds since
        the last successful attestation" and the canary result mean something without outside traffic."""
        while True:
            try:
                await self.probe()
                if self.health.get("provisioned"):
                    await self.gateway.attest()
                    await self.gateway.canary()
                    await asyncio.sleep(self.self_check_interval)
                    continue
            except Exception as exc:  # the loop must outlive any single failure
                log.error("metrics self-check: %s", type(exc).__name__)
            await asyncio.sleep(min(2.0, self.self_check_interval))


class _TrafficCollector(Collector):
    """Requests, latencies and items, from the accumulators the hot path updates."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.m = metrics

    def collect(self) -> list[Metric]:
        m = self.m
        store = m.store
        totals = store.totals()
        requests = CounterMetricFamily(
            f"{PREFIX}_gateway_requests", "HTTP requests answered, by route, op and result code",
            labels=["route", "op", "code"],
        )  # fmt: skip
        by_route: dict[str, list[tuple[int, list[int], float]]] = {}
        by_op: dict[str, list[tuple[int, list[int], float]]] = {}
        for (kind, label, code), total in sorted(totals.items()):
            if kind == "http":
                requests.add_metric([label, _ROUTE_OPS.get(label, "none"), code], total[0])
                by_route.setdefault(label, []).append(total)
        enclave = CounterMetricFamily(
            f"{PREFIX}_enclave_requests", "Requests to the enclave app, by op and result code", labels=["op", "code"]
        )
        for (kind, label, code), total in sorted(totals.items()):
            if kind == "enclave":
                enclave.add_metric([label, code], total[0])
                by_op.setdefault(label, []).append(total)
        items = CounterMetricFamily(
            f"{PREFIX}_tokens_processed", "Card numbers tokenized / tokens detokenized", labels=["op"]
        )
        errors = CounterMetricFamily(f"{PREFIX}_token_errors", "Batch items refused (invalid input)", labels=["op"])
        for op in ("tokenize", "detokenize"):
            items.add_metric([op], store.total(f"{op}_items"))
            errors.add_metric([op], store.total(f"{op}_errors"))
        return [
            requests,
            _histogram(f"{PREFIX}_gateway_request_duration_seconds", "Time to answer an HTTP request (holds "
                       "included)", "route", by_route),
            enclave,
            _histogram(f"{PREFIX}_enclave_request_duration_seconds", "Enclave round trip over vsock", "op", by_op),
            items,
            errors,
            GaugeMetricFamily(f"{PREFIX}_enclave_requests_in_flight", "Enclave requests awaiting an answer",
                              value=store.total("in_flight")),
            CounterMetricFamily(f"{PREFIX}_attestation_failures", "Failed attestation checks",
                                value=store.total("attest_failures")),
        ]  # fmt: skip


class _StateCollector(Collector):
    """State read at scrape time (after GatewayMetrics.probe)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.m = metrics

    def collect(self) -> list[Metric]:
        m = self.m
        st = m.state()  # worker 0's own, or as it last published it
        out: list[Metric] = []

        def gauge(name: str, doc: str, value: float | None) -> None:
            if value is not None:
                out.append(GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value))

        state = (st.get("enclave") or {}).get("state")
        gauge("enclave_up", "1 when the enclave app answered this scrape's health request", float(m.answering))
        family = GaugeMetricFamily(f"{PREFIX}_enclave_state", "nitro-cli state (last describe)", labels=["state"])
        for name in NITRO_STATES:
            family.add_metric([name], float(state == name))
        out.append(family)
        gauge("enclave_running", "1 when nitro-cli shows the enclave RUNNING", float(state in ("RUNNING", "UNCHECKED")))
        gauge("key_provisioned", "1 when the enclave holds its data key", float(bool(m.health.get("provisioned"))))
        key_check = key_check_number(m.health.get("key_check"))
        gauge("key_check", "Data key check value as a number (public, one-way)", key_check)
        generation = m.health.get("key_generation")
        gauge("key_generation", "Data key generation", float(generation) if isinstance(generation, int) else None)
        gauge("provision_failures", "Consecutive failed provisioning attempts", float(st["provision_failures"]))
        gauge("key_unexpected_change", "1 after a key change no rotation asked for", float(bool(st["unexpected"])))
        attested_at, attest_ok, canary_ok = st.get("attested_at"), st.get("attest_ok"), st.get("canary_ok")
        age = time.time() - attested_at if attested_at is not None else float("inf")
        gauge("attestation_age_seconds", "Seconds since the last valid attestation (+Inf: never)", age)
        gauge("attestation_ok", "Last attestation check valid", None if attest_ok is None else float(attest_ok))
        gauge("canary_ok", "Last canary tokenization ok", None if canary_ok is None else float(canary_ok))
        gauge("canary_last_run_timestamp_seconds", "When the canary last ran", st.get("canary_at"))
        # Every process's pool, summed (each sets its own at its scrapes and every second).
        gauge("pool_size", "vsock connections the pool may hold", float(m.store.total("pool_size")))
        gauge("pool_connections", "Open vsock connections to the enclave", float(m.store.total("pool_connections")))
        out.extend(self._supervisor())
        return out

    def _supervisor(self) -> list[Metric]:
        status = read_status(self.m.gateway.config.supervisor_status_file)
        if status is None:
            return []
        states = GaugeMetricFamily(f"{PREFIX}_supervisor_state", "Supervisor state, one-hot", labels=["state"])
        for name in STATES:
            states.add_metric([name], float(status["state"] == name))
        current = GaugeMetricFamily(
            f"{PREFIX}_supervisor_report_current",
            "1 when the report is about the configuration on disk",
            value=float(bool(status["current"])),
        )
        relaunches = CounterMetricFamily(
            f"{PREFIX}_supervisor_relaunches",
            "Enclave relaunches by the supervisor (since it started)",
            value=status["relaunches"],
        )
        out: list[Metric] = [states, current, relaunches]
        last = status["last_relaunch"]
        if last:
            reason = GaugeMetricFamily(
                f"{PREFIX}_supervisor_last_relaunch_reason", "Cause of the last relaunch, one-hot", labels=["reason"]
            )
            for name in RELAUNCH_REASONS:
                reason.add_metric([name], float(last.get("reason") == name))
            out.append(reason)
            if isinstance(last.get("at"), int | float):
                out.append(
                    GaugeMetricFamily(
                        f"{PREFIX}_supervisor_last_relaunch_timestamp_seconds",
                        "When the last relaunch was",
                        value=float(last["at"]),
                    )
                )
        return out
