"""Extra gateway processes on the same port (GatewayConfig.workers > 1).

One aiohttp process is one core at most; with ``workers`` N the gateway forks N-1 more before any event
loop exists, and every process binds the port with SO_REUSEPORT, so the kernel spreads new HTTP
connections over them. Each has its own enclave connection pool (requests of one connection keep their
order: one process serves all of it); only the first (the service's main process, which also watches for
upgrades and tells systemd it is ready) runs the enclave monitor, so a host still provisions once and polls
once. The extra processes stop with the main one: on SIGTERM from it, or when its end of a pipe closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("enclave_tokenizer.gateway")

_STOP_TIMEOUT_S = 10.0


def start(count: int, serve: Callable[[int], Coroutine[Any, Any, Any]]) -> list[tuple[int, int]]:
    """Fork workers 1..count-1, each running ``serve(index)``; returns [(pid, pipe write end)]."""
    children: list[tuple[int, int]] = []
    for index in range(1, count):
        alive_read, alive_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the caller's code
            code = 1
            try:
                os.close(alive_write)
                for _pid, fd in children:
                    os.close(fd)
                asyncio.run(_worker(serve(index), alive_read))
                code = 0
            except BaseException as exc:  # only the type: a message could quote request data
                log.error("gateway worker %d failed: %s", index, type(exc).__name__)
            finally:
                os._exit(code)
        os.close(alive_read)
        children.append((pid, alive_write))
    return children


async def _worker(serving: Coroutine[Any, Any, Any], alive: int) -> None:
    task = asyncio.ensure_future(serving)
    # EOF on the pipe: the main process is gone, so is this worker (its cleanup closes the site).
    asyncio.get_running_loop().add_reader(alive, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def stop(children: list[tuple[int, int]]) -> None:
    """SIGTERM the workers (they finish their requests), then wait for them, killing any that hangs."""
    for pid, fd in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        os.close(fd)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for pid, _fd in children:
        while True:
            with contextlib.suppress(ChildProcessError):
                done, _status = os.waitpid(pid, os.WNOHANG)
                if done == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                if done == 0:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            break
