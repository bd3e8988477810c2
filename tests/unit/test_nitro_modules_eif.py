"""plugins/modules/nitro_eif.py under patch_module_args with a fake nitro-cli build-enclave and a fake docker:
rebuild only on input changes, measurements artifact, check/diff mode, described without nitro-cli."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import read_eif
from nitro_fakes import FakeHost, load_module, make_eif, run_module

MODULE = load_module("nitro_eif")


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    fake = FakeHost(tmp_path, monkeypatch)
    fake.set_image("app:1", "sha256:" + "a" * 64)
    return fake


def run(capsys: pytest.CaptureFixture[str], **args: Any) -> dict[str, Any]:
    return run_module(MODULE, args, capsys)


def builds(host: FakeHost) -> int:
    return host.subcommands().count("build-enclave")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "missing required arguments: path"),
        ({"path": "/x.eif"}, "state is present but all of the following are missing: docker_uri"),
        (
            {"path": "/x.eif", "docker_uri": "a", "signing_certificate": "/c.pem"},
            "parameters are required together: signing_certificate, private_key",
        ),
        (
            {"path": "/x.eif", "state": "absent"},
            "value of state must be one of: present, signed, described, got: absent",
        ),
        ({"path": "/x.eif", "docker_uri": "a", "metadata": "not-a-dict"}, "metadata"),
    ],
)
def test_argument_spec_rules(capsys: pytest.CaptureFixture[str], args: dict[str, Any], message: str) -> None:
    result = run(capsys, **args)
    assert result["failed"] is True
    assert message in result["msg"]


def test_build_once_then_no_change(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    eif = tmp_path / "out" / "app.eif"
    eif.parent.mkdir()
    first = run(capsys, path=str(eif), docker_uri="app:1", name="app", version="1.0")
    assert first["changed"] is True and first["built"] is True
    assert "the EIF does not exist" in first["reasons"]
    image = read_eif(eif, file_digest=True)
    assert first["measurements"] == image.measurements
    assert first["eif_sha384"] == hashlib.sha384(eif.read_bytes()).hexdigest()
    assert first["image_digest"] == "sha256:" + "a" * 64
    artifact = json.loads((tmp_path / "out" / "app.eif.measurements.json").read_text())
    assert artifact == {
        "Measurements": image.measurements,
        "ImageDigest": "sha256:" + "a" * 64,
        "EifSha384": image.file_sha384,
        "EifPath": str(eif),
    }
    assert list(artifact["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    record = json.loads((tmp_path / "out" / "app.eif.inputs.json").read_text())
    assert record["docker_uri"] == "app:1" and record["nitro_cli_version"] == "1.4.2"
    assert image.metadata["ImageName"] == "app"
    assert sorted(p.name for p in eif.parent.iterdir()) == [
        "app.eif",
        "app.eif.inputs.json",
        "app.eif.measurements.json",
    ]

    second = run(capsys, path=str(eif), docker_uri="app:1", name="app", version="1.0")
    assert second["changed"] is False and second["built"] is False and second["reasons"] == []
    assert second["measurements"] == first["measurements"]
    assert builds(host) == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"name": "other"}, "inputs changed: name"),
        ({"version": "2.0"}, "inputs changed: version"),
        ({"metadata": {"team": "payments"}}, "inputs changed: metadata"),
    ],
)
def test_input_changes_rebuild(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path, change: dict[str, Any], reason: str
) -> None:
    eif = tmp_path / "app.eif"
    base = {"path": str(eif), "docker_uri": "app:1", "name": "app", "version": "1.0"}
    run(capsys, **base)
    result = run(capsys, **{**base, **change})
    assert result["changed"] is True and reason in result["reasons"]
    assert builds(host) == 2
    assert run(capsys, **{**base, **change})["changed"] is False


def test_new_image_digest_rebuilds_with_new_pcrs(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path
) -> None:
    eif = tmp_path / "app.eif"
    first = run(capsys, path=str(eif), docker_uri="app:1")
    host.set_image("app:1", "sha256:" + "b" * 64)
    second = run(capsys, path=str(eif), docker_uri="app:1", _ansible_diff=True)
    assert second["changed"] is True and "inputs changed: image_id" in second["reasons"]
    assert second["diff"]["before"]["image_id"] == "sha256:" + "a" * 64
    assert second["diff"]["after"]["image_id"] == "sha256:" + "b" * 64
    assert second["measurements"]["PCR0"] != first["measurements"]["PCR0"]
    artifact = json.loads(Path(str(eif) + ".measurements.json").read_text())
    assert artifact["ImageDigest"] == "sha256:" + "b" * 64
    assert artifact["Measurements"]["PCR0"] == second["measurements"]["PCR0"]


def test_untagged_uri_means_latest(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    host.set_image("app:latest", "sha256:" + "c" * 64)
    result = run(capsys, path=str(tmp_path / "a.eif"), docker_uri="app")
    assert result["image_digest"] == "sha256:" + "c" * 64
    assert host.calls()[-1][1:3] == ["--docker-uri", "app:latest"]


def test_nitro_cli_version_change_rebuilds(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, path=str(tmp_path / "a.eif"), docker_uri="app:1")
    monkeypatch.setenv("FAKE_NITRO_VERSION", "1.5.0")
    result = run(capsys, path=str(tmp_path / "a.eif"), docker_uri="app:1")
    assert "inputs changed: nitro_cli_version" in result["reasons"]


def test_replaced_eif_rebuilds(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    eif = tmp_path / "app.eif"
    run(capsys, path=str(eif), docker_uri="app:1")
    make_eif(eif, b"SOMETHING ELSE")
    result = run(capsys, path=str(eif), docker_uri="app:1")
    assert result["changed"] is True
    assert "the EIF's bytes differ from the ones recorded at build time" in result["reasons"]
    eif.write_bytes(b"garbage")
    result = run(capsys, path=str(eif), docker_uri="app:1")
    assert any(r.startswith("the existing EIF is unreadable") for r in result["reasons"])
    assert builds(host) == 3


def test_missing_artifact_is_rewritten_without_build(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path
) -> None:
    eif = tmp_path / "app.eif"
    run(capsys, path=str(eif), docker_uri="app:1")
    artifact = Path(str(eif) + ".measurements.json")
    expected = artifact.read_text()
    artifact.unlink()
    result = run(capsys, path=str(eif), docker_uri="app:1")
    assert result["changed"] is True and result["built"] is False and result["measurements_file_changed"] is True
    assert artifact.read_text() == expected
    assert builds(host) == 1
    custom = tmp_path / "pcrs" / "app.json"
    custom.parent.mkdir()
    moved = run(capsys, path=str(eif), docker_uri="app:1", measurements_file=str(custom))
    assert moved["changed"] is True and json.loads(custom.read_text()) == json.loads(expected)


def test_check_mode_builds_nothing(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    eif = tmp_path / "app.eif"
    result = run(capsys, path=str(eif), docker_uri="app:1", _ansible_check_mode=True, _ansible_diff=True)
    assert result["changed"] is True and result["built"] is True
    assert result["diff"]["before"] == {} and result["diff"]["after"]["image_id"] == "sha256:" + "a" * 64
    assert not eif.exists() and list(tmp_path.glob("app.eif*")) == []
    assert builds(host) == 0
    run(capsys, path=str(eif), docker_uri="app:1")
    assert run(capsys, path=str(eif), docker_uri="app:1", _ansible_check_mode=True)["changed"] is False


def test_force(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    run(capsys, path=str(tmp_path / "a.eif"), docker_uri="app:1")
    result = run(capsys, path=str(tmp_path / "a.eif"), docker_uri="app:1", force=True)
    assert result["changed"] is True and "force: true" in result["reasons"]
    assert builds(host) == 2


def test_docker_dir_digest(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Dockerfile").write_text("FROM scratch\n")
    (src / "app.py").write_text("print(1)\n")
    args = {"path": str(tmp_path / "a.eif"), "docker_uri": "built:1", "docker_dir": str(src)}
    first = run(capsys, **args)
    assert first["built"] is True and first["image_digest"].startswith("sha256:")
    assert ["--docker-dir", str(src)] == host.calls()[-1][5:7]
    assert run(capsys, **args)["changed"] is False
    (src / "app.py").write_text("print(2)\n")
    second = run(capsys, **args)
    assert second["changed"] is True and "inputs changed: docker_dir_digest" in second["reasons"]
    (src / "Dockerfile").unlink()
    failed = run(capsys, **args)
    assert failed["failed"] is True and "has no Dockerfile" in failed["msg"]


def test_build_failure_keeps_old_eif(
    capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eif = tmp_path / "app.eif"
    run(capsys, path=str(eif), docker_uri="app:1")
    before = eif.read_bytes()
    monkeypatch.setenv("FAKE_NITRO_FAIL", "build-enclave:49:Docker image build error. boom")
    result = run(capsys, path=str(eif), docker_uri="app:1", force=True)
    assert result["failed"] is True
    assert result["msg"] == "build-enclave failed: [ E49 ] Docker image build error. boom"
    assert eif.read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("*app.eif*")) == [
        "app.eif",
        "app.eif.inputs.json",
        "app.eif.measurements.json",
    ]


def test_image_missing_everywhere(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    result = run(capsys, path=str(tmp_path / "a.eif"), docker_uri="nowhere:1")
    assert result["failed"] is True and "[ E50 ]" in result["msg"]


def test_output_directory_must_exist(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    result = run(capsys, path=str(tmp_path / "nope" / "a.eif"), docker_uri="app:1")
    assert result["failed"] is True and "does not exist" in result["msg"]


def test_described_needs_no_nitro_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("NITRO_EMULATED", "0")
    eif = tmp_path / "x.eif"
    pcrs = make_eif(eif, b"DESCRIBE-ME")
    result = run(capsys, path=str(eif), state="described")
    assert result["changed"] is False
    assert result["measurements"]["PCR0"] == pcrs["PCR0"]
    assert result["eif_sha384"] == hashlib.sha384(eif.read_bytes()).hexdigest()
    assert result["size"] == eif.stat().st_size
    describe = result["describe"]
    assert list(describe) == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "CheckCRC",
        "ImageName",
        "ImageVersion",
        "Metadata",
    ]
    assert describe["EifVersion"] == 4 and describe["IsSigned"] is False and describe["CheckCRC"] is True
    assert describe["ImageName"] == "t" and describe["Metadata"]["KernelVersion"] == "4.14"


def test_described_bad_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.eif"
    bad.write_bytes(b".eif" + b"\0" * 10)
    result = run(capsys, path=str(bad), state="described")
    assert result["failed"] is True and result["msg"].startswith(f"path {bad}: ")
    missing = run(capsys, path=str(tmp_path / "missing.eif"), state="described")
    assert missing["failed"] is True and "cannot open EIF" in missing["msg"]


def test_signing_inputs(capsys: pytest.CaptureFixture[str], host: FakeHost, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key.write_text("KEY-1")
    args = {
        "path": str(tmp_path / "a.eif"),
        "docker_uri": "app:1",
        "signing_certificate": str(cert),
        "private_key": str(key),
    }
    first = run(capsys, **args)
    assert first["built"] is True
    assert host.calls()[-1][-4:] == ["--signing-certificate", str(cert), "--private-key", str(key)]
    assert first["inputs"]["signing_certificate_sha256"] == hashlib.sha256(cert.read_bytes()).hexdigest()
    assert first["inputs"]["private_key"] == "sha256:" + hashlib.sha256(b"KEY-1").hexdigest()
    assert "KEY-1" not in json.dumps(first)
    assert run(capsys, **args)["changed"] is False
    key.write_text("KEY-2")
    assert "inputs changed: private_key" in run(capsys, **args)["reasons"]
    arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    with_arn = run(capsys, **{**args, "private_key": arn})
    assert with_arn["inputs"]["private_key"] == arn
    key.unlink()
    missing = run(capsys, **args)
    assert missing["failed"] is True and f"private_key {key}" in missing["msg"]
