"""KMS `Sign` and `Verify` with AWS semantics, replacing moto's (which ignores MessageType: a DIGEST is
hashed again, so its signatures do not verify as AWS's do, and Verify never refuses).

As the KMS API reference (Sign, Verify) describes them:
- `Message` is the raw bytes (base64 on the wire); MessageType RAW (default, at most 4096 bytes) is
  hashed with the algorithm's hash, DIGEST must already be a digest of exactly that hash's length;
- ECDSA signatures are DER (ASN.1 Ecdsa-Sig-Value), RSA PSS uses a salt as long as the digest;
- the key must have KeyUsage SIGN_VERIFY, be enabled, and support the SigningAlgorithm;
- an invalid signature in Verify is a `KMSInvalidSignatureException`, not `SignatureValid: false`.
Authorization (key policy, IAM) has already run in kms.py's call_action by the time these run.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from moto.core.exceptions import JsonRESTError
from moto.kms.exceptions import ValidationException
from moto.kms.responses import KmsResponse

RAW_MAX_BYTES = 4096
# SigningAlgorithm -> (hash, family)
ALGORITHMS = {
    "ECDSA_SHA_256": ("SHA256", "ecdsa"),
    "ECDSA_SHA_384": ("SHA384", "ecdsa"),
    "ECDSA_SHA_512": ("SHA512", "ecdsa"),
    "RSASSA_PSS_SHA_256": ("SHA256", "pss"),
    "RSASSA_PSS_SHA_384": ("SHA384", "pss"),
    "RSASSA_PSS_SHA_512": ("SHA512", "pss"),
    "RSASSA_PKCS1_V1_5_SHA_256": ("SHA256", "pkcs1"),
    "RSASSA_PKCS1_V1_5_SHA_384": ("SHA384", "pkcs1"),
    "RSASSA_PKCS1_V1_5_SHA_512": ("SHA512", "pkcs1"),
}


class InvalidKeyUsageException(JsonRESTError):
    code = 400

    def __init__(self, message: str) -> None:
        super().__init__("InvalidKeyUsageException", message)


class KMSInvalidSignatureException(JsonRESTError):
    code = 400

    def __init__(self) -> None:
        super().__init__("KMSInvalidSignatureException", "")


class DisabledException(JsonRESTError):
    code = 400

    def __init__(self, message: str) -> None:
        super().__init__("DisabledException", message)


def _blob(self: KmsResponse, name: str) -> bytes:
    # moto's service-model parsing hands blobs over decoded; a raw JSON body would still carry base64.
    value = self._get_param(name)
    if isinstance(value, str) and value:
        try:
            value = base64.b64decode(value, validate=True)
        except ValueError:
            raise ValidationException(f"{name} is not valid base64") from None
    if not isinstance(value, bytes | bytearray) or not value:
        raise ValidationException(
            f"1 validation error detected: Value at '{name}' failed to satisfy constraint: "
            "Member must have length greater than or equal to 1"
        )
    return bytes(value)


def _prepare(self: KmsResponse) -> tuple[Any, Any, bytes, Any, Any]:
    """(moto key, cryptography private key, message, hash algorithm, prehashed flag) after AWS's checks."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import utils

    key = self.kms_backend.describe_key(self._get_param("KeyId"))
    if key.key_state != "Enabled":
        raise DisabledException(f"{key.arn} is disabled.")
    if key.key_usage != "SIGN_VERIFY":
        raise InvalidKeyUsageException(f"{key.arn} key usage is {key.key_usage} which is not valid for Sign.")
    algorithm = self._get_param("SigningAlgorithm")
    if algorithm not in (key.signing_algorithms or []) or algorithm not in ALGORITHMS:
        raise InvalidKeyUsageException(
            f"Algorithm {algorithm} is incompatible with key spec {key.key_spec}; "
            f"valid: {', '.join(key.signing_algorithms or [])}."
        )
    message = _blob(self, "Message")
    hash_algorithm = getattr(hashes, ALGORITHMS[algorithm][0])()
    message_type = self._get_param("MessageType") or "RAW"
    if message_type == "RAW":
        if len(message) > RAW_MAX_BYTES:
            raise ValidationException(f"Message is {len(message)} bytes; RAW messages are at most {RAW_MAX_BYTES}")
        return key, key.private_key.private_key, message, hash_algorithm, hash_algorithm
    if message_type != "DIGEST":
        raise ValidationException(f"MessageType {message_type!r} is not RAW or DIGEST")
    if len(message) != hash_algorithm.digest_size:
        raise ValidationException(f"Digest is invalid length for algorithm {algorithm}.")
    return key, key.private_key.private_key, message, hash_algorithm, utils.Prehashed(hash_algorithm)


def _scheme(algorithm: str, hash_algorithm: Any, prehashed: Any) -> tuple[Any, ...]:
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    family = ALGORITHMS[algorithm][1]
    if family == "ecdsa":
        return (ec.ECDSA(prehashed),)
    if family == "pss":
        return (padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size), prehashed)
    return (padding.PKCS1v15(), prehashed)


def sign(self: KmsResponse) -> str:
    key, private, message, hash_algorithm, prehashed = _prepare(self)
    algorithm = self._get_param("SigningAlgorithm")
    signature = private.sign(message, *_scheme(algorithm, hash_algorithm, prehashed))
    return json.dumps(
        {"KeyId": key.arn, "Signature": base64.b64encode(signature).decode("ascii"), "SigningAlgorithm": algorithm}
    )


def verify(self: KmsResponse) -> str:
    from cryptography.exceptions import InvalidSignature

    key, private, message, hash_algorithm, prehashed = _prepare(self)
    algorithm = self._get_param("SigningAlgorithm")
    signature = _blob(self, "Signature")
    try:
        private.public_key().verify(signature, message, *_scheme(algorithm, hash_algorithm, prehashed))
    except (InvalidSignature, ValueError):
        raise KMSInvalidSignatureException() from None
    return json.dumps({"KeyId": key.arn, "SignatureValid": True, "SigningAlgorithm": algorithm})


def install() -> None:
    KmsResponse.sign = sign  # type: ignore[method-assign]
    KmsResponse.verify = verify  # type: ignore[method-assign]
