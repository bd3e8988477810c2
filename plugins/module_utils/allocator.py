"""allocator.yaml (the nitro-enclaves-allocator service config) and the host rules it must obey.

Stdlib only: the nitro_allocator module runs it on hosts, and the emulator's allocator service
imports it by the same name (``...plugins.module_utils.allocator``) so both parse and validate the same way.

The parser follows the real service's line parser (aws-nitro-enclaves-cli
``bootstrap/nitro-enclaves-allocator`` ``parse_config``), not YAML: anything before a line that is
exactly ``---`` is ignored, comment lines are skipped, the key is the leading ``[-_a-z0-9]`` run
before the first ``:``, the value is what follows the *last* ``:`` with the first whitespace run and
surrounding double quotes removed. A blank line after ``---`` is an "unexpected" key there (bash
``read`` + an empty associative-array subscript), and a last line without a newline is never read,
so the renderer emits neither.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Any

# The driver's smallest enclave (NE_MIN_ENCLAVE_MEM_SIZE): a smaller pool is useless.
from .enclave_spec import MIN_MEMORY_MIB

DEFAULT_CONFIG_PATH = "/etc/nitro_enclaves/allocator.yaml"
KNOWN_KEYS = ("memory_mib", "cpu_count", "cpu_pool")
# allocator.yaml is a few lines; anything this large is not one (and is not read whole).
MAX_CONFIG_BYTES = 1 << 20
# The driver's ne_cpus parameter is at most 512 characters.
MAX_CPU_POOL_CHARS = 512
# The kernel's largest NR_CPUS (CONFIG_MAXSMP): no host has a CPU id above this, so no list expands past it.
MAX_CPU_ID = 8191
# A sysfs cpu-list of every CPU of the largest kernel is well under this; longer text is refused unparsed.
MAX_CPU_LIST_CHARS = 65536


class AllocatorConfigError(ValueError):
    """allocator.yaml text the real allocator service would reject; the message is the service's."""


class CpuListError(ValueError):
    """A kernel cpu-list string (``2,3,6-9``) that does not parse."""


@dataclass(frozen=True)
class AllocatorConfig:
    """The effective allocator settings: memory plus exactly one of a CPU count or an explicit pool."""

    memory_mib: int
    cpu_count: int | None = None
    cpu_pool: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.cpu_count is None) == (self.cpu_pool is None):
            raise AllocatorConfigError("exactly one of cpu_count or cpu_pool must be set")

    def as_dict(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {"memory_mib": self.memory_mib}
        if self.cpu_count is not None:
            out["cpu_count"] = self.cpu_count
        else:
            out["cpu_pool"] = format_cpu_list(self.cpu_pool or ())
        return out


# ---------------------------------------------------------------------------------------------
# cpu-list syntax (kernel bitmap list format, as in ne_cpus and sysfs *list files)


def parse_cpu_list(text: str, max_cpu: int = MAX_CPU_ID, hint: str = "") -> list[int]:
    """``"2,3,6-9"`` -> ``[2, 3, 6, 7, 8, 9]`` (sorted, unique). Raises CpuListError.

    Ranges stay ranges until every bound is checked against `max_cpu` (the host's highest CPU, or the
    kernel's limit), so ``0-1000000000`` is refused without expanding it. `hint` ends that message
    (e.g. the host's online CPUs)."""
    stripped = text.strip()
    if not stripped:
        raise CpuListError("empty CPU list")
    if len(stripped) > MAX_CPU_LIST_CHARS:
        raise CpuListError(f"CPU list of {len(stripped)} characters is longer than {MAX_CPU_LIST_CHARS}")
    ranges: list[tuple[int, int]] = []
    for part in stripped.split(","):
        item = part.strip()
        match = re.fullmatch(r"(\d{1,12})(?:-(\d{1,12}))?", item)
        if not match:
            raise CpuListError(f"'{item[:40]}' in '{stripped[:80]}' is not a CPU number or range like 6-9")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise CpuListError(f"range '{item}' in '{stripped[:80]}' ends before it starts")
        if end > max_cpu:
            raise CpuListError(f"'{item}' names CPU {end}, above the highest CPU {max_cpu}{hint}")
        ranges.append((start, end))
    cpus: set[int] = set()
    for start, end in ranges:  # each bounded by max_cpu, so the set is too
        cpus.update(range(start, end + 1))
    return sorted(cpus)


def format_cpu_list(cpus: list[int] | tuple[int, ...] | set[int]) -> str:
    """``[2, 3, 6, 7, 8, 9]`` -> ``"2-3,6-9"`` (the kernel's own list format)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        start = end = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == end + 1:
            index += 1
            end = ordered[index]
        parts.append(str(start) if start == end else f"{start}-{end}")
        index += 1
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------
# allocator.yaml parse / render


def parse_raw(text: str, path: str = DEFAULT_CONFIG_PATH) -> dict[str, str]:
    """The raw key -> value strings exactly as the service's line parser sees them."""
    values: dict[str, str] = {}
    started = False
    # The element after the last newline is either "" or a final line without a newline, which
    # `while read line` never hands to the loop body: drop it in both cases.
    lines = text.split("\n")[:-1]
    for number, raw in enumerate(lines, start=1):
        line = raw.strip(" \t")
        if re.match(r"\s*#", line):
            continue
        if line == "---":
            started = True
            continue
        if not started:
            continue
        key_match = re.match(r"[-_a-zA-Z0-9]+", line.split(":", 1)[0])
        key = key_match.group(0) if key_match else ""
        if key not in KNOWN_KEYS:
            raise AllocatorConfigError(f"Error in {path}:{number} - unexpected: {key}")
        value = re.sub(r"^.+:", "", line)
        value = re.sub(r'\s+"?', "", value, count=1)
        value = re.sub(r'"?$', "", value, count=1)
        if not value:
            raise AllocatorConfigError(f"Error in {path}:{number} - missing value for {key}")
        values[key] = value
    return values


def read_config_text(path: str) -> str | None:
    """allocator.yaml's text, None when absent; AllocatorConfigError naming the file when it is not text.

    Read as bytes and decoded here so a stray byte is reported with its offset, not as a traceback."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AllocatorConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AllocatorConfigError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not an allocator config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AllocatorConfigError(
            f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason}); "
            "fix or remove the file"
        ) from None


def parse_allocator_yaml(text: str, path: str = DEFAULT_CONFIG_PATH) -> AllocatorConfig:
    """Parse allocator.yaml like the real service; raise AllocatorConfigError with its message."""
    values = parse_raw(text, path)
    if not values.get("memory_mib"):
        raise AllocatorConfigError("Config error: missing memory reservation (`memory_mib`).")
    if not values.get("cpu_count") and not values.get("cpu_pool"):
        raise AllocatorConfigError("Config error: missing CPU reservation (either `cpu_count` or `cpu_pool`).")
    if values.get("cpu_count") and values.get("cpu_pool"):
        raise AllocatorConfigError("Config error: `cpu_count` conflicts with `cpu_pool`.")
    memory = values["memory_mib"]
    if not re.fullmatch(r"[0-9]{1,18}", memory):
        raise AllocatorConfigError(f"The needed memory amount ({memory}) is invalid.")
    if "cpu_count" in values:
        count = values["cpu_count"]
        if not re.fullmatch(r"[0-9]{1,18}", count):
            raise AllocatorConfigError(f"The CPU count value ({count}) is invalid.")
        return AllocatorConfig(memory_mib=int(memory), cpu_count=int(count))
    try:
        pool = parse_cpu_list(values["cpu_pool"])
    except CpuListError as exc:
        raise AllocatorConfigError(f"The CPU pool value ({values['cpu_pool']}) is invalid: {exc}.") from exc
    return AllocatorConfig(memory_mib=int(memory), cpu_pool=tuple(pool))


def render_allocator_yaml(config: AllocatorConfig, header: str | None = None) -> str:
    """Text the real line parser accepts: ``---`` first, comments, known keys only, final newline."""
    lines = ["---"]
    if header:
        lines.extend(f"# {line}".rstrip() for line in header.splitlines())
    lines.append("# How much memory to allocate for enclaves (in MiB).")
    lines.append(f"memory_mib: {config.memory_mib}")
    if config.cpu_count is not None:
        lines.append("# How many CPUs to reserve for enclaves (full cores, never CPU 0's core).")
        lines.append(f"cpu_count: {config.cpu_count}")
    else:
        lines.append("# Exactly which CPUs to reserve for enclaves.")
        lines.append(f"cpu_pool: {format_cpu_list(config.cpu_pool or ())}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Host topology (sysfs + meminfo; `root` lets tests point at a fake tree)


def read_sysfs(root: str, relative: str) -> str:
    # Bytes, bounded: a sysfs file is short ASCII; anything else then fails to parse as a CPU list.
    with open(os.path.join(root, relative.lstrip("/")), "rb") as handle:
        return handle.read(MAX_CPU_LIST_CHARS + 1).decode("ascii", errors="replace").strip()


@dataclass
class HostTopology:
    online: list[int]
    siblings: dict[int, list[int]]  # CPU -> its thread group (itself included)
    nodes: dict[int, list[int]]  # NUMA node -> online CPUs on it
    mem_available_mib: int
    hugepages_mib: int = 0  # currently reserved hugepages (the allocator frees them before re-reserving)
    mem_total_mib: int = 0
    node_of: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_sysfs(cls, root: str = "/") -> HostTopology:
        online = parse_cpu_list(read_sysfs(root, "sys/devices/system/cpu/online"))
        siblings: dict[int, list[int]] = {}
        for cpu in online:
            try:
                siblings_file = f"sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
                group = parse_cpu_list(read_sysfs(root, siblings_file))
            except (OSError, CpuListError):
                group = [cpu]
            siblings[cpu] = [c for c in group if c in online] or [cpu]
        nodes: dict[int, list[int]] = {}
        node_dirs = glob.glob(os.path.join(root, "sys/devices/system/node/node[0-9]*"))
        for node_dir in sorted(node_dirs, key=lambda d: int(os.path.basename(d)[4:])):
            node = int(os.path.basename(node_dir)[4:])
            try:
                text = read_sysfs(node_dir, "cpulist")
            except OSError:
                continue
            cpus = [c for c in parse_cpu_list(text) if c in online] if text else []
            if cpus:
                nodes[node] = cpus
        if not nodes:
            # Kernels without NUMA expose no node directories: one node holds everything.
            nodes = {0: list(online)}
        meminfo = _meminfo(root)
        huge_kib = meminfo.get("HugePages_Total", 0) * meminfo.get("Hugepagesize", 0)
        return cls(
            online=online,
            siblings=siblings,
            nodes=nodes,
            mem_available_mib=meminfo.get("MemAvailable", meminfo.get("MemFree", 0)) // 1024,
            hugepages_mib=huge_kib // 1024,
            mem_total_mib=meminfo.get("MemTotal", 0) // 1024,
        )

    def __post_init__(self) -> None:
        if not self.node_of:
            self.node_of = {cpu: node for node, cpus in self.nodes.items() for cpu in cpus}

    @property
    def threads_per_core(self) -> int:
        return max((len(group) for group in self.siblings.values()), default=1)

    @property
    def parent_cpus(self) -> list[int]:
        """CPU 0 and its hyper-thread siblings: the parent instance always keeps them."""
        return sorted(self.siblings.get(0, [0]))

    @property
    def memory_capacity_mib(self) -> int:
        """What a re-run of the allocator can reserve: free memory plus the hugepages it releases."""
        return self.mem_available_mib + self.hugepages_mib

    def cores(self, cpus: list[int]) -> list[list[int]]:
        """Full cores among `cpus`, in ascending order of their first CPU, CPU 0's core excluded."""
        seen: set[int] = set()
        out: list[list[int]] = []
        keep = set(self.parent_cpus)
        for cpu in sorted(cpus):
            if cpu in seen or cpu in keep:
                continue
            group = sorted(self.siblings.get(cpu, [cpu]))
            seen.update(group)
            if all(c in cpus for c in group) and not keep.intersection(group):
                out.append(group)
        return out

    def auto_pool(self, count: int) -> list[int] | None:
        """The pool the real allocator picks for `cpu_count`: the first NUMA node offering enough
        full cores (CPU 0's excluded), its lowest cores first. None when no node can."""
        for node in sorted(self.nodes):
            pool: list[int] = []
            for core in self.cores(self.nodes[node]):
                if len(pool) >= count:
                    break
                pool.extend(core)
            if len(pool) == count:
                return sorted(pool)
        return None


def topology_facts(topology: HostTopology) -> dict[str, Any]:
    """The host's CPU/memory topology as the modules return it (cpu-list strings)."""
    return {
        "online": format_cpu_list(topology.online),
        "parent_cpus": format_cpu_list(topology.parent_cpus),
        "threads_per_core": topology.threads_per_core,
        "numa_nodes": {str(node): format_cpu_list(cpus) for node, cpus in topology.nodes.items()},
        "memory_capacity_mib": topology.memory_capacity_mib,
    }


def _meminfo(root: str) -> dict[str, int]:
    """/proc/meminfo values in kB (HugePages_* are page counts)."""
    out: dict[str, int] = {}
    try:
        text = read_sysfs(root, "proc/meminfo")
    except OSError:
        return out
    for line in text.splitlines():
        name, _sep, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name.strip()] = int(fields[0])
    return out


# ---------------------------------------------------------------------------------------------
# Validation against the host


def validate(config: AllocatorConfig, topology: HostTopology, pool_text: str | None = None) -> list[str]:
    """Every rule the config breaks on this host, each message naming the rule; [] when fine.
    `pool_text` is the cpu_pool as the user wrote it, quoted in messages instead of the normalized list."""
    problems: list[str] = []
    parent = topology.parent_cpus
    tpc = topology.threads_per_core
    online = set(topology.online)
    usable = len(online) - len([c for c in parent if c in online])

    if config.cpu_count is not None:
        count = config.cpu_count
        if count <= 0:
            problems.append(f"cpu_count {count} must be greater than 0")
        elif count > usable:
            problems.append(
                f"cpu_count {count} is more than the {usable} CPU(s) available for enclaves: "
                f"{len(online)} online minus CPU(s) {format_cpu_list(parent)} (CPU 0 and its siblings), "
                "which the parent instance keeps"
            )
        elif count % tpc:
            problems.append(
                f"cpu_count {count} is not a multiple of {tpc} (threads per core): enclaves get full cores only"
            )
        elif topology.auto_pool(count) is None:
            best = max((sum(len(c) for c in topology.cores(cpus)) for cpus in topology.nodes.values()), default=0)
            problems.append(
                f"cpu_count {count} needs {count} CPUs in full cores on one NUMA node; "
                f"the most any node offers is {best}"
            )
    else:
        pool = list(config.cpu_pool or ())
        text = pool_text.strip() if pool_text else format_cpu_list(pool)
        if not pool:
            problems.append("cpu_pool is empty")
        if len(format_cpu_list(pool)) > MAX_CPU_POOL_CHARS:
            problems.append(f"cpu_pool {text} is longer than the driver's {MAX_CPU_POOL_CHARS}-character limit")
        offline = [c for c in pool if c not in online]
        if offline:
            problems.append(
                f"cpu_pool {text} names CPU(s) {format_cpu_list(offline)}, which are not online "
                f"(online: {format_cpu_list(online)})"
            )
        if 0 in pool:
            problems.append(f"cpu_pool {text} includes CPU 0, which the parent instance keeps")
        kept_siblings = [c for c in parent if c != 0 and c in pool]
        if kept_siblings:
            problems.append(
                f"cpu_pool {text} includes CPU(s) {format_cpu_list(kept_siblings)}, sibling(s) of CPU 0, "
                "which the parent instance keeps"
            )
        partial = sorted(
            {c for cpu in pool if cpu in online for c in topology.siblings.get(cpu, [cpu]) if c not in pool}
            - set(parent)
        )
        if partial:
            problems.append(
                f"cpu_pool {text} leaves out sibling CPU(s) {format_cpu_list(partial)} of its cores: "
                "the pool must hold full cores"
            )
        if pool and len(pool) % tpc:
            problems.append(f"cpu_pool {text} has {len(pool)} CPUs, not a multiple of {tpc} (threads per core)")
        pool_nodes = sorted({topology.node_of[c] for c in pool if c in topology.node_of})
        if len(pool_nodes) > 1:
            problems.append(
                f"cpu_pool {text} spans NUMA nodes {', '.join(map(str, pool_nodes))}: all CPUs must be on one node"
            )

    if config.memory_mib < MIN_MEMORY_MIB:
        problems.append(f"memory_mib {config.memory_mib} is below the {MIN_MEMORY_MIB} MiB an enclave needs at least")
    elif config.memory_mib > topology.memory_capacity_mib:
        problems.append(
            f"memory_mib {config.memory_mib} is more than the host can give: {topology.memory_capacity_mib} MiB "
            f"({topology.mem_available_mib} MiB available + {topology.hugepages_mib} MiB already reserved)"
        )
    return problems
