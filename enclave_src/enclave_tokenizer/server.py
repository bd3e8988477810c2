"""The enclave's tokenization server: ``python -m enclave_tokenizer.server``.

asyncio Protocol (not streams) so a pipelined burst of frames is parsed, answered and written in one
pass. Fast ops (tokenize, detokenize, health) answer inline, in order; slow ops (attest, provision) run
in a worker thread and answer when done, so clients match responses by id.

Hostile input: oversize frame -> error then close; malformed JSON / unknown op / bad fields -> error, the
connection stays usable; slow or stuck clients -> a sweeper aborts connections past their deadline;
too many connections -> ``busy`` then close. Memory is bounded for the enclave's size (see ServerConfig):
a client that does not read its answers is no longer read, then dropped; unfinished input across all
connections has one budget; attest/provision have a global cap. Nothing logged ever carries a PAN, token
key or plaintext, and bad input never logs a traceback.

The modules: config (ServerConfig, RequestError), provisioning (the data key, attest/provision),
service (TokenizerService: the ops), connection (one client's frames), this one (listener, sweeper, main),
and workers (one process per vCPU, connections handed over by the parent).
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
from collections.abc import Callable
from typing import Any

from . import redaction, vsock
from .config import ServerConfig
from .connection import _Connection
from .service import TokenizerService

log = logging.getLogger("enclave_tokenizer.server")


class TokenizerServer:
    def __init__(
        self,
        config: ServerConfig | None = None,
        service: TokenizerService | None = None,
        listen_sock: socket.socket | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self.service = service or TokenizerService(self.config)
        self._listen_sock = listen_sock  # a worker serves the listener its parent opened
        self.connections: set[_Connection] = set()
        self.input_held = 0  # bytes of unfinished or not yet answered frames, all connections
        self.output_held = 0  # bytes of answers not yet taken by the kernel, all connections (upper bound)
        self.slow_inflight = 0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.on_close = on_close  # called once per connection served, when it ends (workers count them)
        self._adopting: set[asyncio.Task[Any]] = set()

    async def start(self, listen: bool = True) -> None:
        """Listen (or, ``listen=False``, only serve the connections given to :meth:`adopt`)."""
        loop = asyncio.get_running_loop()
        if listen:
            sock = self._listen_sock or vsock.listen(self.config.port, self.config.cid)
            sock.setblocking(False)
            self._server = await loop.create_server(lambda: _Connection(self), sock=sock)
            log.info("listening on %s", vsock.describe(self.config.cid, self.config.port))
        self._sweeper = loop.create_task(self._sweep())

    def adopt(self, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere (the workers' parent accepts and hands them over)."""
        sock.setblocking(False)
        task = asyncio.get_running_loop().create_task(
            asyncio.get_running_loop().connect_accepted_socket(lambda: _Connection(self), sock)
        )
        self._adopting.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._adopting.discard(task)
        # Never served (the socket failed before a connection was made): it still counts as ended.
        if (task.cancelled() or task.exception() is not None) and self.on_close is not None:
            self.on_close()

    async def _sweep(self) -> None:
        """Drop connections past their deadline (slowloris, stuck readers, idle); re-sample unsent output."""
        stats = self.service.stats
        logged = (0, 0, 0)
        while True:
            await asyncio.sleep(min(1.0, self.config.frame_timeout / 4, self.config.write_timeout / 4))
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.expired(now):
                    stats.dropped_deadline += 1
                    conn.abort()
                elif conn.unsent:
                    conn._account_output()
            # One line per sweep, not one per connection: an attack must not flood the log.
            dropped = (stats.dropped_deadline, stats.dropped_not_reading, stats.dropped_input_budget)
            if dropped != logged:
                log.warning(
                    "dropped connections: %d past their deadline, %d not reading (output budget), "
                    "%d over the input budget (totals since start)",
                    *dropped,
                )
                logged = dropped

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enclave-tokenizer-server", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, help="vsock port (default 5000, env TOKENIZER_PORT)")
    parser.add_argument("--max-frame", type=int, help="frame size limit in bytes")
    parser.add_argument("--max-connections", type=int)
    parser.add_argument("--proxy-port", type=int, help="parent vsock-proxy port for KMS (default 8000)")
    parser.add_argument("--log-level", default=os.environ.get("TOKENIZER_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    redaction.setup(args.log_level)  # every record masked (card numbers, credentials)
    config = ServerConfig.from_env(
        port=args.port, max_frame=args.max_frame, max_connections=args.max_connections, proxy_port=args.proxy_port
    )
    from . import workers

    count = workers.worker_count(config)
    if count > 1:
        return workers.serve(config, count)
    from . import eventloop

    eventloop.run(TokenizerServer(config).serve_forever(), config.busy_poll_us)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
