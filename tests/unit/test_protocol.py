"""Framing (unit + hypothesis) and the real server on emulated vsock: ops, errors, hostile clients, fuzz."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from enclave_tokenizer import protocol
from enclave_tokenizer.protocol import FrameDecoder, ProtocolError
from enclave_tokenizer.tokens import Tokenizer, luhn_check_digit
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_harness import CAPABILITY, TEST_KEY, RunningServer, call, running_server

PAN = "4111111111111111"
PAN_SPACED = "4111 1111 1111 1111"
TK = Tokenizer.from_data_key(TEST_KEY)

# ------------------------------------------------------------------------------------------ framing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=6,
)
messages = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, min_size=1, max_size=8), st.lists(st.integers(0, 4000), max_size=12))
def test_decoder_reassembles_any_split(msgs: list[dict], cuts: list[int]) -> None:
    stream = b"".join(protocol.encode_frame(m) for m in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    bodies: list[bytes] = []
    for start, stop in itertools.pairwise(points):
        bodies.extend(decoder.feed(stream[start:stop]))
    assert [protocol.decode_message(b) for b in bodies] == msgs
    assert decoder.pending == 0 and decoder.error is None


@settings(max_examples=100, deadline=None)
@given(messages)
def test_encode_frame_layout(msg: dict) -> None:
    frame = protocol.encode_frame(msg)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert json.loads(frame[4:]) == msg
    frame[4:].decode("ascii")  # ensure_ascii: no raw non-ASCII on the wire


def test_oversize_length_is_fatal_but_earlier_frames_survive() -> None:
    decoder = FrameDecoder(max_frame=100)
    good = protocol.encode_frame({"op": "health"})
    frames = decoder.feed(good + struct.pack(">I", 101) + b"x" * 10)
    assert frames == [good[4:]]
    assert isinstance(decoder.error, ProtocolError) and decoder.error.code == "frame_too_large"
    assert decoder.error.fatal
    assert decoder.feed(good) == []  # no resynchronisation after a fatal error


def test_exact_limit_accepted() -> None:
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(struct.pack(">I", 10) + b"0123456789") == [b"0123456789"]
    assert decoder.feed(struct.pack(">I", 0)) == [b""]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"{", "bad_json"),
        (b"[" * 100_000 + b"]" * 100_000, "bad_json"),
        (b"1" * 5000, "bad_json"),  # int literal beyond Python's digit limit
        (b"[1,2]", "bad_request"),
        (b'"x"', "bad_request"),
        (b"NaN", "bad_json"),
        (b"-Infinity", "bad_json"),
        (b'{"pan": -1e999}', "bad_json"),
    ],
)
def test_decode_message_errors(body: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_message(body)
    assert info.value.code == code and not info.value.fatal


def test_recv_frame_blocking() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(protocol.encode_frame({"id": 1}) + b"\x00\x00")
        assert protocol.decode_message(protocol.recv_frame(b)) == {"id": 1}
        a.close()
        with pytest.raises(EOFError):
            protocol.recv_frame(b)


# ------------------------------------------------------------------------------------------ server


@pytest.fixture
def vsock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path))
    monkeypatch.delenv("NITRO_ENCLAVE_CID", raising=False)
    return tmp_path


@pytest.fixture
def server(vsock_dir: Path) -> Iterator[RunningServer]:
    with running_server(vsock_dir, frame_timeout=1.0, idle_timeout=30.0, write_timeout=1.0, max_batch=2000) as srv:
        yield srv


@pytest.fixture
def provisioned(server: RunningServer) -> RunningServer:
    server.provision_directly()
    with server.connect() as sock:  # the install runs on the server loop; wait until it is visible
        for _ in range(100):
            if call(sock, {"id": 0, "op": "health"})["result"]["provisioned"]:
                break
            time.sleep(0.01)
    return server


def test_listens_on_the_emulated_vsock_path(server: RunningServer, vsock_dir: Path) -> None:
    assert (vsock_dir / "16" / "5000").is_socket()


def test_unprovisioned_health_and_refusal(server: RunningServer) -> None:
    with server.connect() as sock:
        health = call(sock, {"v": 1, "id": 1, "op": "health"})
        assert health["ok"] and health["id"] == 1
        assert health["result"]["provisioned"] is False and health["result"]["protocol"] == 1
        answer = call(sock, {"id": 2, "op": "tokenize", "pan": PAN})
        assert answer == {
            "v": 1,
            "id": 2,
            "ok": False,
            "error": {"code": "not_provisioned", "message": answer["error"]["message"]},
        }


def test_tokenize_single_and_modes(provisioned: RunningServer) -> None:
    with provisioned.connect() as sock:
        for mode, fn in (("opaque", TK.opaque), ("fpe", TK.fpe), ("reversible", TK.reversible)):
            answer = call(sock, {"id": mode, "op": "tokenize", "pan": PAN_SPACED, "mode": mode})
            assert answer["ok"], answer
            assert answer["id"] == mode
            # Each answer says which key made the token (the key check changes only with a rotation).
            assert answer["result"] == {"token": fn(PAN), "last_four": "1111", "key_check": TK.key_check}
        assert call(sock, {"id": 9, "op": "tokenize", "pan": PAN})["result"]["token"] == (
            "c57c42af4e717c08959485561629195a"
        )


def test_tokenize_batch_with_per_item_errors(provisioned: RunningServer) -> None:
    with provisioned.connect() as sock:
        pans = [PAN, "4111111111111112", "5500-0000-0000-0004", 42, "12"]
        result = call(sock, {"id": 1, "op": "tokenize", "pans": pans})["result"]
        assert result["tokens"] == [TK.opaque(PAN), None, TK.opaque("5500000000000004"), None, None]
        assert result["last_four"] == ["1111", None, "0004", None, None]
        assert [e["index"] for e in result["errors"]] == [1, 3, 4]
        assert {e["code"] for e in result["errors"]} == {"invalid_pan"}
        assert "4111111111111112" not in json.dumps(result)
        too_many = call(sock, {"id": 2, "op": "tokenize", "pans": [PAN] * 2001})
        assert too_many["error"]["code"] == "batch_too_large"
        assert call(sock, {"id": 3, "op": "tokenize", "pans": []})["result"]["tokens"] == []


def test_invalid_pan_never_echoed(provisioned: RunningServer) -> None:
    with provisioned.connect() as sock:
        for bad in ["4111111111111112", "4111-1111-1111-111x", "1234567890123456789012"]:
            answer = call(sock, {"id": 1, "op": "tokenize", "pan": bad})
            assert answer["error"]["code"] == "invalid_pan"
            assert bad not in json.dumps(answer) and "111111" not in json.dumps(answer)


def test_detokenize_needs_capability(provisioned: RunningServer) -> None:
    token = TK.reversible(PAN)
    with provisioned.connect() as sock:
        assert call(sock, {"id": 1, "op": "detokenize", "token": token})["error"]["code"] == "forbidden"
        wrong = call(sock, {"id": 2, "op": "detokenize", "token": token, "capability": "nope"})
        assert wrong["error"]["code"] == "forbidden"
        right = call(sock, {"id": 3, "op": "detokenize", "token": token, "capability": CAPABILITY})
        assert right["result"] == {"pan": PAN, "last_four": "1111", "key_check": TK.key_check}
        opaque = call(sock, {"id": 4, "op": "detokenize", "token": TK.opaque(PAN), "capability": CAPABILITY})
        assert opaque["error"]["code"] == "invalid_token"
        batch = call(sock, {"id": 5, "op": "detokenize", "tokens": [token, "rv1.AAAA"], "capability": CAPABILITY})
        assert batch["result"]["pans"] == [PAN, None]
        assert batch["result"]["errors"][0]["index"] == 1


def test_detokenize_disabled_without_provisioned_capability(server: RunningServer) -> None:
    server.provision_directly(capability=None)
    with server.connect() as sock:
        time.sleep(0.05)
        answer = call(sock, {"id": 1, "op": "detokenize", "token": TK.reversible(PAN), "capability": ""})
        assert answer["error"]["code"] == "forbidden"
        assert "not enabled" in answer["error"]["message"]


@pytest.mark.parametrize(
    ("request_obj", "code", "echo_id"),
    [
        ({"id": 1, "op": "launch_missiles"}, "unknown_op", 1),
        ({"id": 1}, "unknown_op", 1),
        ({"id": 1, "op": "health", "v": 2}, "unsupported_version", 1),
        ({"id": 1.5, "op": "health"}, "bad_request", None),
        ({"id": True, "op": "health"}, "bad_request", None),
        ({"id": "x" * 200, "op": "health"}, "bad_request", None),
        ({"id": 7, "op": "tokenize"}, "bad_request", 7),
        ({"id": 7, "op": "tokenize", "pans": {"a": 1}}, "bad_request", 7),
        ({"id": 7, "op": "tokenize", "pan": PAN, "mode": "rot13"}, "bad_request", 7),
        ({"id": 8, "op": "attest", "nonce": "***"}, "bad_request", 8),
        ({"id": 9, "op": "provision"}, "bad_request", 9),
        ({"id": 9, "op": "provision", "ciphertext_blob": "AAAA", "region": "x", "credentials": 3}, "bad_request", 9),
    ],
)
def test_request_errors_keep_connection(provisioned: RunningServer, request_obj: dict, code: str, echo_id) -> None:
    with provisioned.connect() as sock:
        answer = call(sock, request_obj)
        assert answer["ok"] is False and answer["error"]["code"] == code, answer
        assert answer["id"] == echo_id
        assert set(answer["error"]) == {"code", "message"}
        assert call(sock, {"id": 2, "op": "health"})["ok"]


def test_pipelining_in_order(provisioned: RunningServer) -> None:
    bodies = [f"{400000000000000 + i:015d}" for i in range(300)]
    pans = [body + luhn_check_digit(body) for body in bodies]
    with provisioned.connect() as sock:
        sock.sendall(b"".join(protocol.encode_frame({"id": i, "op": "tokenize", "pan": p}) for i, p in enumerate(pans)))
        for i, pan in enumerate(pans):
            answer = protocol.decode_message(protocol.recv_frame(sock))
            assert answer["id"] == i
            assert answer["result"]["token"] == TK.opaque(pan)


def test_oversize_frame_answered_then_closed(server: RunningServer) -> None:
    with server.connect() as sock:
        sock.sendall(protocol.encode_frame({"id": 1, "op": "health"}) + struct.pack(">I", 2**31) + b"x" * 100)
        first = protocol.decode_message(protocol.recv_frame(sock))
        assert first["id"] == 1 and first["ok"]
        second = protocol.decode_message(protocol.recv_frame(sock))
        assert second["error"]["code"] == "frame_too_large" and second["id"] is None
        assert protocol.recv_frame(sock) is None  # closed


def test_slow_client_dropped_while_others_served(server: RunningServer) -> None:
    slow = server.connect()
    slow.sendall(struct.pack(">I", 100) + b"{")  # a frame that never completes
    with server.connect() as other:
        assert call(other, {"id": 1, "op": "health"})["ok"]
    slow.settimeout(10)
    started = time.monotonic()
    assert slow.recv(10) == b""  # the sweeper aborted it after frame_timeout
    assert time.monotonic() - started < 8
    slow.close()


def test_half_closed_client_gets_answers(provisioned: RunningServer) -> None:
    with provisioned.connect() as sock:
        sock.sendall(b"".join(protocol.encode_frame({"id": i, "op": "health"}) for i in range(5)))
        sock.sendall(protocol.encode_frame({"id": 99, "op": "attest"}))  # slow op, answered before closing
        sock.shutdown(socket.SHUT_WR)
        ids = []
        while (body := protocol.recv_frame(sock)) is not None:
            ids.append(protocol.decode_message(body)["id"])
        assert sorted(ids) == [0, 1, 2, 3, 4, 99]


def test_client_that_never_reads_is_dropped(vsock_dir: Path) -> None:
    with running_server(vsock_dir, write_timeout=0.5, frame_timeout=0.5) as srv:
        srv.provision_directly()
        hog = srv.connect(timeout=10)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        frame = protocol.encode_frame({"id": 1, "op": "tokenize", "pans": [PAN] * 1000})
        deadline = time.monotonic() + 15
        with pytest.raises(OSError):  # the server stops reading, then aborts the connection
            while time.monotonic() < deadline:
                hog.sendall(frame)
        hog.close()
        with srv.connect() as sock:
            assert call(sock, {"id": 1, "op": "health"})["ok"]


def test_thousands_of_connections_and_limit(vsock_dir: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(3000, (min(soft, hard) - 200) // 2)
    assert count >= 1000, f"file descriptor limit {soft} too low for this test"
    with running_server(vsock_dir, max_connections=count) as srv:
        conns = [srv.connect() for _ in range(count)]
        try:
            extra = srv.connect()
            busy = protocol.decode_message(protocol.recv_frame(extra))
            assert busy["error"]["code"] == "busy"
            extra.close()
            for sock in conns[:: max(1, count // 50)]:
                assert call(sock, {"id": 1, "op": "health"})["ok"]
        finally:
            for sock in conns:
                sock.close()
        time.sleep(0.2)
        with srv.connect() as sock:
            assert call(sock, {"id": 2, "op": "health"})["ok"]


def _malformed_frames(rng: random.Random, n: int) -> Iterator[bytes]:
    valid = json.dumps({"v": 1, "id": 1, "op": "tokenize", "pan": PAN, "mode": "fpe"}).encode()
    shapes = [
        lambda: rng.randbytes(rng.randint(0, 64)),
        lambda: valid[: rng.randint(0, len(valid) - 1)],
        lambda: bytes(b ^ (1 << rng.randint(0, 7)) if rng.random() < 0.1 else b for b in valid),
        lambda: b"[" * rng.randint(1, 5000),
        lambda: json.dumps(rng.choice([[], 1, "s", None, 1.5, True])).encode(),
        lambda: json.dumps(
            {
                "id": rng.choice([None, 1, "a", 1.5, [], {}, True, 2**70]),
                "op": rng.choice(["tokenize", "detokenize", "health", "nope", None, 5, ""]),
                "v": rng.choice([1, 2, "1", None]),
                rng.choice(["pan", "pans", "token", "tokens", "mode"]): rng.choice(
                    [None, 0, -1, "", "x" * 50, [None], [1, 2], {"a": PAN}, "4111111111111112", ["12"] * 3]
                ),
            }
        ).encode(),
        lambda: b"\xed\xa0\x80" + valid,  # invalid UTF-8 (surrogate)
        lambda: b'{"id":1,"op":"tokenize","pan":"' + b"9" * rng.randint(0, 40) + b'"}',
    ]
    for _ in range(n):
        yield rng.choice(shapes)()


def test_fuzz_malformed_frames_then_correct_answers(
    provisioned: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rng = random.Random(7)
    bodies = list(_malformed_frames(rng, 12_000))
    with provisioned.connect(timeout=30) as sock:
        for start in range(0, len(bodies), 500):
            chunk = bodies[start : start + 500]
            sock.sendall(b"".join(struct.pack(">I", len(b)) + b for b in chunk))
            for _ in chunk:
                answer = protocol.decode_message(protocol.recv_frame(sock))
                assert answer["v"] == 1 and isinstance(answer["ok"], bool)
                if not answer["ok"]:
                    assert set(answer["error"]) == {"code", "message"}
                    assert PAN not in answer["error"]["message"]
        # The same connection, and a new one, still give correct answers.
        assert call(sock, {"id": "after", "op": "tokenize", "pan": PAN})["result"]["token"] == TK.opaque(PAN)
    # Garbage on fresh connections: random headers (mostly oversize) must be refused without harm.
    for _ in range(200):
        with provisioned.connect() as sock:
            sock.sendall(rng.randbytes(rng.randint(1, 40)))
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError, EOFError, ProtocolError):
                while protocol.recv_frame(sock, max_frame=2**32) is not None:
                    pass
    with provisioned.connect() as sock:
        answer = call(sock, {"id": 1, "op": "tokenize", "pans": [PAN, PAN_SPACED]})
        assert answer["result"]["tokens"] == [TK.opaque(PAN)] * 2
        assert call(sock, {"id": 2, "op": "health"})["result"]["requests"] >= 12_000
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert PAN not in logged and "111111" not in logged and TEST_KEY.hex() not in logged
