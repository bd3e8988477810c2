"""The enclave server's bounds, on a real server over emulated vsock: absolute frame deadlines, the global
input and output budgets, back-pressure on clients that do not read, the cap on slow ops, and the
protocol's answers to wrong-typed fields, non-finite numbers and deep nesting (never `internal`, never a
traceback). The same attacks at the deployed enclave size: tests/integration/test_enclave_server_limits.py.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enclave_tokenizer import protocol
from enclave_tokenizer.tokens import Tokenizer
from tokenizer_harness import CAPABILITY, TEST_KEY, RunningServer, call, running_server

PAN = "4111111111111111"
TK = Tokenizer.from_data_key(TEST_KEY)
# 20 KiB of request, ~1 MiB of answer (10,000 per-item errors): the amplifying request of issue 20.
AMPLIFIER = protocol.encode_frame({"id": 1, "op": "tokenize", "pans": [1] * 10_000})


@pytest.fixture
def vsock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path))
    monkeypatch.delenv("NITRO_ENCLAVE_CID", raising=False)
    monkeypatch.delenv("NITRO_NSM_SOCKET", raising=False)  # attest/provision fail fast: no NSM here
    return tmp_path


@pytest.fixture
def provisioned(vsock_dir: Path) -> Iterator[RunningServer]:
    with running_server(vsock_dir, frame_timeout=1.0, write_timeout=1.0) as srv:
        srv.provision_directly()
        srv.on_loop(lambda: None)  # the key is installed once the loop has run
        yield srv


def _recv(sock: socket.socket) -> dict[str, Any] | None:
    body = protocol.recv_frame(sock)
    return None if body is None else protocol.decode_message(body)


def _wait_idle(srv: RunningServer, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while srv.held() != (0, 0, 0):
        assert time.monotonic() < deadline, f"held after all clients left: {srv.held()}"
        time.sleep(0.05)


def _closed_within(sock: socket.socket, timeout: float) -> float:
    sock.settimeout(timeout)
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


# ------------------------------------------------------------------------------------------ time


def test_frame_deadline_is_absolute_not_per_byte(provisioned: RunningServer) -> None:
    with provisioned.connect() as slow:
        frame = struct.pack(">I", 100) + b"{" * 100
        started = time.monotonic()
        for offset in range(len(frame)):
            try:
                slow.send(frame[offset : offset + 1])
            except OSError:
                break
            time.sleep(0.3)
        elapsed = time.monotonic() - started
        assert elapsed < 2.5, f"a one-byte-every-0.3-s client stayed {elapsed:.1f} s (frame_timeout 1 s)"
        assert provisioned.stats().dropped_deadline >= 1


def test_frames_completing_in_pieces_keep_the_connection(provisioned: RunningServer) -> None:
    """Every read ends inside a frame for 3 s, but each frame completes well within its deadline."""
    frame = protocol.encode_frame({"id": 1, "op": "tokenize", "pan": PAN})
    half = len(frame) // 2
    with provisioned.connect() as sock:
        sock.sendall(frame[:half])
        for _ in range(10):
            time.sleep(0.3)
            sock.sendall(frame[half:] + frame[:half])
            assert _recv(sock)["result"]["token"] == TK.opaque(PAN)
        sock.sendall(frame[half:])
        assert _recv(sock)["ok"]


# ------------------------------------------------------------------------------------------ memory


def test_input_budget_refuses_the_connection_that_grows_past_it(vsock_dir: Path) -> None:
    with running_server(vsock_dir, input_budget=3 << 20, frame_timeout=30.0) as srv:
        srv.provision_directly()
        partial = struct.pack(">I", 1 << 20) + b"x" * ((1 << 20) - 1)
        socks, refused = [], 0
        for _ in range(6):
            sock = srv.connect()
            try:
                sock.sendall(partial)
                sock.settimeout(0.5)
                answer = _recv(sock)
            except (OSError, EOFError):
                answer = None
            if answer is not None:
                assert answer == {
                    "v": 1,
                    "id": None,
                    "ok": False,
                    "error": {"code": "busy", "message": "too much unfinished input; retry"},
                }
                refused += 1
            socks.append(sock)
        assert refused >= 3 and srv.stats().dropped_input_budget == refused
        held, _out, _conns = srv.held()
        assert held <= 3 << 20
        with srv.connect() as sock:  # small complete frames do not need the budget
            assert call(sock, {"id": 1, "op": "tokenize", "pan": PAN})["result"]["token"] == TK.opaque(PAN)
        for sock in socks:
            sock.close()
        _wait_idle(srv)


def test_clients_that_do_not_read_are_paused_then_dropped_past_the_output_budget(vsock_dir: Path) -> None:
    config = {"write_buffer_limit": 64 << 10, "output_budget": 1 << 20, "write_timeout": 30.0}
    with running_server(vsock_dir, **config) as srv:
        srv.provision_directly()
        hogs = []
        for _ in range(6):
            sock = srv.connect()
            sock.setblocking(False)
            for _ in range(10):
                try:
                    sock.send(AMPLIFIER)
                except BlockingIOError:
                    break
            hogs.append(sock)
            time.sleep(0.1)
        assert srv.stats().dropped_not_reading >= 1
        _in, out, _conns = srv.held()
        assert out <= (1 << 20) + (2 << 20)  # the budget, plus at most one answer over it
        with srv.connect() as sock:
            assert call(sock, {"id": 1, "op": "tokenize", "pan": PAN})["ok"]
        for sock in hogs:
            sock.close()
        _wait_idle(srv)


def test_a_paused_client_gets_every_answer_in_order_once_it_reads(provisioned: RunningServer) -> None:
    with provisioned.connect(timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        frames = [protocol.encode_frame({"id": i, "op": "tokenize", "pans": [1] * 10_000}) for i in range(12)]
        sock.sendall(b"".join(frames) + protocol.encode_frame({"id": "last", "op": "health"}))
        sock.shutdown(socket.SHUT_WR)  # half-closed while paused: still answered in full
        time.sleep(0.5)  # the server is now paused on this client (~12 MiB of answers)
        ids = []
        while (answer := _recv(sock)) is not None:
            ids.append(answer["id"])
            if answer["id"] != "last":
                assert len(answer["result"]["errors"]) == 10_000
        assert ids == [*range(12), "last"]
    _wait_idle(provisioned)


def test_slow_ops_are_capped_and_answered_busy(vsock_dir: Path) -> None:
    with running_server(vsock_dir, max_slow_ops=2) as srv:
        with srv.connect() as sock:
            sock.sendall(b"".join(protocol.encode_frame({"id": i, "op": "attest"}) for i in range(10)))
            answers = {a["id"]: a for a in (_recv(sock) for _ in range(10))}
            assert sorted(answers) == list(range(10))
            codes = [a["error"]["code"] for a in answers.values()]
            assert codes.count("busy") >= 1 and "internal" not in codes
            big = {"id": "big", "op": "attest", "junk": "x" * (40 << 10)}
            answer = call(sock, big)
            assert answer["error"]["code"] == "bad_request" and "at most" in answer["error"]["message"]
        assert srv.on_loop(lambda: srv.server.slow_inflight) == 0


# ------------------------------------------------------------------------------------------ answers


@pytest.mark.parametrize(
    ("request_obj", "field"),
    [
        ({"op": "tokenize", "pan": 4111111111111111}, "pan"),
        ({"op": "tokenize", "pan": None}, "pan"),
        ({"op": "tokenize", "pan": [PAN]}, "pan"),
        ({"op": "tokenize", "pans": PAN}, "pans"),
        ({"op": "tokenize", "pan": PAN, "mode": ["opaque"]}, "mode"),
        ({"op": "tokenize", "pan": PAN, "mode": 1}, "mode"),
        ({"op": "detokenize", "token": 5, "capability": CAPABILITY}, "token"),
        ({"op": "detokenize", "tokens": {}, "capability": CAPABILITY}, "tokens"),
        ({"op": "detokenize", "token": "rv1.AAAA", "capability": 5}, "capability"),
        ({"op": "attest", "nonce": 5}, "nonce"),
        ({"op": "attest", "user_data": ["AA=="]}, "user_data"),
        ({"op": "provision", "ciphertext_blob": 5, "region": "eu-west-1", "credentials": {}}, "ciphertext_blob"),
        ({"op": "provision", "ciphertext_blob": "AAAA", "region": "eu\x00", "credentials": {}}, "region"),
        ({"op": "provision", "ciphertext_blob": "AAAA", "region": "eu-west-1\r\nX: y", "credentials": {}}, "region"),
        ({"op": "provision", "ciphertext_blob": "AAAA", "region": "éu-west-1", "credentials": {}}, "region"),
        (
            {"op": "provision", "ciphertext_blob": "AAAA", "region": "eu-west-1", "credentials": {"access_key_id": 5}},
            "access_key_id",
        ),
    ],
)
def test_wrong_typed_fields_are_bad_request_naming_the_field(
    provisioned: RunningServer, request_obj: dict, field: str
) -> None:
    with provisioned.connect() as sock:
        answer = call(sock, {"id": 7, **request_obj})
        assert answer["id"] == 7 and answer["error"]["code"] == "bad_request", answer
        assert f"'{field}'" in answer["error"]["message"]


def test_version_must_be_the_integer_one(provisioned: RunningServer) -> None:
    with provisioned.connect() as sock:
        for version in (1.0, True, "1", [1]):
            answer = call(sock, {"id": 1, "v": version, "op": "health"})
            assert answer["error"]["code"] == "unsupported_version", version


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 1, "op": "tokenize", "pan": NaN}',
        b'{"id": 1, "op": "tokenize", "pan": -1e999}',
        b'{"id": 1, "op": "tokenize", "pans": [Infinity, -Infinity]}',
        b'{"id": 1e400, "op": "health"}',
        b'{"id": 1, "op": "health", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"id": 1, "op": "health", "x": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
        '{"id": 1, "op": "health"}'.encode("utf-16"),
        b'{"id": "\xed\xa0\x80", "op": "health"}',  # a UTF-8-encoded surrogate is not UTF-8
    ],
)
def test_non_finite_deep_or_non_utf8_json_is_bad_json(
    provisioned: RunningServer, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with provisioned.connect() as sock:
        sock.sendall(struct.pack(">I", len(body)) + body)
        answer = _recv(sock)
        assert answer is not None and answer["error"]["code"] == "bad_json", answer
        assert answer["id"] is None
        assert call(sock, {"id": 2, "op": "health"})["ok"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_escaped_surrogates_are_answered_not_internal(provisioned: RunningServer) -> None:
    token = TK.reversible(PAN)
    with provisioned.connect() as sock:
        for body in (
            '{"id": 1, "op": "detokenize", "token": "' + token + '", "capability": "\\ud800"}',
            '{"id": 1, "op": "tokenize", "pan": "4111\\udfff"}',
            '{"id": "\\ud800", "op": "health"}',
        ):
            raw = body.encode()
            sock.sendall(struct.pack(">I", len(raw)) + raw)
            answer = _recv(sock)
            assert answer is not None and answer.get("error", {}).get("code") != "internal", answer
