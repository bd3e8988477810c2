"""Watching the enclave process without asking nitro-cli: a pidfd (Linux 5.3+) becomes readable when it exits.

nitro-cli's `describe-enclaves` is a process per call (hundreds of ms of CPU for the emulator's Python);
asked every few seconds on every host it is what idle hosts spend their CPU on. Every enclave has an
enclave process (its `ProcessID`: nitro-cli's daemonized child, or the emulator's
`nitro_emulator.enclave_process`) that lives exactly as long as the enclave, so the supervisor waits on
that process instead and asks nitro-cli only when it exits, when an input changed, and now and then as a
fallback. Where no pidfd can be had (another OS, an older kernel, a PID from another namespace), nothing
is watched and the caller polls as before.
"""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

# What an enclave process runs as: nitro-cli itself (it forks the enclave process) or the emulator's.
_ENCLAVE_PROCESS_MARKS = ("nitro_emulator.enclave_process",)
_ENCLAVE_PROCESS_NAMES = ("nitro-cli",)


def is_enclave_process(pid: int) -> bool:
    """Whether ``pid`` runs an enclave process (not a recycled or foreign PID that describe reported)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return os.path.basename(argv[0]) in _ENCLAVE_PROCESS_NAMES or any(mark in argv for mark in _ENCLAVE_PROCESS_MARKS)


class ProcessWatch:
    """A pidfd on one enclave process (or none)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.pid: int | None = None

    @property
    def active(self) -> bool:
        return self._fd is not None

    def watch(self, pid: object) -> bool:
        """Watch ``pid`` (the record's ProcessID) from now on; False when it cannot be watched."""
        if isinstance(pid, int) and pid == self.pid and self._fd is not None and not self.exited():
            return True
        self.close()
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not hasattr(os, "pidfd_open"):
            return False
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already, or not visible from here
            return False
        # Checked after opening: the fd pins this very process, so a PID recycled later cannot fool it.
        if not is_enclave_process(pid):
            os.close(fd)
            return False
        self._fd, self.pid = fd, pid
        return True

    def exited(self) -> bool:
        """True when the watched process has exited (False when nothing is watched)."""
        return self._fd is not None and bool(select.select([self._fd], [], [], 0)[0])

    def wait(self, seconds: float, stopping: threading.Event) -> bool:
        """Sleeps up to ``seconds`` (less once ``stopping`` is set, when nothing is watched); True as soon as
        the watched process exits."""
        if self._fd is None:
            stopping.wait(seconds)
            return False
        return bool(select.select([self._fd], [], [], seconds)[0])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self.pid = None
