"""Multi-process serving: one vsock listener, one worker process per vCPU of the enclave.

CPython runs one thread of Python at a time, so a single process tokenizes on one vCPU. The parent opens
the listener and forks ``workers`` processes, each an ordinary TokenizerServer on that inherited socket:
the kernel gives each new connection to one worker, which reads and answers all of it, so answers keep
their per-connection order and every ServerConfig bound holds in each worker (the memory budgets and
connection/slow-op caps are divided between the workers, so the enclave-wide totals stay those of the
configuration). A parallel client (the gateway's connection pool) keeps every vCPU busy.

The workers share the data key state. It lives in an anonymous shared memory file (memfd, nothing on
disk, gone with the enclave): a provision takes a process-wide lock (a POSIX record lock on
that file, released by the kernel if its holder dies), starts from the key state last written, and
writes the outcome, success or refusal, before answering. Every request first compares the state's
version (8 bytes of shared memory) with the one its worker loaded, so no request answered after a
provision uses the key it replaced. Each worker also publishes its counters there: ``health`` reports
the enclave's totals (connections, requests, tokens, dropped connections) and which worker answered.
The parent only forks, replaces a worker that died, and forwards SIGTERM/SIGINT; workers stop when the
parent is gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import fcntl
import json
import logging
import mmap
import os
import select
import signal
import socket
import struct
import time
from typing import Any

from . import vsock
from .server import ServerConfig, Stats, TokenizerServer, TokenizerService, _KeyState
from .tokens import Tokenizer

log = logging.getLogger("enclave_tokenizer.workers")

_HEADER = struct.Struct("<QI")  # version (odd while a write is in progress), payload length
_SHARE_BYTES = 1 << 16
_STATS_OFFSET = 1 << 15  # key state below (well under 2 KiB: two ciphertext blobs of ~1 KiB at most)
# Each worker's counters, in its slot after the key state: health reports the enclave's totals.
_STATS = (
    "connections",
    "connections_total",
    "rejected_busy",
    "dropped_deadline",
    "dropped_not_reading",
    "dropped_input_budget",
    "requests",
    "errors",
    "tokens",
)
_SLOT = struct.Struct(f"<{len(_STATS)}q")
_STATS_PUBLISH_S = 0.25
_RESPAWN_DELAY_S = 1.0


def worker_count(config: ServerConfig) -> int:
    """Workers to run: ``config.workers``, or (0) one per CPU this process may run on, at least 1."""
    if config.workers > 0:
        return config.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_config(config: ServerConfig, count: int) -> ServerConfig:
    """The bounds of one of ``count`` workers: the enclave-wide memory budgets and caps, divided."""
    return dataclasses.replace(
        config,
        max_connections=max(1, config.max_connections // count),
        output_budget=max(config.write_buffer_limit, config.output_budget // count),
        input_budget=max(config.max_frame, config.input_budget // count),
        max_slow_ops=max(1, config.max_slow_ops // count),
    )


# ------------------------------------------------------------------------------------- shared key state


def _dump_tokenizer(tokenizer: Tokenizer | None) -> str | None:
    return None if tokenizer is None else base64.b64encode(tokenizer._data_key).decode("ascii")


def _load_tokenizer(raw: str | None) -> Tokenizer | None:
    return None if raw is None else Tokenizer.from_data_key(base64.b64decode(raw))


def dump_key_state(key: _KeyState) -> bytes:
    # Not dataclasses.asdict: it would deep-copy the Tokenizers (and their hash states).
    state = {f.name: getattr(key, f.name) for f in dataclasses.fields(key)} | {
        "tokenizer": _dump_tokenizer(key.tokenizer),
        "previous": _dump_tokenizer(key.previous),
        "blob": None if key.blob is None else base64.b64encode(key.blob).decode("ascii"),
    }
    return json.dumps(state, separators=(",", ":")).encode("ascii")


def load_key_state(raw: bytes) -> _KeyState:
    state = json.loads(raw)
    state["tokenizer"] = _load_tokenizer(state["tokenizer"])
    state["previous"] = _load_tokenizer(state["previous"])
    state["blob"] = None if state["blob"] is None else base64.b64decode(state["blob"])
    return _KeyState(**state)


class KeyShare:
    """The key state in shared memory, versioned like a seqlock (readers never block the writer)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("enclave-tokenizer-key", 0)
        os.ftruncate(self.fd, _SHARE_BYTES)
        self.memory = mmap.mmap(self.fd, _SHARE_BYTES)

    def version(self) -> int:
        return _HEADER.unpack_from(self.memory)[0]

    def read(self) -> tuple[int, bytes | None]:
        """(version, state) of the last complete write; (0, None) before the first."""
        while True:
            version, length = _HEADER.unpack_from(self.memory)
            if version & 1:  # a write in progress
                time.sleep(0)
                continue
            payload = self.memory[_HEADER.size : _HEADER.size + length]
            if _HEADER.unpack_from(self.memory)[0] == version:
                return version, payload if version else None

    def write(self, payload: bytes) -> int:
        """Publish a new state (the caller holds the lock); returns its version."""
        if len(payload) > _STATS_OFFSET - _HEADER.size:
            raise ValueError("key state too large for the shared region")
        version = self.version()
        _HEADER.pack_into(self.memory, 0, version + 1, 0)
        self.memory[_HEADER.size : _HEADER.size + len(payload)] = payload
        _HEADER.pack_into(self.memory, 0, version + 2, len(payload))
        return version + 2

    def publish_stats(self, index: int, stats: Stats) -> None:
        _SLOT.pack_into(self.memory, _STATS_OFFSET + index * _SLOT.size, *(getattr(stats, n) for n in _STATS))

    def total_stats(self, count: int) -> dict[str, int]:
        """The counters summed over the workers (each as last published: at most _STATS_PUBLISH_S old)."""
        slots = [_SLOT.unpack_from(self.memory, _STATS_OFFSET + i * _SLOT.size) for i in range(count)]
        return dict(zip(_STATS, map(sum, zip(*slots, strict=True)), strict=True))

    def lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)  # blocks; call from a thread

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


class SharedKeyService(TokenizerService):
    """TokenizerService whose key state is the one all workers share."""

    def __init__(self, config: ServerConfig, share: KeyShare, index: int, count: int) -> None:
        super().__init__(config)
        self.share, self.index, self.count = share, index, count
        self.seen = -1
        self._local = asyncio.Lock()  # one provision at a time in this worker (the record lock is per process)
        self.refresh()

    def refresh(self) -> None:
        """Load the shared key state if another worker changed it."""
        if self.share.version() == self.seen:
            return
        version, payload = self.share.read()
        if payload is not None:
            self.key = load_key_state(payload)
        self.seen = version

    def handle_fast(self, request_id: Any, op: str, request: dict[str, Any]) -> dict[str, Any]:
        if self.share.version() != self.seen:
            self.refresh()
        return super().handle_fast(request_id, op, request)

    def op_health(self, request: dict[str, Any]) -> dict[str, Any]:
        self.share.publish_stats(self.index, self.stats)
        totals = self.share.total_stats(self.count)
        return super().op_health(request) | {
            "connections": totals["connections"],
            "requests": totals["requests"],
            "tokens": totals["tokens"],
            "dropped_connections": {
                "deadline": totals["dropped_deadline"],
                "not_reading": totals["dropped_not_reading"],
                "input_budget": totals["dropped_input_budget"],
                "busy": totals["rejected_busy"],
            },
            "worker": self.index,
            "workers": self.count,
        }

    async def op_provision(self, request: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with self._local:
            await loop.run_in_executor(None, self.share.lock)
            try:
                self.refresh()
                try:
                    return await super().op_provision(request)
                finally:
                    # Success, failure or refusal: what every worker's health and next check start from.
                    self.seen = self.share.write(dump_key_state(self.key))
            finally:
                self.share.unlock()


# ------------------------------------------------------------------------------------- processes


@dataclasses.dataclass
class _Pool:
    """What every worker inherits: its bounds, the listener, the key share, the parent's liveness pipe."""

    config: ServerConfig
    sock: socket.socket
    share: KeyShare
    count: int
    alive: tuple[int, int]  # the parent keeps the write end open; workers watch the read end

    def fork(self, index: int) -> int:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.close(self.alive[1])
                asyncio.run(self._worker(index))
                code = 0
            except BaseException as exc:  # only the type: a message could quote input
                log.error("worker %d failed: %s", index, type(exc).__name__)
            finally:
                os._exit(code)
        return pid

    async def _worker(self, index: int) -> None:
        service = SharedKeyService(self.config, self.share, index, self.count)
        server = TokenizerServer(self.config, service=service, listen_sock=self.sock)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # EOF on the liveness pipe: the parent is gone, and the enclave app with it.
        loop.add_reader(self.alive[0], stop.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        while not stop.is_set():
            self.share.publish_stats(index, service.stats)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _STATS_PUBLISH_S)
        await server.close()


def serve(config: ServerConfig, count: int, initial: _KeyState | None = None) -> int:
    """Open the listener, run ``count`` workers on it until SIGTERM/SIGINT, replacing any that dies.
    ``initial``: a key state to start with (benchmarks; the enclave starts with none)."""
    if count * _SLOT.size > _SHARE_BYTES - _STATS_OFFSET:
        raise ValueError(f"at most {(_SHARE_BYTES - _STATS_OFFSET) // _SLOT.size} workers")
    share = KeyShare()
    if initial is not None:
        share.write(dump_key_state(initial))
    pool = _Pool(worker_config(config, count), vsock.listen(config.port, config.cid), share, count, os.pipe())
    log.info("listening on %s with %d worker processes", vsock.describe(config.cid, config.port), count)
    workers: dict[int, int] = {}  # pid -> index
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        workers[pool.fork(index)] = index
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = workers.pop(pid, None)
        if index is None or stopping:
            continue
        log.error("worker %d exited (status %d): starting it again", index, os.waitstatus_to_exitcode(status))
        # A worker failing at once must not spin: wait, but stop promptly when asked.
        select.select([], [], [], _RESPAWN_DELAY_S)
        if not stopping:
            workers[pool.fork(index)] = index
    os.close(pool.alive[1])
    pool.sock.close()
    return 0
