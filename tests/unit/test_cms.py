"""CMS EnvelopedData for CiphertextForRecipient: round trip, OpenSSL interop both ways, refusals."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
from asn1crypto import algos, cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from enclave_tokenizer import cms as ecms
from enclave_tokenizer.cms import CmsError

OPENSSL = shutil.which("openssl")


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
    kea = ktri["key_encryption_algorithm"]
    assert kea["algorithm"].native == "rsaes_oaep"
    assert kea["parameters"]["hash_algorithm"]["algorithm"].native == "sha256"
    assert kea["parameters"]["mask_gen_algorithm"]["parameters"]["algorithm"].native == "sha256"
    eci = env["encrypted_content_info"]
    assert eci["content_type"].native == "data"
    assert eci["content_encryption_algorithm"]["algorithm"].native == "aes256_cbc"
    assert len(eci["content_encryption_algorithm"]["parameters"].native) == 16


def test_ski_is_rfc5280_method_1(key) -> None:
    expected = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert ecms.subject_key_identifier(spki(key)) == expected


def test_wrong_key_refused(key, other_key) -> None:
    envelope = ecms.build_enveloped_data(b"secret", spki(key))
    with pytest.raises(CmsError, match="another key"):
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
    envelope[-1] ^= 0x01  # last ciphertext byte: breaks the padding
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
