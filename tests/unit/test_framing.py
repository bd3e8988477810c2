"""The one length-prefixed framing (enclave_tokenizer.protocol: frame, recv_exact, recv_frame) and its users:
the enclave's NSM client and the emulator's CLI socket."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from enclave_tokenizer import nsm, protocol

from nitro_emulator import enclave_process

LE64 = struct.Struct("<Q")


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_recv_exact_collects_chunks() -> None:
    a, b = _pair()
    with a, b:
        for piece in (b"ab", b"c", b"defg"):
            a.sendall(piece)
        assert protocol.recv_exact(b, 7) == b"abcdefg"
        assert protocol.recv_exact(b, 0) == b""


def test_recv_exact_eof_before_any_byte_is_none() -> None:
    a, b = _pair()
    with a, b:
        a.close()
        assert protocol.recv_exact(b, 4) is None


def test_recv_exact_short_read_is_eof_error() -> None:
    a, b = _pair()
    with a, b:
        a.sendall(b"abc")
        a.close()
        with pytest.raises(EOFError):
            protocol.recv_exact(b, 4)


def test_frame_round_trip_in_both_header_formats() -> None:
    a, b = _pair()
    with a, b:
        a.sendall(protocol.frame(b"big-endian") + protocol.frame(b"", protocol.HEADER))
        a.sendall(protocol.frame(b"little", LE64))
        assert protocol.frame(b"xy") == b"\x00\x00\x00\x02xy"
        assert protocol.frame(b"xy", LE64) == b"\x02" + b"\x00" * 7 + b"xy"
        assert protocol.recv_frame(b) == b"big-endian"
        assert protocol.recv_frame(b) == b""
        assert protocol.recv_frame(b, header=LE64) == b"little"
        a.close()
        assert protocol.recv_frame(b) is None  # clean EOF between frames


def test_frame_limit_is_inclusive_and_oversize_is_fatal() -> None:
    a, b = _pair()
    with a, b:
        a.sendall(protocol.frame(b"x" * 10) + struct.pack(">I", 11) + b"y" * 11)
        assert protocol.recv_frame(b, max_frame=10) == b"x" * 10
        with pytest.raises(protocol.ProtocolError) as info:
            protocol.recv_frame(b, max_frame=10)
        assert info.value.code == "frame_too_large" and info.value.fatal
        assert "11 bytes" in info.value.message
        assert b.recv(11) == b"y" * 11  # the oversize body was left unread


def test_truncated_header_or_body_is_eof_error() -> None:
    for data in (b"\x00\x00", struct.pack(">I", 5) + b"abc"):
        a, b = _pair()
        with a, b:
            a.sendall(data)
            a.close()
            with pytest.raises(EOFError):
                protocol.recv_frame(b)


def test_emulator_cli_frames_report_truncation_as_value_error() -> None:
    a, b = _pair()
    with a, b:
        a.sendall(LE64.pack(10) + b"{}")
        a.close()
        with pytest.raises(ValueError, match="truncated"):
            enclave_process.recv_frame(b)


@pytest.fixture
def fake_nsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """A UNIX socket that answers each connection with the next canned byte string, then closes."""
    path = tmp_path / "nsm.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    answers: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                protocol.recv_frame(conn)
                conn.sendall(answers.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setenv(nsm.NSM_SOCKET_ENV, str(path))
    yield answers
    server.close()
    thread.join(timeout=5)


def test_nsm_client_refuses_a_response_cut_short(fake_nsm: list[bytes]) -> None:
    fake_nsm.append(struct.pack(">I", 100) + b"partial")
    with pytest.raises(nsm.NsmError, match="closed mid-response") as info:
        nsm.get_random(16)
    assert info.value.code == "InvalidResponse"


def test_nsm_client_refuses_an_oversize_response(fake_nsm: list[bytes]) -> None:
    fake_nsm.append(struct.pack(">I", nsm.MAX_RESPONSE + 1))
    with pytest.raises(nsm.NsmError, match=f"{nsm.MAX_RESPONSE + 1} bytes") as info:
        nsm.get_random(16)
    assert info.value.code == "InvalidResponse"
