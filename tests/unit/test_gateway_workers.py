"""Gateway worker processes (GatewayConfig.workers): one port shared with SO_REUSEPORT, each process with
its own enclave pool, the extra ones stopping with the main process. Real processes: an enclave server
with a known data key on emulated vsock, the gateway as its service runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from enclave_tokenizer import vsock
from enclave_tokenizer.tokens import Tokenizer

CID = 16
PORT = 5700
KEY = bytes(range(32))
ENCLAVE = textwrap.dedent(
    """
    import asyncio, sys
    from enclave_tokenizer.config import ServerConfig
    from enclave_tokenizer.server import TokenizerServer
    from enclave_tokenizer.tokens import Tokenizer

    async def main():
        server = TokenizerServer(ServerConfig(port=int(sys.argv[1])))
        server.service.key.tokenizer = Tokenizer.from_data_key(bytes(range(32)))
        await server.start()
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    env = {**os.environ, vsock.ENV_DIR: str(tmp_path), vsock.ENV_CID: str(CID)}
    enclave = subprocess.Popen([sys.executable, "-c", ENCLAVE, str(PORT)], env=env)
    http_port = _free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"listen_port: {http_port}\nenclave_cid: {CID}\nenclave_port: {PORT}\nworkers: 2\nlog_level: WARNING\n"
        "metrics_self_check_interval: 0\n"  # no canary tokenize among the requests counted
    )
    gateway = subprocess.Popen([sys.executable, "-m", "enclave_tokenizer.gateway", "--config", str(config)], env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", http_port), timeout=0.5):
                break
        except OSError:
            assert time.monotonic() < deadline and gateway.poll() is None, "gateway did not start"
            time.sleep(0.1)
    yield gateway, http_port
    for proc in (gateway, enclave):
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on 127.0.0.1:port (/proc/net/tcp, state 0A)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    return {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}


def _tokenize(port: int, pan: str) -> dict[str, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/tokenize", data=json.dumps({"pan": pan}).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_workers_share_the_port_and_stop_with_the_main_process(stack: tuple[subprocess.Popen[bytes], int]) -> None:
    gateway, port = stack
    children = _children(gateway.pid)
    assert len(children) == 1  # workers: 2 = this process and one more
    expected = Tokenizer.from_data_key(KEY).opaque("4111111111111111")
    for _ in range(40):  # new connections each: the kernel spreads them over both processes
        assert _tokenize(port, "4111111111111111")["token"] == expected
    # Both processes listen on the port (SO_REUSEPORT), each on its own socket.
    listening = _listening_inodes(port)
    owned = [listening & _socket_inodes(pid) for pid in (gateway.pid, children[0])]
    assert all(len(inodes) == 1 for inodes in owned) and owned[0] != owned[1], owned
    gateway.send_signal(signal.SIGTERM)
    assert gateway.wait(20) == 0
    assert not Path(f"/proc/{children[0]}").exists()


def test_workers_exit_when_the_main_process_is_killed(stack: tuple[subprocess.Popen[bytes], int]) -> None:
    gateway, _port = stack
    (child,) = _children(gateway.pid)
    gateway.kill()
    gateway.wait(10)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{child}").exists() and "zombie" not in Path(f"/proc/{child}/status").read_text().lower():
        assert time.monotonic() < deadline, "a gateway worker outlived the main process"
        time.sleep(0.1)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_are_the_whole_gateways_whichever_process_answers(stack: tuple[subprocess.Popen[bytes], int]) -> None:
    """Both processes serve requests and scrapes (new connections: the kernel spreads them); every scrape
    reports the requests of both, exactly, and the state the main process observes."""
    _gateway, port = stack
    for _ in range(30):
        _tokenize(port, "4111111111111111")
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/tokenize",
        data=json.dumps({"pans": ["4111111111111111", "4000056655665556", "1234"]}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert len(json.loads(answer.read())["tokens"]) == 3
    ok = ("route", "/v1/tokenize"), ("op", "tokenize"), ("code", "ok")
    scrapes = [_scrape(port) for _ in range(16)]
    for samples in scrapes:
        assert samples[("enclave_tokenizer_gateway_requests_total", tuple(sorted(ok)))] == 31
        histogram = ("enclave_tokenizer_gateway_request_duration_seconds_count", (("route", "/v1/tokenize"),))
        assert samples[histogram] == 31
        enclave = ("enclave_tokenizer_enclave_requests_total", (("code", "ok"), ("op", "tokenize")))
        assert samples[enclave] == 31
        assert samples[("enclave_tokenizer_tokens_processed_total", (("op", "tokenize"),))] == 32
        assert samples[("enclave_tokenizer_token_errors_total", (("op", "tokenize"),))] == 1
        assert samples[("enclave_tokenizer_key_provisioned", ())] == 1
        assert samples[("enclave_tokenizer_enclave_running", ())] == 1
        assert samples[("enclave_tokenizer_pool_size", ())] == 8  # 2 processes x pool_size 4
    # The scrapes are counted too, by both processes: each scrape sees all the earlier ones.
    metrics = ("route", "/metrics"), ("op", "metrics"), ("code", "ok")
    last = _scrape(port)
    assert last[("enclave_tokenizer_gateway_requests_total", tuple(sorted(metrics)))] == len(scrapes)
