"""Emulator state shared by CLI invocations: locations, the emulated driver's slot table, the lock.

Real nitro-cli keeps per-enclave state in the enclave process and the kernel driver keeps the slot table
(CPUs, memory, CIDs). The emulator keeps that driver table in ``<sockets dir>/.driver.json`` under an
exclusive flock, so concurrent ``run-enclave`` calls never hand out the same CID, CPU or memory. A slot
belongs to a live enclave process (pid + its start time, so a recycled pid never counts); slots of dead
processes are pruned, together with their sockets and vsock directories, whenever the table is read.

Locations follow the project contract and can be moved with environment variables (tests use temp dirs):
``NITRO_CLI_SOCKETS_PATH``, ``NITRO_VSOCK_DIR``, ``NITRO_EMULATOR_HOME``, ``NITRO_ALLOCATOR_CONFIG``,
``NITRO_EMULATOR_CACHE`` (unpacked images) and ``NITRO_EMULATOR_SYSFS_ROOT`` (a fake ``sys/``+``proc/``
tree standing in for the host topology).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.atomic_file import write_atomic
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_pool import EMULATOR_POOL_FILE

DEFAULT_SOCKETS_DIR = "/run/nitro_enclaves"
DEFAULT_VSOCK_DIR = "/run/nitro_enclaves/vsock"
DEFAULT_HOME = "/var/lib/nitro-emulator"
DEFAULT_ALLOCATOR_CONFIG = "/etc/nitro_enclaves/allocator.yaml"
DRIVER_FILE = ".driver.json"
LOCK_FILE = ".driver.lock"
PARENT_CID = 3
# nitro-cli's default when /sys/devices/virtual/dmi/id/board_asset_tag is absent.
DEFAULT_INSTANCE_ID = "i-0000000000000000"
BOARD_ASSET_TAG = "/sys/devices/virtual/dmi/id/board_asset_tag"


def sockets_dir() -> Path:
    return Path(os.environ.get("NITRO_CLI_SOCKETS_PATH") or DEFAULT_SOCKETS_DIR)


def vsock_dir() -> Path:
    return Path(os.environ.get("NITRO_VSOCK_DIR") or DEFAULT_VSOCK_DIR)


def emulator_home() -> Path:
    return Path(os.environ.get("NITRO_EMULATOR_HOME") or DEFAULT_HOME)


def allocator_config_path() -> Path:
    return Path(os.environ.get("NITRO_ALLOCATOR_CONFIG") or DEFAULT_ALLOCATOR_CONFIG)


def sysfs_root() -> str:
    return os.environ.get("NITRO_EMULATOR_SYSFS_ROOT") or "/"


def rootfs_cache_dir() -> Path:
    """Unpacked images (see isolation.rootfs_cache); ``NITRO_EMULATOR_CACHE`` lets emulated hosts share it."""
    return Path(os.environ.get("NITRO_EMULATOR_CACHE") or emulator_home() / "rootfs-cache")


def allocator_state_path() -> Path:
    # The nitro_enclave module reads the same record (plugins/module_utils/enclave_pool.py) to check an enclave fits.
    return emulator_home() / EMULATOR_POOL_FILE


def instance_id() -> str:
    """The enclave ID prefix: the DMI board asset tag (the EC2 instance id) like nitro-cli, else its default.

    ``NITRO_EMULATOR_INSTANCE_ID`` overrides it, so container "hosts" can look like distinct instances.
    """
    override = os.environ.get("NITRO_EMULATOR_INSTANCE_ID")
    if override:
        return "".join(override.split())
    try:
        text = Path(BOARD_ASSET_TAG).read_text(encoding="ascii", errors="replace")
    except OSError:
        return DEFAULT_INSTANCE_ID
    tag = "".join(text.split())
    # Non-EC2 machines (KVM, laptops) carry empty or arbitrary tags; nitro-cli would print them as is,
    # but an ID that does not look like an instance id only confuses PCR4 and the logs.
    return tag if tag.startswith("i-") else DEFAULT_INSTANCE_ID


DEFAULT_INSTANCE_ROLE_ARN = "arn:aws:iam::123456789012:role/enclave-parent"


def instance_role_arn() -> str | None:
    """The IAM role of the emulated host's instance profile, which a real NSM measures into PCR3.

    ``NITRO_EMULATOR_INSTANCE_ROLE_ARN`` sets it (empty: an instance without a role, PCR3 zero); the
    default is the role ``playbooks/provision.yml`` creates, in the local endpoint's account, i.e. the
    principal the local KMS maps ``local-instance-role`` credentials to (local_aws/README.md).
    """
    value = os.environ.get("NITRO_EMULATOR_INSTANCE_ROLE_ARN", DEFAULT_INSTANCE_ROLE_ARN)
    return "".join(value.split()) or None


def host_pcrs() -> dict[int, bytes]:
    """What the parent instance contributes to every enclave's PCRs: PCR3 (role ARN), PCR4 (instance id)."""
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import (
        pcr3_from_role_arn,
        pcr4_from_instance_id,
    )

    pcrs = {4: bytes.fromhex(pcr4_from_instance_id(instance_id()))}
    role = instance_role_arn()
    if role:
        pcrs[3] = bytes.fromhex(pcr3_from_role_arn(role))
    return pcrs


def socket_path(slot_uid: str) -> Path:
    return sockets_dir() / f"{slot_uid}.sock"


def slot_of(enclave_id: str) -> str:
    """nitro-cli names the socket after the text following the last ``-enc``."""
    return enclave_id.rsplit("-enc", 1)[-1]


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); None when the process is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 else None


@dataclass
class Slot:
    """One enclave as the emulated driver sees it."""

    slot_uid: str
    enclave_id: str
    enclave_name: str
    pid: int
    pid_start: str
    cid: int
    cpu_ids: list[int]
    memory_mib: int
    flags: int
    state_dir: str
    extra: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        return process_start_time(self.pid) == self.pid_start


class DriverTable:
    """The slot table; use only inside :func:`locked`."""

    def __init__(self, path: Path, slots: dict[str, Slot]) -> None:
        self.path = path
        self.slots = slots

    @property
    def live(self) -> list[Slot]:
        return list(self.slots.values())

    def used_cpus(self) -> set[int]:
        return {cpu for slot in self.slots.values() for cpu in slot.cpu_ids}

    def used_memory_mib(self) -> int:
        return sum(slot.memory_mib for slot in self.slots.values())

    def used_cids(self) -> set[int]:
        return {slot.cid for slot in self.slots.values()}

    def names(self) -> set[str]:
        return {slot.enclave_name for slot in self.slots.values()}

    def add(self, slot: Slot) -> None:
        self.slots[slot.slot_uid] = slot
        self.save()

    def remove(self, slot_uid: str) -> None:
        if self.slots.pop(slot_uid, None) is not None:
            self.save()

    def save(self) -> None:
        data = {uid: asdict(slot) for uid, slot in sorted(self.slots.items())}
        write_atomic(self.path, json.dumps(data, indent=2) + "\n")


def ensure_dir(path: Path, mode: int = 0o775) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


def remove_slot_files(slot: Slot) -> None:
    """What a dead enclave process leaves behind: its socket, state dir and vsock directory."""
    with contextlib.suppress(FileNotFoundError):
        socket_path(slot.slot_uid).unlink()
    shutil.rmtree(slot.state_dir, ignore_errors=True)
    cid_dir = vsock_dir() / str(slot.cid)
    if cid_dir.is_dir() and not cid_dir.is_symlink():
        shutil.rmtree(cid_dir, ignore_errors=True)
    cgroup = slot.extra.get("cgroup")
    if cgroup:
        from .isolation import remove_cgroup

        # Empty once the kernel has reaped the enclave's tasks (they die with their enclave process).
        remove_cgroup(Path(cgroup), timeout=2.0)


def _load(path: Path) -> dict[str, Slot]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        # A torn or foreign file: start over rather than wedge every later command.
        return {}
    slots: dict[str, Slot] = {}
    if isinstance(raw, dict):
        for uid, entry in raw.items():
            with contextlib.suppress(TypeError, KeyError):
                slots[uid] = Slot(**entry)
    return slots


@contextlib.contextmanager
def locked(prune: bool = True) -> Iterator[DriverTable]:
    """Exclusive access to the driver table; dead slots are pruned (and their files removed) first."""
    base = ensure_dir(sockets_dir())
    with open(base / LOCK_FILE, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            path = base / DRIVER_FILE
            table = DriverTable(path, _load(path))
            if prune:
                dead = [slot for slot in table.slots.values() if not slot.alive()]
                for slot in dead:
                    remove_slot_files(slot)
                    del table.slots[slot.slot_uid]
                if dead:
                    table.save()
            yield table
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json_atomic(path: Path, data: Any, mode: int = 0o644) -> None:
    ensure_dir(path.parent, 0o755)
    write_atomic(path, json.dumps(data, indent=2) + "\n", mode)
