"""One client connection of the enclave server: frames in, answers out, in order, within the server's
memory budgets and deadlines (see server.py's docstring for the hostile-input rules)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from . import protocol
from .config import RequestError, _WithId
from .protocol import ProtocolError
from .service import encode_answer

if TYPE_CHECKING:
    from .server import TokenizerServer

log = logging.getLogger("enclave_tokenizer.server")  # one logger name for the whole server, as before the split


class _Connection(asyncio.Protocol):
    """One client. Frames are answered in the order they arrive; while the client does not read its
    answers, complete frames wait in ``backlog`` and the socket is not read (so a client can make the
    server hold at most write_buffer_limit + one answer + one read of input)."""

    def __init__(self, server: TokenizerServer) -> None:
        self.server = server
        self.service = server.service
        self.decoder = protocol.FrameDecoder(server.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[dict[str, Any]]] = set()
        self.backlog: list[bytes] = []
        self.held = 0  # input bytes charged to server.input_held (partial frame + backlog)
        self.unsent = 0  # output bytes charged to server.output_held (last sampled write buffer)
        now = time.monotonic()
        self.active_at = now  # last input: the idle deadline runs from here
        self.frame_started = now  # first byte of the unfinished frame: its absolute deadline
        self.paused_at = 0.0
        self.eof = False
        self.write_paused = False

    # -- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        stats = self.service.stats
        if len(self.server.connections) >= self.server.config.max_connections:
            stats.rejected_busy += 1
            transport.write(protocol.encode_frame(protocol.error(None, "busy", "too many connections")))
            transport.close()
            return
        transport.set_write_buffer_limits(high=self.server.config.write_buffer_limit)
        self.server.connections.add(self)
        stats.connections += 1
        stats.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server.on_close is not None:
            self.server.on_close()
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.service.stats.connections -= 1
        self._release()
        for task in self.tasks:
            task.cancel()

    def _release(self) -> None:
        """Give back this connection's share of the global budgets (it holds nothing any more)."""
        self.backlog = []
        self.decoder = protocol.FrameDecoder(self.server.config.max_frame)
        self.server.input_held -= self.held
        self.server.output_held -= self.unsent
        self.held = self.unsent = 0

    def expired(self, now: float) -> bool:
        config = self.server.config
        if self.write_paused:
            return now - self.paused_at > config.write_timeout
        if self.decoder.pending:
            return now - self.frame_started > config.frame_timeout
        return now - self.active_at > config.idle_timeout

    # -- input
    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except Exception as exc:
            # A bug, not bad input (that is answered): no traceback, it could quote request bytes.
            log.error("internal error on a connection: %s", type(exc).__name__)
            self.abort()

    def _receive(self, data: bytes) -> None:
        decoder = self.decoder
        was_pending = decoder.pending
        frames = decoder.feed(data)
        now = time.monotonic()
        self.active_at = now
        if decoder.pending and (frames or not was_pending):
            self.frame_started = now  # a new frame began in this read; an unfinished one keeps its start
        if frames:
            self._answer(frames)
        self._after_input()

    def _answer(self, frames: list[bytes]) -> None:
        """Answer frames in order, flushing every write_buffer_limit bytes; if the client is then not
        reading, keep the rest in the backlog (reading is paused) until resume_writing."""
        service = self.service
        stats = service.stats
        config = self.server.config
        limit = config.write_buffer_limit
        out: list[bytes] = []
        size = 0
        for index, body in enumerate(frames):
            stats.requests += 1
            try:
                request_id, op, request = service.decode(body)
            except _WithId as exc:
                stats.errors += 1
                answer = protocol.encode_frame(protocol.error(exc.request_id, exc.code, exc.message))
            except (ProtocolError, RequestError) as exc:
                stats.errors += 1
                answer = protocol.encode_frame(protocol.error(None, exc.code, exc.message))
            else:
                if op in service.fast_ops:
                    answer = encode_answer(service.handle_fast(request_id, op, request))
                else:
                    refusal = self._slow(request_id, op, request, len(body))
                    if refusal is None:
                        continue
                    answer = protocol.encode_frame(refusal)
            out.append(answer)
            size += len(answer)
            if size >= limit:
                self._send(out)
                out, size = [], 0
                if self.write_paused or self.transport is None or self.transport.is_closing():
                    self.backlog = frames[index + 1 :]
                    return
        if out:
            self._send(out)
        self.backlog = []

    def _slow(self, request_id: Any, op: str, request: dict[str, Any], size: int) -> dict[str, Any] | None:
        """Start a slow op, or the answer refusing it (None when started)."""
        config = self.server.config
        service = self.service
        if size > config.max_slow_frame:
            service.stats.errors += 1
            return protocol.error(request_id, "bad_request", f"{op} requests are at most {config.max_slow_frame} bytes")
        if self.server.slow_inflight >= config.max_slow_ops:
            service.stats.errors += 1
            return protocol.error(request_id, "busy", f"{config.max_slow_ops} attest/provision requests in flight")
        self.server.slow_inflight += 1
        task = asyncio.get_running_loop().create_task(service.handle_slow(request_id, op, request))
        self.tasks.add(task)
        task.add_done_callback(self._slow_done)
        return None

    def _after_input(self) -> None:
        """Charge the input held to the global budget; the fatal decoder error once all before it is answered."""
        if self.transport is None or self.transport.is_closing():
            return
        decoder = self.decoder
        held = decoder.pending + sum(map(len, self.backlog)) if self.backlog else decoder.pending
        server = self.server
        server.input_held += held - self.held
        self.held = held
        if held and server.input_held > server.config.input_budget:
            self.service.stats.dropped_input_budget += 1
            self._send([protocol.encode_frame(protocol.error(None, "busy", "too much unfinished input; retry"))])
            self._release()
            self._close()
            return
        if decoder.error is not None and not self.backlog:
            self._send([protocol.encode_frame(protocol.error(None, decoder.error.code, decoder.error.message))])
            self._close()

    def eof_received(self) -> bool:
        # Half-closed: answer what is in flight, then close (returning True keeps our side open).
        self.eof = True
        if not self.tasks and not self.backlog:
            self._close()
        return True

    # -- output
    def _send(self, frames: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(b"".join(frames))  # may call pause_writing
        self._account_output()
        if self.write_paused and self.server.output_held > self.server.config.output_budget:
            self.service.stats.dropped_not_reading += 1
            self.abort()

    def _account_output(self) -> None:
        """Re-sample the unsent bytes; between samples the buffer only shrinks, so the sum is an upper bound."""
        transport = self.transport
        unsent = 0 if transport is None or transport.is_closing() else transport.get_write_buffer_size()
        if unsent != self.unsent:
            self.server.output_held += unsent - self.unsent
            self.unsent = unsent

    def _slow_done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self.server.slow_inflight -= 1
        self.tasks.discard(task)
        try:
            if not task.cancelled():
                self._send([protocol.encode_frame(task.result())])
            if self.eof and not self.tasks and not self.backlog:
                self._close()
        except Exception as exc:
            log.error("internal error answering %s: %s", "a slow op", type(exc).__name__)
            self.abort()

    def pause_writing(self) -> None:
        # The client is not reading: stop reading its requests too, and start the write deadline.
        self.write_paused = True
        self.paused_at = time.monotonic()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        try:
            self.write_paused = False
            self._account_output()
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            now = time.monotonic()
            self.active_at = now
            if self.decoder.pending:
                self.frame_started = now  # the unfinished frame could not progress while we were not reading
            if self.backlog:
                frames, self.backlog = self.backlog, []
                self._answer(frames)
                self._after_input()
            if self.write_paused or transport.is_closing():
                return
            if self.eof:
                if not self.tasks and not self.backlog:
                    self._close()
            else:
                transport.resume_reading()
        except Exception as exc:
            log.error("internal error on a connection: %s", type(exc).__name__)
            self.abort()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._release()
