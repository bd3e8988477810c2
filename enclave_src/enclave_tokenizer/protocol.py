"""Wire protocol between the parent and the enclave (documented in enclave_src/README.md).

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON (one object).
Requests: ``{"v": 1, "id": <int|str>, "op": "<name>", ...}``.
Responses: ``{"v": 1, "id": <same>, "ok": true, "result": {...}}`` or
``{"v": 1, "id": <same|null>, "ok": false, "error": {"code": "...", "message": "..."}}``.
Responses carry the request id; clients may pipeline and must match by id (slow ops may overtake).

The length-prefixed framing itself (``frame``, ``recv_exact``, ``recv_frame``) is the one copy for every
stream of this project: the tokenizer protocol, the NSM socket (CBOR bodies, the enclave's nsm and the
emulator's server) and the emulator's CLI socket (nitro-cli's little-endian 64-bit length). It lives here,
in the enclave's own package, because the enclave needs it and its image carries only enclave code.

A request may carry ``"rid"`` (the HTTP request id, a string of at most 128 chars): the answer echoes it
(servers before it ignore the field, as they ignore every field an op does not read).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB: a batch of 10,000 PANs is ~250 KiB
# What a client adds around a request's own fields ({"v":1, ... ,"id":<int64>}): a request whose fields
# encode (encoded_size) to more than MAX_REQUEST_BYTES does not fit the enclave's frame limit.
ENVELOPE_BYTES = 64
MAX_REQUEST_BYTES = DEFAULT_MAX_FRAME - ENVELOPE_BYTES
MAX_ID_LENGTH = 128

_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


class ProtocolError(Exception):
    """A framing or message error with a stable code; ``fatal`` means the stream cannot continue."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


def frame(body: bytes, header: struct.Struct = HEADER) -> bytes:
    """``body`` behind its length in ``header``'s format."""
    return header.pack(len(body)) + body


def encode_frame(message: dict[str, Any]) -> bytes:
    return frame(_encoder.encode(message).encode("ascii"))


def to_json(value: Any) -> str:
    """``value`` as encode_frame writes it (ASCII, compact)."""
    return _encoder.encode(value)


class _NonFinite(ValueError):
    """NaN, Infinity or a literal that overflows a double: not JSON numbers (RFC 8259 section 6)."""


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value - value != 0.0:  # inf - inf is NaN; finite values give 0.0
        raise _NonFinite(literal[:16])
    return value


def _no_constant(name: str) -> Any:
    raise _NonFinite(name)


# Python's json accepts NaN, Infinity and -Infinity and turns 1e999 into inf; the protocol does not.
_decoder = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)


def decode_message(body: bytes) -> dict[str, Any]:
    """JSON object of a frame body; anything else is a (non-fatal) ``bad_json``/``bad_request``."""
    try:
        # Strict UTF-8: json.loads(bytes) would also take UTF-16/32 and lone surrogates (surrogatepass).
        message = _decoder.decode(body.decode("utf-8"))
    except _NonFinite:
        raise ProtocolError(
            "bad_json", "non-finite numbers (NaN, Infinity, overflowing literals) are not JSON"
        ) from None
    except RecursionError:
        # The C scanner counts nesting against the interpreter's recursion limit and unwinds cleanly.
        raise ProtocolError("bad_json", "JSON nested too deeply") from None
    except ValueError:
        # JSONDecodeError, UnicodeDecodeError and over-long integer literals are all ValueErrors.
        raise ProtocolError("bad_json", "frame body is not valid UTF-8 JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_request", "frame body must be a JSON object")
    return message


def valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH


def with_rid(answer: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """``answer`` echoing the request's ``rid`` when it has a valid one (other values are ignored)."""
    rid = request.get("rid")
    if type(rid) is str and len(rid) <= MAX_ID_LENGTH:
        answer["rid"] = rid
    return answer


def ok(request_id: object, result: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error(request_id: object, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}}


class FrameDecoder:
    """Incremental frame splitter for protocol-based servers and clients (no copies of whole buffers)."""

    __slots__ = ("_buffer", "error", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buffer = bytearray()
        self.max_frame = max_frame
        self.error: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (0 between frames)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Complete frame bodies in ``data`` (plus what was buffered).

        An oversize length sets ``error`` (fatal: the stream cannot be resynchronised); the frames
        before it are still returned so that they get their answers first.
        """
        if self.error is not None:
            return []
        buf = self._buffer
        buf += data
        frames: list[bytes] = []
        offset = 0
        end = len(buf)
        while end - offset >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(buf, offset)
            if length > self.max_frame:
                del buf[:]
                self.error = ProtocolError(
                    "frame_too_large", f"frame of {length} bytes exceeds the {self.max_frame}-byte limit", True
                )
                return frames
            stop = offset + HEADER_SIZE + length
            if stop > end:
                break
            frames.append(bytes(buf[offset + HEADER_SIZE : stop]))
            offset = stop
        if offset:
            del buf[:offset]
        return frames


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """``size`` bytes from a blocking socket; None on EOF before the first byte, EOFError mid-way."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            if not chunks:
                return None
            raise EOFError("connection closed in the middle of a frame")
        chunks += chunk
    return bytes(chunks)


def recv_frame(sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME, header: struct.Struct = HEADER) -> bytes | None:
    """One frame body from a blocking socket; None on a clean EOF between frames, EOFError within one,
    a fatal ProtocolError ``frame_too_large`` (its body left unread) for a length over ``max_frame``."""
    prefix = recv_exact(sock, header.size)
    if prefix is None:
        return None
    (length,) = header.unpack(prefix)
    if length > max_frame:
        raise ProtocolError("frame_too_large", f"frame of {length} bytes exceeds {max_frame}", True)
    body = recv_exact(sock, length)
    if body is None and length:
        raise EOFError("connection closed in the middle of a frame")
    return body or b""


def loads_strict(data: bytes) -> Any:
    """JSON as frames take it (strict UTF-8, no NaN/Infinity/overflowing numbers): ValueError otherwise,
    RecursionError for deep nesting. What the gateway parses request bodies with."""
    return _decoder.decode(data.decode("utf-8"))


def encoded_size(message: dict[str, Any]) -> int:
    """Bytes of ``message`` as encode_frame would write them (without the header); ValueError if it
    cannot be encoded."""
    return len(_encoder.encode(message))
