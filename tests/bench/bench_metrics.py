"""The cost of the gateway's Prometheus metrics: the same gateway and enclave server, GET /metrics on
and off (the `metrics` gateway option, role variable vsock_tokenizer_metrics), alternated so both see
the same machine; plus how long a scrape takes. Figures only, never asserted.

    python -m tests.bench metrics
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.bench.bench_tokenizer import CID, OUR_SERVER, OURS_PORT, _free_port, _pans, _start, _wait_http, _wrk

ROUNDS = 3


def _gateway(env: dict[str, str], workdir: Path, metrics: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    config = workdir / f"gateway-{metrics}.yaml"
    config.write_text(
        f"listen_port: {port}\nenclave_cid: {CID}\nenclave_port: {OURS_PORT}\nlog_level: WARNING\n"
        f"metrics: {str(metrics).lower()}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "enclave_tokenizer.gateway", "--config", str(config)], env=env)
    _wait_http(port)
    return proc, port


def _rate(port: int, workdir: Path) -> float:
    """req/s of single-PAN tokenize requests under wrk (C), as bench_tokenizer measures the gateway."""
    if shutil.which("wrk") is None:
        raise SystemExit("bench_metrics: wrk is required (make bench installs it: apt-get install wrk)")
    url = f"http://127.0.0.1:{port}/v1/tokenize"
    body = json.dumps({"pan": _pans(1)[0]}).encode()
    _wrk(url, body, workdir, connections=16, seconds=1)  # warm-up
    rate, _p99, _errors = _wrk(url, body, workdir, connections=64, seconds=4)
    return rate


def _middleware_cost(n: int = 50_000) -> float:
    """µs the metrics middleware adds to one request, in process (no HTTP, no enclave): the least noisy
    figure on a shared machine."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request
    from enclave_tokenizer.gateway import Gateway
    from enclave_tokenizer.parent import GatewayConfig

    gateway = Gateway(GatewayConfig(enclave_cid=CID))
    app = gateway.app()
    assert gateway.metrics is not None
    middleware = gateway.metrics._middleware

    async def run() -> float:
        request = make_mocked_request("POST", "/v1/tokenize", app=app)
        request._match_info = await app.router.resolve(request)
        response = web.json_response({"token": "x"})

        async def handler(_request: web.Request) -> web.StreamResponse:
            return response

        start = time.perf_counter()
        for _ in range(n):
            await middleware(request, handler)
        with_metrics = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n):
            await handler(request)
        return (with_metrics - (time.perf_counter() - start)) / n * 1e6

    return min(asyncio.run(run()) for _ in range(3))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        env = {**os.environ, "NITRO_VSOCK_DIR": tmp, "NITRO_ENCLAVE_CID": str(CID)}
        os.environ["NITRO_VSOCK_DIR"] = tmp
        server = _start(OUR_SERVER, OURS_PORT, env)
        gateways = {on: _gateway(env, Path(tmp), on) for on in (True, False)}
        rates: dict[bool, list[float]] = {True: [], False: []}
        try:
            for _ in range(ROUNDS):
                for on, (_proc, port) in gateways.items():
                    rates[on].append(_rate(port, Path(tmp)))
            port = gateways[True][1]
            scrapes = []
            for _ in range(50):
                start = time.perf_counter()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                    size = len(answer.read())
                scrapes.append(time.perf_counter() - start)
        finally:
            for proc, _port in gateways.values():
                proc.terminate()
                proc.wait(10)
            server.terminate()
            server.wait(10)
    tool = "wrk 64 conns" if shutil.which("wrk") else "Python loop, 64 concurrent"
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"gateway metrics cost: POST /v1/tokenize one PAN, {tool}, median of {ROUNDS} alternated rounds")
    print(f"  {'metrics on':<44} {on:>12,.0f} req/s   ({', '.join(f'{r:,.0f}' for r in rates[True])})")
    print(f"  {'metrics off':<44} {off:>12,.0f} req/s   ({', '.join(f'{r:,.0f}' for r in rates[False])})")
    print(f"  {'on / off':<44} {on / off:>12.3f}")
    print(f"  {'metrics middleware, in process':<44} {_middleware_cost():>12.2f} µs per request")
    print(f"  {'GET /metrics scrape':<44} {statistics.median(scrapes) * 1e3:>12.2f} ms median, {size:,} bytes")


if __name__ == "__main__":
    main()
