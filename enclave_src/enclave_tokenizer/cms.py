"""CMS EnvelopedData as KMS uses it for `CiphertextForRecipient` (RFC 5652).

Shape (aws-nitro-enclaves-sdk-c `source/cms.c` at e86d2cf, and a real KMS reply in its
`tests/kmstool-enclaves/cms_test.c`): ContentInfo(id-envelopedData) → EnvelopedData v2 with one
KeyTransRecipientInfo v2; the content-encryption key is wrapped with RSAES-OAEP (SHA-256, MGF1-SHA-256);
the content is id-data encrypted with AES-256-CBC, IV in the algorithm parameters, PKCS#7 padding.

KMS sends BER: ContentInfo, its [0], EnvelopedData, EncryptedContentInfo and the encrypted content are
indefinite-length; the recipient is a 32-byte `[0] subjectKeyIdentifier`. `build_enveloped_data` (the
local KMS) writes exactly that layout, so AWS's own parser (which walks those headers) reads it.
`decrypt_enveloped_data` (the enclave) reads BER or DER with asn1crypto and, as AWS's parser does, never
compares the recipient identifier: the RSA-OAEP unwrap with the enclave's fresh key is the check.
cryptography's pkcs7 module only does PKCS#1 v1.5 to issuer/serial recipients, hence asn1crypto for the
structure and cryptography for the primitives.
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
_EOC = b"\x00\x00"
_OID_ENVELOPED_DATA = core.ObjectIdentifier("1.2.840.113549.1.7.3").dump()
_OID_DATA = core.ObjectIdentifier("1.2.840.113549.1.7.1").dump()


class CmsError(ValueError):
    """The structure is not the EnvelopedData KMS produces, or does not decrypt with our key."""


def _oaep() -> OAEP:
    return OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def subject_key_identifier(public_key_der: bytes) -> bytes:
    """The 32-byte identifier the local KMS writes: SHA-256 over the subjectPublicKey BIT STRING contents.

    A real KMS reply carries 32 bytes here; how KMS derives them is not published, and no parser (AWS's
    or ours) compares them, so only the length and form are AWS's.
    """
    try:
        info = keys.PublicKeyInfo.load(public_key_der)
        bits = info["public_key"].contents[1:]  # drop the unused-bits octet
    except (ValueError, TypeError) as exc:
        raise CmsError(f"recipient public key is not a DER SubjectPublicKeyInfo: {exc}") from exc
    return hashlib.sha256(bits).digest()


def _load_rsa_public(public_key_der: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError) as exc:
        raise CmsError(f"recipient public key is not a DER SubjectPublicKeyInfo: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise CmsError("recipient public key must be RSA (KMS wraps with RSAES_OAEP_SHA_256)")
    return key


def _oaep_algorithm() -> cms.KeyEncryptionAlgorithm:
    # Explicit NULL parameters on the digests, as in the real KMS reply.
    sha256 = algos.DigestAlgorithm({"algorithm": "sha256", "parameters": core.Null()})
    params = algos.RSAESOAEPParams(
        {
            "hash_algorithm": sha256,
            "mask_gen_algorithm": algos.MaskGenAlgorithm({"algorithm": "mgf1", "parameters": sha256}),
        }
    )
    return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": params})


def _indefinite(header: bytes, *parts: bytes) -> bytes:
    """A constructed BER element of indefinite length: identifier octet, 0x80, contents, end-of-contents."""
    return header + b"\x80" + b"".join(parts) + _EOC


def build_enveloped_data(plaintext: bytes, recipient_public_key_der: bytes) -> bytes:
    """Encrypt `plaintext` to the RSA key (DER SPKI) from an attestation document, in KMS's BER layout."""
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
    # Definite-length leaves from asn1crypto; the indefinite-length frames KMS uses around them.
    recipient_infos = cms.RecipientInfos([cms.RecipientInfo(name="ktri", value=recipient)]).dump()
    content_algorithm = algos.EncryptionAlgorithm(
        {"algorithm": "aes256_cbc", "parameters": core.OctetString(iv)}
    ).dump()
    encrypted_content_info = _indefinite(
        b"\x30", _OID_DATA, content_algorithm, _indefinite(b"\xa0", core.OctetString(encrypted).dump())
    )
    enveloped = _indefinite(b"\x30", core.Integer(2).dump(), recipient_infos, encrypted_content_info)
    return _indefinite(b"\x30", _OID_ENVELOPED_DATA, _indefinite(b"\xa0", enveloped))


def _check_oaep(algorithm: cms.KeyEncryptionAlgorithm) -> None:
    if algorithm["algorithm"].native != "rsaes_oaep":
        raise CmsError(f"key encryption must be RSAES-OAEP, got {algorithm['algorithm'].native}")
    params = algorithm["parameters"]
    digest = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    mgf_digest = mgf["parameters"]["algorithm"].native
    if digest != "sha256" or mgf["algorithm"].native != "mgf1" or mgf_digest != "sha256":
        raise CmsError(f"RSAES-OAEP must use SHA-256 and MGF1-SHA-256, got {digest} / {mgf_digest}")


def parse_enveloped_data(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(RSA-OAEP-wrapped key, AES-256-CBC IV, encrypted content) of a KMS `CiphertextForRecipient`.

    The counterpart of AWS's `aws_cms_parse_enveloped_data`: BER or DER; the first recipient is used
    and its identifier (subjectKeyIdentifier of any length, or issuerAndSerialNumber) is not compared.
    """
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
        if not recipients or recipients[0].name != "ktri":
            raise CmsError("expected a key-transport (KeyTransRecipientInfo) recipient first")
        ktri = recipients[0].chosen
        _check_oaep(ktri["key_encryption_algorithm"])
        content_info = enveloped["encrypted_content_info"]
        if content_info["content_type"].native != "data":
            raise CmsError(f"encrypted content type is {content_info['content_type'].native}, not data")
        algorithm = content_info["content_encryption_algorithm"]
        if algorithm["algorithm"].native != "aes256_cbc":
            raise CmsError(f"content encryption must be AES-256-CBC, got {algorithm['algorithm'].native}")
        iv = algorithm["parameters"].native
        encrypted = content_info["encrypted_content"].native  # BER chunks are joined by asn1crypto
        wrapped_key = ktri["encrypted_key"].native
    except CmsError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
        raise CmsError(f"malformed CMS EnvelopedData: {exc}") from exc
    if not isinstance(iv, bytes) or len(iv) != AES_BLOCK_BYTES:
        raise CmsError("AES-256-CBC IV must be 16 bytes")
    if not isinstance(encrypted, bytes) or not encrypted or len(encrypted) % AES_BLOCK_BYTES:
        raise CmsError("encrypted content length is not a positive multiple of the AES block size")
    if not isinstance(wrapped_key, bytes) or not wrapped_key:
        raise CmsError("the wrapped content-encryption key is empty")
    return wrapped_key, iv, encrypted


def decrypt_enveloped_data(data: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Enclave side: unwrap a `CiphertextForRecipient` with the key whose public half was attested."""
    wrapped_key, iv, encrypted = parse_enveloped_data(data)
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
