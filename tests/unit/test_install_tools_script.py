"""roles/nitro_cli/files/install-tools.sh without pip: the paths where the venv is already current.

The install itself (unpack, venv, pip) runs in `make site`, the nitro_cli molecule scenario and CI's
clean machines; here: an unchanged archive does nothing, a missing nitro-cli link is repaired on its
own, and check mode only reports.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "roles" / "nitro_cli" / "files" / "install-tools.sh"


@pytest.fixture
def installed(tmp_path: Path) -> dict[str, Path]:
    """A venv recorded as installed from archive.tar (no real Python in it)."""
    archive = tmp_path / "wheelhouse.tar"
    archive.write_bytes(b"wheels")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "nitro-cli-emulator"):
        (venv / "bin" / name).write_text("#!/bin/sh\n")
        (venv / "bin" / name).chmod(0o755)
    (venv / ".wheelhouse.sha256").write_text(hashlib.sha256(b"wheels").hexdigest() + "\n")
    return {"archive": archive, "venv": venv, "link": tmp_path / "nitro-cli"}


def run(paths: dict[str, Path], check_mode: bool = False, link: bool = True) -> str:
    args = [str(paths["archive"]), str(paths["venv"]), "p.whl", "gateway", "/usr/bin/python3", str(check_mode)]
    proc = subprocess.run(
        ["/bin/sh", str(SCRIPT), *args, str(paths["link"]) if link else ""],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def test_a_current_venv_and_link_change_nothing(installed: dict[str, Path]) -> None:
    installed["link"].symlink_to(installed["venv"] / "bin" / "nitro-cli-emulator")
    assert run(installed) == "unchanged"
    assert run(installed, link=False) == "unchanged"


def test_a_missing_link_is_repaired_without_reinstalling(installed: dict[str, Path]) -> None:
    assert run(installed, check_mode=True) == "would change"
    assert not installed["link"].is_symlink(), "check mode must not link"
    assert run(installed) == "changed"
    assert installed["link"].readlink() == installed["venv"] / "bin" / "nitro-cli-emulator"
    assert run(installed) == "unchanged"


def test_a_changed_archive_is_reported_in_check_mode(installed: dict[str, Path]) -> None:
    installed["archive"].write_bytes(b"new wheels")
    assert run(installed, check_mode=True) == "would change"
    assert (installed["venv"] / ".wheelhouse.sha256").read_text().strip() == hashlib.sha256(b"wheels").hexdigest()
    installed["archive"].unlink()  # check mode before the copy: the archive is not there yet
    assert run(installed, check_mode=True) == "would change"
