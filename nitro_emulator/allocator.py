"""The emulated ``nitro-enclaves-allocator`` service: ``nitro-cli-emulator allocator apply|show``.

``apply`` does what the real service does on a Nitro host, minus the kernel: parse allocator.yaml with
the real line parser's rules (shared with the nitro_allocator module: ``plugins/module_utils/allocator.py``),
refuse while enclaves run (the real service cannot re-online CPUs then), validate the request against
the host topology, pick the CPU pool the same way (``cpu_count`` → full cores of one NUMA node, CPU 0's
core excluded) and record it in ``$NITRO_EMULATOR_HOME/allocator.json``: the emulator's equivalent of
``ne_cpus`` plus the reserved hugepages. ``run-enclave`` enforces that record.

Messages and exit codes follow the service: ``Error: <msg>`` on stderr and exit 1 on any failure; on
success ``Successfully allocated Nitro Enclaves resources: ...`` on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.allocator import (
    AllocatorConfigError,
    HostTopology,
    format_cpu_list,
    parse_allocator_yaml,
    read_config_text,
    validate,
)

from . import state
from .errors import NitroCliError

HUGEPAGE_MIB = 2  # the smallest hugepage size the real allocator rounds to
RUNNING_ENCLAVES = (
    "Could not re-online CPUs because there is at least one enclave currently running. Make sure you stop "
    "all enclaves prior to re-starting the nitro-enclaves-allocator.service."
)


def round_to_pages(memory_mib: int) -> int:
    """Hugepage memory comes in 2 MiB pages: requests round up, like the real allocator and driver."""
    return -(-memory_mib // HUGEPAGE_MIB) * HUGEPAGE_MIB


def _fail(message: str) -> int:
    sys.stderr.write(f"Error: {message}\n")
    return 1


def compute_pool(text: str, path: str, topology: HostTopology) -> dict[str, Any]:
    """The record `apply` writes, or AllocatorConfigError naming the first broken rule."""
    config = parse_allocator_yaml(text, path)
    problems = validate(config, topology)
    if problems:
        raise AllocatorConfigError("; ".join(problems))
    if config.cpu_count is not None:
        pool = topology.auto_pool(config.cpu_count)
        if pool is None:  # validate() already checks this; kept for a clear message if rules drift
            raise AllocatorConfigError(
                "Failed to find suitable CPUs for the Nitro Enclaves CPU pool after checking all NUMA nodes."
            )
    else:
        pool = sorted(config.cpu_pool or ())
    return {
        "memory_mib": round_to_pages(config.memory_mib),
        "requested_memory_mib": config.memory_mib,
        "mode": "cpu_count" if config.cpu_count is not None else "cpu_pool",
        "cpu_pool": pool,
        "cores": topology.cores(pool),
        "numa_node": topology.node_of.get(pool[0], 0) if pool else 0,
        "config": path,
    }


def allocator_apply(args: argparse.Namespace) -> int:
    path = state.allocator_config_path()
    try:
        text = read_config_text(str(path))
    except AllocatorConfigError as exc:
        return _fail(str(exc))
    if text is None:
        return _fail(f"Could not read {path}: No such file or directory")
    try:
        topology = HostTopology.from_sysfs(state.sysfs_root())
    except (OSError, ValueError) as exc:
        return _fail(f"Could not read the host CPU topology: {exc}")
    with state.locked() as table:
        if table.live:
            return _fail(RUNNING_ENCLAVES)
        try:
            record = compute_pool(text, str(path), topology)
        except AllocatorConfigError as exc:
            return _fail(str(exc))
        record["applied_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        state.write_json_atomic(state.allocator_state_path(), record)
    pool_text = ",".join(str(cpu) for cpu in record["cpu_pool"])
    if record["mode"] == "cpu_count":
        print(f"Auto-generated the enclave CPU pool: {pool_text}")
        cpus = f"{len(record['cpu_pool'])} CPUs"
    else:
        cpus = f"CPU pool: {format_cpu_list(record['cpu_pool'])}"
    print(f"Successfully allocated Nitro Enclaves resources: {record['requested_memory_mib']} MiB, {cpus}")
    return 0


def load_pool() -> dict[str, Any]:
    """The recorded pool for run-enclave; missing means the driver has no ne_cpus file yet (E19)."""
    path = state.allocator_state_path()
    try:
        record = state.read_json(path)
        pool = [int(cpu) for cpu in record["cpu_pool"]]
        memory = int(record["memory_mib"])
        cores = [[int(cpu) for cpu in core] for core in record.get("cores") or [[cpu] for cpu in pool]]
    except FileNotFoundError:
        raise NitroCliError(19, path, "Open") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise NitroCliError(19, path, "Read") from None
    return {"cpu_pool": pool, "memory_mib": memory, "cores": cores}


def allocator_show(args: argparse.Namespace) -> int:
    path = state.allocator_state_path()
    try:
        record = state.read_json(path)
    except FileNotFoundError:
        return _fail(f"No CPU pool has been allocated yet ({path} is missing): run `allocator apply`")
    except (OSError, ValueError) as exc:
        return _fail(f"Could not read {path}: {exc}")
    with state.locked() as table:
        used_cpus = sorted(table.used_cpus())
        used_memory = table.used_memory_mib()
        enclaves = len(table.live)
    out = {
        "memory_mib": record.get("memory_mib"),
        "requested_memory_mib": record.get("requested_memory_mib"),
        "mode": record.get("mode"),
        "cpu_pool": format_cpu_list(record.get("cpu_pool") or []),
        "cpu_ids": record.get("cpu_pool"),
        "config": record.get("config"),
        "applied_at": record.get("applied_at"),
        "enclaves": enclaves,
        "used_cpu_ids": used_cpus,
        "used_memory_mib": used_memory,
    }
    print(json.dumps(out, indent=2))
    return 0
