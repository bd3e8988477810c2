"""run-enclave/describe/terminate/console failures: nitro-cli's E-codes, texts and exit codes.

Checks done by the enclave process surface as nitro-cli shows them: its `[ Exx ]` block, then
`Failed connections: 1` and the CLI's `[ E39 ]`, exit code 39. A small (unbootable) EIF suffices for
everything that fails before boot; no Docker needed.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest

from .conftest import EmulatorHost, Run

pytestmark = [pytest.mark.root]


def run(host: EmulatorHost, eif: Path, *args: str) -> Run:
    return host.run("run-enclave", "--eif-path", str(eif), *args)


def assert_enclave_error(result: Run, code: int, text: str = "") -> None:
    """An error raised inside the enclave process: its block, then the CLI's E39."""
    assert result.code == 39, result.stderr
    assert f"[ E{code:02d} ]" in result.stderr, result.stderr
    assert text in result.stderr
    inner = result.stderr.index(f"[ E{code:02d} ]")
    assert result.stderr.index("Failed connections: 1") > inner
    assert result.stderr.rstrip().endswith("cli-errors.html#E39")
    assert result.stdout == ""


def assert_cli_error(result: Run, code: int, text: str = "") -> None:
    assert result.code == code, result.stderr
    assert result.stderr.startswith(f"[ E{code:02d} ]"), result.stderr
    assert text in result.stderr
    assert "Failed connections" not in result.stderr


def assert_no_leftovers(host: EmulatorHost) -> None:
    table = host.sockets / ".driver.json"
    assert not table.exists() or json.loads(table.read_text()) == {}
    assert [p.name for p in host.sockets.iterdir() if not p.name.startswith(".")] == []


def test_without_allocator_the_pool_file_is_missing(emu_host: EmulatorHost, tiny_eif: Path) -> None:
    result = run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", "128")
    assert_enclave_error(result, 19, "allocator.json")


def test_cid_flag_rules(emu_host: EmulatorHost, tiny_eif: Path) -> None:
    for cid in ("1", "2", "3", "4294967295", "18446744073709551616", "-"):
        result = run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", "128", "--enclave-cid", cid)
        assert_cli_error(result, 3)
    assert "`MISSING_INFO`" in run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", "1", "--enclave-cid", "3").stderr
    assert "`enclave-cid`" in run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", "1", "--enclave-cid", "x").stderr


def test_memory_and_cpu_rules(emu_host: EmulatorHost, tiny_eif: Path) -> None:
    assert emu_host.allocate(2048, cpu_count=1).code == 0  # pool: CPU 1 (CPU 0 stays with the parent)
    assert_cli_error(run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", "256_mb"), 3, "`memory`")
    size = tiny_eif.stat().st_size
    minimum = math.ceil(math.ceil(size / 1024) / 1024) * 4  # nitro-cli's rounding
    too_little = (4 * size) >> 20  # just under 4x the file size
    assert_enclave_error(
        run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", str(too_little)),
        26,
        f"is {too_little} MB, but based on the EIF file size, the minimum memory should be {minimum} MB",
    )
    assert_enclave_error(run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", "0"), 26)
    over = run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", "3G")
    assert_enclave_error(over, 27, "`memory` is 3072 MB")
    assert over.stderr.startswith("Start allocating memory...\n")
    assert_enclave_error(run(emu_host, tiny_eif, "--cpu-ids", "0", "--memory", "128"), 21, "contains CPU 0")
    assert_enclave_error(run(emu_host, tiny_eif, "--cpu-ids", "1", "1", "--memory", "128"), 20, "(CPU(s) 1)")
    assert_enclave_error(run(emu_host, tiny_eif, "--cpu-count", "2", "--memory", "128"), 22, "`cpu-count` is 2")
    assert_enclave_error(run(emu_host, tiny_eif, "--cpu-count", "0", "--memory", "128"), 29)
    assert_enclave_error(run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", "32"), 29)
    assert_no_leftovers(emu_host)


def test_boot_failure_is_e36_and_cleans_up(emu_host: EmulatorHost, tiny_eif: Path) -> None:
    assert emu_host.allocate(2048, cpu_count=1).code == 0
    result = run(emu_host, tiny_eif, "--cpu-count", "1", "--memory", "128", "--enclave-cid", "0")
    assert "The enclave CID will be auto-generated as the provided CID is 0" in result.stderr
    assert "Started enclave with enclave-cid: 16, memory: 128 MiB, cpu-ids: [1]" in result.stderr
    assert_enclave_error(result, 36, "Failed to unpack initramfs")
    assert_no_leftovers(emu_host)
    assert not (emu_host.vsock / "16").exists()


def test_config_file(emu_host: EmulatorHost, tiny_eif: Path, tmp_path: Path) -> None:
    assert emu_host.allocate(2048, cpu_count=1).code == 0

    def with_config(data: object, *extra: str) -> Run:
        path = tmp_path / "run.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return emu_host.run("run-enclave", "--config", str(path), *extra)

    base = {"eif_path": str(tiny_eif), "memory_mib": 128}
    assert_cli_error(with_config({**base, "cpu_count": 1, "cpu_ids": [1]}), 2, "`MISSING_INFO`")
    assert_cli_error(with_config(base), 1, "`MISSING_INFO`")
    assert_cli_error(with_config("{not json"), 17)
    assert_cli_error(with_config({"memory_mib": 128, "cpu_count": 1}), 17)
    assert_cli_error(emu_host.run("run-enclave", "--config", str(tmp_path / "missing.json")), 19)
    # The CLI does not check a CID from --config; the (emulated) driver refuses it.
    assert_enclave_error(with_config({**base, "cpu_count": 1, "enclave_cid": 3}), 29, "")
    # An argument conflict is a usage error (clap, exit 2), not an E-code.
    conflict = with_config({**base, "cpu_count": 1}, "--memory", "64")
    assert conflict.code == 2 and conflict.stderr.startswith("error:")
    # --config with a good request gets as far as the (unbootable) image.
    booted = with_config({**base, "cpu_ids": [1], "enclave_name": "cfg", "debug_mode": True})
    assert_enclave_error(booted, 36)
    assert_no_leftovers(emu_host)


def test_usage_errors_exit_2(emu_host: EmulatorHost, tiny_eif: Path) -> None:
    assert emu_host.run("run-enclave", "--eif-path", str(tiny_eif), "--cpu-count", "1").code == 2
    assert emu_host.run("run-enclave", "--eif-path", str(tiny_eif), "--memory", "128").code == 2
    both = run(emu_host, tiny_eif, "--memory", "1", "--cpu-count", "1", "--cpu-ids", "1")
    assert both.code == 2


def test_lookups_of_missing_enclaves(emu_host: EmulatorHost) -> None:
    assert emu_host.run("describe-enclaves").json() == []
    assert_cli_error(emu_host.run("terminate-enclave", "--enclave-id", "i-0000000000000000-enc123abc"), 11)
    assert_cli_error(emu_host.run("terminate-enclave", "--enclave-name", "nobody"), 58)
    assert_cli_error(emu_host.run("console", "--enclave-id", "i-0000000000000000-enc123abc"), 11)
    assert_cli_error(emu_host.run("console", "--enclave-name", "x", "--disconnect-timeout", "soon"), 3)
    # A stale socket (its process is gone) is removed, not reported.
    stale = emu_host.sockets / "deadbeef.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    assert emu_host.run("describe-enclaves").json() == []
    assert not stale.exists()
    for leftover in emu_host.sockets.iterdir():
        leftover.unlink()
    emu_host.sockets.rmdir()
    assert_cli_error(emu_host.run("describe-enclaves"), 7)
    assert_cli_error(emu_host.run("terminate-enclave", "--all"), 19)


def test_signed_eif_checks_before_launch(emu_host: EmulatorHost, tmp_path: Path) -> None:
    """A signed EIF whose certificate has expired or whose signature was altered fails as nitro-cli
    fails it: the enclave process's E59 (PcrSignatureChecker), then the CLI's E39; a valid one gets past."""
    import datetime as dt

    from nitro_emulator import eif_writer, signing

    from .conftest import load_nitro_fakes

    fakes = load_nitro_fakes()
    assert emu_host.allocate(2048, cpu_count=1).code == 0
    now = dt.datetime.now(dt.UTC)
    expired_cert, expired_key = fakes.make_cert(
        tmp_path, "old", not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1)
    )
    good_cert, good_key = fakes.make_cert(tmp_path, "current")
    expired, good, altered = tmp_path / "expired.eif", tmp_path / "good.eif", tmp_path / "altered.eif"
    for path in (expired, good):
        fakes.make_eif(path, size_pad=1 << 20)
    eif_writer.sign_eif_file(expired, signing.make_signer(str(expired_cert), str(expired_key)))
    eif_writer.sign_eif_file(good, signing.make_signer(str(good_cert), str(good_key)))
    data = bytearray(good.read_bytes())
    data[-1] ^= 0x01  # last byte of the COSE signature (r||s), the section being last
    altered.write_bytes(bytes(data))

    result = run(emu_host, expired, "--cpu-count", "1", "--memory", "128")
    assert_enclave_error(result, 59, 'Invalid signing certificate: "The signing certificate is expired"')
    result = run(emu_host, altered, "--cpu-count", "1", "--memory", "128")
    assert_enclave_error(result, 59, "The EIF signature is not valid")
    # Past the signature check: this unbootable image then fails later, on something else.
    result = run(emu_host, good, "--cpu-count", "1", "--memory", "128")
    assert "[ E59 ]" not in result.stderr
    assert_no_leftovers(emu_host)
