"""The enclave server's event loop (enclave_tokenizer.eventloop): asyncio on a selector that polls briefly
before it blocks. Behaviour only (what is returned, and that a timeout still holds), never speed."""

from __future__ import annotations

import asyncio
import selectors
import socket
import time

from enclave_tokenizer import eventloop


def test_select_returns_what_is_ready_and_times_out() -> None:
    selector = eventloop.BusyPollSelector(0.001)
    left, right = socket.socketpair()
    with left, right, selector:
        selector.register(left, selectors.EVENT_READ)
        start = time.monotonic()
        assert selector.select(0.05) == []  # nothing ready: polls, then blocks for the rest of the timeout
        assert time.monotonic() - start >= 0.045
        right.send(b"x")
        ready = selector.select(5)
        assert [(key.fileobj, events) for key, events in ready] == [(left, selectors.EVENT_READ)]


def test_run_serves_a_connection_on_the_polling_loop() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, asyncio.SelectorEventLoop)
        assert isinstance(loop._selector, eventloop.BusyPollSelector)  # type: ignore[attr-defined]

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(4))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        answer = await reader.readexactly(4)
        writer.close()
        server.close()
        await server.wait_closed()
        return answer

    assert eventloop.run(main(), busy_poll_us=50) == b"ping"
    assert eventloop.run(asyncio.sleep(0.01, result=7), busy_poll_us=0) == 7
