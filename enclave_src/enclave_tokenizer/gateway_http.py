"""The gateway's HTTP plumbing: every error it answers is JSON with a stable code, whoever raises it.

aiohttp's own error answers are text/plain, and its parser errors quote the request bytes (card numbers
included) in the exception it logs at ERROR and in the answer: the gateway names the kind of error only,
and logs no request byte. ``error`` builds the answers; ``json_errors`` (a middleware) turns what handlers
raise into them; ``Runner`` serves connections with a handler whose parser errors are answered the same way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import http_exceptions, web, web_protocol

from .http_api import route_pattern

log = logging.getLogger("enclave_tokenizer.gateway")

# The HTTP status of each error code the gateway or the enclave answers (others: 502).
STATUS = {
    "bad_json": 400,
    "bad_request": 400,
    "invalid_pan": 400,
    "invalid_token": 400,
    "batch_too_large": 413,
    "request_too_large": 413,
    "request_timeout": 408,
    "forbidden": 403,
    "not_provisioned": 503,
    "enclave_unavailable": 503,
    "busy": 503,
    "mode_not_allowed": 403,
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 414: "uri_too_long"}
_PARSER_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "request line or header too long"),
    (http_exceptions.BadHttpMethod, "unknown HTTP method"),
    (http_exceptions.BadStatusLine, "malformed request line"),
    (http_exceptions.InvalidURLError, "malformed request target"),
    (http_exceptions.InvalidHeader, "malformed header"),
    (http_exceptions.TransferEncodingError, "malformed chunked body"),
    (http_exceptions.ContentLengthError, "body does not match its Content-Length"),
    (http_exceptions.ContentEncodingError, "body does not match its Content-Encoding"),
    (web_protocol.RequestPayloadError, "request body could not be read"),
)


def error(code: str, message: str, status: int | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status or STATUS.get(code, 502))


def parser_error(exc: BaseException | None) -> str:
    for kind, text in _PARSER_ERRORS:
        if isinstance(exc, kind):
            return text
    return "malformed HTTP request"


def json_errors(max_body: int) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = f"request body exceeds {max_body} bytes" if exc.status == 413 else exc.reason
            response = error(_HTTP_CODES.get(exc.status, "bad_request"), message, exc.status)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except (web_protocol.RequestPayloadError, http_exceptions.HttpProcessingError) as exc:
            log.info("refused a request to %s: %s", route_pattern(request), type(exc).__name__)
            return error("bad_http", parser_error(exc), 400)
        except ConnectionError:  # the client went away: nobody reads this answer
            log.debug("client disconnected during a request to %s", route_pattern(request))
            return error("bad_http", "connection lost", 400)
        except Exception as exc:  # a bug, never the client's input: logged (masked), answered as JSON
            log.error("internal error answering %s: %s", route_pattern(request), type(exc).__name__, exc_info=exc)
            return error("internal", "internal error in the gateway", 500)

    return middleware


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, with errors it answers itself (parser errors) answered as JSON."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, ConnectionError):  # the client went away: not an error of the gateway
            log.debug("client disconnected: %s", type(exc).__name__)
        elif status >= 500:
            log.error("error answering a request: %s", type(exc).__name__, exc_info=exc)
        else:
            log.info("refused a malformed HTTP request: %s", type(exc).__name__)
        if request.writer.output_size > 0:  # as aiohttp: a response already started cannot be replaced
            raise ConnectionError("response already sent: cannot send an error response")
        if status >= 500:
            response = error("internal", "internal error in the gateway", status)
        else:
            response = error("bad_http", parser_error(exc), status)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """AppRunner whose connections use _RequestHandler (aiohttp 3.14 has no hook for the class)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **server._kwargs,
        )
