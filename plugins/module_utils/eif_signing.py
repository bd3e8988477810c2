"""Who signed an EIF, and does the signature cover this image: the checks the modules make on hosts.

Standard library only (modules run with the host's Python). The signature section's COSE_Sign1 is parsed
structurally: its payload must be the PcrInfo of the image's own PCR0 (describe-eif's SignatureCheck), and
the certificate is identified by its SHA-384 fingerprint and by the PCR8 it gives (reference
nitro-cli-and-eif.md §3). The ECDSA signature itself is verified by nitro-cli at run-enclave (E59); where
the `cryptography` package is importable it is verified here too, so a forged signature is refused before
any enclave is touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .eif import (
    EifError,
    EifImage,
    PcrSignature,
    cbor_bytes,
    cbor_value,
    certificate_sha384,
    pcr8_from_certificate,
    pcr_from_digest,
    pcr_info_payload,
)

_HEX96 = re.compile(r"^[0-9a-fA-F]{96}$")
# COSE alg -> (hash name, coordinate size): ES256, ES384, ES512 (aws-nitro-enclaves-cose)
_COSE_ALGS = {-7: ("SHA256", 32), -35: ("SHA384", 48), -36: ("SHA512", 66)}


def _cose_parts(cose: bytes) -> tuple[bytes, bytes, bytes]:
    """(protected, payload, signature) of an untagged COSE_Sign1; EifError when it is not one."""
    value = cbor_value(cose)
    if (
        isinstance(value, list)
        and len(value) == 4
        and isinstance(value[0], bytes)
        and isinstance(value[2], bytes)
        and isinstance(value[3], bytes)
    ):
        return value[0], value[2], value[3]
    raise EifError("the EIF signature is not a COSE_Sign1 structure")


def signature_verified(signature: PcrSignature) -> bool | None:
    """Verify the COSE_Sign1 with the certificate's key when `cryptography` is importable here (True or
    False); None when it is not (nitro-cli then checks at run-enclave)."""
    try:
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    except ImportError:
        return None
    try:
        protected, payload, sig = _cose_parts(signature.signature)
        header = cbor_value(protected)
        hash_name, size = _COSE_ALGS[header[1]]
        key = x509.load_pem_x509_certificate(signature.signing_certificate).public_key()
    except (EifError, ValueError, TypeError, KeyError):
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey) or len(sig) != 2 * size:
        return False
    der = encode_dss_signature(int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big"))
    # Sig_structure = ["Signature1", protected, external_aad (empty), payload] (RFC 9052 §4.4)
    to_be_signed = b"\x84\x6aSignature1" + cbor_bytes(protected) + cbor_bytes(b"") + cbor_bytes(payload)
    try:
        key.verify(der, to_be_signed, ec.ECDSA(getattr(hashes, hash_name)()))
    except InvalidSignature:
        return False
    return True


def signature_info(image: EifImage) -> dict[str, Any]:
    """What the modules return about an EIF's signature (nothing secret: a certificate is public)."""
    if not image.signatures:
        return {"signed": False}
    first = image.signatures[0]
    try:
        covers = _cose_parts(first.signature)[1] == pcr_info_payload(image.pcrs["PCR0"])
    except EifError:
        covers = False
    return {
        "signed": True,
        "pcr8": pcr8_from_certificate(first.signing_certificate),
        "certificate_sha384": certificate_sha384(first.signing_certificate),
        "covers_pcr0": covers,
        "signature_verified": signature_verified(first),
    }


def normalize_pins(values: Iterable[str] | None, option: str) -> list[str]:
    """Lowercase 96-hex values; ValueError naming the option and the bad value."""
    out = []
    for value in values or []:
        if not isinstance(value, str) or not _HEX96.match(value):
            raise ValueError(f"{option}: {value!r} is not a SHA-384 value (96 hexadecimal characters)")
        out.append(value.lower())
    return out


def signer_problems(image: EifImage, *, pcr8: Iterable[str] = (), certificate_sha384: Iterable[str] = ()) -> list[str]:
    """Why the image is not signed by one of the allowed certificates (by PCR8 or by fingerprint), covering
    its own PCR0; empty when it is. Pins are normalized already (normalize_pins)."""
    allowed = set(pcr8) | {pcr_from_digest(bytes.fromhex(fp)) for fp in certificate_sha384}
    if not allowed:
        return []
    info = signature_info(image)
    wanted = ", ".join(sorted(allowed))
    if not info["signed"]:
        return [f"it is not signed; a signature by a certificate with PCR8 {wanted} is required"]
    problems = []
    if info["pcr8"] not in allowed:
        problems.append(
            f"it is signed by the certificate with SHA-384 {info['certificate_sha384']} (PCR8 {info['pcr8']}), "
            f"which is not an allowed signer (PCR8 {wanted})"
        )
    if not info["covers_pcr0"]:
        problems.append(f"its signature does not cover its PCR0 {image.pcrs['PCR0']} (the image changed after signing)")
    if info["signature_verified"] is False:
        problems.append("its signature does not verify with the certificate's key")
    return problems
