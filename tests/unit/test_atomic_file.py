"""The one atomic writer (plugins/module_utils/atomic_file.py): content, modes, and the old file kept on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.atomic_file import atomic_path, write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


def test_writes_bytes_and_text_with_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"\x00bytes", 0o600)
    assert target.read_bytes() == b"\x00bytes"
    assert _mode(target) == 0o600
    write_atomic(target, "tëxt\n", 0o644)
    assert target.read_text(encoding="utf-8") == "tëxt\n"
    assert _mode(target) == 0o644
    assert _leftovers(tmp_path, "f") == []


def test_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "f", b"x", 0o644)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f") == 0o644


def test_failed_write_keeps_the_old_content_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def broken_move(src: str, dest: str) -> None:
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(target, b"new", move=broken_move)
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, "f") == []


def test_exception_inside_the_block_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(SystemExit), atomic_path(target) as tmp:
        Path(tmp).write_bytes(b"half")
        raise SystemExit(1)  # what module.fail_json raises
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, "f") == []


def test_atomic_path_applies_the_mode_after_the_block(tmp_path: Path) -> None:
    """A program that fills the temporary may replace it with a file of its own mode (mkstemp's 0600)."""
    target = tmp_path / "image.eif"
    with atomic_path(target, 0o644, suffix=".eif") as tmp:
        assert tmp.endswith(".eif") and os.path.dirname(tmp) == str(tmp_path)
        replacement = tmp_path / "other"
        replacement.write_bytes(b"eif")
        os.chmod(replacement, 0o600)
        os.replace(replacement, tmp)
    assert target.read_bytes() == b"eif"
    assert _mode(target) == 0o644


def test_move_is_given_temporary_and_target(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    def move(src: str, dest: str) -> None:
        calls.append((src, dest))
        os.replace(src, dest)

    write_atomic(str(tmp_path / "f"), b"x", move=move)
    assert len(calls) == 1 and calls[0][1] == str(tmp_path / "f")
    assert os.path.dirname(calls[0][0]) == str(tmp_path)


def test_missing_directory_is_an_error_unless_asked_to_create(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "f", b"x")
    write_atomic(tmp_path / "made" / "f", b"x", dir_mode=0o700)
    assert (tmp_path / "made" / "f").read_bytes() == b"x"
    assert _mode(tmp_path / "made") == 0o700
