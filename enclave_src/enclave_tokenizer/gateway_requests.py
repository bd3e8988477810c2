"""Request bodies of the gateway's operations: read, parsed strictly, checked, turned into enclave requests.

Every refusal is a TokenizerError whose code gateway_http.STATUS maps to its HTTP status. A body is JSON
as frames take it (strict UTF-8, finite numbers), an object; the fields the enclave reads are forwarded
as given (the enclave validates card numbers and tokens), and what cannot fit the enclave's frame limit or
the batch limit is refused here rather than sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Any

from aiohttp import web

from . import protocol
from .client import TokenizerError
from .tokens import MODES

_MAX_REENCODE_GROWTH = 8


async def read_body(request: web.Request, timeout: float) -> bytes:
    try:
        if request.content.is_eof():  # all received with the headers (the usual small body): no wait
            return await request.read()
        # A body that never completes (a huge chunk size, a slow sender) does not hold a handler.
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise TokenizerError("request_timeout", "request body not received in time") from None


def parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = protocol.loads_strict(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and non-finite numbers included
        raise TokenizerError("bad_json", "request body must be JSON (UTF-8, finite numbers)") from None
    if not isinstance(body, dict):
        raise TokenizerError("bad_request", "request body must be a JSON object")
    return body


def tokenize_fields(body: dict[str, Any], allowed_modes: Collection[str]) -> dict[str, Any]:
    forward: dict[str, Any] = {"op": "tokenize", "mode": body.get("mode", "opaque")}
    if forward["mode"] in MODES and forward["mode"] not in allowed_modes:
        raise TokenizerError("mode_not_allowed", f"mode {forward['mode']} is not enabled on this gateway")
    if "pans" in body:
        forward["pans"] = body["pans"]
    elif "pan" in body:
        forward["pan"] = body["pan"]
    else:
        raise TokenizerError("bad_request", "'pan' or 'pans' is required")
    return forward


def detokenize_fields(body: dict[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    capability = headers.get("X-Detokenize-Capability", body.get("capability"))
    forward: dict[str, Any] = {"op": "detokenize", "capability": capability}
    if "tokens" in body:
        forward["tokens"] = body["tokens"]
    elif "token" in body:
        forward["token"] = body["token"]
    else:
        raise TokenizerError("bad_request", "'token' or 'tokens' is required")
    return forward


def flat_and_small(fields: dict[str, Any], body_size: int | None) -> bool:
    """Fields that are strings (or lists of strings) from a small body cannot encode past the enclave's frame
    limit, nor too deeply: re-encoding a JSON string grows it at most 3x (a UTF-8 char as a \\u escape), so
    the encoding pass that measures them is skipped (one JSON encode fewer per single-PAN request)."""
    if body_size is None or body_size * _MAX_REENCODE_GROWTH + 256 > protocol.MAX_REQUEST_BYTES:
        return False
    for value in fields.values():
        if type(value) is list:
            if not all(type(item) is str for item in value):
                return False
        elif type(value) is not str:
            return False
    return True


def check_limits(fields: dict[str, Any], many: str, max_batch: int, body_size: int | None) -> None:
    """Refuse a batch over ``max_batch`` items, or fields the enclave's frame limit cannot take."""
    items = fields.get(many)
    if items is not None and isinstance(items, list) and len(items) > max_batch:
        raise TokenizerError("batch_too_large", f"at most {max_batch} items per request")
    try:
        size = 0 if flat_and_small(fields, body_size) else protocol.encoded_size(fields)
    except (ValueError, RecursionError):
        raise TokenizerError("bad_request", "request fields cannot be sent to the enclave (nesting too deep)") from None
    if size > protocol.MAX_REQUEST_BYTES:  # the enclave would drop the connection: refuse it here
        raise TokenizerError(
            "request_too_large",
            f"request encodes to {size} bytes for the enclave; at most {protocol.MAX_REQUEST_BYTES}",
        )
