"""Verifier for AWS Nitro Enclaves attestation documents (COSE_Sign1, ES384, X.509 chain to a pinned root).

Strict by design: every field the NSM specification requires is present with the right type and size,
the certificate chain is exactly ``certificate -> cabundle[N-1] .. cabundle[1] -> pinned root``, and the
signature is checked over the COSE Sig_structure built from the exact protected-header bytes.
Any failure raises :class:`AttestationError` whose ``check`` attribute names the failed check:

``input``         the caller's own arguments are unusable (bad root PEM, expected-PCR spec, ...)
``format``        not a COSE_Sign1 (CBOR, envelope shape, tag, trailing bytes, payload not a CBOR map)
``alg``           protected header is not exactly ``{1: -35}`` (ES384), or unprotected header misuse
``field``         a payload field is missing, unknown, of the wrong type or outside its size bounds
``root``          cabundle[0] is not the pinned trust anchor (wrong root)
``not_yet_valid`` a certificate of the chain is not yet valid at the verification time
``expired``       a certificate of the chain is expired at the verification time
``chain``         the chain does not verify (signature, issuer, extensions, order, missing links)
``signature``     the COSE ES384 signature does not verify with the leaf key
``debug``         a debug-mode document (PCR0/1/2 zero) without ``allow_debug``
``pcr``           an expected PCR value is absent or different
``nonce``         the expected nonce is absent or different

Anything the hostile input can make the libraries raise is converted to one of these; no other
exception escapes :func:`verify_attestation_document`.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hmac
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import cbor2
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.pcr import is_pcr_hex
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification

__all__ = [
    "AWS_NITRO_ROOT_G1_SHA256",
    "AttestationError",
    "AttestationResult",
    "aws_root_pem",
    "decode_document_text",
    "load_roots",
    "pcrs_from_measurements",
    "verify_attestation_document",
]

# SHA-256 of the DER of "AWS Nitro Enclaves Root G1" (not the hash of the zip AWS publishes).
AWS_NITRO_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
_ROOT_RESOURCE = "aws_nitro_root_g1.pem"

ES384 = -35
PROTECTED_ES384 = b"\xa1\x01\x38\x22"  # CBOR {1: -35}, the only header the NSM emits
SIGNATURE_LEN = 96  # raw r || s, 48 bytes each
PCR_LEN = 48  # SHA-384
MAX_PCRS = 32
MAX_OPTIONAL_LEN = 1024  # public_key / user_data / nonce (NSM CDDL and nsm-check DATA_LEN)
MAX_CERT_LEN = 1024
MAX_CABUNDLE = 16  # real bundles hold 4; a bound keeps hostile input cheap
MAX_MODULE_ID_LEN = 256
MAX_PAYLOAD_LEN = 16384
MAX_DOCUMENT_LEN = 262144  # KMS RecipientInfo.AttestationDocument limit
DEBUG_PCRS = (0, 1, 2)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

REQUIRED_FIELDS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
OPTIONAL_FIELDS = ("public_key", "user_data", "nonce")


class AttestationError(Exception):
    """A failed verification step; ``check`` names it (see the module docstring)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
        self.message = message


@dataclass(frozen=True)
class AttestationResult:
    """The verified content of an attestation document."""

    module_id: str
    timestamp: dt.datetime  # aware, UTC, millisecond precision
    timestamp_ms: int
    digest: str
    pcrs: dict[int, bytes]
    certificate_subject: str
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    debug: bool
    certificate: bytes = field(repr=False)
    cabundle: tuple[bytes, ...] = field(repr=False)

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready view: PCRs in lowercase hex, binary optional fields in base64 (or null)."""

        def b64(value: bytes | None) -> str | None:
            return None if value is None else base64.b64encode(value).decode("ascii")

        return {
            "valid": True,
            "module_id": self.module_id,
            "timestamp": self.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "timestamp_ms": self.timestamp_ms,
            "digest": self.digest,
            "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
            "certificate_subject": self.certificate_subject,
            "public_key": b64(self.public_key),
            "user_data": b64(self.user_data),
            "nonce": b64(self.nonce),
            "debug": self.debug,
        }


# --------------------------------------------------------------------------- roots


def aws_root_pem() -> bytes:
    """The AWS Nitro Enclaves Root G1 PEM shipped in this package (checked against the pinned fingerprint)."""
    return _aws_root()[0]


@functools.cache
def _aws_root() -> tuple[bytes, x509.Certificate]:
    pem = resources.files(__package__).joinpath(_ROOT_RESOURCE).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    if _fingerprint(cert) != AWS_NITRO_ROOT_G1_SHA256:
        # A modified package file must never silently become the trust anchor.
        raise AttestationError("root", "shipped AWS root does not match the pinned SHA-256 fingerprint")
    return pem, cert


def load_roots(root_pem: bytes | str | Sequence[bytes | str] | None = None) -> list[x509.Certificate]:
    """Trust anchors: the pinned AWS root by default, else every certificate in the given PEM text(s)."""
    if root_pem is None:
        return [_aws_root()[1]]
    texts = [root_pem] if isinstance(root_pem, bytes | str) else list(root_pem)
    roots: list[x509.Certificate] = []
    for text in texts:
        try:
            data = text.encode("ascii") if isinstance(text, str) else bytes(text)
            roots.extend(x509.load_pem_x509_certificates(data))
        except (ValueError, TypeError) as exc:
            raise AttestationError("input", f"root PEM does not parse: {exc}") from None
    if not roots:
        raise AttestationError("input", "no root certificate given")
    return roots


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


# --------------------------------------------------------------------------- parsing


def decode_document_text(data: bytes | str) -> bytes:
    """Raw COSE bytes from either raw CBOR or its base64 text (standard or URL-safe, whitespace ignored)."""
    if isinstance(data, str):
        try:
            data = data.encode("ascii")
        except UnicodeEncodeError:
            raise AttestationError("format", "document text is not base64") from None
    if data[:1] in (b"\x84", b"\xd2"):  # untagged array(4) or tag 18: raw CBOR
        return data
    text = b"".join(data.split())
    if not text:
        raise AttestationError("format", "empty document")
    try:
        if b"-" in text or b"_" in text:
            return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except ValueError:
        raise AttestationError("format", "document is neither CBOR nor base64") from None


def _cbor_loads_exact(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item; trailing bytes are an error (cbor2.loads would ignore them)."""
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # cbor2 raises many types on hostile input (decode, recursion, value errors)
        raise AttestationError("format", f"{what} is not valid CBOR: {type(exc).__name__}") from None
    if fp.tell() != len(data):
        raise AttestationError("format", f"{what} has {len(data) - fp.tell()} trailing bytes")
    return value


def _parse_envelope(document: bytes) -> tuple[bytes, bytes, bytes]:
    """(protected, payload, signature) of a COSE_Sign1, untagged or with tag 18."""
    if not isinstance(document, bytes | bytearray | memoryview):
        raise AttestationError("format", "document must be bytes")
    document = bytes(document)
    if not document:
        raise AttestationError("format", "empty document")
    if len(document) > MAX_DOCUMENT_LEN:
        raise AttestationError("format", f"document larger than {MAX_DOCUMENT_LEN} bytes")
    obj = _cbor_loads_exact(document, "document")
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != 18:
            raise AttestationError("format", f"unexpected CBOR tag {obj.tag} (only COSE_Sign1 tag 18)")
        obj = obj.value
    if not isinstance(obj, list | tuple):
        raise AttestationError("format", "COSE_Sign1 must be a CBOR array")
    if len(obj) != 4:
        raise AttestationError("format", f"COSE_Sign1 must have 4 items, found {len(obj)}")
    protected, unprotected, payload, signature = obj
    if type(protected) is not bytes:
        raise AttestationError("format", "protected header must be a byte string")
    if not isinstance(unprotected, Mapping):
        raise AttestationError("format", "unprotected header must be a map")
    if type(payload) is not bytes:
        raise AttestationError("format", "payload must be a byte string")
    if type(signature) is not bytes:
        raise AttestationError("format", "signature must be a byte string")

    header = _cbor_loads_exact(protected, "protected header") if protected else {}
    if not isinstance(header, Mapping) or dict(header) != {1: ES384} or protected != PROTECTED_ES384:
        raise AttestationError("alg", "protected header must be exactly {1: -35} (ES384)")
    if 1 in unprotected or 4 in unprotected:
        raise AttestationError("alg", "algorithm or key id must not be in the unprotected header")
    if len(signature) != SIGNATURE_LEN:
        raise AttestationError("format", f"ES384 signature must be {SIGNATURE_LEN} bytes, not {len(signature)}")
    if not 1 <= len(payload) <= MAX_PAYLOAD_LEN:
        raise AttestationError("format", f"payload size {len(payload)} outside 1..{MAX_PAYLOAD_LEN}")
    return protected, payload, signature


def _bstr(value: Any, name: str, lo: int, hi: int) -> bytes:
    if type(value) is not bytes:
        raise AttestationError("field", f"{name} must be a byte string")
    if not lo <= len(value) <= hi:
        raise AttestationError("field", f"{name} size {len(value)} outside {lo}..{hi}")
    return value


@dataclass(frozen=True)
class _Payload:
    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None


def _parse_payload(payload: bytes) -> _Payload:
    doc = _cbor_loads_exact(payload, "payload")
    if not isinstance(doc, Mapping):
        raise AttestationError("format", "payload must be a CBOR map")
    for key in doc:
        if type(key) is not str:
            raise AttestationError("field", "payload keys must be text strings")
    unknown = sorted(set(doc) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise AttestationError("field", f"unknown payload field(s): {', '.join(unknown)[:200]}")
    for name in REQUIRED_FIELDS:
        if name not in doc or doc[name] is None:
            raise AttestationError("field", f"required field {name} is missing")

    module_id = doc["module_id"]
    if type(module_id) is not str or not 1 <= len(module_id) <= MAX_MODULE_ID_LEN:
        raise AttestationError("field", f"module_id must be a text string of 1..{MAX_MODULE_ID_LEN} chars")
    if doc["digest"] != "SHA384" or type(doc["digest"]) is not str:
        raise AttestationError("field", "digest must be SHA384")
    timestamp = doc["timestamp"]
    if type(timestamp) is not int or not 0 < timestamp < 2**64:
        raise AttestationError("field", "timestamp must be a positive 64-bit integer (ms since epoch)")

    raw_pcrs = doc["pcrs"]
    if not isinstance(raw_pcrs, Mapping) or not 1 <= len(raw_pcrs) <= MAX_PCRS:
        raise AttestationError("field", f"pcrs must be a map of 1..{MAX_PCRS} entries")
    pcrs: dict[int, bytes] = {}
    for index, value in raw_pcrs.items():
        if type(index) is not int or not 0 <= index < MAX_PCRS:
            raise AttestationError("field", f"PCR index must be an integer in 0..{MAX_PCRS - 1}")
        pcrs[index] = _bstr(value, f"pcrs[{index}]", PCR_LEN, PCR_LEN)
    missing = [i for i in DEBUG_PCRS if i not in pcrs]
    if missing:
        # Fail closed: without PCR0-2 neither image identity nor debug mode can be established.
        raise AttestationError("field", f"pcrs lacks PCR{missing[0]}")

    certificate = _bstr(doc["certificate"], "certificate", 1, MAX_CERT_LEN)
    bundle = doc["cabundle"]
    if not isinstance(bundle, list | tuple) or not 1 <= len(bundle) <= MAX_CABUNDLE:
        raise AttestationError("field", f"cabundle must be an array of 1..{MAX_CABUNDLE} certificates")
    cabundle = tuple(_bstr(c, f"cabundle[{i}]", 1, MAX_CERT_LEN) for i, c in enumerate(bundle))

    optional: dict[str, bytes | None] = {}
    for name in OPTIONAL_FIELDS:
        value = doc.get(name)  # the NSM sends null for unused fields; treat null and absent alike
        optional[name] = None if value is None else _bstr(value, name, 0, MAX_OPTIONAL_LEN)
    return _Payload(
        module_id=module_id,
        digest="SHA384",
        timestamp_ms=timestamp,
        pcrs=pcrs,
        certificate=certificate,
        cabundle=cabundle,
        public_key=optional["public_key"],
        user_data=optional["user_data"],
        nonce=optional["nonce"],
    )


# --------------------------------------------------------------------------- chain + signature


def _load_der(data: bytes, name: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(data)
        # cryptography parses lazily; touch every part used later so malformed DER fails here, once.
        cert.public_key()
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm)
        list(cert.extensions)
        serial = cert.serial_number
    except Exception as exc:  # cryptography raises ValueError and others on malformed DER
        raise AttestationError("field", f"{name} is not a valid X.509 certificate: {type(exc).__name__}") from None
    if serial <= 0:
        raise AttestationError("field", f"{name} has a non-positive serial number")
    return cert


def _check_validity(certs: Sequence[tuple[str, x509.Certificate]], at: dt.datetime) -> None:
    for name, cert in certs:
        if at < cert.not_valid_before_utc:
            raise AttestationError(
                "not_yet_valid",
                f"{name} is valid from {cert.not_valid_before_utc.isoformat()}, checked at {at.isoformat()}",
            )
        if at > cert.not_valid_after_utc:
            raise AttestationError(
                "expired", f"{name} expired at {cert.not_valid_after_utc.isoformat()}, checked at {at.isoformat()}"
            )


def _verify_chain(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], root: x509.Certificate, at: dt.datetime
) -> None:
    # The Nitro leaf has only BasicConstraints and KeyUsage (no AKI), which the default client policy
    # rejects; CA certificates still get the full web-PKI CA profile, and the leaf is checked below.
    builder = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(at)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
    )
    try:
        verified = builder.build_client_verifier().verify(leaf, intermediates)
    except verification.VerificationError as exc:
        raise AttestationError("chain", f"certificate chain does not verify: {exc}") from None
    except Exception as exc:
        raise AttestationError("chain", f"certificate chain does not verify: {type(exc).__name__}") from None
    expected = [leaf, *reversed(intermediates), root]
    if [_der(c) for c in verified.chain] != [_der(c) for c in expected]:
        # The NSM bundle is an ordered path; a valid chain that skips or reorders entries is not it.
        raise AttestationError("chain", "cabundle is not the exact path root -> intermediates -> certificate")

    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise AttestationError("chain", f"leaf certificate lacks {exc.oid._name}") from None
    except Exception as exc:
        raise AttestationError("chain", f"leaf certificate extensions unreadable: {type(exc).__name__}") from None
    if bc.ca or bc.path_length is not None:
        raise AttestationError("chain", "leaf certificate must not be a CA")
    if not ku.digital_signature:
        raise AttestationError("chain", "leaf certificate lacks the digitalSignature key usage")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _verify_signature(leaf: x509.Certificate, protected: bytes, payload: bytes, signature: bytes) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError("signature", "leaf key is not ECDSA P-384")
    # COSE Sig_structure for COSE_Sign1: ["Signature1", protected bytes as received, external_aad, payload].
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    r = int.from_bytes(signature[:48], "big")
    s = int.from_bytes(signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise AttestationError("signature", "COSE ES384 signature does not verify") from None


# --------------------------------------------------------------------------- policy


def _normalize_expected_pcrs(expected: Mapping[int, bytes | str]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for index, value in expected.items():
        if type(index) is not int or not 0 <= index < MAX_PCRS:
            raise AttestationError("input", f"expected PCR index {index!r} outside 0..{MAX_PCRS - 1}")
        raw = value
        if isinstance(value, str):
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                raise AttestationError("input", f"expected PCR{index} is not hex") from None
        if not isinstance(raw, bytes) or len(raw) != PCR_LEN:
            raise AttestationError("input", f"expected PCR{index} must be {PCR_LEN} bytes ({PCR_LEN * 2} hex chars)")
        out[index] = raw
    return out


def _ms_to_datetime(ms: int) -> dt.datetime:
    try:
        return _EPOCH + dt.timedelta(milliseconds=ms)
    except OverflowError:
        # A signed but absurd timestamp (past year 9999) still verified; clamp for display only.
        return dt.datetime.max.replace(tzinfo=dt.UTC)


def _as_utc(at: dt.datetime | None) -> dt.datetime:
    if at is None:
        return dt.datetime.now(dt.UTC)
    if not isinstance(at, dt.datetime):
        raise AttestationError("input", "at must be a datetime")
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


MAX_MEASUREMENTS_LEN = 1 << 20


def pcrs_from_measurements(measurements: Mapping[str, Any] | str | Path) -> dict[int, str]:
    """Expected PCRs from an EIF measurements artifact (``<eif>.measurements.json``), nitro-cli JSON, or
    an enclave run configuration.

    Accepts the parsed object, its JSON text, or a path. Reads ``Measurements.PCR<n>`` (the artifact,
    nitro-cli) or ``measurements.PCR<n>`` (the run configuration); at least PCR0.
    """
    obj: Any = measurements
    try:
        if isinstance(measurements, Path):
            with open(measurements, "rb") as handle:  # bytes, bounded: the artifact is a few hundred bytes
                data = handle.read(MAX_MEASUREMENTS_LEN + 1)
            if len(data) > MAX_MEASUREMENTS_LEN:
                raise AttestationError("input", f"measurements larger than {MAX_MEASUREMENTS_LEN} bytes")
            obj = json.loads(data.decode("utf-8"))
        elif isinstance(measurements, str):
            obj = json.loads(measurements)
    except UnicodeDecodeError as exc:
        reason = f"measurements not UTF-8 text (byte offset {exc.start}: {exc.reason})"
        raise AttestationError("input", reason) from None
    except RecursionError:  # json recurses per nesting level; a hostile file nests thousands deep
        raise AttestationError("input", "measurements nested too deeply to be an EIF measurements artifact") from None
    except (OSError, ValueError) as exc:
        raise AttestationError("input", f"measurements unreadable: {exc}") from None
    table = (obj.get("Measurements") or obj.get("measurements")) if isinstance(obj, Mapping) else None
    if not isinstance(table, Mapping):
        raise AttestationError("input", "measurements lack a Measurements (or run configuration measurements) object")
    pcrs: dict[int, str] = {}
    for key, value in table.items():
        match = re.fullmatch(r"PCR(\d{1,2})", str(key))
        if not match:
            continue  # HashAlgorithm and the like
        if not is_pcr_hex(value):
            raise AttestationError("input", f"measurement {key} is not 96 hex characters")
        pcrs[int(match.group(1))] = value.lower()
    if 0 not in pcrs:
        raise AttestationError("input", "measurements lack PCR0")
    _normalize_expected_pcrs(pcrs)  # index range check
    return pcrs


def pcr8_of_certificate(pem: bytes | str | Path) -> str:
    """The PCR8 an enclave from an EIF signed with this certificate reports (nitro-cli pcr
    --signing-certificate), for ``expected_pcrs={8: ...}``: pins the publisher rather than one image."""
    # The one PCR8 formula (host-side only).
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import (
        EifError,
        pcr8_from_certificate,
    )

    try:
        if isinstance(pem, Path):
            with open(pem, "rb") as handle:
                pem = handle.read(MAX_MEASUREMENTS_LEN * 16 + 1)
        x509.load_pem_x509_certificate(pem.encode("ascii") if isinstance(pem, str) else pem)
        return pcr8_from_certificate(pem)
    except (OSError, ValueError, EifError) as exc:
        raise AttestationError("input", f"signing certificate unreadable: {exc}") from None


def verify_attestation_document(
    document: bytes,
    *,
    root_pem: bytes | str | Sequence[bytes | str] | None = None,
    at: dt.datetime | None = None,
    expected_pcrs: Mapping[int, bytes | str] | None = None,
    signer_pcr8: Sequence[str] = (),
    nonce: bytes | None = None,
    allow_debug: bool = False,
) -> AttestationResult:
    """Verify a Nitro attestation document; return its content or raise :class:`AttestationError`.

    ``root_pem``: trust anchor(s) as PEM (default: the pinned AWS Nitro Enclaves Root G1). ``cabundle[0]``
    must be byte-identical (same DER fingerprint) to one of them. ``at``: verification instant (default
    now; naive datetimes are UTC). ``expected_pcrs``: index -> 48 bytes or 96 hex chars, all must match.
    ``signer_pcr8``: PCR8 must be one of these (`pcr8_of_certificate`: the EIF signed by one of those
    certificates, whatever its PCR0). ``nonce``: the document's nonce must equal it. Debug documents are
    rejected unless ``allow_debug``.
    """
    # Caller arguments first, so a bad policy is reported as such rather than as a document failure.
    roots = load_roots(root_pem)
    when = _as_utc(at)
    want_pcrs = _normalize_expected_pcrs(expected_pcrs or {})
    if nonce is not None and not isinstance(nonce, bytes):
        raise AttestationError("input", "expected nonce must be bytes")

    protected, payload, signature = _parse_envelope(document)
    doc = _parse_payload(payload)
    leaf = _load_der(doc.certificate, "certificate")
    bundle = [_load_der(der, f"cabundle[{i}]") for i, der in enumerate(doc.cabundle)]

    anchor_fp = _fingerprint(bundle[0])
    anchor = next((r for r in roots if _fingerprint(r) == anchor_fp), None)
    if anchor is None:
        raise AttestationError(
            "root",
            f"cabundle[0] ({bundle[0].subject.rfc4514_string()[:200]}, sha256 {anchor_fp}) is not a trusted root",
        )
    intermediates = bundle[1:]
    _check_validity(
        [("root", anchor)] + [(f"cabundle[{i + 1}]", c) for i, c in enumerate(intermediates)] + [("certificate", leaf)],
        when,
    )
    _verify_chain(leaf, intermediates, anchor, when)
    _verify_signature(leaf, protected, payload, signature)

    debug = any(not any(doc.pcrs[i]) for i in DEBUG_PCRS)
    if debug and not allow_debug:
        raise AttestationError("debug", "debug-mode document (PCR0-2 are zero); pass allow_debug to accept it")
    for index, value in sorted(want_pcrs.items()):
        actual = doc.pcrs.get(index)
        if actual is None:
            raise AttestationError("pcr", f"PCR{index} is not in the document")
        if not hmac.compare_digest(actual, value):
            raise AttestationError("pcr", f"PCR{index} is {actual.hex()}, expected {value.hex()}")
    if signer_pcr8:
        # Any of the allowed signers (a certificate rotation allows two), as a KMS policy ORs PCR8 values.
        actual8 = doc.pcrs.get(8, b"").hex()
        if actual8.lower() not in {value.lower() for value in signer_pcr8}:
            raise AttestationError(
                "pcr",
                f"PCR8 is {actual8 or 'absent'}: the image is not signed by an allowed certificate "
                f"(PCR8 {', '.join(signer_pcr8)})",
            )
    if nonce is not None:
        if doc.nonce is None:
            raise AttestationError("nonce", "document carries no nonce")
        if not hmac.compare_digest(doc.nonce, nonce):
            raise AttestationError("nonce", "document nonce differs from the expected nonce")

    return AttestationResult(
        module_id=doc.module_id,
        timestamp=_ms_to_datetime(doc.timestamp_ms),
        timestamp_ms=doc.timestamp_ms,
        digest=doc.digest,
        pcrs=dict(sorted(doc.pcrs.items())),
        certificate_subject=leaf.subject.rfc4514_string(),
        public_key=doc.public_key,
        user_data=doc.user_data,
        nonce=doc.nonce,
        debug=debug,
        certificate=doc.certificate,
        cabundle=doc.cabundle,
    )
