"""CMS EnvelopedData as KMS uses it for `CiphertextForRecipient` (RFC 5652).

Shape (aws-nitro-enclaves-sdk-c `source/cms.c`): ContentInfo(id-envelopedData) → EnvelopedData v2 with one
KeyTransRecipientInfo v2 whose recipient is a subjectKeyIdentifier; the content-encryption key is wrapped
with RSAES-OAEP (SHA-256, MGF1-SHA-256); the content is id-data encrypted with AES-256-CBC, IV in the
algorithm parameters, PKCS#7 padding.

`build_enveloped_data` is the KMS side (the local KMS uses it); `decrypt_enveloped_data` is the enclave
side. cryptography's pkcs7 module only does PKCS#1 v1.5 to issuer/serial recipients, hence asn1crypto
for the structure and cryptography for the primitives.
"""

from __future__ import annotations

import hashlib
import os

from asn1crypto import algos, cms, core, keys
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

AES256_KEY_BYTES = 32
AES_BLOCK_BYTES = 16
MAX_CMS_BYTES = 64 * 1024  # KMS caps CiphertextForRecipient at 6144 bytes; stay well clear of that


class CmsError(ValueError):
    """The structure is not the EnvelopedData KMS produces, or does not decrypt with our key."""


def _oaep() -> OAEP:
    return OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def subject_key_identifier(public_key_der: bytes) -> bytes:
    """RFC 5280 §4.2.1.2 method 1: SHA-1 over the subjectPublicKey BIT STRING contents."""
    try:
        info = keys.PublicKeyInfo.load(public_key_der)
        bits = info["public_key"].contents[1:]  # drop the unused-bits octet
    except (ValueError, TypeError) as exc:
        raise CmsError(f"recipient public key is not a DER SubjectPublicKeyInfo: {exc}") from exc
    return hashlib.sha1(bits, usedforsecurity=False).digest()


def _load_rsa_public(public_key_der: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError) as exc:
        raise CmsError(f"recipient public key is not a DER SubjectPublicKeyInfo: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise CmsError("recipient public key must be RSA (KMS wraps with RSAES_OAEP_SHA_256)")
    return key


def _oaep_algorithm() -> cms.KeyEncryptionAlgorithm:
    sha256 = algos.DigestAlgorithm({"algorithm": "sha256"})
    params = algos.RSAESOAEPParams(
        {
            "hash_algorithm": sha256,
            "mask_gen_algorithm": algos.MaskGenAlgorithm({"algorithm": "mgf1", "parameters": sha256}),
        }
    )
    return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": params})


def build_enveloped_data(plaintext: bytes, recipient_public_key_der: bytes) -> bytes:
    """Encrypt `plaintext` to the RSA key (DER SPKI) from an attestation document; DER ContentInfo."""
    public_key = _load_rsa_public(recipient_public_key_der)
    cek = os.urandom(AES256_KEY_BYTES)
    iv = os.urandom(AES_BLOCK_BYTES)
    padder = padding.PKCS7(AES_BLOCK_BYTES * 8).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padded) + encryptor.finalize()
    recipient = cms.KeyTransRecipientInfo(
        {
            "version": "v2",
            "rid": cms.RecipientIdentifier(
                name="subject_key_identifier",
                value=core.OctetString(subject_key_identifier(recipient_public_key_der)),
            ),
            "key_encryption_algorithm": _oaep_algorithm(),
            "encrypted_key": public_key.encrypt(cek, _oaep()),
        }
    )
    enveloped = cms.EnvelopedData(
        {
            "version": "v2",
            "recipient_infos": [cms.RecipientInfo(name="ktri", value=recipient)],
            "encrypted_content_info": cms.EncryptedContentInfo(
                {
                    "content_type": "data",
                    "content_encryption_algorithm": algos.EncryptionAlgorithm(
                        {"algorithm": "aes256_cbc", "parameters": core.OctetString(iv)}
                    ),
                    "encrypted_content": encrypted,
                }
            ),
        }
    )
    return cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()


def _check_oaep(algorithm: cms.KeyEncryptionAlgorithm) -> None:
    if algorithm["algorithm"].native != "rsaes_oaep":
        raise CmsError(f"key encryption must be RSAES-OAEP, got {algorithm['algorithm'].native}")
    params = algorithm["parameters"]
    digest = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    mgf_digest = mgf["parameters"]["algorithm"].native
    if digest != "sha256" or mgf["algorithm"].native != "mgf1" or mgf_digest != "sha256":
        raise CmsError(f"RSAES-OAEP must use SHA-256 and MGF1-SHA-256, got {digest} / {mgf_digest}")


def decrypt_enveloped_data(data: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Enclave side: unwrap a `CiphertextForRecipient` with the key whose public half was attested."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise CmsError("CiphertextForRecipient is empty")
    if len(data) > MAX_CMS_BYTES:
        raise CmsError(f"CiphertextForRecipient is {len(data)} bytes; refusing more than {MAX_CMS_BYTES}")
    try:
        info = cms.ContentInfo.load(bytes(data))
        if info["content_type"].native != "enveloped_data":
            raise CmsError(f"content type is {info['content_type'].native}, not enveloped_data")
        enveloped = info["content"]
        recipients = list(enveloped["recipient_infos"])
        if len(recipients) != 1 or recipients[0].name != "ktri":
            raise CmsError("expected exactly one key-transport recipient")
        ktri = recipients[0].chosen
        rid = ktri["rid"]
        if rid.name != "subject_key_identifier":
            raise CmsError("recipient must be identified by subjectKeyIdentifier")
        public_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if rid.chosen.native != subject_key_identifier(public_der):
            raise CmsError("the envelope is addressed to another key (subjectKeyIdentifier mismatch)")
        _check_oaep(ktri["key_encryption_algorithm"])
        content_info = enveloped["encrypted_content_info"]
        algorithm = content_info["content_encryption_algorithm"]
        if algorithm["algorithm"].native != "aes256_cbc":
            raise CmsError(f"content encryption must be AES-256-CBC, got {algorithm['algorithm'].native}")
        iv = algorithm["parameters"].native
        encrypted = content_info["encrypted_content"].native
        wrapped_key = ktri["encrypted_key"].native
    except CmsError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CmsError(f"malformed CMS EnvelopedData: {exc}") from exc
    if not isinstance(iv, bytes) or len(iv) != AES_BLOCK_BYTES:
        raise CmsError("AES-256-CBC IV must be 16 bytes")
    if not encrypted or len(encrypted) % AES_BLOCK_BYTES:
        raise CmsError("encrypted content length is not a positive multiple of the AES block size")
    try:
        cek = private_key.decrypt(wrapped_key, _oaep())
    except (ValueError, InvalidKey) as exc:
        raise CmsError("the content-encryption key does not decrypt with this private key") from exc
    if len(cek) != AES256_KEY_BYTES:
        raise CmsError("the content-encryption key is not 32 bytes")
    decryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).decryptor()
    padded = decryptor.update(encrypted) + decryptor.finalize()
    unpadder = padding.PKCS7(AES_BLOCK_BYTES * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise CmsError("bad PKCS#7 padding in the decrypted content") from exc
