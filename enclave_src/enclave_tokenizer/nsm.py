"""Enclave-side client of the Nitro Secure Module.

Transport rule (shared with the emulator): when ``NITRO_NSM_SOCKET`` is set, requests go to that UNIX
socket framed as u32 big-endian length + CBOR; otherwise to the real ``/dev/nsm`` through its single
ioctl, ``NSM_IOCTL_RAW = _IOWR(0x0A, 0, struct nsm_raw)`` with request/response iovecs.
Requests and responses are the NSM API's CBOR messages (reference attestation-and-kms.md §4.2).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
from collections.abc import Mapping
from typing import Any, NamedTuple

import cbor2

from . import protocol

__all__ = [
    "NSM_IOCTL_RAW",
    "NsmError",
    "PcrDescription",
    "describe_nsm",
    "describe_pcr",
    "extend_pcr",
    "get_attestation_document",
    "get_random",
    "lock_pcr",
    "lock_pcrs",
]

NSM_DEVICE = "/dev/nsm"
NSM_SOCKET_ENV = "NITRO_NSM_SOCKET"
MAX_REQUEST = 0x1000
MAX_RESPONSE = 0x3000
MAX_OPTIONAL_LEN = 1024
SOCKET_TIMEOUT = 30.0


class NsmError(Exception):
    """The NSM answered with an error code, or could not be reached."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(message or code)
        self.code = code


class PcrDescription(NamedTuple):
    locked: bool
    data: bytes


class _NsmIovec(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _NsmRaw(ctypes.Structure):
    _fields_ = (("request", _NsmIovec), ("response", _NsmIovec))


def _iowr(magic: int, number: int, size: int) -> int:
    # Linux asm-generic ioctl encoding: dir(2) << 30 | size(14) << 16 | type(8) << 8 | nr(8).
    ioc_read_write = 3
    return (ioc_read_write << 30) | (size << 16) | (magic << 8) | number


NSM_IOCTL_RAW = _iowr(0x0A, 0, ctypes.sizeof(_NsmRaw))  # 0xC0200A00


def _ioctl_roundtrip(request: bytes, device: str | None = None) -> bytes:
    device = device or NSM_DEVICE
    req_buf = ctypes.create_string_buffer(request, len(request))
    resp_buf = ctypes.create_string_buffer(MAX_RESPONSE)
    raw = _NsmRaw(
        _NsmIovec(ctypes.addressof(req_buf), len(request)),
        _NsmIovec(ctypes.addressof(resp_buf), MAX_RESPONSE),
    )
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NsmError("Unavailable", f"cannot open {device}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, NSM_IOCTL_RAW, raw, True)  # the driver writes response.len back into raw
    except OSError as exc:
        code = "InputTooLarge" if exc.errno == errno.EMSGSIZE else "InternalError"
        raise NsmError(code, f"NSM ioctl failed: {exc.strerror}") from None
    finally:
        os.close(fd)
    if raw.response.len > MAX_RESPONSE:
        raise NsmError("InvalidResponse", "NSM response length exceeds its buffer")
    return resp_buf.raw[: raw.response.len]


def _socket_roundtrip(request: bytes, path: str) -> bytes:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(SOCKET_TIMEOUT)
            sock.connect(path)
            sock.sendall(protocol.frame(request))
            response = protocol.recv_frame(sock, MAX_RESPONSE)
    except protocol.ProtocolError as exc:
        raise NsmError("InvalidResponse", f"NSM response: {exc.message}") from None
    except EOFError:
        raise NsmError("InvalidResponse", "NSM socket closed mid-response") from None
    except OSError as exc:
        raise NsmError("Unavailable", f"NSM socket {path}: {exc}") from None
    if response is None:
        raise NsmError("InvalidResponse", "NSM socket closed mid-response")
    return response


def _call(request: Any) -> Any:
    """Send one NSM request; return the body of the success response or raise :class:`NsmError`."""
    encoded = cbor2.dumps(request)
    if len(encoded) > MAX_REQUEST:
        raise NsmError("InputTooLarge", f"request of {len(encoded)} bytes exceeds {MAX_REQUEST}")
    path = os.environ.get(NSM_SOCKET_ENV)
    raw = _socket_roundtrip(encoded, path) if path else _ioctl_roundtrip(encoded)
    try:
        response = cbor2.loads(raw)
    except Exception:  # a broken device answer must not surface as a decoder traceback
        raise NsmError("InvalidResponse", "NSM response is not valid CBOR") from None
    op = request if isinstance(request, str) else next(iter(request))
    if isinstance(response, Mapping) and "Error" in response:
        raise NsmError(str(response["Error"]), f"NSM {op} failed: {response['Error']}")
    if response == op:  # unit-variant answers (LockPCR, LockPCRs)
        return None
    if not isinstance(response, Mapping) or op not in response or not isinstance(response[op], Mapping):
        raise NsmError("InvalidResponse", f"unexpected NSM answer to {op}")
    return response[op]


def _optional(value: bytes | None, name: str) -> bytes | None:
    if value is not None and (not isinstance(value, bytes | bytearray) or len(value) > MAX_OPTIONAL_LEN):
        raise ValueError(f"{name} must be bytes of at most {MAX_OPTIONAL_LEN}")
    return None if value is None else bytes(value)


def get_attestation_document(
    user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
) -> bytes:
    """A signed attestation document (raw COSE_Sign1) carrying the given fields (each ≤ 1024 bytes)."""
    body = _call(
        {
            "Attestation": {
                "user_data": _optional(user_data, "user_data"),
                "nonce": _optional(nonce, "nonce"),
                "public_key": _optional(public_key, "public_key"),
            }
        }
    )
    document = body.get("document")
    if type(document) is not bytes:
        raise NsmError("InvalidResponse", "Attestation answer lacks the document")
    return document


def get_random(n: int) -> bytes:
    """``n`` bytes from the NSM's random source (several requests when n exceeds one answer)."""
    if n < 0:
        raise ValueError("n must be non-negative")
    out = bytearray()
    while len(out) < n:
        chunk = _call("GetRandom").get("random")
        if type(chunk) is not bytes or not chunk:
            raise NsmError("InvalidResponse", "GetRandom answer lacks random bytes")
        out += chunk
    return bytes(out[:n])


def describe_pcr(index: int) -> PcrDescription:
    body = _call({"DescribePCR": {"index": index}})
    lock, data = body.get("lock"), body.get("data")
    if type(lock) is not bool or type(data) is not bytes:
        raise NsmError("InvalidResponse", "DescribePCR answer is malformed")
    return PcrDescription(lock, data)


def extend_pcr(index: int, data: bytes) -> bytes:
    """Extend PCR ``index`` (16..31 while unlocked) with ``data``; returns the new value."""
    body = _call({"ExtendPCR": {"index": index, "data": bytes(data)}})
    value = body.get("data")
    if type(value) is not bytes:
        raise NsmError("InvalidResponse", "ExtendPCR answer is malformed")
    return value


def lock_pcr(index: int) -> None:
    _call({"LockPCR": {"index": index}})


def lock_pcrs(lock_range: int) -> None:
    """Lock PCRs ``[0, lock_range)``."""
    _call({"LockPCRs": {"range": lock_range}})


def describe_nsm() -> dict[str, Any]:
    return dict(_call("DescribeNSM"))
