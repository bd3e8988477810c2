"""The enclave's tokenization server in a memory cgroup of the deployed enclave size, under the resource
attacks of issue 20: clients that never read their answers, connections holding unfinished 1 MiB frames,
and slowloris connections sending one byte every 2 s. The server must stay alive, inside the limit, drop
the attackers by their deadlines and then still answer a valid request correctly.

The limit is a real memory cgroup (v1 here, v2 where that is the hierarchy), made by the emulator's own
isolation code, which limits emulated enclaves the same way; a control run shows that the limit bites a
server without the bounds (it is OOM-killed by the same attack).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from enclave_tokenizer import protocol, vsock
from enclave_tokenizer.tokens import Tokenizer

from nitro_emulator import isolation

pytestmark = [pytest.mark.root, pytest.mark.slow]

MEMORY_MIB = 192  # the deployed enclave's memory (issue 20)
# In an enclave the rootfs (the EIF's ramdisks, unpacked) lives in the same memory: nitro-cli requires
# memory >= 4x the EIF size, so up to a quarter of it. The server holds that much ballast in its cgroup.
ROOTFS_MIB = MEMORY_MIB // 4
CID = 16
PORT = 5000
KEY = bytes(range(32))
PAN = "4111111111111111"
DEADLINE = 3.0  # frame_timeout and write_timeout of the test server (production: 10 s)

SERVER = """
import asyncio, json, sys
from enclave_tokenizer.config import ServerConfig
from enclave_tokenizer.server import TokenizerServer
from enclave_tokenizer.tokens import Tokenizer

async def main():
    ballast = b"r" * (int(sys.argv[2]) << 20)  # touched pages, charged to the cgroup like a rootfs
    server = TokenizerServer(ServerConfig(**json.loads(sys.argv[1])))
    server.service.key.tokenizer = Tokenizer.from_data_key(bytes(range(32)))
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class LimitedServer:
    def __init__(self, proc: subprocess.Popen[str], cgroup: Path) -> None:
        self.proc = proc
        self.cgroup = cgroup

    def _read(self, *names: str) -> str | None:
        for name in names:
            with contextlib.suppress(OSError):
                return (self.cgroup / name).read_text(encoding="ascii")
        return None

    def peak_mib(self) -> float:
        raw = self._read("memory.max_usage_in_bytes", "memory.peak")
        return int(raw or 0) / 2**20

    def oom_kills(self) -> int:
        raw = self._read("memory.oom_control", "memory.events") or ""
        for line in raw.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def limited_server(tmp_path: Path, **config: Any) -> Iterator[LimitedServer]:
    if os.geteuid() != 0:
        pytest.skip("a memory cgroup needs root")
    cgroup = isolation.create_cgroup(f"tokenizer-limits-{os.getpid()}-{time.monotonic_ns()}", MEMORY_MIB)
    if cgroup is None:
        pytest.skip("this host gives no writable memory cgroup (v1 or v2)")
    (tmp_path / str(CID)).mkdir(parents=True, exist_ok=True)
    settings = {"port": PORT, "cid": CID, "frame_timeout": DEADLINE, "write_timeout": DEADLINE, **config}
    env = {**os.environ, "NITRO_VSOCK_DIR": str(tmp_path)}
    cpus = sorted(os.sched_getaffinity(0))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, json.dumps(settings), str(ROOTFS_MIB)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=isolation.preexec(cgroup, cpus, MEMORY_MIB),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield LimitedServer(proc, cgroup)
    finally:
        proc.kill()
        proc.wait(10)
        isolation.remove_cgroup(cgroup)


@pytest.fixture
def vsock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path))
    monkeypatch.delenv("NITRO_ENCLAVE_CID", raising=False)
    return tmp_path


def _call(request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    with vsock.connect(CID, PORT, timeout=timeout) as sock:
        sock.sendall(protocol.encode_frame(request))
        body = protocol.recv_frame(sock)
    assert body is not None, "the server closed the connection instead of answering"
    return protocol.decode_message(body)


def _health() -> dict[str, Any]:
    answer = _call({"id": "health", "op": "health"})
    assert answer["ok"], answer
    return answer["result"]


def _assert_serves() -> None:
    answer = _call({"id": "valid", "op": "tokenize", "pan": PAN})
    tokenizer = Tokenizer.from_data_key(KEY)
    assert answer["result"] == {"token": tokenizer.opaque(PAN), "last_four": "1111", "key_check": tokenizer.key_check}


def _wait_connections(expected: int, timeout: float) -> float:
    """Seconds until the server reports `expected` connections (the health one included)."""
    start = time.monotonic()
    while True:
        count = _health()["connections"]
        if count <= expected:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"{count} connections still open after {timeout} s"
        time.sleep(0.2)


def _report(server: LimitedServer, phase: str) -> None:
    print(f"  {phase}: server RSS {server.rss_mib():.0f} MiB, cgroup peak {server.peak_mib():.0f} of {MEMORY_MIB} MiB")


def _never_reading_clients(count: int = 24, volume: int = 234 << 10) -> list[socket.socket]:
    """Clients that send ~234 KiB of requests each and never read: each 20 KiB frame of 10,000 bad
    items is answered with ~1 MiB of per-item errors (unbounded, ~7 MiB of answers per client)."""
    frame = protocol.encode_frame({"id": 1, "op": "tokenize", "pans": [1] * 10_000})
    payload = frame * (volume // len(frame) + 1)
    socks = []
    for _ in range(count):
        sock = vsock.connect(CID, PORT, timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        socks.append(sock)
    sent = dict.fromkeys(range(count), 0)
    until = time.monotonic() + 2.0
    while time.monotonic() < until and any(sent[i] < len(payload) for i in sent):
        for i, sock in enumerate(socks):
            with contextlib.suppress(BlockingIOError, OSError):
                sent[i] += sock.send(payload[sent[i] :])
        time.sleep(0.01)
    return socks


def _unfinished_frames(count: int = 171, size: int = 1 << 20) -> list[socket.socket]:
    """Connections that each declare a 1 MiB frame and send all of it but the last byte."""
    header = struct.pack(">I", size)
    body = b"x" * (size - 1)
    socks = []
    for _ in range(count):
        try:
            sock = vsock.connect(CID, PORT, timeout=5)
        except ConnectionRefusedError:  # the server is gone (the control run without bounds)
            break
        with contextlib.suppress(OSError):  # answered `busy` and closed: over the input budget
            sock.sendall(header + body)
        socks.append(sock)
    return socks


def _drip(
    socks: list[socket.socket], until: Callable[[], bool], limit: float, each: Callable[[], None] | None = None
) -> float:
    """Send one byte of a 100-byte frame on each socket every 2 s until `until()`; seconds it took."""
    frame = struct.pack(">I", 100) + b"{" * 100
    started = time.monotonic()
    offset = 0
    while True:
        if time.monotonic() - started >= 2.0 * offset:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(frame[offset : offset + 1])
            offset += 1
        if each is not None:
            each()
        if until():
            return time.monotonic() - started
        assert time.monotonic() - started < limit, f"the server did not drop them within {limit} s"
        time.sleep(0.2)


def test_survives_the_attacks_in_the_enclave_memory(vsock_dir: Path) -> None:
    with limited_server(vsock_dir) as server:
        _assert_serves()
        print(f"\nenclave server in a {MEMORY_MIB} MiB memory cgroup with a {ROOTFS_MIB} MiB rootfs ballast:")
        _report(server, "idle")

        # 1. 24 clients that never read their answers: the server stops reading them, drops them.
        hogs = _never_reading_clients()
        _assert_serves()  # others are served meanwhile
        _report(server, "24 clients not reading")
        waited = _wait_connections(1, DEADLINE + 5)
        dropped = _health()["dropped_connections"]
        assert dropped["deadline"] + dropped["not_reading"] >= 24, dropped
        print(f"    all 24 dropped {waited:.1f} s later ({dropped})")
        for sock in hogs:
            sock.close()

        # 2. 171 connections each holding an unfinished 1 MiB frame: within the input budget or refused.
        holders = _unfinished_frames()
        assert server.alive()
        _assert_serves()
        health = _health()
        refused = health["dropped_connections"]["input_budget"]
        _report(server, f"171 unfinished 1 MiB frames ({health['connections'] - 1} held, {refused} refused busy)")
        assert refused > 0, "171 MiB of unfinished frames cannot all be held in a 192 MiB enclave"
        waited = _wait_connections(1, DEADLINE + 5)
        print(f"    the held ones dropped {waited:.1f} s later by the frame deadline")
        for sock in holders:
            sock.close()

        # 3. 300 slowloris connections: one byte every 2 s must not keep a frame open past its deadline.
        slow = [vsock.connect(CID, PORT, timeout=5) for _ in range(300)]
        assert _health()["connections"] == 301  # all accepted: the deadline, not a refusal, must end them
        closed_after = _drip(slow, until=lambda: _health()["connections"] == 1, limit=DEADLINE + 6)
        print(f"  300 slowloris connections (1 byte / 2 s): all closed {closed_after:.1f} s after their first byte")
        assert closed_after <= DEADLINE + 2, "the frame deadline is not absolute"
        for sock in slow:
            with pytest.raises(OSError):  # closed by the server: the next byte fails
                sock.send(b"{")
            sock.close()

        # 4. All three at once; a valid client is served throughout.
        hogs = _never_reading_clients()
        holders = _unfinished_frames()
        slow = [vsock.connect(CID, PORT, timeout=5) for _ in range(300)]
        _assert_serves()
        _report(server, "all three attacks at once")
        _drip(slow, until=lambda: _health()["connections"] == 1, limit=DEADLINE + 6, each=_assert_serves)
        for sock in hogs + holders + slow:
            sock.close()

        # Still correct, alive, never over the limit.
        _assert_serves()
        health = _health()
        _report(server, "after the attacks")
        print(f"    dropped_connections {health['dropped_connections']}")
        assert server.alive() and server.oom_kills() == 0
        assert server.peak_mib() < MEMORY_MIB


def test_the_limit_bites_a_server_without_bounds(vsock_dir: Path) -> None:
    """Control: with the budgets lifted, the same unfinished frames get the server OOM-killed, so the
    test above is evidence (a limit that never bites would pass anything)."""
    unbounded = {"input_budget": 1 << 40, "frame_timeout": 60.0}
    with limited_server(vsock_dir, **unbounded) as server:
        _assert_serves()
        holders = _unfinished_frames()
        deadline = time.monotonic() + 10
        while server.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"\ncontrol, no input budget: alive={server.alive()}, OOM kills {server.oom_kills()}")
        assert not server.alive() and server.oom_kills() >= 1
        for sock in holders:
            sock.close()
