"""Long-running parent services (enclave-supervisor, the gateway) pick up upgraded tools by themselves.

The nitro_cli role re-installs the tools' venv from a new wheelhouse and, once pip is done, renames a
new install record (``<venv>/.wheelhouse.sha256``) into place. A service watching that file re-executes
itself (same PID, same command line, so systemd or the restart loop keep tracking it) instead of running
old code next to new files. The enclave supervisor adopts the running enclave afterwards: no relaunch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

INSTALL_RECORD = ".wheelhouse.sha256"


def file_key(path: Path | str | None) -> tuple[int, int, int] | None:
    """Identity of a file's content for change detection: (inode, mtime, size); None when it is missing."""
    try:
        stat = Path(path).stat() if path else None
    except OSError:
        return None
    return None if stat is None else (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def default_stamp() -> Path | None:
    """The install record of the venv this process runs from (None outside a venv)."""
    return Path(sys.prefix) / INSTALL_RECORD if sys.prefix != sys.base_prefix else None


@dataclass
class UpgradeWatch:
    """Tells whether the stamp file changed since this process started (None: never)."""

    path: Path | None
    _at_start: tuple[int, int, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._at_start = file_key(self.path)

    def key(self) -> tuple[int, int, int] | None:
        return file_key(self.path)

    def changed(self) -> bool:
        return self.path is not None and self.key() != self._at_start


def reexec() -> NoReturn:
    """Replace this process with a fresh start of the same command line."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)  # noqa: S606 - this very process, its own argv
