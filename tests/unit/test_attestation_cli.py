"""`nitro-attest verify` as users run it: the installed console script, in a subprocess."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nitro_emulator.nsm import build_attestation_document, emulator_root_pem

VECTORS = Path(__file__).resolve().parent / "attestation_vectors"
B64_FILE = VECTORS / "nitro_debug_nullfields_uid2.b64"
EXPECTED = json.loads((VECTORS / "nitro_debug_nullfields_uid2.expected.json").read_text())
AT = "2021-04-26T04:09:13.100Z"
NITRO_ATTEST = Path(sys.executable).parent / "nitro-attest"


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(NITRO_ATTEST), *args], input=stdin, capture_output=True, timeout=60, check=False)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert "Traceback" not in out.stderr, out.stderr
    return out


@pytest.fixture(scope="module")
def raw_doc_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "doc.cbor"
    path.write_bytes(base64.b64decode("".join(B64_FILE.read_text().split())))
    return path


def test_console_script_is_installed() -> None:
    assert NITRO_ATTEST.exists(), "make setup installs nitro-attest into .venv/bin"


def test_real_document_base64_file_valid_with_allow_debug() -> None:
    proc = run("verify", str(B64_FILE), "--at", AT, "--allow-debug", "--pcr", f"4={EXPECTED['pcrs']['4']}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["valid"] is True
    assert out["module_id"] == EXPECTED["module_id"]
    assert out["digest"] == "SHA384"
    assert out["timestamp"] == AT
    assert out["pcrs"] == EXPECTED["pcrs"]
    assert out["certificate_subject"].startswith("CN=i-0fd25f30661854f2b-enc01790c5d9eab829d.us-west-1.aws")
    assert out["public_key"] is None and out["user_data"] is None and out["nonce"] is None


def test_raw_cbor_file_and_stdin(raw_doc_file: Path) -> None:
    assert run("verify", str(raw_doc_file), "--at", AT, "--allow-debug").returncode == 0
    assert run("verify", "-", "--at", AT, "--allow-debug", stdin=raw_doc_file.read_bytes()).returncode == 0
    assert run("verify", "-", "--at", "1619410153.1", "--allow-debug", stdin=B64_FILE.read_bytes()).returncode == 0


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ([], "debug"),
        (["--allow-debug", "--at", "2021-04-26T08:09:13Z"], "expired"),
        (["--allow-debug", "--at", "2021-04-26T03:09:13Z"], "not_yet_valid"),
        (["--allow-debug", "--pcr", "0=" + "ab" * 48], "pcr"),
        (["--allow-debug", "--nonce", "00ff"], "nonce"),
    ],
)
def test_real_document_failures_name_the_check(extra: list[str], check: str) -> None:
    args = ["verify", str(B64_FILE), *extra]
    if "--at" not in extra:
        args += ["--at", AT]
    proc = run(*args)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["valid"] is False and out["check"] == check
    assert check in proc.stderr


def test_default_time_is_now_so_the_real_document_is_expired() -> None:
    proc = run("verify", str(B64_FILE), "--allow-debug")
    assert proc.returncode == 1 and json.loads(proc.stdout)["check"] == "expired"


def test_emulator_document_with_root_option(tmp_path: Path) -> None:
    home = tmp_path / "emu"
    nonce = b"\x01\x02\x03"
    doc = build_attestation_document(
        {0: b"\x07" * 48, 1: b"\x08" * 48, 2: b"\x09" * 48}, "i-1-enc1", nonce=nonce, home=home
    )
    doc_file = tmp_path / "emu.b64"
    doc_file.write_bytes(base64.b64encode(doc) + b"\n")
    root = tmp_path / "root.pem"
    root.write_bytes(emulator_root_pem(home))
    proc = run("verify", str(doc_file), "--root", str(root), "--nonce", nonce.hex(), "--pcr", "0=" + "07" * 48)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["nonce"] == base64.b64encode(nonce).decode() and out["debug"] is False
    proc = run("verify", str(doc_file))  # AWS root by default
    assert proc.returncode == 1 and json.loads(proc.stdout)["check"] == "root"


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage that is not base64 !!", b"\x84\x01\x02", b"\xd2\x80", base64.b64encode(b"\x00" * 100)],
)
def test_hostile_input_fails_cleanly(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "doc"
    path.write_bytes(content)
    proc = run("verify", str(path), "--allow-debug")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["check"] == "format"


def test_flipped_byte_document(raw_doc_file: Path, tmp_path: Path) -> None:
    data = bytearray(raw_doc_file.read_bytes())
    data[-5] ^= 0xFF  # inside the signature
    path = tmp_path / "flipped.cbor"
    path.write_bytes(bytes(data))
    proc = run("verify", str(path), "--at", AT, "--allow-debug")
    assert proc.returncode == 1 and json.loads(proc.stdout)["check"] == "signature"


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "/nonexistent/doc"],
        ["verify", str(B64_FILE), "--pcr", "0=abcd"],
        ["verify", str(B64_FILE), "--pcr", "32=" + "00" * 48],
        ["verify", str(B64_FILE), "--nonce", "xyz"],
        ["verify", str(B64_FILE), "--at", "yesterday"],
        ["verify", str(B64_FILE), "--root", "/nonexistent/root.pem"],
        ["verify", str(B64_FILE), "--root", str(B64_FILE)],  # not a PEM
        [],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    proc = run(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)


def test_measurements_option(tmp_path: Path) -> None:
    home = tmp_path / "emu"
    pcrs = {0: b"\x07" * 48, 1: b"\x08" * 48, 2: b"\x09" * 48}
    doc_file = tmp_path / "doc.cbor"
    doc_file.write_bytes(build_attestation_document(pcrs, "i-1-enc1", home=home))
    root = tmp_path / "root.pem"
    root.write_bytes(emulator_root_pem(home))
    good = tmp_path / "good.measurements.json"
    good.write_text(
        json.dumps(
            {"Measurements": {"HashAlgorithm": "Sha384 { ... }", **{f"PCR{i}": v.hex() for i, v in pcrs.items()}}}
        )
    )
    bad = tmp_path / "bad.measurements.json"
    bad.write_text(json.dumps({"Measurements": {"PCR0": "aa" * 48}}))
    assert run("verify", str(doc_file), "--root", str(root), "--measurements", str(good)).returncode == 0
    proc = run("verify", str(doc_file), "--root", str(root), "--measurements", str(bad))
    assert proc.returncode == 1 and json.loads(proc.stdout)["check"] == "pcr"
    # A --pcr that contradicts the artifact is a usage error, not a silent override.
    proc = run("verify", str(doc_file), "--root", str(root), "--measurements", str(good), "--pcr", "0=" + "aa" * 48)
    assert proc.returncode == 2
    assert run("verify", str(doc_file), "--measurements", str(tmp_path / "absent.json")).returncode == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "measurements nested too deeply to be an EIF measurements artifact"),
        (b'{"Measurements": {"PCR0": "\xff"}}', "measurements not UTF-8 text (byte offset 27: invalid start byte)"),
        (b"{" + b" " * (2 << 20) + b"}", "measurements larger than 1048576 bytes"),
    ],
)
def test_hostile_measurements_are_usage_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "m.json"
    path.write_bytes(content)
    proc = run("verify", str(B64_FILE), "--measurements", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"nitro-attest: {path}: {message}"


def test_endless_root_file_is_bounded() -> None:
    proc = run("verify", str(B64_FILE), "--root", "/dev/zero")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "nitro-attest: root /dev/zero is larger than 1048576 bytes: not a PEM certificate"
