"""Masking of card numbers and credentials in every log record, the project's and third-party libraries'.

One mechanism for the parent services and the enclave (this package is measured into the EIF):

- a LogRecord factory (:func:`install`) masks each record when it is created, whichever logger made it
  (aiohttp, asyncio, botocore, werkzeug...) and whichever handler will write it, including handlers a
  library adds to its own logger and logging's last-resort handler. The message is formatted with its
  args and masked; an exception or stack is formatted into ``exc_text`` and masked, and the exception
  object is dropped so that no formatter can render it unmasked;
- :class:`RedactingFilter` on the handlers :func:`setup` configures masks what the factory cannot see:
  ``extra=`` attributes (added after the factory ran) and records built by ``logging.makeLogRecord``;
- uncaught exceptions (main thread and other threads) and warnings are routed through logging.

What is masked (:func:`redact`):

- PAN-shaped digit runs: 12-19 digits, possibly separated by single spaces, dashes, ``+`` or ``%20``, not
  inside a longer run of digits or hex letters (so hex digests, key checks, opaque tokens and UUIDs stay
  readable). Exempt: AWS account ids (exactly 12 digits between colons, as in ARNs) and epoch times
  (13, 16 or 19 digits starting with 1: ms, us, ns until 2033; no card network issues such PANs). Tokens of
  the ``fpe`` mode are PAN-shaped by design and are masked like PANs: a token belongs in no log either.
  The mask keeps the last four digits (what PCI DSS allows to display): ``[PAN ...1111]``;
- AWS access key ids (``AKIA``/``ASIA``... + 16 characters), keeping the 4-letter prefix;
- long base64 values (40 characters or more mixing upper case, lower case and digits): secret access
  keys, session tokens, data keys, KMS ciphertexts, attestation documents. Pure hex (PCRs, digests) is
  not base64-shaped and stays readable;
- the value after a credential-shaped name followed by ``:`` or ``=``: ``Authorization``,
  ``X-Amz-Security-Token`` and ``X-Detokenize-Capability`` up to the end of the quoted value or line;
  ``aws_secret_access_key``, ``SessionToken``, ``CiphertextBlob``, ``Plaintext``, ``capability``,
  ``signature``, ``token``... up to the next space or delimiter (values of 6 characters or more).
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import re
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

_SEP = r"(?:[ +\-]|%20)"
# Lookarounds: no digit or hex letter adjacent, so a run inside a hex string (or the last group of a
# UUID, "...-446655440000") is left alone.
_PAN = re.compile(rf"(?<![0-9A-Fa-f])(?<![0-9A-Fa-f]-)[0-9](?:{_SEP}?[0-9]){{11,18}}(?![0-9A-Fa-f])")
_ACCESS_KEY_ID = re.compile(
    r"(?<![A-Z0-9])(A3T[A-Z0-9]|AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])"
)
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{40,}={0,2}(?![A-Za-z0-9+/=])")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
# Header-style values run to the end of the quoted value or line (they contain spaces)...
_CREDENTIAL_HEADERS = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])((?:authorization|x-amz-security-token|x-detokenize-capability)[\"']?\s*[:=]\s*"
    r"(?:b?[\"'])?)(?![\"'\s,}\]])([^\"'\r\n]+)"
)
# ... other credential-shaped names' values to the next space, quote or delimiter (6 characters at least:
# "tokens: 5" is a count).
_CREDENTIAL_FIELDS = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])((?:x-amz-signature|aws_secret_access_key|secret_access_key|secretaccesskey|"
    r"aws_session_token|session_token|sessiontoken|ciphertextblob|ciphertextforrecipient|ciphertext|plaintext|"
    r"data_key|capability|password|signature|tokens?)[\"']?\s*[:=]\s*(?:b?[\"'])?)(?!\[REDACTED\])([^\"'\s,;}\]]{6,})"
)
_MASK = "[REDACTED]"
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _pan(match: re.Match[str]) -> str:
    text = match.group(0)
    if text.isdigit():
        if len(text) in (13, 16, 19) and text[0] == "1":
            return text  # epoch time in ms/us/ns (2001-2033); no card network issues such PANs
        start, end, whole = match.start(), match.end(), match.string
        if len(text) == 12 and start > 0 and end < len(whole) and whole[start - 1] == ":" == whole[end]:
            return text  # an AWS account id inside an ARN
    elif "-" in text and any(u.start() <= match.start() < u.end() for u in _UUID.finditer(match.string)):
        return text  # groups of a UUID (request ids)
    digits = re.sub(r"[^0-9]", "", text.replace("%20", ""))
    return f"[PAN ...{digits[-4:]}]"


def _base64(match: re.Match[str]) -> str:
    text = match.group(0)
    mixed = any(c.isupper() for c in text) and any(c.islower() for c in text) and any(c.isdigit() for c in text)
    return _MASK if mixed else text


def redact(text: str) -> str:
    """``text`` with card numbers and credentials masked (see the module docstring)."""
    text = _CREDENTIAL_HEADERS.sub(lambda m: m.group(1) + _MASK, text)
    text = _CREDENTIAL_FIELDS.sub(lambda m: m.group(1) + _MASK, text)
    text = _ACCESS_KEY_ID.sub(lambda m: m.group(1) + _MASK, text)
    text = _BASE64.sub(_base64, text)
    return _PAN.sub(_pan, text)


def _format_exception(exc_info: tuple[Any, Any, Any]) -> str:
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


def redact_record(record: logging.LogRecord) -> None:
    """Mask ``record`` in place: message (with its args), exception, stack and string ``extra`` values."""
    if not getattr(record, "_redacted", False):
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record, nor leak its args
            message = f"{record.msg!r} (arguments not formatted: {record.args!r})"
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            if record.exc_info[0] is not None:
                record.exc_text = redact(_format_exception(record.exc_info))
            record.exc_info = None  # formatters would render the exception again, unmasked
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._redacted = True
    for name, value in list(vars(record).items()):
        if name not in _STANDARD_ATTRS and isinstance(value, str):
            setattr(record, name, redact(value))


class RedactingFilter(logging.Filter):
    """Handler filter: masks every record it sees (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_lock = threading.Lock()
# (our factory, the one it wraps) once installed
_installed: list[tuple[Callable[..., logging.LogRecord], Callable[..., logging.LogRecord]]] = []


def install() -> None:
    """Mask every record at creation (idempotent), and route uncaught exceptions and warnings to logging."""
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            redact_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed.append((factory, previous))
    logging.captureWarnings(True)
    uncaught = logging.getLogger("uncaught")

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        uncaught.critical("uncaught exception", exc_info=(kind, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:
            name = args.thread.name if args.thread else "?"
            exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
            uncaught.error("uncaught exception in thread %s", name, exc_info=exc_info)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def uninstall() -> None:
    """Undo :func:`install`'s record factory (tests)."""
    with _lock:
        if _installed and logging.getLogRecordFactory() is _installed[0][0]:
            logging.setLogRecordFactory(_installed[0][1])
        _installed.clear()
    sys.excepthook = sys.__excepthook__
    threading.excepthook = threading.__excepthook__
    logging.captureWarnings(False)


DEFAULT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# "json" (one object per line) or "text"; the env var wins over what an entry point asks for, so that a
# host's services and tools can all be switched (the roles set it).
LOG_FORMAT_ENV = "ENCLAVE_TOKENIZER_LOG_FORMAT"
# The request being served (the gateway's X-Request-Id, the vsock request's "rid"): every record made
# while it is set carries it, whichever logger made it.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Fields of ``extra=`` that JSON lines carry, in this order (others follow, masked like the message).
_JSON_FIRST = ("request_id", "event", "method", "route", "op", "status", "code", "duration_ms")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, host, logger, msg, request_id, the record's
    ``extra=`` fields (already masked by RedactingFilter) and the masked exception text."""

    def __init__(self) -> None:
        super().__init__()
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        redact_record(record)  # also records that reached this handler without the filter
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "ts": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "host": self.host,
            "logger": record.name,
            "msg": record.msg,
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            line["request_id"] = rid
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
        for name in (*_JSON_FIRST, *sorted(extra)):
            if name in extra and name not in line:
                value = extra[name]
                line[name] = value if isinstance(value, str | int | float | bool | None) else redact(repr(value))
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=True, separators=(",", ":"))


def setup(
    level: str | int = "INFO", fmt: str = DEFAULT_FORMAT, stream: TextIO | None = None, log_format: str | None = None
) -> None:
    """What every entry point calls instead of ``logging.basicConfig``: a stderr handler (or ``stream``)
    on the root logger, masking installed, and a masking filter on every handler configured so far.

    ``log_format``: "json" (JSON lines, JsonFormatter) or "text" (``fmt``); the env var
    ENCLAVE_TOKENIZER_LOG_FORMAT overrides it; unset, services (default ``fmt``) write JSON and tools that
    pass their own ``fmt`` write text for a person."""
    install()
    chosen = os.environ.get(LOG_FORMAT_ENV) or log_format or ("json" if fmt == DEFAULT_FORMAT else "text")
    if chosen not in ("json", "text"):
        raise ValueError(f"{LOG_FORMAT_ENV}={chosen!r}: expected 'json' or 'text'")
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=fmt, stream=stream)
    root = logging.getLogger()
    if chosen == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
    known = logging.Logger.manager.loggerDict.values()
    for logger in [root, *(lg for lg in known if isinstance(lg, logging.Logger))]:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
