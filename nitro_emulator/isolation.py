"""Run an EIF's application the way an enclave would, on a host without Nitro hardware.

The enclave process starts ``unshare --fork --kill-child --pid --mount --net --ipc --uts -- python -m
nitro_emulator.isolation SPEC`` (see :func:`command`). This module's ``main`` then runs as PID 1 of the
new namespaces and plays the enclave's ``init``:

- the rootfs lives in a tmpfs sized to the enclave memory, mounted in the private mount namespace only:
  nothing persists and the host never sees it; it vanishes with the namespace;
- the customer ramdisk(s) of the EIF are unpacked there (``rootfs/``, ``cmd``, ``env``, like nitro-cli
  builds them), then ``/proc`` (of the new PID namespace), a read-only ``/sys``, a minimal ``/dev`` and
  only these host paths are mounted: ``$NITRO_VSOCK_DIR/<cid>`` and ``$NITRO_VSOCK_DIR/3`` at
  ``/run/vsock/<cid>`` and ``/run/vsock/3``, and the enclave's NSM socket at ``/run/nsm.sock``;
- the network namespace has the loopback interface only (brought up), no route to anything;
- ``pivot_root`` into the rootfs and the old root is detached, so not even PID 1 can reach host files;
- the application (``cmd`` with ``env`` plus ``NITRO_VSOCK_DIR=/run/vsock``, ``NITRO_ENCLAVE_CID``,
  ``NITRO_NSM_SOCKET=/run/nsm.sock``) runs without a terminal, stdin on /dev/null, output on the console,
  and without the capabilities that could undo the above (mount, mknod, raw I/O, modules, ...);
- PID 1 reaps orphans and exits with the application, which ends the enclave (as on Nitro).

CPU affinity and the memory cgroup are applied by the enclave process before exec (:func:`preexec`), so
every process of the enclave inherits them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import platform
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_MOVE = 0x2000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
HEARTBEAT = b"\xb7"  # the byte a Nitro enclave's init sends to CID 3:9000 once booted
# pivot_root has no glibc wrapper.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41}
# Capabilities the application must not keep: each could reach outside the sandbox (mounts, devices,
# open_by_handle_at, kernel modules, chroot, raw I/O, clock, reboot, MAC/audit policy, BPF/perf).
DROPPED_CAPS = (2, 9, 16, 17, 18, 20, 21, 22, 25, 26, 27, 30, 32, 33, 34, 36, 38, 39, 40)
CONSOLE_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}
ENCLAVE_VSOCK_DIR = "/run/vsock"
ENCLAVE_NSM_SOCKET = "/run/nsm.sock"
CACHE_KEEP = 4
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_libc = ctypes.CDLL(None, use_errno=True)
_START = time.monotonic()


class IsolationError(RuntimeError):
    """The sandbox could not be built; the message says which step failed."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise IsolationError(f"{what}: {os.strerror(code)}")


def mount(source: str, target: str | Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    fs = fstype.encode() if fstype else None
    options = data.encode() if data else None
    result = _libc.mount(source.encode(), str(target).encode(), fs, flags, options)
    _check(result, f"mount {source} on {target}")


def umount(target: str | Path, flags: int = 0) -> None:
    _check(_libc.umount2(str(target).encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = SYS_PIVOT_ROOT.get(platform.machine().lower())
    if number is None:
        raise IsolationError(f"pivot_root: unsupported architecture {platform.machine()}")
    if _libc.syscall(number, new_root.encode(), put_old.encode()) != 0:
        code = ctypes.get_errno()
        if code == errno.EPERM:
            raise PermissionError(code, "pivot_root")
        raise IsolationError(f"pivot_root: {os.strerror(code)}")


def enter_root(root: Path) -> None:
    """Make `root` the filesystem root of this mount namespace. pivot_root detaches the host's tree;
    where a seccomp profile refuses pivot_root (Docker's default one does), do what switch_root does:
    move the new root over / and chroot into it. The host's tree is then hidden under it, and the
    application cannot chroot back out (CAP_SYS_CHROOT is among the dropped capabilities)."""
    os.chdir(root)
    try:
        pivot_root(".", ".")
        umount(".", MNT_DETACH)
    except PermissionError:
        mount(".", "/", None, MS_MOVE)
        os.chroot(".")
    os.chdir("/")


def prctl(option: int, arg: int) -> int:
    return _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0)


def drop_capabilities() -> None:
    for cap in DROPPED_CAPS:
        if prctl(PR_CAPBSET_DROP, cap) != 0 and ctypes.get_errno() != errno.EINVAL:  # EINVAL: unknown cap
            raise IsolationError(f"cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")


def loopback_up() -> bool:
    """Bring `lo` up in the new network namespace (the only interface an enclave gets). Returns False
    when the host denies it (a container without CAP_NET_ADMIN): the enclave then has no interface up
    at all, which keeps it just as isolated; only apps that talk to themselves over 127.0.0.1 notice."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request)[:18])[1]
        try:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
        except PermissionError:
            return False
    return True


# --------------------------------------------------------------------------------------------- host side


def host_cpus(cpu_ids: list[int]) -> list[int]:
    """CPUs to pin to: the enclave's own where this host has them (an emulated topology may name more
    CPUs than exist), else whatever the emulator itself may use."""
    allowed = os.sched_getaffinity(0)
    chosen = sorted(cpu for cpu in cpu_ids if cpu in allowed)
    return chosen or sorted(allowed)


def _own_cgroup(controller: str | None) -> str:
    """This process's cgroup path in the v1 hierarchy of `controller` (None: the v2 unified one)."""
    for line in Path("/proc/self/cgroup").read_text(encoding="ascii").splitlines():
        _hier, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller and controller in controllers.split(",")):
            return path
    raise IsolationError("no cgroup entry")


def create_cgroup(name: str, memory_mib: int) -> Path | None:
    """A memory cgroup limiting the whole enclave (tmpfs rootfs included) to its memory; None when the
    host gives us no writable cgroup (then :func:`preexec` falls back to RLIMIT_AS)."""
    limit = str(memory_mib << 20)
    base = Path("/sys/fs/cgroup")
    candidates: list[tuple[Path, str, list[Path]]] = []
    with contextlib.suppress(OSError, IsolationError):
        if (base / "memory").is_dir():  # cgroup v1: nest under our own memory cgroup
            parent = base / "memory" / _own_cgroup("memory").lstrip("/")
            candidates.append((parent / name, "memory.limit_in_bytes", []))
        elif (base / "cgroup.controllers").exists():  # cgroup v2 at the root of the hierarchy
            parent = base / "nitro-enclaves"
            candidates.append((parent / name, "memory.max", [base, parent]))
    for path, limit_file, enable in candidates:
        try:
            for level in enable:
                level.mkdir(exist_ok=True)
                (level / "cgroup.subtree_control").write_text("+memory", encoding="ascii")
            path.mkdir(exist_ok=True)
            (path / limit_file).write_text(limit, encoding="ascii")
            for swap in ("memory.memsw.limit_in_bytes", "memory.swap.max"):
                with contextlib.suppress(OSError):
                    (path / swap).write_text(limit if "memsw" in swap else "0", encoding="ascii")
            return path
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
    return None


def remove_cgroup(path: Path | None, timeout: float = 5.0) -> None:
    if path is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            # Busy until the kernel has reaped the last task of the enclave.
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


def preexec(cgroup: Path | None, cpus: list[int], memory_mib: int) -> Callable[[], None]:
    """Runs in the forked child before exec of `unshare`: die with the enclave process (as the enclave
    dies with its fd), join the memory cgroup, pin the CPUs."""

    def apply() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()), encoding="ascii")
        else:
            import resource

            # Address space is a coarse stand-in for RAM: allow mappings beyond the enclave memory.
            limit = max(memory_mib << 20, 64 << 20) * 4
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.sched_setaffinity(0, cpus)

    return apply


def rootfs_cache(image: Any, source: str, base: Path) -> Path | None:
    """The EIF's customer ramdisks unpacked under ``base`` (0700, root only) for the image's second and
    later boots, keyed by PCR0 (which covers every ramdisk byte); None when the enclave should unpack
    the EIF itself.

    A first boot only records the image (``<PCR0>.seen``): unpacking straight into the enclave's tmpfs
    is cheaper than unpacking to disk and copying, and most images boot once per host (a rollout). A
    relaunch of the same image then fills the cache, and later boots copy instead of inflating.

    Only the image's own content is kept there; what an enclave writes lives in its private tmpfs and
    is gone when it stops. The newest CACHE_KEEP images are kept. None too when the cache is unusable.
    ``source`` is where to read the measured EIF's bytes (its path, or /proc/self/fd/N).
    """
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import EifError, ramdisk_windows

    from .cpio import extract_ramdisk_windows

    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(base, 0o700)
        with open(base / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            target = base / image.pcrs["PCR0"]
            seen = base / f"{target.name}.seen"
            if not target.is_dir() and not seen.exists():
                seen.touch()
                _prune_cache(base, keep={seen})
                return None
            if not target.is_dir():
                tmp = base / f".unpacking-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    extract_ramdisk_windows(source, ramdisk_windows(image), tmp, preserve_owner=True)
                    os.rename(tmp, target)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            os.utime(target)
            seen.touch()
            _prune_cache(base, keep={seen, target})
            return target
    except (OSError, EifError):
        return None


def _prune_cache(base: Path, keep: set[Path]) -> None:
    """Drops all but the CACHE_KEEP most recently booted images (unpacked trees and first-boot marks)."""
    marks = list(base.glob("*.seen"))
    trees = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for group in (marks, trees):
        for old in sorted(group, key=lambda p: p.stat().st_mtime, reverse=True)[CACHE_KEEP:]:
            if old in keep:
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def command(spec_path: Path) -> list[str]:
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    return [
        unshare,
        "--fork",
        "--kill-child",
        "--pid",
        "--mount",
        "--net",
        "--ipc",
        "--uts",
        "--propagation",
        "private",
        "--",
        sys.executable,
        "-m",
        "nitro_emulator.isolation",
        str(spec_path),
    ]


# --------------------------------------------------------------------------------------------- inside


def _log(message: str) -> None:
    # Kernel-log style lines on the console; `nitro-cli console` users grep for some of them.
    sys.stdout.write(f"[{time.monotonic() - _START:12.6f}] {message}\n")
    sys.stdout.flush()


def _inside(root: Path, relative: str) -> Path:
    """`root/relative`, refusing image symlinks that would lead the mount elsewhere."""
    target = root / relative.lstrip("/")
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(target)
    if resolved != real_root and not resolved.startswith(real_root + os.sep):
        raise IsolationError(f"/{relative.lstrip('/')} in the image points outside the rootfs")
    return target


def _mkdirs(root: Path, relative: str, mode: int = 0o755) -> Path:
    target = _inside(root, relative)
    target.mkdir(parents=True, exist_ok=True, mode=mode)
    return _inside(root, relative)


def _bind(source: str | Path, root: Path, relative: str, is_file: bool = False) -> None:
    if is_file:
        parent = _mkdirs(root, str(Path(relative).parent))
        target = parent / Path(relative).name
        if not target.exists():
            target.touch(mode=0o600)
    else:
        target = _mkdirs(root, relative)
    mount(str(source), target, None, MS_BIND)


def _setup_dev(root: Path) -> None:
    dev = _mkdirs(root, "dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=256k")
    for name, (major, minor) in CONSOLE_DEVICES.items():
        os.mknod(dev / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)  # noqa: S103 - /dev/null & co. are world-writable everywhere
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
        os.symlink(target, dev / name)
    os.symlink("/proc/self/fd/1", dev / "stdout")
    os.symlink("/proc/self/fd/2", dev / "stderr")
    (dev / "shm").mkdir(mode=0o1777)
    mount("tmpfs", dev / "shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise IsolationError(f"Could not open /{what} file: {exc.strerror}") from None


def build(spec: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Everything up to and including pivot_root; returns the command and environment to run."""
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import EifError

    from .cpio import extract_ramdisk_windows

    work = Path(spec["workdir"])
    cid = int(spec["cid"])
    mount("tmpfs", work, "tmpfs", 0, f"size={int(spec['memory_mib'])}m,mode=0755")
    _log("Unpacking initramfs...")
    cache = spec.get("rootfs_cache")
    try:
        if cache:
            # The image unpacked by an earlier boot (see rootfs_cache); copying it costs about half of
            # inflating the ramdisk again, and the enclave still gets its own private tmpfs copy.
            subprocess.run(["cp", "-a", f"{cache}/.", str(work)], check=True, capture_output=True)
        else:
            # The descriptor of the EIF the enclave process measured (inherited), at the sections it found.
            windows = [(int(offset), int(size)) for offset, size in spec["ramdisks"]]
            if not windows:
                raise IsolationError("Failed to unpack initramfs: the EIF has no application ramdisk")
            extract_ramdisk_windows(f"/proc/self/fd/{int(spec['eif_fd'])}", windows, work, preserve_owner=True)
    except subprocess.CalledProcessError as exc:
        raise IsolationError(f"Failed to unpack initramfs: {exc.stderr.decode(errors='replace')}") from None
    except (EifError, OSError) as exc:
        raise IsolationError(f"Failed to unpack initramfs: {exc}") from None
    cmd = [line for line in _read_lines(work / "cmd", "cmd") if line]
    env_lines = _read_lines(work / "env", "env")
    if not cmd:
        raise IsolationError("The /cmd file is empty")
    root = work / "rootfs"
    if not root.is_dir() or root.is_symlink():
        raise IsolationError("The image has no rootfs/ directory")
    # pivot_root needs the new root to be a mount point.
    mount(str(root), root, None, MS_BIND | MS_REC)
    for name in ("proc", "sys", "run", "tmp"):
        _mkdirs(root, name)
    mount("proc", _inside(root, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", _inside(root, "sys"), "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _setup_dev(root)
    _bind(Path(spec["vsock_dir"]) / str(cid), root, f"{ENCLAVE_VSOCK_DIR}/{cid}")
    _bind(Path(spec["vsock_dir"]) / "3", root, f"{ENCLAVE_VSOCK_DIR}/3")
    _bind(spec["nsm_socket"], root, ENCLAVE_NSM_SOCKET, is_file=True)
    socket.sethostname(spec.get("hostname") or "enclave")
    if not loopback_up():
        _log("init: lo stays down: the host denies CAP_NET_ADMIN (no interface is up in the enclave)")
    enter_root(root)

    env: dict[str, str] = {}
    for line in env_lines:
        key, sep, value = line.partition("=")
        if sep and key:
            env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env["NITRO_VSOCK_DIR"] = ENCLAVE_VSOCK_DIR
    env["NITRO_ENCLAVE_CID"] = str(cid)
    env["NITRO_NSM_SOCKET"] = ENCLAVE_NSM_SOCKET
    return cmd, env


def _run_application(cmd: list[str], env: dict[str, str]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            drop_capabilities()
            os.execvpe(cmd[0], cmd, env)  # noqa: S606 - the image's own command, as its init would
        except BaseException as exc:  # report anything on the console, never return
            with contextlib.suppress(BaseException):
                sys.stderr.write(f"Failed to execute {cmd[0]}: {exc}\n")
                sys.stderr.flush()
        os._exit(127)
    return pid


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    ready_fd = int(spec["ready_fd"])
    try:
        _log(f"nitro-cli-emulator: booting enclave {spec.get('enclave_id', '')} (CID {spec['cid']})")
        cmd, env = build(spec)
    except (IsolationError, OSError) as exc:
        _log(f"init: {exc}")
        os.write(ready_fd, b"E" + str(exc).encode("utf-8", "replace")[:4000])
        return 1
    _log(f"init: starting {' '.join(cmd)}")
    child = _run_application(cmd, env)
    os.write(ready_fd, HEARTBEAT)
    os.close(ready_fd)
    code = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            break
    _log(f"init: application exited with status {code}; shutting down the enclave")
    return code if 0 <= code < 256 else 128 + (-code & 0x7F)


if __name__ == "__main__":
    sys.exit(main())
