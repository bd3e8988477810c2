"""vsock for the enclave app and the parent side: the transport of plugins/module_utils/vsock.py (one
implementation, also used by the Ansible modules and the emulator) plus its asyncio variants.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.vsock import (
    DEFAULT_BACKLOG,
    DEFAULT_VSOCK_DIR,
    ENV_CID,
    ENV_DIR,
    MAX_PORT,
    PARENT_CID,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_HYPERVISOR,
    VMADDR_CID_LOCAL,
    _check,
    connect,
    describe,
    emulated,
    emulation_dir,
    listen,
    own_cid,
    unix_path,
)

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_VSOCK_DIR",
    "ENV_CID",
    "ENV_DIR",
    "MAX_PORT",
    "PARENT_CID",
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "VMADDR_CID_HYPERVISOR",
    "VMADDR_CID_LOCAL",
    "connect",
    "describe",
    "emulated",
    "emulation_dir",
    "listen",
    "open_connection",
    "own_cid",
    "start_server",
    "unix_path",
]

ClientCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


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
