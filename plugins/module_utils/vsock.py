"""The one vsock transport: the enclave app, the parent side (gateway, supervisor, Ansible modules) and
the emulator all connect and listen through it. enclave_tokenizer.vsock adds asyncio on top.

Rule (project contract): when the env var ``NITRO_VSOCK_DIR`` is set, vsock is emulated with UNIX
sockets: a listener on (cid, port) is the UNIX socket ``$NITRO_VSOCK_DIR/<cid>/<port>``. The own CID
used by CID_ANY listeners is ``NITRO_ENCLAVE_CID`` inside an emulated enclave, else 3 (the parent).
Without the variable, real ``AF_VSOCK`` sockets are used. Parent-side callers on an emulated host may
pass ``emulated_dir`` explicitly instead (the variable is only a default there, never inside a real enclave).

Stdlib only: Ansible ships it to hosts with the modules, and the enclave image stays small.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import time
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


def emulation_dir(explicit: str | os.PathLike[str] | None = None) -> str | None:
    """The emulated vsock directory in force: ``explicit``, else $NITRO_VSOCK_DIR; None means AF_VSOCK."""
    if explicit:
        return str(explicit)
    return os.environ.get(ENV_DIR) or None


def emulated() -> bool:
    """True when the emulator's UNIX-socket mapping is in force through the environment."""
    return emulation_dir() is not None


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


def describe(cid: int, port: int, emulated_dir: str | os.PathLike[str] | None = None) -> str:
    """Human-readable address for logs and errors (no secrets here)."""
    shown = "ANY" if cid == VMADDR_CID_ANY else str(cid)
    base = emulation_dir(emulated_dir)
    if base is not None:
        return f"vsock({shown}:{port}) emulated at {unix_path(cid, port, base)}"
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


def connect(
    cid: int, port: int, timeout: float | None = None, emulated_dir: str | os.PathLike[str] | None = None
) -> socket.socket:
    """A connected stream socket to vsock (cid, port); ``timeout`` applies to connect and later I/O.

    A missing emulated listener raises ConnectionRefusedError, like real vsock (ECONNRESET/ECONNREFUSED).
    """
    _check(cid, port)
    base = emulation_dir(emulated_dir)
    if base is not None:
        family, address = socket.AF_UNIX, str(unix_path(cid, port, base))
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
                where = describe(cid, port, emulated_dir)
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens on {where}") from exc
            except BlockingIOError:
                # AF_UNIX with a timeout answers EAGAIN when the listener's backlog is full, where
                # real vsock would wait: wait too, within the timeout.
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"connect to {describe(cid, port, emulated_dir)} timed out") from None
                time.sleep(0.005)
    except BaseException:
        sock.close()
        raise
    return sock
