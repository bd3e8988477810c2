"""Signed EIFs: the signature section as aws-nitro-enclaves-image-format writes it, PCR8, sign-eif, and the
checks run-enclave (E59) and describe-eif make, for good, tampered, expired and wrong-certificate images.

The layout is checked with cbor2, pycose and cryptography directly, not with the code that wrote it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import struct
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import cbor2
import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from nitro_fakes import make_cert
from pycose.keys import CoseKey
from pycose.messages import Sign1Message

from nitro_emulator import cli, eif_writer, signing
from nitro_emulator.errors import NitroCliError

NOW = dt.datetime.now(dt.UTC)
BUILD_INFO = dict.fromkeys(eif.BUILD_INFO_KEYS, "test")


def build(path: Path, signer: eif_writer.Signer | None = None, kernel: bytes = b"KERNEL") -> dict[str, str]:
    return eif_writer.write_eif(
        path,
        kernel=kernel,
        cmdline="console=ttyS0",
        ramdisks=[b"RAMDISK0", b"RAMDISK1"],
        metadata=eif.make_metadata("t", "1.0", BUILD_INFO),
        signer=signer,
    )


def extend(data: bytes) -> str:
    return hashlib.sha384(bytes(48) + hashlib.sha384(data).digest()).hexdigest()


def sections(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, offset, data) of every section, walked from byte 548 as the crate's reader does."""
    out, pos = [], 548
    while pos + 12 <= len(data):
        kind, flags, size = struct.unpack(">HHQ", data[pos : pos + 12])
        assert flags == 0
        out.append((kind, pos, data[pos + 12 : pos + 12 + size]))
        pos += 12 + size
    assert pos == len(data)
    return out


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    cert, key = make_cert(tmp_path)
    path = tmp_path / "signed.eif"
    build(path, signing.make_signer(str(cert), str(key)))
    return path, cert, key


def test_signature_section_is_the_crates_layout(signed: tuple[Path, Path, Path]) -> None:
    path, cert, _key = signed
    data = path.read_bytes()
    walked = sections(data)
    assert [kind for kind, _, _ in walked] == [1, 2, 5, 3, 3, 4]  # EifBuilder order, signature last
    magic, version, _flags, _mem, _cpus, _res, count = struct.unpack(">4sHHQQHH", data[:28])
    offsets = struct.unpack(">32Q", data[28 : 28 + 256])
    sizes = struct.unpack(">32Q", data[284 : 284 + 256])
    assert (magic, version, count) == (b".eif", 4, 6)
    assert [offsets[i] for i in range(6)] == [off for _, off, _ in walked]
    assert [sizes[i] for i in range(6)] == [len(body) for _, _, body in walked]
    crc = zlib.crc32(data[548:], zlib.crc32(data[:544]))
    assert struct.unpack(">I", data[544:548])[0] == crc

    # serde_cbor: [ {"signing_certificate": [u8...], "signature": [u8...]} ], Vec<u8> as arrays of uints.
    section = walked[-1][2]
    value = cbor2.loads(section)
    assert isinstance(value, list) and len(value) == 1
    assert list(value[0]) == ["signing_certificate", "signature"]
    assert all(isinstance(v, list) for v in value[0].values())
    assert bytes(value[0]["signing_certificate"]) == cert.read_bytes()  # the PEM file as read
    assert section[:1] == b"\x81" and section[1:2] == b"\xa2"
    assert section[2:22] == b"\x73signing_certificate"

    cose = bytes(value[0]["signature"])
    protected, unprotected, payload, sig = cbor2.loads(cose)  # untagged COSE_Sign1
    assert cose[:1] == b"\x84" and protected == b"\xa1\x01\x38\x22" and unprotected == {}  # ES384
    assert len(sig) == 96  # r || s, 48 bytes each
    image = eif.read_eif(path)
    pcr0 = image.pcrs["PCR0"]
    assert payload == cbor2.dumps({"register_index": 0, "register_value": list(bytes.fromhex(pcr0))})
    assert payload == eif.pcr_info_payload(pcr0)

    # pycose, an independent COSE implementation, accepts it with the certificate's key.
    message = Sign1Message.from_cose_obj(cbor2.loads(cose), True)
    pub = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    message.key = CoseKey.from_pem_public_key(pem.decode())
    assert message.verify_signature()

    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert image.pcrs["PCR8"] == extend(der) == eif.pcr8_from_certificate(cert.read_bytes())
    assert eif.certificate_sha384(cert.read_bytes()) == hashlib.sha384(der).hexdigest()
    unsigned = build(path.with_name("unsigned.eif"))
    assert {k: image.pcrs[k] for k in ("PCR0", "PCR1", "PCR2")} == unsigned  # the signature is not measured


def test_good_image_passes_run_and_describe(signed: tuple[Path, Path, Path]) -> None:
    path, cert, _key = signed
    signing.verify_before_run(path)
    code, out, _err = run_cli("describe-eif", "--eif-path", str(path))
    described = json.loads(out)
    assert code == 0
    assert list(described)[:6] == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "SigningCertificate",
        "CheckCRC",
        "SignatureCheck",
    ]
    assert described["IsSigned"] is True and described["SignatureCheck"] is True and described["CheckCRC"] is True
    info = described["SigningCertificate"]
    assert list(info) == ["IssuerName", "Algorithm", "NotBefore", "NotAfter", "Signature"]
    assert info["IssuerName"] == {"commonName": "publisher", "countryName": "DE"}
    assert info["Algorithm"] == "ecdsa-with-SHA384"
    assert info["NotAfter"].endswith(" GMT") and info["Signature"].count(":") > 60
    assert described["Measurements"]["PCR8"] == eif.pcr8_from_certificate(cert.read_bytes())


def _e59(path: Path) -> str:
    with pytest.raises(NitroCliError) as raised:
        signing.verify_before_run(path)
    assert raised.value.code == 59
    return raised.value.render()


def _rewrite_signature(path: Path, mutate: object) -> None:
    """Replace the signature section with mutate(PcrSignature) re-encoded, CRC fixed (a careful attacker)."""
    data = bytearray(path.read_bytes())
    kind, offset, body = sections(bytes(data))[-1]
    assert kind == 4
    new = eif.encode_signature_section([mutate(eif.decode_signature_section(body)[0])])  # type: ignore[operator]
    data[offset:] = struct.pack(">HHQ", 4, 0, len(new)) + new  # the signature is the last section
    slot = len(sections(bytes(path.read_bytes()))) - 1
    data[284 + 8 * slot : 292 + 8 * slot] = struct.pack(">Q", len(new))
    data[544:548] = struct.pack(">I", zlib.crc32(bytes(data[548:]), zlib.crc32(bytes(data[:544]))))
    path.write_bytes(bytes(data))


def test_tampered_signature_is_e59(signed: tuple[Path, Path, Path]) -> None:
    path, _cert, _key = signed

    def flip(sig: eif.PcrSignature) -> eif.PcrSignature:
        cose = bytearray(sig.signature)
        cose[-1] ^= 0x01
        return eif.PcrSignature(sig.signing_certificate, bytes(cose))

    _rewrite_signature(path, flip)
    text = _e59(path)
    assert text.startswith(
        '[ E59 ] EIF signature checker error. Invalid signing certificate: "The EIF signature is not valid"'
    )
    assert "cli-errors.html#E59" in text


def test_tampered_payload_is_e59(signed: tuple[Path, Path, Path]) -> None:
    path, _cert, _key = signed

    def other_pcr0(sig: eif.PcrSignature) -> eif.PcrSignature:
        protected, unprotected, _payload, signature = cbor2.loads(sig.signature)
        forged = eif.pcr_info_payload("ab" * 48)
        return eif.PcrSignature(sig.signing_certificate, cbor2.dumps([protected, unprotected, forged, signature]))

    _rewrite_signature(path, other_pcr0)
    assert "The EIF signature is not valid" in _e59(path)


def test_swapped_certificate_is_e59(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Someone else's certificate on this signature: the signature does not verify with its key."""
    path, _cert, _key = signed
    other, _ = make_cert(tmp_path, "publisher")  # same name and length, another key
    _rewrite_signature(path, lambda sig: eif.PcrSignature(other.read_bytes(), sig.signature))
    assert eif.read_eif(path).pcrs["PCR8"] == eif.pcr8_from_certificate(other.read_bytes())
    assert "The EIF signature is not valid" in _e59(path)


def test_garbled_certificate_is_e59(signed: tuple[Path, Path, Path]) -> None:
    path, _cert, _key = signed

    def garble(sig: eif.PcrSignature) -> eif.PcrSignature:
        pem = bytearray(sig.signing_certificate)
        pem[40:44] = b"AAAA" if pem[40:44] != b"AAAA" else b"BBBB"
        return eif.PcrSignature(bytes(pem), sig.signature)

    _rewrite_signature(path, garble)
    text = _e59(path)
    assert "Could not deserialize the signing certificate" in text or "The EIF signature is not valid" in text


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        (NOW - dt.timedelta(days=10), NOW - dt.timedelta(days=1)),
        (NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=9)),
    ],
    ids=["expired", "not-yet-valid"],
)
def test_certificate_outside_validity_is_e59(tmp_path: Path, not_before: dt.datetime, not_after: dt.datetime) -> None:
    cert, key = make_cert(tmp_path, not_before=not_before, not_after=not_after)
    path = tmp_path / "dated.eif"
    build(path, signing.make_signer(str(cert), str(key)))  # nitro-cli signs with any certificate
    assert 'Invalid signing certificate: "The signing certificate is expired"' in _e59(path)
    code, out, _ = run_cli("describe-eif", "--eif-path", str(path))
    assert code == 0 and json.loads(out)["SignatureCheck"] is True  # describe-eif does not check dates


def test_modified_image_keeps_signature_but_fails_signature_check(signed: tuple[Path, Path, Path]) -> None:
    """A kernel byte changed after signing: the COSE signature is intact (run-enclave's check passes, as
    nitro-cli's does), but it no longer covers PCR0: describe-eif's SignatureCheck is false."""
    path, _cert, _key = signed
    data = bytearray(path.read_bytes())
    data[548 + 12] ^= 0x20  # first kernel byte
    data[544:548] = struct.pack(">I", zlib.crc32(bytes(data[548:]), zlib.crc32(bytes(data[:544]))))
    path.write_bytes(bytes(data))
    signing.verify_before_run(path)
    code, out, _ = run_cli("describe-eif", "--eif-path", str(path))
    assert code == 0 and json.loads(out)["SignatureCheck"] is False


def test_unsigned_image_needs_no_check(tmp_path: Path) -> None:
    path = tmp_path / "u.eif"
    build(path)
    signing.verify_before_run(path)
    code, out, _ = run_cli("describe-eif", "--eif-path", str(path))
    assert code == 0 and "SignatureCheck" not in json.loads(out) and json.loads(out)["IsSigned"] is False


def test_sign_eif_adds_then_replaces_the_signature(tmp_path: Path) -> None:
    path = tmp_path / "img.eif"
    unsigned = build(path)
    first_cert, first_key = make_cert(tmp_path, "first")
    code, out, err = run_cli(
        "sign-eif", "--eif-path", str(path), "--signing-certificate", str(first_cert), "--private-key", str(first_key)
    )
    assert code == 0 and "Enclave Image successfully signed." in err
    measured = json.loads(out)["Measurements"]
    assert list(measured) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert {k: measured[k] for k in unsigned} == unsigned
    assert measured["PCR8"] == eif.pcr8_from_certificate(first_cert.read_bytes())
    data = path.read_bytes()
    assert [kind for kind, _, _ in sections(data)] == [1, 2, 5, 3, 3, 4]  # appended in slot num_sections
    signing.verify_before_run(path)

    # A longer certificate name: the section grows, it is replaced in place, the file stays valid.
    second_cert, second_key = make_cert(tmp_path, "second-publisher-with-a-longer-name")
    assert eif_writer.sign_eif_file(path, signing.make_signer(str(second_cert), str(second_key)))["PCR8"] == (
        eif.pcr8_from_certificate(second_cert.read_bytes())
    )
    image = eif.read_eif(path)  # checks offsets, sizes and CRC
    assert [s.type for s in image.sections].count(eif.SectionType.SIGNATURE) == 1
    assert {k: image.pcrs[k] for k in unsigned} == unsigned
    signing.verify_before_run(path)


def test_sign_eif_refuses_a_key_that_is_not_the_certificates(tmp_path: Path) -> None:
    path = tmp_path / "img.eif"
    build(path)
    before = path.read_bytes()
    cert, _ = make_cert(tmp_path, "a")
    _, other_key = make_cert(tmp_path, "b")
    code, _out, err = run_cli(
        "sign-eif", "--eif-path", str(path), "--signing-certificate", str(cert), "--private-key", str(other_key)
    )
    assert code == 60 and "does not match the private key" in err and "[ E60 ]" in err
    assert path.read_bytes() == before  # nothing written
    code, _out, err = run_cli("sign-eif", "--signing-certificate", str(cert), "--private-key", str(other_key))
    assert code == 1 and "[ E01 ]" in err


def test_key_file_errors_do_not_quote_key_material(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nU0VDUkVUU0VDUkVU\n-----END PRIVATE KEY-----\n")
    with pytest.raises(signing.SigningError) as raised:
        signing.make_signer(str(cert), str(key))
    assert "U0VDUkVU" not in str(raised.value) and str(key) in str(raised.value)


def test_kms_arn_is_recognised_as_upstream_does() -> None:
    good = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert signing.KMS_KEY_ARN.match(good).groups() == ("eu-west-1", "1234abcd-12ab-34cd-56ef-1234567890ab")
    assert signing.KMS_KEY_ARN.match(good.replace("key/", "key:"))
    for bad in ("arn:aws:kms:eu-west-1:12345:key/x", "arn:aws:s3:eu-west-1:123456789012:key/x", "/tmp/key.pem"):
        assert not signing.KMS_KEY_ARN.match(bad)


def test_attestation_verifier_checks_pcr8_against_certificates(tmp_path: Path) -> None:
    """An enclave of an EIF signed by `cert` attests PCR8 = the certificate's; the verifier (library and
    nitro-attest --signing-certificate) accepts it for that certificate, or any of several, and no other."""
    from enclave_tokenizer import attestation, attestation_cli

    from nitro_emulator.nsm import build_attestation_document, emulator_root_pem

    cert, _key = make_cert(tmp_path, "publisher")
    other, _ = make_cert(tmp_path, "other")
    pcr8 = attestation.pcr8_of_certificate(cert)
    assert pcr8 == eif.pcr8_from_certificate(cert.read_bytes())
    home = tmp_path / "emu"
    pcrs = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48, 8: bytes.fromhex(pcr8)}
    doc = build_attestation_document(pcrs, "i-0123456789abcdef0-enc0123456789abcdef", home=home)
    root = emulator_root_pem(home)
    ok = attestation.verify_attestation_document(doc, root_pem=root, signer_pcr8=[pcr8.upper()])
    assert ok.pcrs[8].hex() == pcr8
    with pytest.raises(attestation.AttestationError) as refused:
        attestation.verify_attestation_document(
            doc, root_pem=root, signer_pcr8=[attestation.pcr8_of_certificate(other)]
        )
    assert refused.value.check == "pcr" and f"PCR8 is {pcr8}" in refused.value.message
    (tmp_path / "doc.cbor").write_bytes(doc)
    (tmp_path / "root.pem").write_bytes(root)
    argv = ["verify", str(tmp_path / "doc.cbor"), "--root", str(tmp_path / "root.pem")]
    assert (
        run_cli_attest(
            attestation_cli, [*argv, "--signing-certificate", str(other), "--signing-certificate", str(cert)]
        )
        == 0
    )
    assert run_cli_attest(attestation_cli, [*argv, "--signing-certificate", str(other)]) == 1
    (tmp_path / "junk.pem").write_text("junk")
    assert run_cli_attest(attestation_cli, [*argv, "--signing-certificate", str(tmp_path / "junk.pem")]) == 2


def run_cli_attest(module: object, argv: list[str]) -> int:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        return module.main(argv)  # type: ignore[attr-defined]
