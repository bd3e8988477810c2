"""Kept fuzz suite for the vsock protocol (issue 20), against a real server in its own process: random frame
headers, lengths and bytes on fresh connections, then random JSON shapes and field types for every op on
one connection. Every answer must be a well-formed protocol message, never `internal`, never quoting a
PAN; after it all the server still tokenizes correctly and its RSS has not grown without bound. The counts
are printed in the "fuzz counts" section of the run (fuzz_counts, conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import fuzz_counts
import pytest
from enclave_tokenizer import protocol, vsock
from enclave_tokenizer.tokens import MODES, TokenError, Tokenizer, normalize_pan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_harness import CAPABILITY, ENCLAVE_CID, TEST_KEY, rss_mib, server_process

PAN = "4111111111111111"
TK = Tokenizer.from_data_key(TEST_KEY)
MAX_FRAME = protocol.DEFAULT_MAX_FRAME
CODE = re.compile(r"[a-z_]{2,40}")
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pans = st.sampled_from(
    [PAN, "4111 1111 1111 1111", "5500-0000-0000-0004", "4111111111111112", "12", "", "٤١١١١١١١١١١١١١١١", "4111\ud800"]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
    | st.sampled_from(["\ud800", "eu\x00", "a\r\nb", "AAAA", "=", "rv1.AAAA", "x" * 300])
    | pans
)
anything = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=6,
)
credentials = st.dictionaries(st.sampled_from(["access_key_id", "secret_access_key", "session_token"]), anything)
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "tokenize": {
        "pan": pans | anything,
        "pans": st.lists(pans | anything, max_size=20) | anything,
        "mode": st.sampled_from(MODES) | anything,
    },
    "detokenize": {
        "token": st.just(TK.reversible(PAN)) | anything,
        "tokens": st.lists(st.just(TK.reversible(PAN)) | anything, max_size=10) | anything,
        "capability": st.just(CAPABILITY) | anything,
    },
    "health": {},
    "attest": {"nonce": st.just("AAAA") | anything, "user_data": st.just("AAAA") | anything},
    "provision": {
        "ciphertext_blob": st.just("AAAA") | anything,
        "region": st.just("eu-west-1") | anything,
        "credentials": credentials | anything,
        "endpoint": anything,
        "key_id": anything,
        "encryption_context": st.dictionaries(st.text(max_size=8), anything, max_size=3) | anything,
        "proxy_port": st.integers(-5, 2**33) | anything,
        "detokenize_capability_sha256": st.just("0" * 64) | anything,
    },
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    # Mostly real ops (their fields are where the type checks live), sometimes anything at all.
    op = draw(st.sampled_from(sorted(FIELDS)) if draw(st.integers(0, 9)) else anything)
    fields = FIELDS.get(op, {}) if isinstance(op, str) else {}
    request: dict[str, Any] = {}
    if draw(st.booleans()):
        request["v"] = draw(st.just(1) | anything)
    request["id"] = draw(st.integers(-(2**64), 2**64) | st.text(max_size=140) | anything)
    request["op"] = op
    for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True)) if fields else []:
        request[name] = draw(fields[name])
    if draw(st.booleans()):
        request["rid"] = draw(st.text(max_size=140) | anything)  # the HTTP request id, echoed when valid
    request.update(draw(st.dictionaries(st.text(max_size=6), anything, max_size=2)))
    return request


FRAMES = "vsock frames (header, length, bytes; fresh connection each)"
MESSAGES = "vsock messages (every op, random JSON shapes and field types)"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    vsock_dir = tmp_path_factory.mktemp("vsock")
    with pytest.MonkeyPatch.context() as mp, server_process(vsock_dir, frame_timeout=2.0) as proc:
        mp.setenv("NITRO_VSOCK_DIR", str(vsock_dir))
        _warm_up()
        yield {"proc": proc, "rss_start": rss_mib(proc.pid)}


def _connect() -> socket.socket:
    return vsock.connect(ENCLAVE_CID, 5000, timeout=10)


def _warm_up() -> None:
    """Reach steady state first (allocator pools, first big answers), so RSS growth later means a leak."""
    with _connect() as sock:
        for mode in MODES:
            sock.sendall(protocol.encode_frame({"id": 1, "op": "tokenize", "pans": [PAN] * 10_000, "mode": mode}))
            protocol.recv_frame(sock)
        sock.sendall(protocol.encode_frame({"id": 2, "op": "tokenize", "pans": [1] * 10_000}))
        protocol.recv_frame(sock)


def _assert_well_formed(answer: dict[str, Any], pans_sent: str = "") -> None:
    assert answer["v"] == 1 and isinstance(answer["ok"], bool), answer
    rid = answer.get("rid", "")  # the request's id for logs, echoed (a string of at most 128 characters)
    assert isinstance(rid, str) and len(rid) <= protocol.MAX_ID_LENGTH, answer
    keys = set(answer) - {"rid"}
    if answer["ok"]:
        assert keys == {"v", "id", "ok", "result"} and isinstance(answer["result"], dict)
        return
    assert keys == {"v", "id", "ok", "error"} and set(answer["error"]) == {"code", "message"}
    code, message = answer["error"]["code"], answer["error"]["message"]
    assert CODE.fullmatch(code) and code != "internal", answer
    assert isinstance(message, str) and PAN not in message and "4111111111111112" not in message


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


def _expected_token(pan: Any, mode: Any) -> str | None:
    try:
        digits = normalize_pan(pan)
    except TokenError:
        return None
    return {"opaque": TK.opaque, "fpe": TK.fpe, "reversible": TK.reversible}[mode](digits)


def _check_answer(request: dict[str, Any], answer: dict[str, Any]) -> None:
    """The protocol's promises for this request, as far as they follow from the request alone."""
    # A request's valid "rid" may be echoed (answers of ops that ran); nothing else ever is.
    echoed, rid = answer.get("rid"), request.get("rid")
    assert echoed is None or (echoed == rid and type(rid) is str and len(rid) <= protocol.MAX_ID_LENGTH), answer
    _assert_well_formed(answer)
    if _non_finite(request):
        assert answer["error"]["code"] == "bad_json" and answer["id"] is None, answer
        return
    assert answer["id"] == (request["id"] if protocol.valid_id(request["id"]) else None), answer
    op, mode = request["op"], request.get("mode", "opaque")
    if not answer["ok"] or op != "tokenize":
        if answer["ok"] and op == "detokenize" and "tokens" not in request:
            assert answer["result"] == {"pan": PAN, "last_four": "1111", "key_check": TK.key_check}
        return
    if request.get("pans") is not None:  # "pans": null is no batch (as every optional field's null)
        result = answer["result"]
        assert len(result["tokens"]) == len(request["pans"])
        assert result["tokens"] == [_expected_token(p, mode) for p in request["pans"]]
    else:
        assert answer["result"]["token"] == _expected_token(request["pan"], mode)


def _read_all(sock: socket.socket, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every answer until the server closes (we half-closed); fails if it does not close in time."""
    sock.settimeout(timeout)
    answers = []
    with contextlib.suppress(ConnectionResetError):
        while (body := protocol.recv_frame(sock)) is not None:
            answers.append(protocol.decode_message(body))
    return answers


frame_bodies = (
    st.binary(max_size=200)
    | requests().map(lambda r: json.dumps(r, allow_nan=True).encode())
    | st.builds(lambda n, c: c * n, st.integers(1, 20_000), st.sampled_from([b"[", b"{", b'{"a":', b"1", b"\x00"]))
)


def test_fuzz_frames_on_fresh_connections(server: dict[str, Any]) -> None:
    health = protocol.encode_frame({"id": "pre", "op": "health"})

    @settings(FUZZ, max_examples=150)
    @given(
        body=frame_bodies,
        declared=st.none() | st.integers(0, 2**32 - 1) | st.integers(MAX_FRAME - 2, MAX_FRAME + 2),
        prefix=st.booleans(),
        cuts=st.lists(st.integers(1, 64), max_size=4),
    )
    def run(body: bytes, declared: int | None, prefix: bool, cuts: list[int]) -> None:
        fuzz_counts.tried(FRAMES)
        stream = (health if prefix else b"") + struct.pack(">I", len(body) if declared is None else declared) + body
        with _connect() as sock:
            offset = 0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused mid-way: fine
                for cut in cuts:  # a few small writes first: partial headers and bodies
                    sock.sendall(stream[offset : offset + cut])
                    offset += cut
                sock.sendall(stream[offset:])
                sock.shutdown(socket.SHUT_WR)
            answers = _read_all(sock)
        for answer in answers:
            _assert_well_formed(answer)
        if prefix:
            assert answers and answers[0]["id"] == "pre" and answers[0]["ok"]
        if declared is not None and declared > MAX_FRAME:
            assert answers[-1]["error"]["code"] == "frame_too_large"
        fuzz_counts.clean(FRAMES)

    run()


def test_fuzz_messages_for_every_op(server: dict[str, Any]) -> None:
    state: dict[str, socket.socket] = {"sock": _connect()}

    @settings(FUZZ, max_examples=600)
    @given(request=requests())
    def run(request: dict[str, Any]) -> None:
        fuzz_counts.tried(MESSAGES)
        body = json.dumps(request, allow_nan=True).encode()
        sock = state["sock"]
        sock.sendall(struct.pack(">I", len(body)) + body)
        answer = protocol.recv_frame(sock)
        assert answer is not None, "the server closed a connection over a well-framed message"
        _check_answer(request, protocol.decode_message(answer))
        fuzz_counts.clean(MESSAGES)

    try:
        run()
    finally:
        state["sock"].close()


def test_after_fuzzing_still_correct_and_memory_bounded(server: dict[str, Any]) -> None:
    with _connect() as sock:
        for mode in MODES:
            sock.sendall(protocol.encode_frame({"id": mode, "op": "tokenize", "pan": PAN, "mode": mode}))
            answer = protocol.decode_message(protocol.recv_frame(sock))
            assert answer["result"] == {
                "token": _expected_token(PAN, mode),
                "last_four": "1111",
                "key_check": TK.key_check,
            }
        sock.sendall(protocol.encode_frame({"id": "h", "op": "health"}))
        health = protocol.decode_message(protocol.recv_frame(sock))["result"]
    deadline = time.monotonic() + 5
    while health["connections"] > 1 and time.monotonic() < deadline:  # fuzz connections being reaped
        time.sleep(0.1)
        with _connect() as sock:
            sock.sendall(protocol.encode_frame({"id": "h", "op": "health"}))
            health = protocol.decode_message(protocol.recv_frame(sock))["result"]
    assert health["connections"] == 1
    grown = rss_mib(server["proc"].pid) - server["rss_start"]
    # Steady state after the warm-up; a leak of even 1 KiB per request would soon exceed this bound.
    # Counted as a fuzz surface of its own so the figure shows in the summary with the counts.
    surface = f"vsock server after fuzzing: RSS {grown:+.1f} MiB over {health['requests']} requests"
    fuzz_counts.tried(surface)
    assert grown < 24, surface
    fuzz_counts.clean(surface)
