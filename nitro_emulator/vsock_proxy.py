"""Emulated vsock-proxy: ``nitro-cli-emulator vsock-proxy LOCAL_PORT REMOTE_ADDR REMOTE_PORT [--config]``.

Behaves like the real ``vsock-proxy`` 1.0.x (reference §8): the allowlist YAML (``allowlist:`` list of
``{address, port}``) is checked at start-up and a remote that is not on it is refused; a match needs the
same port and either the same address string or one of the entry's resolved IPs equal to the remote's
resolved IP. It then listens on vsock CID 3 at LOCAL_PORT - emulated: the UNIX socket
``$NITRO_VSOCK_DIR/3/<LOCAL_PORT>`` through the project's one transport (``enclave_tokenizer.vsock``) -
and forwards each connection over TCP, at most ``--num_workers`` at a time. The remote name is resolved
again for new connections (the real proxy re-resolves when the DNS TTL expires).

Errors end the process like the Rust binary's ``main`` returning ``Err``: ``Error: "<message>"`` on
stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from typing import Any

import yaml

BUFFER_SIZE = 8192


class ProxyError(Exception):
    """A start-up failure; the message is the real vsock-proxy's."""


def _family(ip_mode: str | None) -> int:
    return {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(ip_mode or "", socket.AF_UNSPEC)


def resolve(host: str, ip_mode: str | None = None) -> list[str]:
    """All addresses of `host` in resolver order (IDNA names allowed), filtered by -4/-6."""
    try:
        infos = socket.getaddrinfo(host, None, _family(ip_mode), socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in seen:
            seen.append(address)
    return seen


def resolve_single(host: str, ip_mode: str | None = None) -> str:
    addresses = resolve(host, ip_mode)
    if not addresses:
        raise ProxyError("DNS lookup returned no IP address")
    return addresses[0]


def load_allowlist(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ProxyError("Could not open the file") from None
    except OSError:
        raise ProxyError("Could not open the file") from None
    except UnicodeDecodeError:
        raise ProxyError("Could not read the file") from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        raise ProxyError("Bad yaml format") from None
    first = docs[0] if docs else None
    services = first.get("allowlist") if isinstance(first, dict) else None
    if not isinstance(services, list):
        raise ProxyError("No allowlist field")
    return services


def check_allowlist(remote_host: str, remote_port: int, config_file: str, ip_mode: str | None = None) -> str:
    """The remote's IP when (host, port) is allowed; ProxyError with the real proxy's message otherwise."""
    services = load_allowlist(config_file)
    remote_ip = resolve_single(remote_host, ip_mode)
    for service in services:
        address = service.get("address") if isinstance(service, dict) else None
        port = service.get("port") if isinstance(service, dict) else None
        if not isinstance(address, str):
            raise ProxyError("No address field")
        if isinstance(port, bool) or not isinstance(port, int):
            raise ProxyError("No port field or invalid type")
        if port & 0xFFFF != remote_port:  # the real proxy casts the i64 to u16
            continue
        if address == remote_host:
            return remote_ip
        if remote_ip in resolve(address, ip_mode):
            return remote_ip
    raise ProxyError("The given address and port are not allowed")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER_SIZE):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


class Proxy:
    def __init__(self, remote_host: str, remote_port: int, workers: int, ip_mode: str | None) -> None:
        self.remote_host = remote_host
        self.remote_port = remote_port
        self.ip_mode = ip_mode
        self.slots = asyncio.Semaphore(workers)

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        async with self.slots:
            try:
                loop = asyncio.get_running_loop()
                remote_ip = await loop.run_in_executor(None, resolve_single, self.remote_host, self.ip_mode)
                server_reader, server_writer = await asyncio.open_connection(remote_ip, self.remote_port)
            except (OSError, ProxyError) as exc:
                sys.stderr.write(f"Could not connect to {self.remote_host}:{self.remote_port}: {exc}\n")
                client_writer.close()
                return
            try:
                await asyncio.gather(_pump(client_reader, server_writer), _pump(server_reader, client_writer))
            finally:
                for writer in (server_writer, client_writer):
                    with contextlib.suppress(OSError):
                        writer.close()


async def _serve(local_port: int, proxy: Proxy) -> None:
    from enclave_tokenizer import vsock

    server = await vsock.start_server(proxy.handle, local_port, cid=vsock.PARENT_CID)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    with contextlib.suppress(OSError):
        os.unlink(vsock.unix_path(vsock.PARENT_CID, local_port))


def run(
    local_port: str,
    remote_addr: str,
    remote_port: str,
    config: str,
    *,
    workers: str = "4",
    ip_mode: str | None = None,
) -> None:
    """Parse like vsock-proxy's main, check the allowlist, then serve until SIGTERM/SIGINT."""
    from .state import vsock_dir

    try:
        port = int(local_port)
        if not 0 <= port <= 0xFFFFFFFF:
            raise ValueError
    except ValueError:
        raise ProxyError("Local port is not valid") from None
    try:
        rport = int(remote_port)
        if not 0 <= rport <= 0xFFFF:
            raise ValueError
    except ValueError:
        raise ProxyError("Remote port is not valid") from None
    try:
        num_workers = int(workers)
        if num_workers < 0:
            raise ValueError
    except ValueError:
        raise ProxyError("Number of workers is not valid") from None
    if num_workers == 0:
        raise ProxyError("Number of workers must not be 0")
    try:
        check_allowlist(remote_addr, rport, config, ip_mode)
    except ProxyError as exc:
        raise ProxyError(f"Error at checking the allowlist: {exc}") from None
    # The emulator always emulates vsock, whatever the caller's environment says.
    os.environ["NITRO_VSOCK_DIR"] = str(vsock_dir())
    try:
        asyncio.run(_serve(port, Proxy(remote_addr, rport, num_workers, ip_mode)))
    except OSError as exc:
        raise ProxyError(f"Could not listen for connections: {exc}") from None


def vsock_proxy(args: argparse.Namespace) -> int:
    ip_mode = "ipv4" if getattr(args, "ipv4", False) else "ipv6" if getattr(args, "ipv6", False) else None
    try:
        run(
            str(args.local_port),
            args.remote_addr,
            str(args.remote_port),
            args.config,
            workers=str(getattr(args, "workers", 4)),
            ip_mode=ip_mode,
        )
    except ProxyError as exc:
        # Rust prints main's Err(String) with Debug formatting: a quoted, escaped string.
        sys.stderr.write(f"Error: {json.dumps(str(exc))}\n")
        return 1
    return 0
