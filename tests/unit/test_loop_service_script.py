"""roles/supervised_service/files/loop-service.sh: the logrotate configuration it keeps beside the launcher
(written, left alone when equal, repaired, removed; nothing touched in check mode). The service itself is
stopped (no pid file), so start-stop-daemon only answers --status."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "roles" / "supervised_service" / "files" / "loop-service.sh"
TEXT = "# Ansible managed\n/var/log/x.log {\n    daily\n}\n"

pytestmark = pytest.mark.skipif(
    shutil.which("start-stop-daemon") is None or os.geteuid() != 0,
    reason="needs start-stop-daemon and root (the script chowns to root), as on the hosts",
)


def run(tmp_path: Path, text: str, check_mode: bool = False, state: str = "stopped") -> str:
    argv = ["sh", str(SCRIPT), state, str(tmp_path / "launcher"), str(tmp_path / "pid"), str(check_mode),
            str(tmp_path / "logrotate.d" / "svc"), text]  # fmt: skip
    done = subprocess.run(argv, input="#!/bin/sh\n", capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_written_then_unchanged_then_repaired_then_removed(tmp_path: Path) -> None:
    conf = tmp_path / "logrotate.d" / "svc"
    assert run(tmp_path, TEXT, check_mode=True).endswith("logrotate=changed")
    assert not conf.exists()
    assert run(tmp_path, TEXT) == "launcher=changed service=unchanged logrotate=changed"
    assert conf.read_text() == TEXT and stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert run(tmp_path, TEXT) == "launcher=unchanged service=unchanged logrotate=unchanged"
    conf.chmod(0o600)
    assert run(tmp_path, TEXT).endswith("logrotate=changed")
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    conf.write_text("other\n")
    assert run(tmp_path, TEXT).endswith("logrotate=changed") and conf.read_text() == TEXT
    assert run(tmp_path, "", check_mode=True).endswith("logrotate=changed") and conf.exists()
    assert run(tmp_path, "").endswith("logrotate=changed") and not conf.exists()
    assert run(tmp_path, "").endswith("logrotate=unchanged")
    assert sorted(p.name for p in conf.parent.iterdir()) == []  # no temporary file left behind
