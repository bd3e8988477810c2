"""Emulated Nitro Secure Module: a per-host CA, the attestation-document signer and the NSM API server.

Documents are byte-for-byte in the AWS format (untagged COSE_Sign1, protected header ``{1: -35}``,
empty unprotected map, payload keys in the NSM's order with nulls for unused optional fields, raw r||s
ES384 signature) and chain like AWS: emulator root (pinned by the verifier) -> three intermediates in
``cabundle`` -> a 3-hour leaf issued per document. They verify with :func:`emulator_root_pem` and fail
with the AWS root, which is the point: a local KMS can trust exactly this host's emulator.

The NSM API (reference attestation-and-kms.md §4.2) is served over a UNIX socket, each message framed
as a u32 big-endian length followed by the CBOR request or response.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import secrets
import socket
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.atomic_file import write_atomic
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from enclave_tokenizer import protocol

__all__ = [
    "NsmDevice",
    "NsmServer",
    "NsmSigner",
    "build_attestation_document",
    "emulator_home",
    "emulator_root_pem",
    "start_nsm_server",
]

DEFAULT_HOME = Path("/var/lib/nitro-emulator")
ROOT_PEM_NAME = "root-ca.pem"
ROOT_KEY_NAME = "root-ca.key"
PROTECTED_ES384 = cbor2.dumps({1: -35})  # a1 01 38 22
PCR_LEN = 48
MAX_PCRS = 32
LOCKED_AT_BOOT = 16  # PCR0-15 are locked when the enclave starts
MAX_OPTIONAL_LEN = 1024
MAX_REQUEST = 0x1000  # the driver's request limit
MAX_RESPONSE = 0x3000
RANDOM_LEN = 256
LEAF_LIFETIME = dt.timedelta(hours=3)
_CHAIN_LIFETIMES = (dt.timedelta(days=20), dt.timedelta(days=6), dt.timedelta(days=1))
_BACKDATE = dt.timedelta(minutes=5)  # small clock differences between host tools must not matter

ERROR_CODES = (
    "Success",
    "InvalidArgument",
    "InvalidIndex",
    "InvalidResponse",
    "ReadOnlyIndex",
    "InvalidOperation",
    "BufferTooSmall",
    "InputTooLarge",
    "InternalError",
)


# --------------------------------------------------------------------------- per-host root CA


def emulator_home(home: Path | None = None) -> Path:
    return Path(home) if home is not None else Path(os.environ.get("NITRO_EMULATOR_HOME", DEFAULT_HOME))


def _name(common_name: str, *extra: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "US")]
    attrs += [x509.NameAttribute(oid, value) for oid, value in extra]
    attrs += [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nitro-emulator"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "emulated"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ]
    return x509.Name(attrs)


def _new_root() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(f"{secrets.token_hex(8)}.emulator.nitro-enclaves")
    # 30 years, like AWS's G1 root.
    cert = (
        _builder(name, name, key, now - dt.timedelta(days=1), now + dt.timedelta(days=365 * 30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _key_usage(ca: bool) -> x509.KeyUsage:
    """CA: digitalSignature + keyCertSign + cRLSign; leaf: digitalSignature + nonRepudiation (as AWS)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, start: dt.datetime, end: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _ensure_root(home: Path | None) -> tuple[Path, Path]:
    """Create root-ca.pem/root-ca.key once; safe against concurrent processes and threads."""
    base = emulator_home(home)
    pem, key = base / ROOT_PEM_NAME, base / ROOT_KEY_NAME
    if pem.exists() and key.exists():
        return pem, key
    base.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the root key
    # flock works between processes and between threads (each open() is its own open file description).
    with open(base / ".root-ca.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if pem.exists() and key.exists():
            return pem, key
        if pem.exists():
            raise RuntimeError(f"{pem} exists but {key} is missing; remove {pem} to create a new emulator root")
        cert_pem, key_pem = _new_root()
        # The key goes first: a visible root-ca.pem always has its key next to it.
        write_atomic(key, key_pem, 0o600)
        write_atomic(pem, cert_pem, 0o644)
    return pem, key


def emulator_root_pem(home: Path | None = None) -> bytes:
    """The emulator's root CA certificate (PEM), created under ``$NITRO_EMULATOR_HOME`` if missing."""
    pem, _ = _ensure_root(home)
    return pem.read_bytes()


def _load_root(home: Path | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    pem, key_path = _ensure_root(home)
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise RuntimeError(f"{key_path} has mode {mode:o}; it must be 0600")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RuntimeError(f"{key_path} is not an EC private key")
    return x509.load_pem_x509_certificate(pem.read_bytes()), key


# --------------------------------------------------------------------------- signer


@dataclass
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


class NsmSigner:
    """Issues attestation documents under this host's emulator root.

    Intermediates (regional 20 d, zonal 6 d, instance 1 d, like AWS) live in memory only and are
    renewed whenever a fresh 3-hour leaf would outlive the shortest of them.
    """

    def __init__(self, home: Path | None = None) -> None:
        self._root_cert, self._root_key = _load_root(home)
        self._lock = threading.Lock()
        self._chain: list[_Ca] = []

    @property
    def root_pem(self) -> bytes:
        return self._root_cert.public_bytes(serialization.Encoding.PEM)

    def _intermediates(self, now: dt.datetime) -> list[_Ca]:
        with self._lock:
            if not self._chain or self._chain[-1].cert.not_valid_after_utc < now + LEAF_LIFETIME + _BACKDATE:
                self._chain = self._make_chain(now)
            return list(self._chain)

    def _make_chain(self, now: dt.datetime) -> list[_Ca]:
        parent = _Ca(self._root_cert, self._root_key)
        chain: list[_Ca] = []
        labels = (f"{secrets.token_hex(8)}.emulated", f"{secrets.token_hex(8)}.zonal.emulated", "instance")
        for depth, (label, lifetime) in enumerate(zip(labels, _CHAIN_LIFETIMES, strict=True)):
            key = ec.generate_private_key(ec.SECP384R1())
            start = now - _BACKDATE
            not_after = min(start + lifetime, parent.cert.not_valid_after_utc)
            cert = (
                _builder(_name(f"{label}.nitro-enclaves"), parent.cert.subject, key, start, not_after)
                .add_extension(x509.BasicConstraints(ca=True, path_length=2 - depth), critical=True)
                .add_extension(_key_usage(ca=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False
                )
                .sign(parent.key, hashes.SHA384())
            )
            parent = _Ca(cert, key)
            chain.append(parent)
        return chain

    def _leaf(self, issuer: _Ca, module_id: str, now: dt.datetime) -> _Ca:
        key = ec.generate_private_key(ec.SECP384R1())
        start = now.replace(microsecond=0)  # AWS leaves start at the document's second
        end = min(start + LEAF_LIFETIME, issuer.cert.not_valid_after_utc)
        cert = (
            _builder(_name(f"{module_id}.emulated"), issuer.cert.subject, key, start, end)
            # Like the AWS leaf: only these two extensions, KeyUsage non-critical.
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=False)
            .sign(issuer.key, hashes.SHA384())
        )
        return _Ca(cert, key)

    def document(
        self,
        pcrs: Mapping[int, bytes],
        module_id: str,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
        now: dt.datetime | None = None,
    ) -> bytes:
        """A signed attestation document (raw COSE_Sign1 bytes) over exactly the given PCR map."""
        for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
            if value is not None and (not isinstance(value, bytes) or len(value) > MAX_OPTIONAL_LEN):
                raise ValueError(f"{name} must be bytes of at most {MAX_OPTIONAL_LEN}")
        for index, value in pcrs.items():
            if not 0 <= index < MAX_PCRS or len(value) != PCR_LEN:
                raise ValueError(f"PCR{index} must be an index 0..31 with a 48-byte value")
        when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        fields = {  # insertion order is the NSM's serde field order
            "module_id": module_id,
            "digest": "SHA384",
            "timestamp": int(when.timestamp() * 1000),
            "pcrs": {i: bytes(pcrs[i]) for i in sorted(pcrs)},
            "certificate": None,
            "cabundle": None,
            "public_key": public_key,
            "user_data": user_data,
            "nonce": nonce,
        }
        return self.sign_payload(fields, leaf_name=module_id, now=when)

    def sign_payload(
        self, fields: Mapping[str, Any], *, leaf_name: str = "emulated", now: dt.datetime | None = None
    ) -> bytes:
        """Sign an arbitrary payload map as a COSE_Sign1 under a fresh leaf of this host's chain.

        ``certificate`` / ``cabundle`` keys whose value is None are filled with the real leaf and bundle
        (in place, so key order is kept). No validation: tests use this to build hostile but validly
        signed documents.
        """
        when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        chain = self._intermediates(when)
        leaf = self._leaf(chain[-1], leaf_name, when)
        der = serialization.Encoding.DER
        filled = dict(fields)
        if "certificate" in filled and filled["certificate"] is None:
            filled["certificate"] = leaf.cert.public_bytes(der)
        if "cabundle" in filled and filled["cabundle"] is None:
            filled["cabundle"] = [self._root_cert.public_bytes(der)] + [c.cert.public_bytes(der) for c in chain]
        payload = cbor2.dumps(filled)
        to_be_signed = cbor2.dumps(["Signature1", PROTECTED_ES384, b"", payload])
        r, s = decode_dss_signature(leaf.key.sign(to_be_signed, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
        return cbor2.dumps([PROTECTED_ES384, {}, payload, signature])


_signers: dict[Path, NsmSigner] = {}
_signers_lock = threading.Lock()


def _signer_for(home: Path | None) -> NsmSigner:
    base = emulator_home(home).resolve()
    with _signers_lock:
        signer = _signers.get(base)
        if signer is None:
            signer = _signers[base] = NsmSigner(base)
        return signer


def boot_pcrs(pcrs: Mapping[int, bytes | str], debug: bool = False) -> dict[int, bytes]:
    """The 32 PCRs of a freshly started enclave: the given measurements, zeros elsewhere.

    In debug mode the Nitro hypervisor reports PCR0-2 as zeros (PCR3/PCR4 stay as measured).
    """
    out = {i: bytes(PCR_LEN) for i in range(MAX_PCRS)}
    for index, value in pcrs.items():
        # Hex strings are accepted because measurements artifacts carry PCRs as hex.
        raw = bytes.fromhex(value) if isinstance(value, str) else bytes(value)
        if not 0 <= int(index) < MAX_PCRS or len(raw) != PCR_LEN:
            raise ValueError(f"PCR{index} must be an index 0..31 with a 48-byte value")
        out[int(index)] = raw
    if debug:
        for index in (0, 1, 2):
            out[index] = bytes(PCR_LEN)
    return out


def build_attestation_document(
    pcrs: Mapping[int, bytes | str],
    module_id: str,
    *,
    user_data: bytes | None = None,
    nonce: bytes | None = None,
    public_key: bytes | None = None,
    debug: bool = False,
    home: Path | None = None,
    now: dt.datetime | None = None,
) -> bytes:
    """A document as an enclave with these measurements would get (PCR0-15, debug zeroing applied)."""
    booted = boot_pcrs(pcrs, debug)
    return _signer_for(home).document(
        {i: booted[i] for i in range(LOCKED_AT_BOOT)},
        module_id,
        user_data=user_data,
        nonce=nonce,
        public_key=public_key,
        now=now,
    )


# --------------------------------------------------------------------------- NSM API


class _NsmFailure(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class NsmDevice:
    """The NSM's state machine: PCR bank with locks, attestation, randomness. Thread-safe."""

    def __init__(
        self, pcrs: Mapping[int, bytes | str], module_id: str, home: Path | None = None, debug: bool = False
    ) -> None:
        self.module_id = module_id
        self._signer = _signer_for(home)
        self._pcrs = boot_pcrs(pcrs, debug)
        self._locked = set(range(LOCKED_AT_BOOT))
        self._lock = threading.Lock()

    def handle(self, request: bytes) -> bytes:
        """One raw CBOR request -> one raw CBOR response (errors as ``{"Error": code}``)."""
        try:
            if len(request) > MAX_REQUEST:
                raise _NsmFailure("InputTooLarge")
            try:
                message = cbor2.loads(request)
            except Exception:  # hostile bytes: any decode failure is the caller's fault
                raise _NsmFailure("InvalidArgument") from None
            response: Any = self._dispatch(message)
        except _NsmFailure as failure:
            response = {"Error": failure.code}
        except Exception:  # never let a request kill the device thread
            response = {"Error": "InternalError"}
        return cbor2.dumps(response)

    def _dispatch(self, message: Any) -> Any:
        if isinstance(message, str):  # unit variants: "DescribeNSM", "GetRandom"
            op, body = message, {}
        elif isinstance(message, Mapping) and len(message) == 1:
            op, body = next(iter(message.items()))
            body = {} if body is None else body
        else:
            raise _NsmFailure("InvalidOperation")
        if not isinstance(body, Mapping):
            raise _NsmFailure("InvalidArgument")
        handler = (
            {
                "DescribePCR": self._describe_pcr,
                "ExtendPCR": self._extend_pcr,
                "LockPCR": self._lock_pcr,
                "LockPCRs": self._lock_pcrs,
                "DescribeNSM": self._describe_nsm,
                "Attestation": self._attestation,
                "GetRandom": self._get_random,
            }.get(op)
            if isinstance(op, str)
            else None
        )
        if handler is None:
            raise _NsmFailure("InvalidOperation")
        return handler(body)

    @staticmethod
    def _index(body: Mapping[Any, Any]) -> int:
        index = body.get("index")
        if type(index) is not int:
            raise _NsmFailure("InvalidArgument")
        if not 0 <= index < MAX_PCRS:
            raise _NsmFailure("InvalidIndex")
        return index

    def _describe_pcr(self, body: Mapping[Any, Any]) -> Any:
        index = self._index(body)
        with self._lock:
            return {"DescribePCR": {"lock": index in self._locked, "data": self._pcrs[index]}}

    def _extend_pcr(self, body: Mapping[Any, Any]) -> Any:
        index = self._index(body)
        data = body.get("data")
        if type(data) is not bytes:
            raise _NsmFailure("InvalidArgument")
        with self._lock:
            if index in self._locked:
                raise _NsmFailure("ReadOnlyIndex")
            self._pcrs[index] = hashlib.sha384(self._pcrs[index] + data).digest()
            return {"ExtendPCR": {"data": self._pcrs[index]}}

    def _lock_pcr(self, body: Mapping[Any, Any]) -> Any:
        index = self._index(body)
        with self._lock:
            if index in self._locked:
                raise _NsmFailure("ReadOnlyIndex")
            self._locked.add(index)
        return "LockPCR"

    def _lock_pcrs(self, body: Mapping[Any, Any]) -> Any:
        limit = body.get("range")
        if type(limit) is not int or limit < 0:
            raise _NsmFailure("InvalidArgument")
        if limit > MAX_PCRS:
            raise _NsmFailure("InvalidIndex")
        with self._lock:
            self._locked.update(range(limit))
        return "LockPCRs"

    def _describe_nsm(self, _body: Mapping[Any, Any]) -> Any:
        with self._lock:
            locked = sorted(self._locked)
        return {
            "DescribeNSM": {
                "version_major": 1,
                "version_minor": 0,
                "version_patch": 0,
                "module_id": self.module_id,
                "max_pcrs": MAX_PCRS,
                "locked_pcrs": locked,
                "digest": "SHA384",
            }
        }

    def _attestation(self, body: Mapping[Any, Any]) -> Any:
        fields: dict[str, bytes | None] = {}
        for name in ("user_data", "nonce", "public_key"):
            value = body.get(name)  # missing and null are the same (serde Option)
            if value is not None and type(value) is not bytes:
                raise _NsmFailure("InvalidArgument")
            if value is not None and len(value) > MAX_OPTIONAL_LEN:
                raise _NsmFailure("InputTooLarge")
            fields[name] = value
        with self._lock:
            # "All locked PCRs at the moment the attestation document was generated".
            pcrs = {i: self._pcrs[i] for i in sorted(self._locked)}
        document = self._signer.document(pcrs, self.module_id, **fields)
        return {"Attestation": {"document": document}}

    def _get_random(self, _body: Mapping[Any, Any]) -> Any:
        return {"GetRandom": {"random": os.urandom(RANDOM_LEN)}}


class NsmServer:
    """Serves an :class:`NsmDevice` on a UNIX socket; one thread per connection. Use :meth:`close`."""

    def __init__(self, socket_path: Path, device: NsmDevice, mode: int = 0o600) -> None:
        self.socket_path = Path(socket_path)
        self.device = device
        self._claim_path()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window in which others could connect
        try:
            self._sock.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, mode)
        self._sock.listen(16)
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="nsm-accept", daemon=True)
        self._acceptor.start()

    def _claim_path(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.socket_path.exists() and not self.socket_path.is_symlink():
            return
        if not stat.S_ISSOCK(self.socket_path.lstat().st_mode):
            raise FileExistsError(f"{self.socket_path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket_path))
        except OSError:
            self.socket_path.unlink()  # stale socket left by a dead server
            return
        finally:
            probe.close()
        raise FileExistsError(f"an NSM server already listens on {self.socket_path}")

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._conns_lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), name="nsm-conn", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    request = protocol.recv_frame(conn, MAX_REQUEST)
                except protocol.ProtocolError:
                    # The rest of an oversize frame is never read, so the stream cannot be resynced.
                    conn.sendall(protocol.frame(cbor2.dumps({"Error": "InputTooLarge"})))
                    return
                if request is None:
                    return
                conn.sendall(protocol.frame(self.device.handle(request)))
        except (OSError, EOFError):
            return
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._conns_lock:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        self._acceptor.join(timeout=5)
        for thread in threads:
            thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def __enter__(self) -> NsmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_nsm_server(
    socket_path: Path,
    pcrs: dict[int, bytes],
    module_id: str,
    home: Path | None = None,
    debug: bool = False,
    *,
    mode: int = 0o600,
) -> NsmServer:
    """Start serving the NSM API for one enclave on ``socket_path`` (thread-based; call ``.close()``).

    ``pcrs``: the EIF measurements (PCR0/1/2, optional 3/4/8; bytes or hex); the rest of PCR0-15 is zero.
    The socket is ``mode`` 0600 by default: whoever can connect can obtain documents for this enclave.
    """
    return NsmServer(Path(socket_path), NsmDevice(pcrs, module_id, home=home, debug=debug), mode=mode)
