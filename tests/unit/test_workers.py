"""The multi-process tokenizer server (enclave_tokenizer.workers): real worker processes on one emulated
vsock listener. Only KMS is replaced (in the server process: the decrypt returns the blob's first 32 bytes
as the data key); everything else is the production code path, provisioning included.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.data_key_record import GENERATION_CONTEXT_KEY
from enclave_tokenizer import protocol, vsock
from enclave_tokenizer.config import ServerConfig
from enclave_tokenizer.tokens import Tokenizer
from enclave_tokenizer.workers import KeyShare, dump_key_state, load_key_state, worker_config

CID = 16
PORT = 5600
KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"

SERVER = textwrap.dedent(
    f"""
    import sys
    from enclave_tokenizer import provisioning, server, redaction
    from enclave_tokenizer.tokens import Tokenizer

    def fake_bootstrap(params):  # KMS replaced: the "ciphertext" carries the data key
        return Tokenizer.from_data_key(params["blob"][:32]), {ARN!r}, None

    provisioning._bootstrap_key = fake_bootstrap
    redaction.setup("INFO")
    sys.exit(server.main(["--port", sys.argv[1]]))
    """
)


def _start(tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, vsock.ENV_DIR: str(tmp_path), vsock.ENV_CID: str(CID), "TOKENIZER_WORKERS": "2", **env}
    os.environ[vsock.ENV_DIR] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(PORT)], env=env)
    deadline = time.monotonic() + 20
    while not vsock.unix_path(CID, PORT).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = _start(tmp_path)
    yield proc
    _stop(proc)


def _call(sock: Any, **request: Any) -> dict[str, Any]:
    sock.sendall(protocol.encode_frame({"v": 1, "id": 1, **request}))
    return protocol.decode_message(protocol.recv_frame(sock) or b"")


def _by_worker(count: int = 2, tries: int = 200) -> dict[int, Any]:
    """One connection per worker (the kernel picks the worker of each new connection)."""
    found: dict[int, Any] = {}
    for _ in range(tries):
        sock = vsock.connect(CID, PORT, timeout=5)
        health = _call(sock, op="health")["result"]
        if health["worker"] in found:
            sock.close()
        else:
            found[health["worker"]] = sock
        if len(found) == count:
            return found
        time.sleep(0.01)
    raise AssertionError(f"connections reached workers {sorted(found)} only")


def _provision(key: bytes, generation: int) -> dict[str, Any]:
    return {
        "op": "provision",
        "ciphertext_blob": base64.b64encode(key + b"-ciphertext").decode(),
        "region": "us-east-1",
        "credentials": {"access_key_id": "AKIAEXAMPLEEXAMPLE12", "secret_access_key": "x" * 40},
        "encryption_context": {GENERATION_CONTEXT_KEY: str(generation)} if generation else {},
    }


def _wait_for_worker(index: int, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _by_worker(tries=50)[index]
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_workers_share_the_key_and_keep_order(workers: subprocess.Popen[bytes]) -> None:
    conns = _by_worker()
    assert _call(conns[0], op="health")["result"]["workers"] == 2
    assert _call(conns[1], op="tokenize", pan="4111111111111111")["error"]["code"] == "not_provisioned"

    answer = _call(conns[0], **_provision(KEY_A, 1))
    assert answer["ok"], answer
    # The other worker uses the key at once, and reports the same key state.
    tokenized = _call(conns[1], op="tokenize", pan="4111111111111111")["result"]
    assert tokenized["token"] == Tokenizer.from_data_key(KEY_A).opaque("4111111111111111")
    health = _call(conns[1], op="health")["result"]
    assert (health["provisioned"], health["key_generation"], health["provision_attempts"]) == (True, 1, 1)

    # A replacement that is not a rotation is refused by whichever worker gets it (state is shared).
    refused = _call(conns[1], **_provision(KEY_B, 1))
    assert refused["error"]["code"] == "provision_refused"
    assert _call(conns[0], op="health")["result"]["provision_refused"] == 1
    # A rotation on worker 1 is seen by worker 0: new tokens, previous key kept for lookups.
    assert _call(conns[1], **_provision(KEY_B, 2))["ok"]
    result = _call(conns[0], op="tokenize", pan="4111111111111111")["result"]
    assert result["token"] == Tokenizer.from_data_key(KEY_B).opaque("4111111111111111")
    previous = _call(conns[0], op="tokenize", pan="4111111111111111", key="previous")["result"]
    assert previous["token"] == tokenized["token"]

    # Pipelined requests on one connection are answered in order, by that connection's worker.
    sock = conns[0]
    frames = [protocol.encode_frame({"v": 1, "id": i, "op": "tokenize", "pan": "4111111111111111"}) for i in range(300)]
    sock.sendall(b"".join(frames))
    ids = [protocol.decode_message(protocol.recv_frame(sock) or b"")["id"] for _ in range(300)]
    assert ids == list(range(300))
    for conn in conns.values():
        conn.close()


def test_a_dead_worker_is_replaced_with_the_key(workers: subprocess.Popen[bytes]) -> None:
    conns = _by_worker()
    assert _call(conns[0], **_provision(KEY_A, 1))["ok"]
    for conn in conns.values():
        conn.close()
    # The workers are the parent's only children.
    children = Path(f"/proc/{workers.pid}/task/{workers.pid}/children").read_text().split()
    assert len(children) == 2
    pid = int(children[0])
    os.kill(pid, signal.SIGKILL)
    time.sleep(1.5)  # the parent waits a second before a replacement
    children = Path(f"/proc/{workers.pid}/task/{workers.pid}/children").read_text().split()
    assert len(children) == 2 and str(pid) not in children
    for index in (0, 1):
        sock = _wait_for_worker(index)
        result = _call(sock, op="tokenize", pan="4111111111111111")["result"]
        assert result["token"] == Tokenizer.from_data_key(KEY_A).opaque("4111111111111111")
        sock.close()
    workers.send_signal(signal.SIGTERM)
    assert workers.wait(10) == 0
    assert not any(Path(f"/proc/{child}").exists() for child in children)  # reaped by the parent


def test_worker_bounds_split_the_enclave_budgets() -> None:
    config = ServerConfig()
    one = worker_config(config, 2)
    assert one.input_budget * 2 == config.input_budget and one.output_budget * 2 == config.output_budget
    assert one.max_connections * 2 == config.max_connections and one.max_slow_ops * 2 == config.max_slow_ops
    assert one.write_buffer_limit == config.write_buffer_limit and one.max_frame == config.max_frame


def test_key_state_round_trip_and_seqlock() -> None:
    from enclave_tokenizer.provisioning import _KeyState

    state = _KeyState(
        tokenizer=Tokenizer.from_data_key(KEY_B),
        previous=Tokenizer.from_data_key(KEY_A),
        blob=b"\x00\x01",
        generation=2,
        previous_generation=1,
        last_error={"code": "kms_error", "message": "m"},
    )
    share = KeyShare()
    assert share.read() == (0, None)
    version = share.write(dump_key_state(state))
    assert version == 2 and share.version() == 2
    loaded = load_key_state(share.read()[1] or b"")
    assert loaded.tokenizer is not None and loaded.previous is not None
    assert loaded.tokenizer.opaque("4111111111111111") == state.tokenizer.opaque("4111111111111111")
    assert loaded.previous.key_check == state.previous.key_check
    assert (loaded.blob, loaded.generation, loaded.last_error) == (state.blob, 2, state.last_error)
    assert repr(loaded.tokenizer) == f"Tokenizer(key_check={state.tokenizer.key_check})"


def test_bounds_hold_per_worker_and_health_sums_the_workers(tmp_path: Path) -> None:
    """TOKENIZER_MAX_CONNECTIONS=4 over 2 workers: each holds 2 at most, whichever gets more connections."""
    proc = _start(tmp_path, TOKENIZER_MAX_CONNECTIONS="4")
    try:
        socks = []
        busy = 0
        for _ in range(10):
            sock = vsock.connect(CID, PORT, timeout=5)
            # Refused at once: the `busy` frame was written before the close and is still readable.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(protocol.encode_frame({"v": 1, "id": 1, "op": "health"}))
            answer = protocol.decode_message(protocol.recv_frame(sock) or b"")
            if answer["ok"]:
                socks.append(sock)
            else:
                assert answer["error"]["code"] == "busy"
                busy += 1
                sock.close()
        assert 2 <= len(socks) <= 4 and busy == 10 - len(socks)
        time.sleep(0.6)  # every worker has published its counters since
        health = _call(socks[0], op="health")["result"]
        assert health["dropped_connections"]["busy"] == busy
        assert health["connections"] == len(socks)
        assert health["requests"] >= len(socks) + 1
    finally:
        _stop(proc)


def test_connections_go_to_the_least_loaded_worker(workers: subprocess.Popen[bytes]) -> None:
    """The parent hands each connection to the worker with the fewest open ones: two clients use both vCPUs
    (with the kernel choosing, asyncio's accept loop often took both on one worker)."""

    def worker_of(sock: Any) -> int:
        return _call(sock, op="health")["result"]["worker"]

    for _ in range(3):
        first, second = vsock.connect(CID, PORT, timeout=5), vsock.connect(CID, PORT, timeout=5)
        busy = worker_of(first)
        assert {busy, worker_of(second)} == {0, 1}
        second.close()
        deadline = time.monotonic() + 5
        while True:  # the freed worker gets the next connection once it has seen the close
            third = vsock.connect(CID, PORT, timeout=5)
            index = worker_of(third)
            third.close()
            if index != busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert index != busy
        first.close()
        time.sleep(0.2)
