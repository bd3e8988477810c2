"""Multi-process serving: one vsock listener, one worker process per vCPU of the enclave.

CPython runs one thread of Python at a time, so a single process tokenizes on one vCPU. The parent opens
the listener and forks ``workers`` processes, each an ordinary TokenizerServer. The parent accepts every
connection and hands it (SCM_RIGHTS over a socketpair) to the worker holding the fewest open connections:
left to the kernel, a shared listener gave both connections of a 2-connection client to the same worker
(asyncio accepts every pending connection on each wake-up), so the second vCPU stayed idle. One worker
reads and answers all of a connection, so answers keep their per-connection order and every ServerConfig
bound holds in each worker (the memory budgets and connection/slow-op caps are divided between the
workers, so the enclave-wide totals stay those of the configuration). A parallel client (the gateway's
connection pool) keeps every vCPU busy.

The workers share the data key state. It lives in an anonymous shared memory file (memfd, nothing on
disk, gone with the enclave): a provision takes a process-wide lock (a POSIX record lock on
that file, released by the kernel if its holder dies), starts from the key state last written, and
writes the outcome, success or refusal, before answering. Every request first compares the state's
version (8 bytes of shared memory) with the one its worker loaded, so no request answered after a
provision uses the key it replaced. Each worker also publishes its counters there: ``health`` reports
the enclave's totals (connections, requests, tokens, dropped connections) and which worker answered, and
the parent reads how many of the connections it handed over each worker has closed.
The parent only accepts, forks, replaces a worker that died, and forwards SIGTERM/SIGINT; workers stop
when the parent is gone.
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
import selectors
import signal
import socket
import struct
import time
from typing import Any

from . import eventloop, vsock
from .config import ServerConfig
from .provisioning import _KeyState
from .server import TokenizerServer
from .service import Stats, TokenizerService
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
# After the counter slots: per worker, the connections it was handed and has closed (exact, not sampled).
_CLOSED = struct.Struct("<q")
_CLOSED_OFFSET = _SHARE_BYTES - (1 << 12)
_MAX_WORKERS = (_CLOSED_OFFSET - _STATS_OFFSET) // _SLOT.size
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

    def count_closed(self, index: int) -> None:
        """One more handed-over connection closed by worker ``index`` (only that worker writes its slot)."""
        offset = _CLOSED_OFFSET + index * _CLOSED.size
        _CLOSED.pack_into(self.memory, offset, _CLOSED.unpack_from(self.memory, offset)[0] + 1)

    def closed(self, index: int) -> int:
        return _CLOSED.unpack_from(self.memory, _CLOSED_OFFSET + index * _CLOSED.size)[0]

    def reset_closed(self, index: int) -> None:
        _CLOSED.pack_into(self.memory, _CLOSED_OFFSET + index * _CLOSED.size, 0)

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
    """What every worker inherits: its bounds, the key share, the parent's liveness pipe; and, per worker,
    the socketpair connections are handed over on (the parent keeps end 0, the worker end 1)."""

    config: ServerConfig
    share: KeyShare
    count: int
    alive: tuple[int, int]  # the parent keeps the write end open; workers watch the read end
    channels: dict[int, tuple[socket.socket, socket.socket]] = dataclasses.field(default_factory=dict)
    handed: list[int] = dataclasses.field(default_factory=list)  # connections handed to each worker
    _turn: int = 0

    def fork(self, index: int) -> int:
        old = self.channels.pop(index, None)
        if old is not None:
            old[0].close()
        self.channels[index] = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.share.reset_closed(index)
        self.handed[index] = 0
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                os.close(self.alive[1])
                for other, (parent_end, worker_end) in self.channels.items():
                    parent_end.close()  # only the parent hands over connections
                    if other != index:
                        worker_end.close()
                eventloop.run(self._worker(index, self.channels[index][1]), self.config.busy_poll_us)
                code = 0
            except BaseException as exc:  # only the type: a message could quote input
                log.error("worker %d failed: %s", index, type(exc).__name__)
            finally:
                os._exit(code)
        self.channels[index][1].close()
        return pid

    def dispatch(self, conn: socket.socket) -> None:
        """Hand ``conn`` to the worker with the fewest open connections (round robin among equals)."""
        loads = [(self.handed[i] - self.share.closed(i), (i - self._turn) % self.count) for i in range(self.count)]
        index = min(range(self.count), key=loads.__getitem__)
        self._turn = (index + 1) % self.count
        try:
            socket.send_fds(self.channels[index][0], [b"c"], [conn.fileno()])
            self.handed[index] += 1
        except OSError as exc:  # that worker is gone (its replacement gets a new channel): drop the client
            log.error("could not hand a connection to worker %d: %s", index, type(exc).__name__)
        conn.close()

    async def _worker(self, index: int, channel: socket.socket) -> None:
        service = SharedKeyService(self.config, self.share, index, self.count)
        server = TokenizerServer(self.config, service=service, on_close=lambda: self.share.count_closed(index))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # EOF on the liveness pipe: the parent is gone, and the enclave app with it.
        loop.add_reader(self.alive[0], stop.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start(listen=False)
        channel.setblocking(False)
        loop.add_reader(channel, _adopt, server, channel, stop)
        while not stop.is_set():
            self.share.publish_stats(index, service.stats)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _STATS_PUBLISH_S)
        await server.close()


def _adopt(server: TokenizerServer, channel: socket.socket, stop: asyncio.Event) -> None:
    """Serve the connections the parent handed over (EOF: the parent is gone)."""
    try:
        _data, fds, _flags, _addr = socket.recv_fds(channel, 64, 64)
    except BlockingIOError:
        return
    if not _data:
        stop.set()
        return
    for fd in fds:
        server.adopt(socket.socket(fileno=fd))


def serve(config: ServerConfig, count: int, initial: _KeyState | None = None) -> int:
    """Open the listener, run ``count`` workers until SIGTERM/SIGINT, handing each connection to one and
    replacing any that dies. ``initial``: a key state to start with (benchmarks; the enclave starts with none)."""
    if count > _MAX_WORKERS:
        raise ValueError(f"at most {_MAX_WORKERS} workers")
    share = KeyShare()
    if initial is not None:
        share.write(dump_key_state(initial))
    listener = vsock.listen(config.port, config.cid)
    listener.setblocking(False)
    pool = _Pool(worker_config(config, count), share, count, os.pipe(), handed=[0] * count)
    log.info("listening on %s with %d worker processes", vsock.describe(config.cid, config.port), count)
    # Signals only wake the selector (set_wakeup_fd); they are handled in the loop, not in a handler.
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, lambda _signum, _frame: None)
    workers: dict[int, int] = {pool.fork(index): index for index in range(count)}  # pid -> index
    try:
        _parent_loop(pool, listener, wake_read, workers)
    finally:
        signal.set_wakeup_fd(-1)
        os.close(pool.alive[1])
        listener.close()
    return 0


def _parent_loop(pool: _Pool, listener: socket.socket, wake: socket.socket, workers: dict[int, int]) -> None:
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake, selectors.EVENT_READ)
    respawn: dict[int, float] = {}  # index -> when to start it again
    stopping = False
    while workers or (respawn and not stopping):
        timeout = max(0.0, min(respawn.values()) - time.monotonic()) if respawn else None
        for key, _events in selector.select(timeout):
            if key.fileobj is listener:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        pool.dispatch(listener.accept()[0])
                continue
            signals = wake.recv(256)
            if not stopping and (signal.SIGTERM in signals or signal.SIGINT in signals):
                stopping = True
                selector.unregister(listener)
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
        for index, status in _reap(workers):
            if not stopping:
                log.error("worker %d exited (status %d): starting it again", index, status)
                # A worker failing at once must not spin: wait, but stop promptly when asked.
                respawn[index] = time.monotonic() + _RESPAWN_DELAY_S
        for index, at in list(respawn.items()):
            if stopping:
                del respawn[index]
            elif time.monotonic() >= at:
                del respawn[index]
                workers[pool.fork(index)] = index


def _reap(workers: dict[int, int]) -> list[tuple[int, int]]:
    """(index, exit code) of the workers that exited since the last call."""
    gone = []
    while workers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        index = workers.pop(pid, None)
        if index is not None:
            gone.append((index, os.waitstatus_to_exitcode(status)))
    return gone
