"""The one vsock transport shared by the enclave app, the parent side and the emulator.

Rule (project contract): when the env var ``NITRO_VSOCK_DIR`` is set, vsock is emulated with UNIX
sockets: a listener on (cid, port) is the UNIX socket ``$NITRO_VSOCK_DIR/<cid>/<port>``. The own CID
used by CID_ANY listeners is ``NITRO_ENCLAVE_CID`` inside an emulated enclave, else 3 (the parent).
Without the variable, real ``AF_VSOCK`` sockets are used.

Only stdlib: the enclave image stays small and the emulator's vsock-proxy can import this too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
PARENT_CID = 3
DEFAULT_VSOCK_DIR = "/run/nitro_enclaves/vsock"
ENV_DIR = "NITRO_VSOCK_DIR"
ENV_CID = "NITRO_ENCLAVE_CID"
MAX_PORT = 0xFFFFFFFF
DEFAULT_BACKLOG = 1024

ClientCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


def emulated() -> bool:
    """True when the emulator's UNIX-socket mapping is in force."""
    return bool(os.environ.get(ENV_DIR))


def own_cid() -> int:
    """The CID a CID_ANY listener binds to under emulation (enclave CID, else the parent's 3)."""
    value = os.environ.get(ENV_CID, "")
    try:
        return int(value) if value else PARENT_CID
    except ValueError as exc:
        raise ValueError(f"{ENV_CID} must be an integer CID, got {value!r}") from exc


def _check(cid: int, port: int) -> None:
    if not 0 <= cid <= VMADDR_CID_ANY:
        raise ValueError(f"invalid vsock CID {cid}")
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"invalid vsock port {port}")


def unix_path(cid: int, port: int, base: str | os.PathLike[str] | None = None) -> Path:
    """UNIX socket path emulating vsock (cid, port); ``base`` defaults to $NITRO_VSOCK_DIR.

    CID_ANY resolves to the own CID, as a real bind to CID_ANY would listen on the local CID.
    """
    _check(cid, port)
    if cid == VMADDR_CID_ANY:
        cid = own_cid()
    root = Path(base) if base is not None else Path(os.environ.get(ENV_DIR) or DEFAULT_VSOCK_DIR)
    return root / str(cid) / str(port)


def describe(cid: int, port: int) -> str:
    """Human-readable address for logs and errors (no secrets here)."""
    shown = "ANY" if cid == VMADDR_CID_ANY else str(cid)
    if emulated():
        return f"vsock({shown}:{port}) emulated at {unix_path(cid, port)}"
    return f"vsock({shown}:{port})"


def _remove_stale(path: Path) -> None:
    """Remove a socket file left by a dead listener; refuse if someone still listens (EADDRINUSE)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    except OSError:
        # A listener with a full backlog still counts as "in use".
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"address in use: {path}")


def listen(port: int, cid: int = VMADDR_CID_ANY, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A listening stream socket on vsock (cid, port), emulated or real."""
    _check(cid, port)
    if emulated():
        path = unix_path(cid, port)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((cid, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(cid: int, port: int, timeout: float | None = None) -> socket.socket:
    """A connected stream socket to vsock (cid, port); ``timeout`` applies to connect and later I/O.

    A missing emulated listener raises ConnectionRefusedError, like real vsock (ECONNRESET/ECONNREFUSED).
    """
    _check(cid, port)
    if emulated():
        family, address = socket.AF_UNIX, str(unix_path(cid, port))
    else:
        family, address = socket.AF_VSOCK, (cid, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(address)
                break
            except FileNotFoundError as exc:
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens on {describe(cid, port)}") from exc
            except BlockingIOError:
                # AF_UNIX with a timeout answers EAGAIN when the listener's backlog is full, where
                # real vsock would wait: wait too, within the timeout.
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"connect to {describe(cid, port)} timed out") from None
                time.sleep(0.005)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection(
    cid: int, port: int, timeout: float | None = None, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over vsock (cid, port); ``timeout`` bounds the connect only."""
    _check(cid, port)
    if emulated():
        path = str(unix_path(cid, port))
        try:
            coro = asyncio.open_unix_connection(path, limit=limit)
            return await asyncio.wait_for(coro, timeout)
        except FileNotFoundError as exc:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens on {describe(cid, port)}") from exc
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (cid, port)), timeout)
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise


async def start_server(
    client_connected_cb: ClientCallback,
    port: int,
    cid: int = VMADDR_CID_ANY,
    backlog: int = DEFAULT_BACKLOG,
    limit: int = 2**16,
) -> asyncio.Server:
    """asyncio server on vsock (cid, port), emulated or real."""
    sock = listen(port, cid, backlog)
    sock.setblocking(False)
    try:
        return await asyncio.start_server(client_connected_cb, sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise
