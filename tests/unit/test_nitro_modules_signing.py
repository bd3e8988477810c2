"""Signed EIFs in the modules: nitro_enclave refuses an EIF not signed by the required certificate (by PCR8 or
SHA-384 fingerprint) before anything changes; nitro_eif reports the signature and signs with state=signed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif
from nitro_fakes import FakeHost, load_module, make_cert, make_eif, run_module

from nitro_emulator import eif_writer, signing

ENCLAVE = load_module("nitro_enclave")
EIF_MODULE = load_module("nitro_eif")


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    return FakeHost(tmp_path, monkeypatch)


@pytest.fixture
def publisher(tmp_path: Path) -> tuple[Path, Path]:
    return make_cert(tmp_path, "publisher")


def signed_eif(path: Path, cert: Path, key: Path, payload: bytes = b"APP-1") -> Path:
    make_eif(path, payload)
    eif_writer.sign_eif_file(path, signing.make_signer(str(cert), str(key)))
    return path


def enclave(capsys: pytest.CaptureFixture[str], path: Path, **extra: Any) -> dict[str, Any]:
    args = {"name": "tok", "eif_path": str(path), "cpu_count": 2, "memory_mib": 256, **extra}
    return run_module(ENCLAVE, args, capsys)


def test_required_signer_by_pcr8_and_fingerprint(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path, publisher: tuple[Path, Path]
) -> None:
    cert, key = publisher
    pcr8 = eif.pcr8_from_certificate(cert.read_bytes())
    fingerprint = eif.certificate_sha384(cert.read_bytes())
    good = signed_eif(tmp_path / "good.eif", cert, key)
    assert enclave(capsys, good, signer_pcr8=[pcr8.upper()])["changed"] is True
    assert enclave(capsys, good, state="absent")["changed"] is True
    assert enclave(capsys, good, signer_certificate_sha384=[fingerprint])["changed"] is True


@pytest.mark.parametrize("state", ["running", "configured"])
def test_other_signers_are_refused_before_any_change(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path, publisher: tuple[Path, Path], state: str
) -> None:
    cert, _key = publisher
    pcr8 = eif.pcr8_from_certificate(cert.read_bytes())
    other_cert, other_key = make_cert(tmp_path, "someone-else")
    other_pcr8 = eif.pcr8_from_certificate(other_cert.read_bytes())
    unsigned = tmp_path / "unsigned.eif"
    make_eif(unsigned, b"APP-1")
    foreign = signed_eif(tmp_path / "foreign.eif", other_cert, other_key)
    config = tmp_path / "tok.json"
    extra = {"state": state, "config_path": str(config), "signer_pcr8": [pcr8]}

    refused = enclave(capsys, unsigned, **extra)
    assert refused["failed"] is True and f"eif_path {unsigned} is refused: it is not signed" in refused["msg"]
    assert pcr8 in refused["msg"]
    refused = enclave(capsys, foreign, **extra)
    assert refused["failed"] is True
    assert f"signed by the certificate with SHA-384 {eif.certificate_sha384(other_cert.read_bytes())}" in refused["msg"]
    assert f"(PCR8 {other_pcr8}), which is not an allowed signer (PCR8 {pcr8})" in refused["msg"]
    assert "Nothing was changed" in refused["msg"]
    assert host.calls() == [] and not config.exists()


def test_changed_after_signing_is_refused(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path, publisher: tuple[Path, Path]
) -> None:
    """The allowed certificate's valid signature, copied from a signed image onto another image: PCR8 is the
    allowed one, but the signed payload is the other image's PCR0."""
    cert, key = publisher
    good = signed_eif(tmp_path / "good.eif", cert, key, b"APP-1")
    section = eif.read_eif(good).signature_section
    other = tmp_path / "other.eif"
    make_eif(other, b"APP-2")
    eif_writer.sign_eif_file(other, lambda _pcr0: section)  # someone else's valid signature, copied over
    refused = enclave(capsys, other, signer_pcr8=[eif.pcr8_from_certificate(cert.read_bytes())])
    assert refused["failed"] is True and "does not cover its PCR0" in refused["msg"]
    assert host.calls() == []


def test_bad_pin_values_are_named(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    path = tmp_path / "a.eif"
    make_eif(path, b"APP-1")
    refused = enclave(capsys, path, signer_certificate_sha384=["AB:CD"])
    assert refused["failed"] is True
    assert refused["msg"] == "signer_certificate_sha384: 'AB:CD' is not a SHA-384 value (96 hexadecimal characters)"
    assert host.calls() == []


def test_nitro_eif_reports_and_signs(
    capsys: pytest.CaptureFixture[str],
    host: FakeHost,
    tmp_path: Path,
    publisher: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key = publisher
    path = tmp_path / "img.eif"
    make_eif(path, b"APP-1")
    pcrs = eif.read_eif(path).pcrs
    described = run_module(EIF_MODULE, {"path": str(path), "state": "described"}, capsys)
    assert described["signature"] == {"signed": False}
    emulator = str(Path(__file__).resolve().parents[2] / ".venv/bin/nitro-cli-emulator")
    record = Path(str(path) + ".inputs.json")
    record.write_text(json.dumps({"format": 1, "eif_sha384": eif.read_eif(path, file_digest=True).file_sha384}))
    args = {
        "path": str(path),
        "state": "signed",
        "signing_certificate": str(cert),
        "private_key": str(key),
        "nitro_cli_path": emulator,
    }
    checked = run_module(EIF_MODULE, {**args, "_ansible_check_mode": True}, capsys)
    assert checked["changed"] is True and not eif.read_eif(path).is_signed
    first = run_module(EIF_MODULE, args, capsys)
    pcr8 = eif.pcr8_from_certificate(cert.read_bytes())
    assert first["changed"] is True and first["measurements"]["PCR8"] == pcr8
    assert {k: first["measurements"][k] for k in ("PCR0", "PCR1", "PCR2")} == {
        k: pcrs[k] for k in ("PCR0", "PCR1", "PCR2")
    }
    assert first["signature"] == {
        "signed": True,
        "pcr8": pcr8,
        "certificate_sha384": hashlib.sha384(eif.pem_to_der(cert.read_bytes())).hexdigest(),
        "covers_pcr0": True,
        "signature_verified": True,
    }
    assert json.loads(record.read_text())["eif_sha384"] == first["eif_sha384"]  # present will not rebuild it
    assert run_module(EIF_MODULE, args, capsys)["changed"] is False
    # Another certificate: signed again, in place.
    other_cert, other_key = make_cert(tmp_path, "next-publisher")
    again = run_module(
        EIF_MODULE, {**args, "signing_certificate": str(other_cert), "private_key": str(other_key)}, capsys
    )
    assert again["changed"] is True and again["signature"]["pcr8"] == eif.pcr8_from_certificate(other_cert.read_bytes())
    key_body = key.read_text().splitlines()[1]  # a line of the key's base64
    assert key_body not in json.dumps([first, again])


def test_nitro_eif_signs_a_copy_of_src_once(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path, publisher: tuple[Path, Path]
) -> None:
    """src: the unsigned EIF a build host built keeps its bytes; path becomes its signed copy, once."""
    cert, key = publisher
    src, path = tmp_path / "img.unsigned.eif", tmp_path / "img.eif"
    make_eif(src, b"APP-1")
    unsigned = src.read_bytes()
    Path(str(src) + ".measurements.json").write_text(json.dumps({"ImageDigest": "sha256:abc", "EifPath": str(src)}))
    emulator = str(Path(__file__).resolve().parents[2] / ".venv/bin/nitro-cli-emulator")
    args = {"path": str(path), "src": str(src), "state": "signed", "signing_certificate": str(cert)}
    args |= {"private_key": str(key), "nitro_cli_path": emulator}
    checked = run_module(EIF_MODULE, {**args, "_ansible_check_mode": True}, capsys)
    assert checked["changed"] is True and not path.exists()
    first = run_module(EIF_MODULE, args, capsys)
    pcr8 = eif.pcr8_from_certificate(cert.read_bytes())
    assert first["changed"] is True and first["signer_pcr8"] == pcr8 and first["signature"]["pcr8"] == pcr8
    assert src.read_bytes() == unsigned
    signed = eif.read_eif(path, file_digest=True)
    assert {k: signed.pcrs[k] for k in ("PCR0", "PCR1", "PCR2", "PCR8")} == {
        **{k: eif.read_eif(src).pcrs[k] for k in ("PCR0", "PCR1", "PCR2")},
        "PCR8": pcr8,
    }
    artifact = json.loads(Path(str(path) + ".measurements.json").read_text())
    assert artifact == {
        "ImageDigest": "sha256:abc",
        "EifPath": str(path),
        "Measurements": signed.measurements,
        "EifSha384": signed.file_sha384,
    }
    assert [p.name for p in tmp_path.glob(".img.eif.*")] == []  # no temporary file left
    second = run_module(EIF_MODULE, args, capsys)
    assert second["changed"] is False and second["eif_sha384"] == signed.file_sha384
    # A new build (other PCR0) behind src: signed again.
    make_eif(src, b"APP-2")
    third = run_module(EIF_MODULE, args, capsys)
    assert third["changed"] is True and "is not a signed copy of" in third["reasons"][0]
    assert eif.read_eif(path).pcrs["PCR0"] == eif.read_eif(src).pcrs["PCR0"]
