"""plugins/module_utils/allocator.py: the real service's line parser, rendering, cpu-lists, sysfs topology and
the host validation rules (each failure names its rule)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.allocator import (
    AllocatorConfig,
    AllocatorConfigError,
    CpuListError,
    HostTopology,
    format_cpu_list,
    parse_allocator_yaml,
    parse_cpu_list,
    parse_raw,
    read_config_text,
    render_allocator_yaml,
    validate,
)
from hypothesis import given
from hypothesis import strategies as st
from nitro_fakes import make_sysfs

# What the RPM ships as /etc/nitro_enclaves/allocator.yaml (reference §7), comments included.
SHIPPED = """---
# Enclave configuration file.
#
# How much memory to allocate for enclaves (in MiB).
memory_mib: 512
#
# How many CPUs to reserve for enclaves.
cpu_count: 2
#
# Alternatively, the exact CPUs to be reserved for the enclave can be explicitly
# configured by using `cpu_pool` (like below), instead of `cpu_count`.
# Note: cpu_count and cpu_pool conflict with each other. Only use exactly one of them.
# Example of reserving CPUs 2, 3, and 6 through 9:
# cpu_pool: 2,3,6-9
"""


# ---------------------------------------------------------------------------------------------
# cpu lists


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("2", [2]), ("2,3,6-9", [2, 3, 6, 7, 8, 9]), (" 1 , 3-4 ", [1, 3, 4]), ("5-5", [5]), ("3,1,3", [1, 3])],
)
def test_parse_cpu_list(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "  ", "a", "1,,2", "3-1", "1-", "-2", "1;2", "0x1"])
def test_parse_cpu_list_rejects(text: str) -> None:
    with pytest.raises(CpuListError):
        parse_cpu_list(text)


def test_parse_cpu_list_bounds_ranges_before_expanding() -> None:
    # Would be a billion-element set if the range were expanded before its bound is checked.
    with pytest.raises(CpuListError, match=r"'0-1000000000' names CPU 1000000000, above the highest CPU 7 on it"):
        parse_cpu_list("0-1000000000", 7, " on it")
    with pytest.raises(CpuListError, match="above the highest CPU 8191"):
        parse_cpu_list("1-99999999999")  # the kernel's limit when no host is given
    with pytest.raises(CpuListError, match="longer than 65536"):
        parse_cpu_list("1," * 40000)
    assert parse_cpu_list("0-7,0-7,3", 7) == list(range(8))


def test_config_text_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_bytes(b"---\nmemory_mib: 512\ncpu_count: \xff2\n")
    with pytest.raises(AllocatorConfigError, match=rf"{path} is not UTF-8 text: byte 0xff at offset 31"):
        read_config_text(str(path))
    assert read_config_text(str(tmp_path / "absent.yaml")) is None
    path.write_bytes(b"---\ncpu_pool: 0-1000000000\nmemory_mib: 512\n")
    with pytest.raises(AllocatorConfigError, match=r"The CPU pool value \(0-1000000000\) is invalid: .*8191"):
        parse_allocator_yaml(path.read_text(), str(path))


def test_format_cpu_list() -> None:
    assert format_cpu_list([9, 2, 3, 6, 7, 8]) == "2-3,6-9"
    assert format_cpu_list([0]) == "0"
    assert format_cpu_list([1, 3, 5]) == "1,3,5"
    assert format_cpu_list([]) == ""


@given(st.sets(st.integers(min_value=0, max_value=600), min_size=1))
def test_cpu_list_round_trip(cpus: set[int]) -> None:
    assert parse_cpu_list(format_cpu_list(cpus)) == sorted(cpus)


# ---------------------------------------------------------------------------------------------
# allocator.yaml parser (the service's rules)


def test_shipped_file_parses() -> None:
    assert parse_allocator_yaml(SHIPPED) == AllocatorConfig(memory_mib=512, cpu_count=2)


def test_lines_before_the_document_start_are_ignored() -> None:
    text = "memory_mib: 1\nbogus: x\n---\nmemory_mib: 128\ncpu_pool: 2-3\n"
    assert parse_allocator_yaml(text) == AllocatorConfig(memory_mib=128, cpu_pool=(2, 3))


def test_without_document_start_nothing_is_read() -> None:
    with pytest.raises(AllocatorConfigError, match=r"missing memory reservation \(`memory_mib`\)"):
        parse_allocator_yaml("memory_mib: 512\ncpu_count: 2\n")


def test_unknown_key_names_file_and_line() -> None:
    with pytest.raises(AllocatorConfigError) as exc:
        parse_allocator_yaml("---\nmemory_mib: 512\ncpus: 2\n", "/etc/nitro_enclaves/allocator.yaml")
    assert str(exc.value) == "Error in /etc/nitro_enclaves/allocator.yaml:3 - unexpected: cpus"


def test_blank_line_after_start_is_an_unexpected_empty_key() -> None:
    with pytest.raises(AllocatorConfigError, match=r":2 - unexpected: $"):
        parse_allocator_yaml("---\n\nmemory_mib: 512\ncpu_count: 2\n", "f")


def test_missing_value() -> None:
    with pytest.raises(AllocatorConfigError, match=r"f:2 - missing value for memory_mib"):
        parse_allocator_yaml("---\nmemory_mib:\ncpu_count: 2\n", "f")


def test_quotes_indentation_and_last_colon() -> None:
    raw = parse_raw('---\n  memory_mib:   "256"  \ncpu_pool: "2,3"\n')
    assert raw == {"memory_mib": "256", "cpu_pool": "2,3"}
    # The value is what follows the LAST colon (sed s/^.+://).
    assert parse_raw("---\nmemory_mib: 5:12\n") == {"memory_mib": "12"}


def test_final_line_without_newline_is_not_read() -> None:
    with pytest.raises(AllocatorConfigError, match="missing CPU reservation"):
        parse_allocator_yaml("---\nmemory_mib: 512\ncpu_count: 2")


def test_later_value_wins() -> None:
    assert parse_allocator_yaml("---\nmemory_mib: 1\nmemory_mib: 96\ncpu_count: 2\n").memory_mib == 96


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("---\ncpu_count: 2\n", "Config error: missing memory reservation (`memory_mib`)."),
        ("---\nmemory_mib: 512\n", "Config error: missing CPU reservation (either `cpu_count` or `cpu_pool`)."),
        ("---\nmemory_mib: 512\ncpu_count: 2\ncpu_pool: 2,3\n", "Config error: `cpu_count` conflicts with `cpu_pool`."),
        (
            "---\nmemory_mib: 512 # half a GiB\ncpu_count: 2\n",
            "The needed memory amount (512 # half a GiB) is invalid.",
        ),
        ("---\nmemory_mib: 512\ncpu_count: two\n", "The CPU count value (two) is invalid."),
    ],
)
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(AllocatorConfigError) as exc:
        parse_allocator_yaml(text)
    assert str(exc.value) == message


def test_bad_cpu_pool() -> None:
    with pytest.raises(AllocatorConfigError, match=r"CPU pool value \(2-x\) is invalid"):
        parse_allocator_yaml("---\nmemory_mib: 512\ncpu_pool: 2-x\n")


def test_config_needs_exactly_one_cpu_setting() -> None:
    with pytest.raises(AllocatorConfigError):
        AllocatorConfig(memory_mib=512)
    with pytest.raises(AllocatorConfigError):
        AllocatorConfig(memory_mib=512, cpu_count=2, cpu_pool=(2, 3))


def test_render_shape() -> None:
    text = render_allocator_yaml(AllocatorConfig(memory_mib=1024, cpu_pool=(2, 3, 6, 7, 8, 9)), header="hello")
    lines = text.splitlines()
    assert lines[0] == "---"
    assert text.endswith("\n")
    assert "" not in lines  # a blank line after --- breaks the real parser
    keys = [line.split(":")[0] for line in lines[1:] if not line.startswith("#")]
    assert keys == ["memory_mib", "cpu_pool"]
    assert "cpu_pool: 2-3,6-9" in lines


@given(
    memory=st.integers(min_value=0, max_value=10**7),
    count=st.one_of(st.none(), st.integers(min_value=0, max_value=512)),
    pool=st.sets(st.integers(min_value=0, max_value=255), min_size=1),
    header=st.text(
        alphabet=st.characters(
            blacklist_categories=("Cs",), blacklist_characters="\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
        ),
        max_size=40,
    ),
)
def test_render_parse_round_trip(memory: int, count: int | None, pool: set[int], header: str) -> None:
    config = (
        AllocatorConfig(memory_mib=memory, cpu_count=count)
        if count is not None
        else AllocatorConfig(memory_mib=memory, cpu_pool=tuple(sorted(pool)))
    )
    assert parse_allocator_yaml(render_allocator_yaml(config, header=header)) == config


# ---------------------------------------------------------------------------------------------
# topology from sysfs


def test_topology_smt_one_node(tmp_path: Path) -> None:
    topo = HostTopology.from_sysfs(str(make_sysfs(tmp_path, cpus=8, threads=2, mem_available_mib=4000, hugepages=256)))
    assert topo.online == list(range(8))
    assert topo.threads_per_core == 2
    assert topo.parent_cpus == [0, 4]
    assert topo.nodes == {0: list(range(8))}
    assert topo.mem_available_mib == 4000
    assert topo.hugepages_mib == 512
    assert topo.memory_capacity_mib == 4512
    assert topo.cores(list(range(8))) == [[1, 5], [2, 6], [3, 7]]
    assert topo.auto_pool(4) == [1, 2, 5, 6]


def test_topology_two_nodes(tmp_path: Path) -> None:
    topo = HostTopology.from_sysfs(str(make_sysfs(tmp_path, cpus=16, threads=2, nodes=2)))
    assert topo.nodes == {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}
    assert topo.node_of[12] == 1
    # Node 0 offers 3 cores besides CPU 0's: 8 CPUs must come from node 1.
    assert topo.auto_pool(6) == [1, 2, 3, 9, 10, 11]
    assert topo.auto_pool(8) == [4, 5, 6, 7, 12, 13, 14, 15]


def test_topology_without_numa_dirs_and_with_offline_cpus(tmp_path: Path) -> None:
    topo = HostTopology.from_sysfs(str(make_sysfs(tmp_path, cpus=4, threads=1, node_dirs=False, offline=(3,))))
    assert topo.online == [0, 1, 2]
    assert topo.nodes == {0: [0, 1, 2]}
    assert topo.threads_per_core == 1
    assert topo.parent_cpus == [0]


def test_topology_missing_tree(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        HostTopology.from_sysfs(str(tmp_path))


def test_this_host_topology_reads() -> None:
    topo = HostTopology.from_sysfs("/")
    assert 0 in topo.online and topo.threads_per_core >= 1 and topo.mem_available_mib > 0


# ---------------------------------------------------------------------------------------------
# validation rules


@pytest.fixture
def smt8(tmp_path: Path) -> HostTopology:
    return HostTopology.from_sysfs(str(make_sysfs(tmp_path, cpus=8, threads=2, mem_available_mib=8192)))


@pytest.fixture
def numa16(tmp_path: Path) -> HostTopology:
    return HostTopology.from_sysfs(str(make_sysfs(tmp_path, cpus=16, threads=2, nodes=2, mem_available_mib=8192)))


def _pool(text: str, memory: int = 512) -> AllocatorConfig:
    return AllocatorConfig(memory_mib=memory, cpu_pool=tuple(parse_cpu_list(text)))


def test_valid_configs(smt8: HostTopology) -> None:
    assert validate(AllocatorConfig(memory_mib=512, cpu_count=2), smt8) == []
    assert validate(AllocatorConfig(memory_mib=8192, cpu_count=6), smt8) == []
    assert validate(_pool("1,5"), smt8) == []
    assert validate(_pool("1-3,5-7"), smt8) == []


def test_cpu_count_zero(smt8: HostTopology) -> None:
    assert validate(AllocatorConfig(memory_mib=512, cpu_count=0), smt8) == ["cpu_count 0 must be greater than 0"]


def test_cpu_count_above_what_the_parent_leaves(smt8: HostTopology) -> None:
    (problem,) = validate(AllocatorConfig(memory_mib=512, cpu_count=8), smt8)
    assert "cpu_count 8 is more than the 6 CPU(s) available" in problem
    assert "CPU(s) 0,4 (CPU 0 and its siblings), which the parent instance keeps" in problem


def test_cpu_count_not_multiple_of_threads(smt8: HostTopology) -> None:
    (problem,) = validate(AllocatorConfig(memory_mib=512, cpu_count=3), smt8)
    assert problem == "cpu_count 3 is not a multiple of 2 (threads per core): enclaves get full cores only"


def test_cpu_count_must_fit_one_numa_node(numa16: HostTopology) -> None:
    assert validate(AllocatorConfig(memory_mib=512, cpu_count=8), numa16) == []
    (problem,) = validate(AllocatorConfig(memory_mib=512, cpu_count=10), numa16)
    assert "needs 10 CPUs in full cores on one NUMA node; the most any node offers is 8" in problem


def test_pool_with_cpu_0(smt8: HostTopology, tmp_path: Path) -> None:
    no_smt = HostTopology.from_sysfs(str(make_sysfs(tmp_path / "nosmt", cpus=4, threads=1)))
    assert validate(_pool("0,1"), no_smt) == ["cpu_pool 0-1 includes CPU 0, which the parent instance keeps"]
    problems = validate(_pool("0,4"), smt8)
    assert "cpu_pool 0,4 includes CPU 0, which the parent instance keeps" in problems
    assert any("CPU(s) 4, sibling(s) of CPU 0" in p for p in problems)


def test_pool_with_sibling_of_cpu_0(smt8: HostTopology) -> None:
    problems = validate(_pool("4"), smt8)
    assert "cpu_pool 4 includes CPU(s) 4, sibling(s) of CPU 0, which the parent instance keeps" in problems


def test_pool_partial_core(smt8: HostTopology) -> None:
    problems = validate(_pool("1,2,5"), smt8)
    assert "cpu_pool 1-2,5 leaves out sibling CPU(s) 6 of its cores: the pool must hold full cores" in problems
    # Three CPUs with two threads per core also break the multiple rule.
    assert len(problems) == 2


def test_pool_offline_cpu(smt8: HostTopology) -> None:
    problems = validate(_pool("1,5,9,13"), smt8)
    assert "cpu_pool 1,5,9,13 names CPU(s) 9,13, which are not online (online: 0-7)" in problems


def test_pool_odd_count_with_smt(smt8: HostTopology) -> None:
    assert any("not a multiple of 2 (threads per core)" in p for p in validate(_pool("1"), smt8))


def test_pool_spanning_numa_nodes(numa16: HostTopology) -> None:
    problems = validate(_pool("1,9,4,12"), numa16)
    assert problems == ["cpu_pool 1,4,9,12 spans NUMA nodes 0, 1: all CPUs must be on one node"]


def test_memory_minimum(smt8: HostTopology) -> None:
    (problem,) = validate(AllocatorConfig(memory_mib=32, cpu_count=2), smt8)
    assert problem == "memory_mib 32 is below the 64 MiB an enclave needs at least"


def test_memory_above_capacity(tmp_path: Path) -> None:
    topo = HostTopology.from_sysfs(str(make_sysfs(tmp_path, mem_available_mib=1000, hugepages=512)))
    assert validate(AllocatorConfig(memory_mib=2024, cpu_count=2), topo) == []
    (problem,) = validate(AllocatorConfig(memory_mib=2025, cpu_count=2), topo)
    assert problem.startswith("memory_mib 2025 is more than the host can give: 2024 MiB")


def test_several_problems_reported_together(smt8: HostTopology) -> None:
    problems = validate(_pool("0,1", memory=10), smt8)
    assert len(problems) >= 3
