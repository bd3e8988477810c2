"""CMS EnvelopedData for CiphertextForRecipient: a real KMS reply, AWS's parser's view of ours, round trip,
OpenSSL interop both ways, refusals."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from asn1crypto import algos, cms, core, parser
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from enclave_tokenizer import cms as ecms
from enclave_tokenizer.cms import CmsError

OPENSSL = shutil.which("openssl")
VECTOR = Path(__file__).resolve().parent / "kms_vectors"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def spki(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 32, 1000, 4096])
def test_round_trip(key, size) -> None:
    plaintext = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    envelope = ecms.build_enveloped_data(plaintext, spki(key))
    if size >= 16:
        assert plaintext not in envelope
    assert ecms.decrypt_enveloped_data(envelope, key) == plaintext


def test_structure_matches_kms_format(key) -> None:
    info = cms.ContentInfo.load(ecms.build_enveloped_data(b"k" * 32, spki(key)))
    assert info["content_type"].native == "enveloped_data"
    env = info["content"]
    assert env["version"].native == "v2"
    (recipient,) = env["recipient_infos"]
    ktri = recipient.chosen
    assert ktri["version"].native == "v2"
    assert ktri["rid"].name == "subject_key_identifier"
    assert ktri["rid"].chosen.native == ecms.subject_key_identifier(spki(key))
    assert len(ktri["rid"].chosen.native) == 32  # the length a real KMS reply carries
    kea = ktri["key_encryption_algorithm"]
    assert kea["algorithm"].native == "rsaes_oaep"
    assert kea["parameters"]["hash_algorithm"]["algorithm"].native == "sha256"
    assert kea["parameters"]["mask_gen_algorithm"]["parameters"]["algorithm"].native == "sha256"
    eci = env["encrypted_content_info"]
    assert eci["content_type"].native == "data"
    assert eci["content_encryption_algorithm"]["algorithm"].native == "aes256_cbc"
    assert len(eci["content_encryption_algorithm"]["parameters"].native) == 16


def test_wrong_key_refused_at_the_rsa_step(key, other_key) -> None:
    # The identifier is not compared (as in AWS's parser): the OAEP unwrap is what refuses.
    envelope = ecms.build_enveloped_data(b"secret", spki(key))
    with pytest.raises(CmsError, match="does not decrypt"):
        ecms.decrypt_enveloped_data(envelope, other_key)


def test_non_rsa_recipient_refused() -> None:
    ec_pub = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(CmsError, match="must be RSA"):
        ecms.build_enveloped_data(b"x", ec_pub)
    with pytest.raises(CmsError, match="SubjectPublicKeyInfo"):
        ecms.build_enveloped_data(b"x", b"not a key")


def mutate(envelope: bytes, change) -> bytes:
    info = cms.ContentInfo.load(envelope)
    change(info["content"])
    return info.dump(force=True)  # force: re-serialize the modified children, not the cached bytes


def test_refuses_other_algorithms(key) -> None:
    envelope = ecms.build_enveloped_data(b"secret", spki(key))

    def sha1_oaep(env) -> None:
        env["recipient_infos"][0].chosen["key_encryption_algorithm"]["parameters"]["hash_algorithm"] = (
            algos.DigestAlgorithm({"algorithm": "sha1"})
        )

    def pkcs1v15(env) -> None:
        env["recipient_infos"][0].chosen["key_encryption_algorithm"] = cms.KeyEncryptionAlgorithm(
            {"algorithm": "rsaes_pkcs1v15"}
        )

    def aes128(env) -> None:
        env["encrypted_content_info"]["content_encryption_algorithm"] = algos.EncryptionAlgorithm(
            {"algorithm": "aes128_cbc", "parameters": core.OctetString(b"\0" * 16)}
        )

    def short_iv(env) -> None:
        env["encrypted_content_info"]["content_encryption_algorithm"] = algos.EncryptionAlgorithm(
            {"algorithm": "aes256_cbc", "parameters": core.OctetString(b"\0" * 8)}
        )

    def truncated_content(env) -> None:
        eci = env["encrypted_content_info"]
        eci["encrypted_content"] = eci["encrypted_content"].native[:-3]

    for change, reason in [
        (sha1_oaep, "SHA-256"),
        (pkcs1v15, "RSAES-OAEP"),
        (aes128, "AES-256-CBC"),
        (short_iv, "IV"),
        (truncated_content, "block size"),
    ]:
        with pytest.raises(CmsError, match=reason):
            ecms.decrypt_enveloped_data(mutate(envelope, change), key)


def test_tampered_content_refused(key) -> None:
    envelope = bytearray(ecms.build_enveloped_data(b"secret" * 4, spki(key)))
    envelope[-11] ^= 0x01  # last ciphertext byte (before five end-of-contents pairs): breaks the padding
    with pytest.raises(CmsError, match="padding"):
        ecms.decrypt_enveloped_data(bytes(envelope), key)


def test_tampered_wrapped_key_refused(key) -> None:
    def flip(env) -> None:
        ktri = env["recipient_infos"][0].chosen
        wrapped = bytearray(ktri["encrypted_key"].native)
        wrapped[10] ^= 0xFF
        ktri["encrypted_key"] = bytes(wrapped)

    with pytest.raises(CmsError, match="does not decrypt"):
        ecms.decrypt_enveloped_data(mutate(ecms.build_enveloped_data(b"s", spki(key)), flip), key)


@pytest.mark.parametrize("junk", [b"", b"\x30\x03\x02\x01", b"\x30\x80" * 1000, b"\xff" * 70000, b"hello"])
def test_garbage_gives_cms_error(key, junk) -> None:
    with pytest.raises(CmsError):
        ecms.decrypt_enveloped_data(junk, key)


def test_other_content_type_refused(key) -> None:
    signed = cms.ContentInfo({"content_type": "data", "content": core.OctetString(b"x")}).dump()
    with pytest.raises(CmsError, match="not enveloped_data"):
        ecms.decrypt_enveloped_data(signed, key)


# ------------------------------------------------------------------ OpenSSL as an independent oracle


def write_key(tmp_path: Path, private_key) -> Path:
    path = tmp_path / "key.pem"
    path.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def self_signed(tmp_path: Path, private_key) -> Path:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclave")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed (interop oracle only)")
def test_openssl_decrypts_ours(tmp_path, key) -> None:
    plaintext = b"data key material 32 bytes long!"
    der = tmp_path / "env.der"
    der.write_bytes(ecms.build_enveloped_data(plaintext, spki(key)))
    out = subprocess.run(
        [OPENSSL, "cms", "-decrypt", "-inform", "DER", "-in", str(der), "-inkey", str(write_key(tmp_path, key))],
        check=True,
        capture_output=True,
    )
    assert out.stdout == plaintext


@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed (interop oracle only)")
def test_we_decrypt_openssls(tmp_path, key) -> None:
    plaintext = b"made by openssl"
    src = tmp_path / "in.bin"
    src.write_bytes(plaintext)
    out = tmp_path / "env.der"
    oaep = ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256", "-keyopt", "rsa_mgf1_md:sha256"]
    files = ["-in", str(src), "-out", str(out), "-recip", str(self_signed(tmp_path, key))]
    subprocess.run(
        [OPENSSL, "cms", "-encrypt", "-binary", "-aes-256-cbc", "-outform", "DER", "-keyid", *files, *oaep],
        check=True,
        capture_output=True,
    )
    assert ecms.decrypt_enveloped_data(out.read_bytes(), key) == plaintext


# ------------------------------------------------------------------ what AWS sends, what AWS's parser reads


def _element(data: bytes, pos: int) -> tuple[int, int, int, bool]:
    """(identifier octet, header length, whole length, indefinite?) of the BER element at `pos`."""
    try:
        _cls, _method, _tag, header, content, trailer = parser.parse(data[pos:], strict=False)
    except ValueError as exc:
        raise AssertionError(f"kmstool: no element at {pos}: {exc}") from exc
    # Every tag here fits the identifier octet, so the length octet is header[1]; 0x80 = indefinite.
    return data[pos], len(header), len(header) + len(content) + len(trailer), header[1] == 0x80


def aws_kmstool_parse(data: bytes) -> tuple[bytes, bytes, bytes]:
    """The steps of aws-nitro-enclaves-sdk-c `aws_cms_parse_enveloped_data` (source/cms.c, e86d2cf), on
    BoringSSL's CBS semantics: `CBS_get_any_ber_asn1_element` steps *into* an indefinite-length element
    (header only) but consumes a definite-length one whole; `CBS_get_asn1` reads one definite element.
    Returns (wrapped key, IV, encrypted content); AssertionError where kmstool would fail."""
    pos = 0

    def ber(expect: int | None = None) -> tuple[int, bytes]:
        nonlocal pos
        tag, header_len, total, indefinite = _element(data, pos)
        assert expect is None or tag == expect, f"kmstool: tag {tag:#x} at {pos}, wanted {expect:#x}"
        element = data[pos : pos + total]
        pos += header_len if indefinite else total
        return tag, element

    def asn1(buf: bytes, at: int, expect: int) -> tuple[bytes, int]:
        tag, header_len, total, indefinite = _element(buf, at)
        assert tag == expect and not indefinite, f"kmstool: tag {tag:#x} at {at}, wanted definite {expect:#x}"
        return buf[at + header_len : at + total], at + total

    ber(0x30)  # ContentInfo
    oid, pos = asn1(data, pos, 0x06)
    assert oid == bytes.fromhex("2a864886f70d010703")
    ber()  # [0]
    ber(0x30)  # EnvelopedData
    version, pos = asn1(data, pos, 0x02)
    assert version == b"\x02"
    _, recipient_set = ber(0x31)
    recipients, _ = asn1(recipient_set, 0, 0x31)
    ktri, _ = asn1(recipients, 0, 0x30)
    version, at = asn1(ktri, 0, 0x02)
    assert version == b"\x02", "kmstool: only KeyTransRecipientInfo v2 (subjectKeyIdentifier)"
    at += _element(ktri, at)[2]  # the recipient identifier: skipped, never compared
    _, at = asn1(ktri, at, 0x30)
    wrapped_key, _ = asn1(ktri, at, 0x04)
    ber(0x30)  # EncryptedContentInfo
    oid, pos = asn1(data, pos, 0x06)
    assert oid == bytes.fromhex("2a864886f70d010701")
    _, algorithm = ber(0x30)
    header_len = _element(algorithm, 0)[1]
    oid, at = asn1(algorithm, header_len, 0x06)
    assert oid == bytes.fromhex("60864801650304012a"), "kmstool: AES-256-CBC only"
    iv, _ = asn1(algorithm, at, 0x04)
    content = b""
    if data[pos] == 0x80:  # primitive [0]: definite-length parts
        while pos < len(data) and data[pos] == 0x80:
            part, pos = asn1(data, pos, 0x80)
            content += part
    else:
        ber()  # constructed [0], indefinite: OCTET STRING chunks
        while pos < len(data) and data[pos] == 0x04:
            _, chunk = ber(0x04)
            part, _ = asn1(chunk, 0, 0x04)
            content += part
    assert content, "kmstool: no encrypted content"
    return wrapped_key, iv, content


def _skeleton(data: bytes, depth: int = 0) -> list[tuple[int, int, bool]]:
    """(depth, identifier octet, indefinite?) of every element: the encoding's shape without its values."""
    out, pos = [], 0
    while pos < len(data):
        tag, header_len, total, indefinite = _element(data, pos)
        if tag == 0 and total == 2:
            break  # end-of-contents of the enclosing indefinite element
        out.append((depth, tag, indefinite))
        if tag & 0x20:
            out += _skeleton(data[pos + header_len : pos + total], depth + 1)
        pos += total
    return out


def test_real_kms_reply_parses_as_awss_parser_parses_it(other_key) -> None:
    ber = (VECTOR / "ciphertext_for_recipient.ber").read_bytes()
    expected = json.loads((VECTOR / "expected.json").read_text())
    assert len(ber) == expected["length"]
    wrapped_key, iv, encrypted = ecms.parse_enveloped_data(ber)
    assert (wrapped_key.hex(), iv.hex(), encrypted.hex()) == (
        expected["encrypted_key"],
        expected["iv"],
        expected["ciphertext"],
    )
    assert aws_kmstool_parse(ber) == (wrapped_key, iv, encrypted)  # the port agrees with the vector too
    # No private key is public: the unwrap fails, and only at the RSA step.
    with pytest.raises(CmsError, match="content-encryption key does not decrypt"):
        ecms.decrypt_enveloped_data(ber, other_key)


def test_local_kms_output_has_the_real_replys_encoding(key) -> None:
    ours = ecms.build_enveloped_data(b"k" * 32, spki(key))
    real = (VECTOR / "ciphertext_for_recipient.ber").read_bytes()
    assert ours[:2] == b"\x30\x80"
    assert _skeleton(ours) == _skeleton(real)
    wrapped_key, iv, encrypted = aws_kmstool_parse(ours)
    assert (wrapped_key, iv, encrypted) == ecms.parse_enveloped_data(ours)
    assert ecms.decrypt_enveloped_data(ours, key) == b"k" * 32


def test_awss_parser_cannot_read_der(key) -> None:
    # Why the local KMS must answer in BER: kmstool walks the indefinite-length headers.
    der = cms.ContentInfo.load(ecms.build_enveloped_data(b"x", spki(key))).dump(force=True)
    assert der[:2] != b"\x30\x80"
    with pytest.raises(AssertionError, match="kmstool"):
        aws_kmstool_parse(der)
    assert ecms.decrypt_enveloped_data(der, key) == b"x"  # the enclave still reads definite lengths


@pytest.mark.parametrize("ski_len", [8, 20, 32, 64])
def test_any_subject_key_identifier_length(key, ski_len) -> None:
    def rid(env) -> None:
        env["recipient_infos"][0].chosen["rid"] = cms.RecipientIdentifier(
            name="subject_key_identifier", value=core.OctetString(b"\x5a" * ski_len)
        )

    envelope = mutate(ecms.build_enveloped_data(b"data key", spki(key)), rid)
    assert ecms.decrypt_enveloped_data(envelope, key) == b"data key"


def test_issuer_and_serial_number_recipient(key) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms")])

    def rid(env) -> None:
        ktri = env["recipient_infos"][0].chosen
        ktri["version"] = "v0"
        ktri["rid"] = cms.RecipientIdentifier(
            name="issuer_and_serial_number",
            value=cms.IssuerAndSerialNumber({"issuer": cms.Name.load(name.public_bytes()), "serial_number": 12345}),
        )

    envelope = mutate(ecms.build_enveloped_data(b"data key", spki(key)), rid)
    assert ecms.decrypt_enveloped_data(envelope, key) == b"data key"
