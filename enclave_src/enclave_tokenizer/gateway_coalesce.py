"""One-PAN tokenize requests that arrive together go to the enclave as one batch.

Under load many HTTP requests are parsed in the same event-loop turn; each as its own enclave request
costs a frame encoded and decoded on both sides, a future routed by id and the enclave's per-request work.
``Coalescer.tokenize`` queues the PAN; at the end of the turn (call_soon runs after every handler already
scheduled) the queued PANs of one mode go as one ``pans`` request, and each caller gets what a request of
its own would have answered: ``{"token", "last_four", "key_check"}``, or the TokenizerError of its item
(the enclave's batch errors carry the item's code and message, as the single operation raises them), or
the error of the whole batch (enclave unavailable, not provisioned...) for every caller. A PAN alone in its
turn is sent as the usual one-PAN request (with its request id), so unloaded traffic is unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .client import TokenizerError

# Only PAN-sized strings are coalesced, so a batch of them stays far below the enclave's frame limit
# (a PAN is 12-19 digits, perhaps with separators); anything else goes alone, checked as it is.
MAX_PAN_CHARS = 64
# At most this many PANs a batch (and never more than the gateway's max_batch): far below any enclave's batch
# limit (10,000 by default), so coalescing never turns single requests into a refused batch.
MAX_ITEMS = 256
Request = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Coalescer:
    def __init__(self, request: Callable[[], Request], max_items: int) -> None:
        self._request = request  # looked up per send: metrics wrap the client's entry point after start-up
        self.max_items = max(1, min(max_items, MAX_ITEMS))
        self._queued: dict[str, list[tuple[str, str | None, asyncio.Future[dict[str, Any]]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def accepts(fields: dict[str, Any]) -> bool:
        pan = fields.get("pan")
        return len(fields) <= 4 and type(pan) is str and len(pan) <= MAX_PAN_CHARS and type(fields["mode"]) is str

    async def tokenize(self, pan: str, mode: str, rid: str | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.setdefault(mode, []).append((pan, rid, future))
        return await future

    def _flush(self) -> None:
        queued, self._queued = self._queued, {}
        loop = asyncio.get_running_loop()
        for mode, items in queued.items():
            for start in range(0, len(items), self.max_items):
                task = loop.create_task(self._send(mode, items[start : start + self.max_items]))
                self._tasks.add(task)  # held: the loop keeps weak references to tasks only
                task.add_done_callback(self._tasks.discard)

    async def _send(self, mode: str, items: list[tuple[str, str | None, asyncio.Future[dict[str, Any]]]]) -> None:
        request = self._request()
        if len(items) == 1:
            pan, rid, future = items[0]
            single: dict[str, Any] = {"op": "tokenize", "mode": mode, "pan": pan}
            if rid is not None:
                single["rid"] = rid
            try:
                answer = await request(single)
            except Exception as exc:
                _settle(future, exc)
            else:
                _settle(future, answer)
            return
        try:
            result = await request({"op": "tokenize", "mode": mode, "pans": [item[0] for item in items]})
            tokens, last_four, key_check = result["tokens"], result["last_four"], result.get("key_check")
            failed = {error["index"]: error for error in result["errors"]}
        except Exception as exc:  # the whole batch failed (or its answer is malformed): every caller alike
            if not isinstance(exc, TokenizerError):
                exc = TokenizerError("bad_response", "malformed batch answer from the enclave")
            for _pan, _rid, future in items:
                _settle(future, exc)
            return
        for index, (_pan, _rid, future) in enumerate(items):
            error = failed.get(index)
            if error is not None:
                _settle(future, TokenizerError(str(error.get("code")), str(error.get("message"))))
            else:
                _settle(future, {"token": tokens[index], "last_four": last_four[index], "key_check": key_check})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _settle(future: asyncio.Future[dict[str, Any]], outcome: dict[str, Any] | Exception) -> None:
    if future.done():  # its caller went away (cancelled)
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
