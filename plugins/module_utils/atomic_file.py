"""Atomic file replacement, the one writer the modules, the emulator and the parent-side services share.

A temporary file is created next to the target (same file system, so the final rename is atomic), filled,
flushed to disk, given its mode and renamed over the target: readers see the old content or the new one,
never half, and a failure at any step leaves the old file untouched and no temporary file behind.
Ansible modules pass ``move=module.atomic_move`` (it keeps an existing file's owner, mode and SELinux
context, as Ansible users expect); everything else uses ``os.replace``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

Move = Callable[[str, str], Any]


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    mode: int = 0o644,
    *,
    move: Move = os.replace,
    suffix: str = "",
) -> Iterator[str]:
    """A new empty temporary file beside ``path`` (mode 0600 while it is filled) for the block to fill,
    by itself or through another program; when the block succeeds it gets ``mode`` and replaces ``path``.
    On any exception (SystemExit from ``fail_json`` included) it is removed and ``path`` stays as it was."""
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        # After the block: a program that filled tmp may have replaced it with a file of another mode.
        os.chmod(tmp, mode)
        move(tmp, target)
    finally:
        if os.path.lexists(tmp):  # only when filling or moving failed
            os.unlink(tmp)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes | str,
    mode: int = 0o644,
    *,
    move: Move = os.replace,
    dir_mode: int | None = None,
) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8), durably (fsync before the rename).

    ``dir_mode``: create missing parent directories with that mode; without it a missing directory is an
    error (FileNotFoundError) rather than a silently created tree."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if dir_mode is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", mode=dir_mode, exist_ok=True)
    with atomic_path(path, mode, move=move) as tmp, open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
