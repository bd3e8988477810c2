"""The Nitro Enclaves pool the allocator applied (not merely configured), and whether an enclave fits.

Where the pool lives: on a Nitro host the driver's ``ne_cpus`` parameter and the reserved hugepages
(sysfs); on an emulated host the emulated allocator's record (``$NITRO_EMULATOR_HOME/allocator.json``,
written by ``nitro-cli-emulator allocator apply``). The nitro_enclave module checks a new run
configuration against it before writing, so a change the driver would refuse (E22/E26/E27) never
replaces the configuration of a healthy enclave. Stdlib only (runs on hosts).
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from .allocator import MAX_CONFIG_BYTES, MAX_CPU_ID, CpuListError, format_cpu_list, parse_cpu_list, read_sysfs

NE_CPUS = "sys/module/nitro_enclaves/parameters/ne_cpus"
HUGEPAGES_DIR = "sys/kernel/mm/hugepages"
# The emulated allocator's record (nitro_emulator.state.allocator_state_path): the emulator's ne_cpus.
EMULATOR_HOME_ENV = "NITRO_EMULATOR_HOME"
DEFAULT_EMULATOR_HOME = "/var/lib/nitro-emulator"
EMULATOR_POOL_FILE = "allocator.json"


def read_ne_cpus(sysfs_root: str = "/") -> str:
    """The Nitro driver's CPU pool (``ne_cpus``), "" until the allocator ran or without the driver."""
    try:
        return read_sysfs(sysfs_root, NE_CPUS)
    except OSError:
        return ""


def emulator_pool_path(home: str | None = None) -> str:
    return os.path.join(home or os.environ.get(EMULATOR_HOME_ENV) or DEFAULT_EMULATOR_HOME, EMULATOR_POOL_FILE)


@dataclass(frozen=True)
class EnclavePool:
    """What the allocator reserved (applied, not merely configured) and where that was read."""

    cpus: tuple[int, ...]
    memory_mib: int | None  # None: not known (no hugepage counters)
    source: str

    def describe(self) -> str:
        memory = "" if self.memory_mib is None else f", {self.memory_mib} MiB"
        return f"cpu_pool {format_cpu_list(self.cpus)}{memory}, from {self.source}"


def _hugepages_mib(sysfs_root: str) -> int | None:
    """Every hugepage size's reserved pages (the allocator takes 1 GiB and 2 MiB pages)."""
    total_kib = 0
    found = False
    for directory in glob.glob(os.path.join(sysfs_root, HUGEPAGES_DIR, "hugepages-*kB")):
        size = re.fullmatch(r"hugepages-(\d{1,9})kB", os.path.basename(directory))
        try:
            pages = read_sysfs(directory, "nr_hugepages")
        except OSError:
            continue
        if size and pages.isdigit():
            found = True
            total_kib += int(size.group(1)) * int(pages)
    return total_kib // 1024 if found else None


def read_applied_pool(emulated: bool, sysfs_root: str = "/", emulator_home: str | None = None) -> EnclavePool | None:
    """The pool enclaves launch from now; None when none is applied or it cannot be read (no check then)."""
    if not emulated:
        text = read_ne_cpus(sysfs_root)
        try:
            cpus = parse_cpu_list(text) if text else []
        except CpuListError:
            return None
        source = os.path.join(sysfs_root, NE_CPUS)
        return EnclavePool(tuple(cpus), _hugepages_mib(sysfs_root), source) if cpus else None
    path = emulator_pool_path(emulator_home)
    try:
        with open(path, "rb") as handle:
            record = json.loads(handle.read(MAX_CONFIG_BYTES))
        cpus = sorted({int(cpu) for cpu in record["cpu_pool"]})
        memory = int(record["memory_mib"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not cpus or min(cpus) < 0 or max(cpus) > MAX_CPU_ID:
        return None
    return EnclavePool(tuple(cpus), memory, path)


def _holders(others: list[dict[str, Any]], wanted: set[int]) -> str:
    names = [f"{r.get('EnclaveName')} ({r.get('EnclaveID')})" for r in others if wanted & _cpus_of(r)]
    return ", ".join(names)


def _cpus_of(record: dict[str, Any]) -> set[int]:
    cpus = record.get("CPUIDs")
    return {cpu for cpu in cpus if isinstance(cpu, int)} if isinstance(cpus, list) else set()


def enclave_pool_problems(
    pool: EnclavePool,
    *,
    cpu_count: int | None,
    cpu_ids: list[int] | None,
    memory_mib: int,
    enclave_cid: int | None,
    others: list[dict[str, Any]],
) -> list[str]:
    """Why an enclave with these resources cannot launch from `pool` next to `others` (describe-enclaves
    records of the enclaves that keep running); [] when it fits. Each message names the value and the pool."""
    problems: list[str] = []
    held = set().union(*(_cpus_of(r) for r in others)) if others else set()
    free = [cpu for cpu in pool.cpus if cpu not in held]
    pool_text = pool.describe()
    if cpu_ids is not None:
        outside = sorted(set(cpu_ids) - set(pool.cpus))
        taken = sorted(set(cpu_ids) & held)
        if outside:
            problems.append(
                f"cpu_ids {sorted(cpu_ids)}: CPU(s) {format_cpu_list(outside)} not in the allocator's pool "
                f"({pool_text}); use CPUs of the pool or change the allocator's cpu_pool (nitro_allocator_cpu_pool)"
            )
        if taken:
            problems.append(
                f"cpu_ids {sorted(cpu_ids)}: CPU(s) {format_cpu_list(taken)} held by running enclave(s) "
                f"{_holders(others, set(taken))}"
            )
    elif cpu_count is not None and cpu_count > len(free):
        plural = "" if len(pool.cpus) == 1 else "s"
        busy = f", {len(pool.cpus) - len(free)} held by {_holders(others, held)}" if len(free) < len(pool.cpus) else ""
        problems.append(
            f"cpu_count {cpu_count}: the allocator's pool has {len(pool.cpus)} CPU{plural} ({pool_text}){busy}; "
            "raise the allocator's cpu_count (nitro_allocator_cpu_count) or lower cpu_count (nitro_enclave_cpu_count)"
        )
    if pool.memory_mib is not None:
        used = sum(r.get("MemoryMiB") or 0 for r in others if isinstance(r.get("MemoryMiB"), int))
        need = memory_mib + memory_mib % 2  # hugepages come in 2 MiB pages
        if need > pool.memory_mib - used:
            busy = f", {used} MiB held by running enclave(s)" if used else ""
            problems.append(
                f"memory_mib {memory_mib}: the allocator's pool has {pool.memory_mib} MiB ({pool_text}){busy}; "
                "raise the allocator's memory (nitro_allocator_min_memory_mib) or lower memory_mib "
                "(nitro_enclave_memory_mib)"
            )
    if enclave_cid is not None:
        clash = [r for r in others if r.get("EnclaveCID") == enclave_cid]
        if clash:
            problems.append(
                f"enclave_cid {enclave_cid} is used by running enclave {clash[0].get('EnclaveName')} "
                f"({clash[0].get('EnclaveID')}); choose another CID (nitro_enclave_cid)"
            )
    return problems
