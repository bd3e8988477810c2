"""Real tokenizer server instances for tests: the production server on emulated vsock (UNIX sockets
under a temp NITRO_VSOCK_DIR), run on its own event loop in a thread so tests can use blocking sockets.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from enclave_tokenizer import protocol, vsock
from enclave_tokenizer.server import ServerConfig, TokenizerServer
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

        def install() -> None:
            state = self.server.service.key
            state.tokenizer = Tokenizer.from_data_key(key)
            state.capability_sha256 = capability_digest(capability) if capability else None

        self.loop.call_soon_threadsafe(install)

    def unprovision(self) -> None:
        def clear() -> None:
            self.server.service.key.tokenizer = None

        self.loop.call_soon_threadsafe(clear)

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


@contextmanager
def running_server(vsock_dir: Path, cid: int = ENCLAVE_CID, **config: Any) -> Iterator[RunningServer]:
    """Start the real server listening on $NITRO_VSOCK_DIR/<cid>/<port> (caller sets NITRO_VSOCK_DIR)."""
    (vsock_dir / str(cid)).mkdir(parents=True, exist_ok=True)
    loop = asyncio.new_event_loop()
    server = TokenizerServer(ServerConfig(**{"port": 5000, "cid": cid, **config}))
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
