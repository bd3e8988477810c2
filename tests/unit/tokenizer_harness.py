"""Real tokenizer server instances for tests: the production server on emulated vsock (UNIX sockets
under a temp NITRO_VSOCK_DIR), run on its own event loop in a thread so tests can use blocking sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from enclave_tokenizer import protocol, vsock
from enclave_tokenizer.config import ServerConfig
from enclave_tokenizer.server import TokenizerServer
from enclave_tokenizer.tokens import Tokenizer, capability_digest

TEST_KEY = bytes(range(32))
CAPABILITY = "test-capability-secret"
ENCLAVE_CID = 16


class RunningServer:
    def __init__(self, server: TokenizerServer, loop: asyncio.AbstractEventLoop, cid: int) -> None:
        self.server = server
        self.loop = loop
        self.cid = cid
        self.port = server.config.port

    def provision_directly(self, key: bytes = TEST_KEY, capability: str | None = CAPABILITY) -> None:
        """Install a data key as a successful `provision` would (the KMS path is tested separately)."""
        # Done on the loop and waited for: a loaded machine would otherwise let the next request see
        # the server before the key is in (tests assert on what the enclave holds right after this).
        self.on_loop(lambda: _install_key(self.server, key, capability))

    def unprovision(self) -> None:
        def clear() -> None:
            self.server.service.key.tokenizer = None

        self.on_loop(clear)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return vsock.connect(self.cid, self.port, timeout=timeout)

    def stats(self) -> Any:
        return self.server.service.stats

    def on_loop(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """``fn()`` run on the server's loop (its state is only consistent there)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def held(self) -> tuple[int, int, int]:
        """(input bytes held, output bytes held, connections): all 0 when no client is connected."""
        server = self.server
        return self.on_loop(lambda: (server.input_held, server.output_held, len(server.connections)))


def _install_key(server: TokenizerServer, key: bytes, capability: str | None) -> None:
    state = server.service.key
    state.tokenizer = Tokenizer.from_data_key(key)
    state.capability_sha256 = capability_digest(capability) if capability else None


@contextmanager
def running_server(
    vsock_dir: Path, cid: int = ENCLAVE_CID, provisioned_with: bytes | None = None, **config: Any
) -> Iterator[RunningServer]:
    """Start the real server listening on $NITRO_VSOCK_DIR/<cid>/<port> (caller sets NITRO_VSOCK_DIR);
    ``provisioned_with``: a data key it holds before it listens (no client can provision it first)."""
    (vsock_dir / str(cid)).mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    server = TokenizerServer(ServerConfig(**{"port": 5000, "cid": cid, **config}))
    if provisioned_with is not None:
        _install_key(server, provisioned_with, CAPABILITY)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, name="tokenizer-server", daemon=True)
    thread.start()
    started.wait(10)
    if failure:
        raise failure[0]
    try:
        yield RunningServer(server, loop, cid)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def call(sock: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    sock.sendall(protocol.encode_frame(request))
    body = protocol.recv_frame(sock)
    assert body is not None, "server closed the connection"
    return protocol.decode_message(body)


SERVER_SCRIPT = """
import asyncio, json, sys
from enclave_tokenizer.config import ServerConfig
from enclave_tokenizer.server import TokenizerServer
from enclave_tokenizer.tokens import Tokenizer, capability_digest

async def main():
    server = TokenizerServer(ServerConfig(**json.loads(sys.argv[1])))
    server.service.key.tokenizer = Tokenizer.from_data_key(bytes.fromhex(sys.argv[2]))
    server.service.key.capability_sha256 = capability_digest(sys.argv[3])
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@contextmanager
def server_process(vsock_dir: Path, cid: int = ENCLAVE_CID, **config: Any) -> Iterator[subprocess.Popen[str]]:
    """The real server, provisioned with TEST_KEY and CAPABILITY, in its own process (so its memory can be
    measured alone); listens on $NITRO_VSOCK_DIR/<cid>/5000 of ``vsock_dir``."""
    (vsock_dir / str(cid)).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NITRO_VSOCK_DIR": str(vsock_dir)}
    env.pop("NITRO_NSM_SOCKET", None)  # attest/provision fail fast with nsm_error: no NSM here
    settings = json.dumps({"port": 5000, "cid": cid, **config})
    argv = [sys.executable, "-c", SERVER_SCRIPT, settings, TEST_KEY.hex(), CAPABILITY]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "server did not start"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")
