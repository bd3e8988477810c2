"""The vsock transport: the emulated UNIX-socket mapping (the real AF_VSOCK needs Nitro hardware)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from enclave_tokenizer import vsock


@pytest.fixture
def vsock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path))
    monkeypatch.delenv("NITRO_ENCLAVE_CID", raising=False)
    return tmp_path


def test_unix_path_mapping(vsock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert vsock.unix_path(16, 5000) == vsock_dir / "16" / "5000"
    assert vsock.unix_path(vsock.VMADDR_CID_ANY, 5000) == vsock_dir / "3" / "5000"
    monkeypatch.setenv("NITRO_ENCLAVE_CID", "17")
    assert vsock.unix_path(vsock.VMADDR_CID_ANY, 5000) == vsock_dir / "17" / "5000"
    assert vsock.unix_path(3, 8000, base="/x") == Path("/x/3/8000")
    with pytest.raises(ValueError):
        vsock.unix_path(-1, 1)
    with pytest.raises(ValueError):
        vsock.unix_path(3, 2**32)


def test_real_vsock_when_env_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NITRO_VSOCK_DIR", raising=False)
    assert not vsock.emulated()
    # Nothing listens on real vsock here: the error comes from AF_VSOCK, not from a UNIX path.
    with pytest.raises(OSError) as info:
        vsock.connect(vsock.PARENT_CID, 59999, timeout=1).close()
    assert not isinstance(info.value, FileNotFoundError)


def test_listen_connect_roundtrip(vsock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_ENCLAVE_CID", "16")
    server = vsock.listen(5000)
    try:
        assert (vsock_dir / "16" / "5000").is_socket()
        client = vsock.connect(16, 5000, timeout=2)
        peer, _ = server.accept()
        client.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        client.close()
        peer.close()
        # A live listener cannot be taken over.
        with pytest.raises(OSError):
            vsock.listen(5000)
    finally:
        server.close()
    # A stale socket file from a dead listener is replaced.
    vsock.listen(5000).close()


def test_connect_refused_when_nobody_listens(vsock_dir: Path) -> None:
    with pytest.raises(ConnectionRefusedError):
        vsock.connect(16, 5000, timeout=1)
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(vsock.open_connection(16, 5000, timeout=1))


def test_async_roundtrip(vsock_dir: Path) -> None:
    async def main() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()

        server = await vsock.start_server(echo, 7000)
        async with server:
            reader, writer = await vsock.open_connection(vsock.PARENT_CID, 7000, timeout=2)
            writer.write(b"hello")
            data = await reader.readexactly(5)
            writer.close()
            return data

    assert asyncio.run(main()) == b"hello"


def test_listener_path_is_not_a_socket(vsock_dir: Path) -> None:
    (vsock_dir / "3").mkdir()
    (vsock_dir / "3" / "5000").write_text("x")
    with pytest.raises(OSError):
        vsock.listen(5000)
    assert socket.AF_VSOCK  # the platform has the address family the real path uses
