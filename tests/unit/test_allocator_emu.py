"""The emulated nitro-enclaves-allocator service (`nitro-cli-emulator allocator apply|show`) on fake hosts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
from nitro_fakes import make_sysfs

from nitro_emulator import allocator, state
from nitro_emulator.errors import NitroCliError


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An 8-vCPU SMT host (siblings i, i+4) with 16 GiB available and private emulator locations."""
    make_sysfs(tmp_path / "sysfs", cpus=8, threads=2, mem_available_mib=16384)
    monkeypatch.setenv("NITRO_EMULATOR_SYSFS_ROOT", str(tmp_path / "sysfs"))
    monkeypatch.setenv("NITRO_CLI_SOCKETS_PATH", str(tmp_path / "sock"))
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path / "vs"))
    monkeypatch.setenv("NITRO_EMULATOR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NITRO_ALLOCATOR_CONFIG", str(tmp_path / "allocator.yaml"))
    return tmp_path


def apply(host: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    (host / "allocator.yaml").write_text(text)
    code = allocator.allocator_apply(argparse.Namespace())
    out, err = capsys.readouterr()
    return code, out, err


def recorded(host: Path) -> dict:
    return json.loads((host / "home" / "allocator.json").read_text())


def test_cpu_count_picks_full_cores_after_cpu0s(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = apply(host, "---\nmemory_mib: 1001\ncpu_count: 4\n", capsys)
    assert (code, err) == (0, "")
    assert out == (
        "Auto-generated the enclave CPU pool: 1,2,5,6\n"
        "Successfully allocated Nitro Enclaves resources: 1001 MiB, 4 CPUs\n"
    )
    record = recorded(host)
    assert record["cpu_pool"] == [1, 2, 5, 6]
    assert record["cores"] == [[1, 5], [2, 6]]
    assert record["memory_mib"] == 1002  # whole 2 MiB hugepages
    assert record["requested_memory_mib"] == 1001


def test_cpu_pool_mode(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = apply(host, "# comment before the marker is ignored\n---\nmemory_mib: 512\ncpu_pool: 3,7\n", capsys)
    assert code == 0
    assert out == "Successfully allocated Nitro Enclaves resources: 512 MiB, CPU pool: 3,7\n"
    assert recorded(host)["cpu_pool"] == [3, 7]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("---\ncpu_count: 2\n", "Error: Config error: missing memory reservation (`memory_mib`).\n"),
        (
            "---\nmemory_mib: 512\n",
            "Error: Config error: missing CPU reservation (either `cpu_count` or `cpu_pool`).\n",
        ),
        (
            "---\nmemory_mib: 512\ncpu_count: 2\ncpu_pool: 1,5\n",
            "Error: Config error: `cpu_count` conflicts with `cpu_pool`.\n",
        ),
        ("---\nmemory_mib: 512\nfoo: 1\n", "- unexpected: foo\n"),
        ("---\nmemory_mib: 512\ncpu_count: 3\n", "not a multiple of 2"),
        ("---\nmemory_mib: 512\ncpu_count: 8\n", "cpu_count 8 is more than the 6 CPU(s)"),
        ("---\nmemory_mib: 512\ncpu_pool: 0,4\n", "includes CPU 0"),
        ("---\nmemory_mib: 512\ncpu_pool: 1\n", "leaves out sibling CPU(s) 5"),
        ("---\nmemory_mib: 999999\ncpu_count: 2\n", "more than the host can give"),
    ],
)
def test_refusals_print_error_and_exit_1(
    host: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    code, out, err = apply(host, text, capsys)
    assert code == 1
    assert out == ""
    assert err.startswith("Error: ") and message in err
    assert not (host / "home" / "allocator.json").exists()


def test_missing_config(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert allocator.allocator_apply(argparse.Namespace()) == 1
    assert "allocator.yaml" in capsys.readouterr().err


def test_refused_while_an_enclave_runs_then_allowed(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert apply(host, "---\nmemory_mib: 512\ncpu_count: 2\n", capsys)[0] == 0
    me = os.getpid()
    slot = state.Slot(
        slot_uid="abc",
        enclave_id="i-0-encabc",
        enclave_name="x",
        pid=me,
        pid_start=state.process_start_time(me) or "",
        cid=16,
        cpu_ids=[1, 5],
        memory_mib=128,
        flags=0,
        state_dir=str(host / "sock" / "abc.d"),
    )
    with state.locked() as table:
        table.add(slot)
    code, _, err = apply(host, "---\nmemory_mib: 1024\ncpu_count: 2\n", capsys)
    assert code == 1
    assert err == f"Error: {allocator.RUNNING_ENCLAVES}\n"
    assert recorded(host)["memory_mib"] == 512  # unchanged

    # allocator show reports the use.
    assert allocator.allocator_show(argparse.Namespace()) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["cpu_pool"], shown["enclaves"], shown["used_cpu_ids"], shown["used_memory_mib"]) == (
        "1,5",
        1,
        [1, 5],
        128,
    )

    # A slot whose process is gone (pid reused or dead) no longer counts.
    with state.locked() as table:
        table.slots["abc"].pid_start = "0"
        table.save()
    assert apply(host, "---\nmemory_mib: 1024\ncpu_count: 2\n", capsys)[0] == 0
    assert recorded(host)["memory_mib"] == 1024


def test_show_and_load_pool_without_apply(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert allocator.allocator_show(argparse.Namespace()) == 1
    assert "allocator apply" in capsys.readouterr().err
    with pytest.raises(NitroCliError) as error:
        allocator.load_pool()
    assert error.value.code == 19


def test_load_pool_after_apply(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    apply(host, "---\nmemory_mib: 64\ncpu_pool: 2-3,6-7\n", capsys)
    assert allocator.load_pool() == {"cpu_pool": [2, 3, 6, 7], "memory_mib": 64, "cores": [[2, 6], [3, 7]]}


@pytest.mark.parametrize(("mib", "pages"), [(0, 0), (1, 2), (2, 2), (63, 64), (64, 64)])
def test_round_to_pages(mib: int, pages: int) -> None:
    assert allocator.round_to_pages(mib) == pages
