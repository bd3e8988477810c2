"""EIF signing and signature checks, as aws-nitro-enclaves-image-format does them (reference §3).

- The signature section is serde-CBOR of ``[PcrSignature{signing_certificate: PEM bytes, signature:
  untagged COSE_Sign1}]`` (byte strings as arrays of uints: `eif.encode_signature_section`), one element,
  over PCR0 (image-format src/utils/eif_signer.rs `generate_eif_signature` @935dc62).
- The COSE payload is serde-CBOR of ``PcrInfo{register_index: 0, register_value: raw PCR0}``
  (`eif.pcr_info_payload`); protected header {1: alg} from the key's curve, unprotected {} (the crate
  passes an empty HeaderMap), signature r||s.
- A key is a local PEM EC private key or a KMS key ARN (the crate's `parse_kms_arn`); KMS signs the
  SHA-384 digest of the COSE Sig_structure with MessageType DIGEST, as aws-nitro-enclaves-cose's KmsKey
  does, and the DER signature it returns becomes r||s.
- Checks (`PcrSignatureChecker::verify`, `get_certificate_info`) use cbor2 + cryptography (hosts have no
  pycose); tests/unit/test_eif_signing.py checks the written images with pycose, independently.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif

from .errors import NitroCliError

# arn:partition:kms:region:account:key[/|:]id (image-format eif_signer.rs parse_kms_arn)
KMS_KEY_ARN = re.compile(r"^arn:(?:aws|aws-cn|aws-us-gov):kms:([a-z0-9-]+):\d{12}:key[:/]([a-zA-Z0-9-]+)$")
# curve -> (COSE alg, hash, coordinate size, KMS signing algorithm)
CURVES = {
    "secp256r1": (-7, "SHA256", 32, "ECDSA_SHA_256"),
    "secp384r1": (-35, "SHA384", 48, "ECDSA_SHA_384"),
    "secp521r1": (-36, "SHA512", 66, "ECDSA_SHA_512"),
}


class SigningError(Exception):
    """The key or certificate cannot be used; the message says which and why."""


@dataclass
class SigningKey:
    """Something that signs bytes with ECDSA: a local key or a KMS key (the key never leaves it)."""

    public_key: Any
    sign_der: Callable[[bytes], bytes]  # to-be-signed bytes -> DER ECDSA signature
    description: str

    @property
    def curve(self) -> str:
        return str(self.public_key.curve.name)


def _hash(curve: str) -> Any:
    from cryptography.hazmat.primitives import hashes

    return getattr(hashes, CURVES[curve][1])()


def local_key(path: str | os.PathLike[str]) -> SigningKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"Could not open the key file: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        # No exception text: it could quote key material.
        raise SigningError(f"Failed to deserialize PEM-formatted private key {path}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in CURVES:
        raise SigningError(f"{path}: only EC P-256, P-384 and P-521 private keys can sign an EIF")
    return SigningKey(key.public_key(), lambda data: key.sign(data, ec.ECDSA(_hash(key.curve.name))), str(path))


def kms_client(region: str) -> Any:
    """boto3 KMS client; AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL point it at a local endpoint."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_KMS") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("kms", region_name=region, endpoint_url=endpoint)


def kms_key(arn: str, client: Any = None) -> SigningKey:
    """A KMS asymmetric key (KeyUsage SIGN_VERIFY): GetPublicKey once, then Sign per signature."""
    import botocore.exceptions
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    match = KMS_KEY_ARN.match(arn)
    if not match:
        raise SigningError(f"{arn!r} is not a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>)")
    region, key_id = match.groups()
    client = client or kms_client(region)
    try:
        public_der = client.get_public_key(KeyId=key_id)["PublicKey"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise SigningError(f"KMS GetPublicKey on {arn} failed: {exc}") from None
    public = serialization.load_der_public_key(public_der)
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CURVES:
        raise SigningError(f"KMS key {arn} is not an ECC_NIST_P256/P384/P521 key")
    curve = public.curve.name

    def sign_der(data: bytes) -> bytes:
        digest = hashlib.new(CURVES[curve][1].lower(), data).digest()
        try:
            answer = client.sign(KeyId=key_id, Message=digest, MessageType="DIGEST", SigningAlgorithm=CURVES[curve][3])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise SigningError(f"KMS Sign with {arn} failed: {exc}") from None
        return bytes(answer["Signature"])

    return SigningKey(public, sign_der, arn)


def load_key(location: str) -> SigningKey:
    """`--private-key`: a KMS key ARN, else a local PEM file (the crate's SignKeyInfo::new)."""
    return kms_key(location) if KMS_KEY_ARN.match(location) else local_key(location)


def load_certificate(path: str | os.PathLike[str]) -> tuple[bytes, Any]:
    from cryptography import x509

    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"Could not open the certificate file: {exc.strerror or exc}") from None
    try:
        return pem, x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise SigningError(f"{path} is not a PEM X.509 certificate: {exc}") from None


def cose_sign1(key: SigningKey, payload: bytes) -> bytes:
    """Untagged COSE_Sign1 [protected {1: alg}, {}, payload, r||s] as aws-nitro-enclaves-cose writes it."""
    import cbor2
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    alg, _hash_name, size, _kms = CURVES[key.curve]
    protected = cbor2.dumps({1: alg})
    r, s = decode_dss_signature(key.sign_der(cbor2.dumps(["Signature1", protected, b"", payload])))
    return cbor2.dumps([protected, {}, payload, r.to_bytes(size, "big") + s.to_bytes(size, "big")])


def make_signer(cert_path: str, key_location: str) -> Callable[[str], bytes]:
    """signer(pcr0_hex) -> signature section bytes, for `eif_writer.write_eif` and `sign_eif_file`.

    Raises SigningError before anything is written when the key or certificate is unusable or the
    certificate is not the key's.
    """
    cert_pem, cert = load_certificate(cert_path)
    key = load_key(key_location)
    if cert.public_key() != key.public_key:
        raise SigningError(f"The signing certificate {cert_path} does not match the private key {key.description}")

    def signer(pcr0: str) -> bytes:
        cose = cose_sign1(key, eif.pcr_info_payload(pcr0))
        return eif.encode_signature_section([eif.PcrSignature(cert_pem, cose)])

    return signer


# ------------------------------------------------------------------------------------------------ checks


def cose_payload(cose: bytes, public_key: Any) -> bytes:
    """Verify the COSE_Sign1 with the certificate's key; return its payload. EifError if invalid.

    cbor2 + cryptography only: hosts run this (run-enclave) and have no pycose; the tests check the same
    images with pycose independently.
    """
    import cbor2
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    try:
        value = cbor2.loads(cose)
        if isinstance(value, cbor2.CBORTag):
            value = value.value
        protected, _unprotected, payload, signature = value
        alg = cbor2.loads(protected)[1]
    except (cbor2.CBORDecodeError, ValueError, TypeError, KeyError, IndexError):
        raise eif.EifError("Could not deserialize the signature") from None
    curve = next((name for name, (cose_alg, *_rest) in CURVES.items() if cose_alg == alg), None)
    if curve is None or not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != curve:
        raise eif.EifError("The EIF signature is not valid")
    size = CURVES[curve][2]
    if not isinstance(signature, bytes) or len(signature) != 2 * size or not isinstance(payload, bytes):
        raise eif.EifError("The EIF signature is not valid")
    der = encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))
    try:
        public_key.verify(der, cbor2.dumps(["Signature1", protected, b"", payload]), ec.ECDSA(_hash(curve)))
    except InvalidSignature:
        raise eif.EifError("The EIF signature is not valid") from None
    return payload


def check_signature(signature: eif.PcrSignature, now: dt.datetime | None = None) -> Any:
    """run-enclave's PcrSignatureChecker::verify: signature valid and not_before <= now <= not_after.

    Returns the certificate; raises EifError with upstream's message otherwise.
    """
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(signature.signing_certificate)
    except ValueError:
        raise eif.EifError("Could not deserialize the signing certificate") from None
    cose_payload(signature.signature, cert.public_key())
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc or now < cert.not_valid_before_utc:
        raise eif.EifError("The signing certificate is expired")
    return cert


def signature_of(path: str | os.PathLike[str]) -> eif.PcrSignature | None:
    """The first PcrSignature of an EIF, found by walking section headers as PcrSignatureChecker::from_eif
    does (no measurement, so it is cheap and runs before the full read); None when unsigned."""
    with eif.open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        pos = eif.HEADER_SIZE
        while pos + eif.SECTION_HEADER_SIZE <= size:
            handle.seek(pos)
            kind, _flags, length = eif.SECTION_STRUCT.unpack(handle.read(eif.SECTION_HEADER_SIZE))
            if kind == eif.SectionType.SIGNATURE:
                if length > eif.SIGNATURE_MAX_SIZE:
                    raise eif.EifError(f"signature section is {length} bytes (max {eif.SIGNATURE_MAX_SIZE})")
                return eif.decode_signature_section(handle.read(length))[0]
            pos += eif.SECTION_HEADER_SIZE + length
    return None


def verify_before_run(path: str | os.PathLike[str]) -> None:
    """The enclave process's check before launch: E59 with upstream's wording when it fails."""
    try:
        signature = signature_of(path)
    except (eif.EifError, OSError) as exc:
        raise NitroCliError(59, f"Failed to create EIF signature checker: {exc}") from None
    if signature is None:
        return
    try:
        check_signature(signature)
    except eif.EifError as exc:
        raise NitroCliError(59, f'Invalid signing certificate: "{exc}"') from None


_LONG_NAMES = {
    "2.5.4.3": "commonName",
    "2.5.4.6": "countryName",
    "2.5.4.7": "localityName",
    "2.5.4.8": "stateOrProvinceName",
    "2.5.4.10": "organizationName",
    "2.5.4.11": "organizationalUnitName",
    "1.2.840.113549.1.9.1": "emailAddress",
    "2.5.4.5": "serialNumber",
    "0.9.2342.19200300.100.1.25": "domainComponent",
}
_SIG_LONG_NAMES = {
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
    "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
}


def _asn1_time(when: dt.datetime) -> str:
    """OpenSSL ASN1_TIME_print: `Jan  5 12:00:00 2025 GMT`."""
    return f"{when:%b} {when.day:>2} {when:%H:%M:%S} {when.year} GMT"


def certificate_inspector(signature: eif.PcrSignature, pcr0: str) -> tuple[dict[str, Any], bool]:
    """describe-eif's SigningCertificate object and SignatureCheck (payload == PcrInfo of PCR0 now),
    as image-format's `get_certificate_info`: an invalid COSE signature is an error, not `false`."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(signature.signing_certificate)
    except ValueError as exc:
        raise eif.EifError(f"Error while digesting certificate: {exc}") from None
    payload = cose_payload(signature.signature, cert.public_key())
    issuer = {}
    for attribute in cert.issuer:
        oid = attribute.oid.dotted_string
        value = attribute.value if isinstance(attribute.value, str) else attribute.value.hex()
        issuer[_LONG_NAMES.get(oid, oid)] = value.replace('"', "")
    algorithm = cert.signature_algorithm_oid.dotted_string
    info = {
        "IssuerName": {k: issuer[k] for k in sorted(issuer)},
        "Algorithm": _SIG_LONG_NAMES.get(algorithm, algorithm),
        "NotBefore": _asn1_time(cert.not_valid_before_utc),
        "NotAfter": _asn1_time(cert.not_valid_after_utc),
        "Signature": ":".join(f"{b:02X}" for b in cert.signature),
    }
    return info, payload == eif.pcr_info_payload(pcr0)
