"""The gateway's HTTP surface besides its operations: request ids, the access log and the OpenAPI document.

- Request ids: the client's ``X-Request-Id`` when it is a plain identifier (at most 128 characters of
  ``[A-Za-z0-9._:@/+=-]`` that masking leaves alone, so never a card number), else a fresh one. It is set
  in :data:`redaction.request_id` for every record made while the request is served, sent to the enclave
  as the vsock request's ``rid`` and returned in the ``X-Request-Id`` header.
- The access log: one JSON line per request on the logger ``enclave_tokenizer.access`` (method, route
  pattern, op, status, error code, duration); never the path as sent, a query, a header value or the body.
- ``GET /openapi.json``: the OpenAPI 3.1 document shipped in the package (``openapi.json``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from functools import cache
from importlib import resources
from typing import Any

from aiohttp import web

from . import redaction

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_OPS = {"/v1/tokenize": "tokenize", "/v1/detokenize": "detokenize", "/healthz": "health", "/openapi.json": "openapi"}

access_log = logging.getLogger("enclave_tokenizer.access")


@cache
def openapi_document() -> bytes:
    return resources.files(__package__).joinpath("openapi.json").read_bytes()


def request_id_of(request: web.BaseRequest) -> str:
    """The client's X-Request-Id if it is a plain identifier that masking would not change, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given and _REQUEST_ID.fullmatch(given) and redaction.redact(given) == given:
        return given
    return f"{_fresh[0]}{next(_fresh[1]):016x}"


# Fresh ids: 32 hex characters as a uuid4's, a random prefix per process then a counter, so unique without
# reading the kernel's random source per request (uuid4 is an os.urandom call: ~2 % of a request's time).
# A forked gateway worker draws its own prefix.
_fresh: list[Any] = []


def _new_prefix() -> None:
    _fresh[:] = [os.urandom(8).hex(), itertools.count()]


_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)


def route_pattern(request: web.BaseRequest) -> str:
    """The route's pattern, never the request's own path (which may carry anything)."""
    info = getattr(request, "match_info", None)
    resource = info.route.resource if info is not None else None
    return resource.canonical if resource is not None else "?"


def _error_code(response: web.StreamResponse) -> str | None:
    """The ``error.code`` of a JSON error answer (read only for errors)."""
    body = getattr(response, "body", None)
    try:
        code = json.loads(body)["error"]["code"] if isinstance(body, bytes) else None
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def middleware(access: bool = True) -> Any:
    """Outermost middleware: the request id, its response header, and (``access``) the access log line."""

    @web.middleware
    async def request_ids(request: web.Request, handler: Any) -> web.StreamResponse:
        rid = request_id_of(request)
        reset = redaction.request_id.set(rid)
        started = time.perf_counter()
        status, code = 500, "internal"
        try:
            response = await handler(request)
            status = response.status
            code = _error_code(response) if status >= 400 else None
            response.headers[REQUEST_ID_HEADER] = rid
            return response
        except web.HTTPException as exc:  # redirects and the like, which the error middleware lets through
            status, code = exc.status, None
            exc.headers[REQUEST_ID_HEADER] = rid
            raise
        finally:
            if access and access_log.isEnabledFor(logging.INFO):  # fields built only for a line written
                route = route_pattern(request)
                fields = {
                    "method": request.method,
                    "route": route,
                    "op": _OPS.get(route),
                    "status": status,
                    "code": code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                }
                access_log.info("%s %s %d", request.method, route, status, extra=fields)
            redaction.request_id.reset(reset)

    return request_ids


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", _openapi)
