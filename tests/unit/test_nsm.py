"""Emulated NSM: per-host root CA, AWS document format, NSM API server, and the enclave-side client."""

from __future__ import annotations

import ctypes
import datetime as dt
import fcntl
import hashlib
import multiprocessing
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from enclave_tokenizer import nsm as client
from enclave_tokenizer.attestation import AttestationError, verify_attestation_document

from nitro_emulator.nsm import (
    NsmDevice,
    build_attestation_document,
    emulator_root_pem,
    start_nsm_server,
)

VECTOR = Path(__file__).resolve().parent / "attestation_vectors" / "nitro_debug_nullfields_uid2.b64"
MODULE_ID = "i-0fd25f30661854f2b-enc0123456789abcdef"
MEASURED = {
    0: hashlib.sha384(b"image").digest(),
    1: hashlib.sha384(b"kernel").digest(),
    2: hashlib.sha384(b"app").digest(),
    4: hashlib.sha384(bytes(48) + b"i-0fd25f30661854f2b").digest(),
    8: hashlib.sha384(b"signing cert").digest(),
}


# --------------------------------------------------------------------------- root CA


def _root_in_child(home: str, queue: Any) -> None:
    queue.put(emulator_root_pem(Path(home)))


def test_root_created_once_with_safe_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_EMULATOR_HOME", str(tmp_path / "home"))
    pem = emulator_root_pem()
    assert pem == emulator_root_pem(tmp_path / "home") == emulator_root_pem()
    key = tmp_path / "home" / "root-ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "home" / "root-ca.pem").stat().st_mode) == 0o644
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.subject == cert.issuer
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=365 * 29)
    # No stray temporary files from the atomic writes.
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == [".root-ca.lock", "root-ca.key", "root-ca.pem"]


def test_root_creation_is_safe_under_concurrency(tmp_path: Path) -> None:
    home = tmp_path / "race"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_root_in_child, args=(str(home), queue)) for _ in range(6)]
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(emulator_root_pem(home))) for _ in range(6)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pems = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(set(pems + results)) == 1
    assert (home / "root-ca.pem").read_bytes() == pems[0]


def test_separate_homes_have_separate_roots(tmp_path: Path) -> None:
    assert emulator_root_pem(tmp_path / "a") != emulator_root_pem(tmp_path / "b")


def test_pem_without_key_is_an_error_not_a_silent_new_root(tmp_path: Path) -> None:
    home = tmp_path / "h"
    emulator_root_pem(home)
    (home / "root-ca.key").unlink()
    with pytest.raises(RuntimeError, match=r"root-ca\.key is missing"):
        emulator_root_pem(home)


# --------------------------------------------------------------------------- document format


def test_document_has_the_exact_aws_layout(tmp_path: Path) -> None:
    import base64

    real = cbor2.loads(base64.b64decode("".join(VECTOR.read_text().split())))
    doc = build_attestation_document(MEASURED, MODULE_ID, home=tmp_path)
    assert doc[:8] == bytes.fromhex("8444a1013822a059")  # same prefix as every real document
    items = cbor2.loads(doc)
    assert isinstance(items, list) and len(items) == 4
    assert items[0] == real[0] == b"\xa1\x01\x38\x22" and items[1] == {} and len(items[3]) == 96
    payload = cbor2.loads(items[2])
    assert list(payload) == list(cbor2.loads(real[2]))  # key order of the NSM's serde struct
    assert payload["digest"] == "SHA384"
    assert payload["public_key"] is None and payload["user_data"] is None and payload["nonce"] is None
    assert items[2][items[2].index(b"timestamp") + 9] == 0x1B  # 8-byte uint, as AWS encodes it
    assert sorted(payload["pcrs"]) == list(range(16))
    assert payload["pcrs"][0] == MEASURED[0] and payload["pcrs"][4] == MEASURED[4]
    assert payload["pcrs"][3] == bytes(48)
    # PCR8 comes from the measurements too (signed EIFs).
    assert payload["pcrs"][8] == MEASURED[8]
    assert len(payload["cabundle"]) == 4
    assert payload["cabundle"][0] == x509.load_pem_x509_certificate(emulator_root_pem(tmp_path)).public_bytes(
        Encoding.DER
    )
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=3)
    assert abs(leaf.not_valid_before_utc.timestamp() * 1000 - payload["timestamp"]) < 1000
    assert [e.oid._name for e in leaf.extensions] == ["basicConstraints", "keyUsage"]
    bundle = [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]
    assert [c.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length for c in bundle] == [
        None,
        2,
        1,
        0,
    ]
    for cert in [leaf, *bundle]:
        assert cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
        assert cert.signature_hash_algorithm.name == "sha384"  # type: ignore[union-attr]


def test_debug_mode_zeroes_only_pcr0_to_2(tmp_path: Path) -> None:
    doc = build_attestation_document(MEASURED, MODULE_ID, debug=True, home=tmp_path)
    result = verify_attestation_document(doc, root_pem=emulator_root_pem(tmp_path), allow_debug=True)
    assert result.debug and [result.pcrs[i] for i in (0, 1, 2)] == [bytes(48)] * 3
    assert result.pcrs[4] == MEASURED[4] and result.pcrs[8] == MEASURED[8]


def test_oversize_fields_refused_by_builder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="user_data"):
        build_attestation_document(MEASURED, MODULE_ID, user_data=b"x" * 1025, home=tmp_path)
    with pytest.raises(ValueError, match="PCR"):
        build_attestation_document({0: b"short"}, MODULE_ID, home=tmp_path)


# --------------------------------------------------------------------------- server + client


@pytest.fixture
def nsm_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    home = tmp_path / "home"
    sock = tmp_path / "nsm.sock"
    server = start_nsm_server(sock, MEASURED, MODULE_ID, home=home)
    monkeypatch.setenv("NITRO_NSM_SOCKET", str(sock))
    try:
        yield sock, home
    finally:
        server.close()
    assert not sock.exists()


def test_attestation_round_trip_verifies(nsm_socket: tuple[Path, Path]) -> None:
    _, home = nsm_socket
    nonce, user_data, public_key = os.urandom(32), b"hello enclave", b"\x30" * 300
    doc = client.get_attestation_document(user_data=user_data, nonce=nonce, public_key=public_key)
    result = verify_attestation_document(
        doc, root_pem=emulator_root_pem(home), nonce=nonce, expected_pcrs={i: MEASURED[i] for i in (0, 1, 2, 4, 8)}
    )
    assert (result.user_data, result.public_key, result.nonce) == (user_data, public_key, nonce)
    assert result.module_id == MODULE_ID
    with pytest.raises(AttestationError) as info:
        verify_attestation_document(doc, nonce=nonce)
    assert info.value.check == "root"


def test_max_size_fields_and_client_side_limits(nsm_socket: tuple[Path, Path]) -> None:
    doc = client.get_attestation_document(user_data=b"u" * 1024, nonce=b"n" * 1024, public_key=b"k" * 1024)
    assert len(doc) > 3072
    with pytest.raises(ValueError):
        client.get_attestation_document(nonce=b"n" * 1025)


def test_describe_extend_lock_pcrs(nsm_socket: tuple[Path, Path]) -> None:
    _, home = nsm_socket
    assert client.describe_pcr(0) == client.PcrDescription(True, MEASURED[0])
    assert client.describe_pcr(16) == client.PcrDescription(False, bytes(48))
    new = client.extend_pcr(16, b"app-config")
    assert new == hashlib.sha384(bytes(48) + b"app-config").digest()
    assert client.extend_pcr(16, b"more") == hashlib.sha384(new + b"more").digest()
    for locked in (0, 4, 15):
        with pytest.raises(client.NsmError) as info:
            client.extend_pcr(locked, b"x")
        assert info.value.code == "ReadOnlyIndex"
        with pytest.raises(client.NsmError) as info:
            client.lock_pcr(locked)
        assert info.value.code == "ReadOnlyIndex"
    with pytest.raises(client.NsmError) as info:
        client.describe_pcr(32)
    assert info.value.code == "InvalidIndex"
    # The locked PCR16 joins the document (documents hold every locked PCR).
    doc = client.get_attestation_document()
    assert 16 not in verify_attestation_document(doc, root_pem=emulator_root_pem(home)).pcrs
    client.lock_pcr(16)
    assert client.describe_pcr(16).locked
    with pytest.raises(client.NsmError):
        client.extend_pcr(16, b"x")
    result = verify_attestation_document(client.get_attestation_document(), root_pem=emulator_root_pem(home))
    assert result.pcrs[16] == hashlib.sha384(new + b"more").digest()
    client.lock_pcrs(20)
    assert client.describe_nsm()["locked_pcrs"] == list(range(20))
    with pytest.raises(client.NsmError) as info:
        client.lock_pcrs(33)
    assert info.value.code == "InvalidIndex"


def test_describe_nsm_and_random(nsm_socket: tuple[Path, Path]) -> None:
    desc = client.describe_nsm()
    assert desc == {
        "version_major": 1,
        "version_minor": 0,
        "version_patch": 0,
        "module_id": MODULE_ID,
        "max_pcrs": 32,
        "locked_pcrs": list(range(16)),
        "digest": "SHA384",
    }
    a, b = client.get_random(32), client.get_random(32)
    assert len(a) == 32 and a != b
    assert len(client.get_random(1000)) == 1000 and client.get_random(0) == b""


def _raw_exchange(sock_path: Path, frames: list[bytes]) -> list[Any]:
    answers = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        for frame in frames:
            sock.sendall(struct.pack(">I", len(frame)) + frame)
            (length,) = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))
            answers.append(cbor2.loads(sock.recv(length, socket.MSG_WAITALL)))
    return answers


def test_wire_forms_and_errors_on_one_connection(nsm_socket: tuple[Path, Path]) -> None:
    sock, _ = nsm_socket
    answers = _raw_exchange(
        sock,
        [
            cbor2.dumps("DescribeNSM"),
            cbor2.dumps({"DescribeNSM": {}}),  # the map form some C clients send
            cbor2.dumps({"Attestation": {"nonce": b"only-nonce"}}),  # missing keys mean None
            cbor2.dumps({"LockPCR": {"index": 20}}),
            b"\xff\xfe",
            cbor2.dumps({"Bogus": {}}),
            cbor2.dumps({"ExtendPCR": {"index": 17, "data": "text"}}),
            cbor2.dumps({"Attestation": {"user_data": b"u" * 1025}}),
            cbor2.dumps([1, 2, 3]),
        ],
    )
    assert answers[0]["DescribeNSM"]["module_id"] == MODULE_ID
    assert answers[1] == answers[0]
    assert isinstance(answers[2]["Attestation"]["document"], bytes)
    assert answers[3] == "LockPCR"
    assert answers[4:] == [
        {"Error": "InvalidArgument"},
        {"Error": "InvalidOperation"},
        {"Error": "InvalidArgument"},
        {"Error": "InputTooLarge"},
        {"Error": "InvalidOperation"},
    ]


def test_oversize_frame_is_refused_and_server_keeps_serving(nsm_socket: tuple[Path, Path]) -> None:
    sock, _ = nsm_socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        conn.sendall(struct.pack(">I", 0x1001))
        (length,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
        assert cbor2.loads(conn.recv(length, socket.MSG_WAITALL)) == {"Error": "InputTooLarge"}
        assert conn.recv(1) == b""  # closed: the stream cannot be resynchronised
    # Half-sent frames from a vanishing client do not hurt either.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(sock))
        conn.sendall(struct.pack(">I", 100) + b"\xa1")
    assert client.describe_pcr(1).data == MEASURED[1]


def test_concurrent_clients(nsm_socket: tuple[Path, Path]) -> None:
    _, home = nsm_socket
    root = emulator_root_pem(home)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            nonce = n.to_bytes(4, "big")
            doc = client.get_attestation_document(nonce=nonce)
            verify_attestation_document(doc, root_pem=root, nonce=nonce)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors


def test_socket_is_private_and_path_is_guarded(tmp_path: Path) -> None:
    sock = tmp_path / "nsm.sock"
    server = start_nsm_server(sock, MEASURED, MODULE_ID, home=tmp_path / "home")
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with pytest.raises(FileExistsError, match="already listens"):
            start_nsm_server(sock, MEASURED, MODULE_ID, home=tmp_path / "home")
    finally:
        server.close()
    # A stale socket file (dead server) is replaced; a regular file is never clobbered.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    start_nsm_server(sock, MEASURED, MODULE_ID, home=tmp_path / "home").close()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(FileExistsError, match="not a socket"):
        start_nsm_server(regular, MEASURED, MODULE_ID, home=tmp_path / "home")
    assert regular.read_text() == "x"


def test_client_without_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_NSM_SOCKET", str(tmp_path / "absent.sock"))
    with pytest.raises(client.NsmError) as info:
        client.get_random(8)
    assert info.value.code == "Unavailable"


# --------------------------------------------------------------------------- /dev/nsm ioctl path


def test_ioctl_number_and_struct_layout() -> None:
    assert client.NSM_IOCTL_RAW == 0xC0200A00 == 3223325184
    assert ctypes.sizeof(client._NsmRaw) == 32


def test_ioctl_transport_against_a_simulated_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel side is simulated: it reads the request iovec and fills the response iovec in place."""
    device_file = tmp_path / "nsm"
    device_file.write_bytes(b"")
    monkeypatch.delenv("NITRO_NSM_SOCKET", raising=False)
    monkeypatch.setattr(client, "NSM_DEVICE", str(device_file))
    device = NsmDevice(MEASURED, MODULE_ID, home=tmp_path / "home")
    calls: list[int] = []

    def fake_ioctl(fd: int, request: int, arg: Any, mutate: bool = True) -> int:
        assert request == client.NSM_IOCTL_RAW and mutate
        raw = client._NsmRaw.from_buffer(arg)
        assert raw.response.len == 0x3000
        answer = device.handle(ctypes.string_at(raw.request.addr, raw.request.len))
        assert len(answer) <= raw.response.len
        ctypes.memmove(raw.response.addr, answer, len(answer))
        raw.response.len = len(answer)
        calls.append(fd)
        return 0

    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    nonce = b"ioctl-nonce"
    doc = client.get_attestation_document(nonce=nonce)
    verify_attestation_document(doc, root_pem=emulator_root_pem(tmp_path / "home"), nonce=nonce)
    assert client.describe_pcr(2) == client.PcrDescription(True, MEASURED[2])
    with pytest.raises(client.NsmError) as info:
        client.extend_pcr(3, b"x")
    assert info.value.code == "ReadOnlyIndex"
    assert len(calls) == 3


def test_missing_device_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NITRO_NSM_SOCKET", raising=False)
    monkeypatch.setattr(client, "NSM_DEVICE", str(tmp_path / "no-nsm"))
    with pytest.raises(client.NsmError, match="cannot open"):
        client.get_random(4)


def test_host_pcrs_follow_the_role_and_instance(monkeypatch) -> None:
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import (
        pcr3_from_role_arn,
        pcr4_from_instance_id,
    )

    from nitro_emulator import state

    monkeypatch.setenv("NITRO_EMULATOR_INSTANCE_ID", "i-0fd25f30661854f2b")
    monkeypatch.delenv("NITRO_EMULATOR_INSTANCE_ROLE_ARN", raising=False)
    pcrs = state.host_pcrs()
    assert pcrs[4].hex() == pcr4_from_instance_id("i-0fd25f30661854f2b")
    assert pcrs[3].hex() == pcr3_from_role_arn("arn:aws:iam::123456789012:role/enclave-parent")
    monkeypatch.setenv("NITRO_EMULATOR_INSTANCE_ROLE_ARN", "arn:aws:iam::111122223333:role/other")
    assert state.host_pcrs()[3].hex() == pcr3_from_role_arn("arn:aws:iam::111122223333:role/other")
    monkeypatch.setenv("NITRO_EMULATOR_INSTANCE_ROLE_ARN", "")
    assert 3 not in state.host_pcrs()  # no instance profile: PCR3 stays zero
