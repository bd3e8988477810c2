"""Property tests over the modules' argument rules (issue 20): any input is either accepted and consistent,
or refused with a clear message naming the value; never a traceback, never unbounded time or memory.

Most properties drive the validation functions in module_utils directly (fast); a few run the real
module entry points (nitro_enclave, nitro_allocator, nitro_eif) in-process. Counts per surface are
printed in the terminal summary (fuzz_counts, conftest.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fuzz_counts
import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.allocator import (
    AllocatorConfig,
    AllocatorConfigError,
    CpuListError,
    HostTopology,
    format_cpu_list,
    parse_allocator_yaml,
    parse_cpu_list,
    read_config_text,
    validate,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_pool import (
    EnclavePool,
    enclave_pool_problems,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_spec import (
    MAX_CID,
    MAX_MEMORY_MIB,
    MAX_TIMEOUT,
    MAX_VCPUS,
    MEASUREMENT_KEYS,
    MIN_CID,
    MIN_MEMORY_MIB,
    NAME_RE,
    argument_problem,
    expected_measurements,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.kms_policy import (
    PolicyError,
    StatementSpec,
    parse_statement_spec,
)
from enclave_tokenizer.attestation import AttestationError, pcrs_from_measurements
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nitro_fakes import load_module, make_eif, make_sysfs, run_module

# A slow example is a failure (unbounded work), but the 2 shared cores make a tight deadline flaky.
FAST = settings(deadline=dt.timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def fuzz(examples: int, fixtures: bool = False) -> settings:
    checks = [HealthCheck.too_slow] + ([HealthCheck.function_scoped_fixture] if fixtures else [])
    return settings(FAST, max_examples=examples, suppress_health_check=checks)


MAX_MESSAGE = 1200  # a clear message is short; an echo of a hostile value would not be

HEX96 = st.text("0123456789abcdefABCDEF", min_size=96, max_size=96)
EDGE_INTS = st.sampled_from(
    [0, 1, 2, 3, 4, 63, 64, 447, 448, 449, MAX_MEMORY_MIB, MAX_MEMORY_MIB + 1, MAX_CID, MAX_CID + 1, 2**63, -1]
)
ANY_INT = st.one_of(EDGE_INTS, st.integers(-1000, 100_000), st.integers(-(2**80), 2**80))
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), ANY_INT, st.floats(allow_nan=True), st.text(max_size=40), HEX96),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)
MEASUREMENT_KEY = st.one_of(
    st.sampled_from([*MEASUREMENT_KEYS, "pcr0", "Pcr1", "PCR3", " PCR0", "PCR0 ", "EifSha384"]), st.text(max_size=12)
)
MEASUREMENTS = st.one_of(
    st.none(),
    st.dictionaries(MEASUREMENT_KEY, st.one_of(HEX96, st.text(max_size=100), ANY_INT, st.none()), max_size=6),
)


def _clean_message(message: Any, *names: str) -> None:
    assert isinstance(message, str) and message, message
    assert len(message) < MAX_MESSAGE, message[:200]
    assert "Traceback" not in message
    assert message.startswith(names), message


# ---------------------------------------------------------------------------------------------
# nitro_enclave's rules (plugins/module_utils/enclave_spec.py)


@st.composite
def enclave_params(draw: st.DrawFn) -> dict[str, Any]:
    ids = draw(st.one_of(st.none(), st.lists(ANY_INT, max_size=6), st.lists(st.integers(0, 500), max_size=500)))
    return {
        "name": draw(st.one_of(st.from_regex(NAME_RE, fullmatch=True), st.text(max_size=80))),
        "state": draw(st.sampled_from(["running", "absent", "restarted", "configured"])),
        "eif_path": draw(st.sampled_from(["/x.eif", None])),
        "memory_mib": draw(st.one_of(ANY_INT, st.none())),
        "cpu_count": None if ids is not None else draw(st.one_of(ANY_INT, st.none())),
        "cpu_ids": ids,
        "enclave_cid": draw(st.one_of(st.none(), ANY_INT)),
        "wait_for": draw(st.one_of(st.none(), st.fixed_dictionaries({"port": ANY_INT, "timeout": ANY_INT}))),
        "timeout": draw(ANY_INT),
        "lock_timeout": draw(ANY_INT),
        "measurements": draw(MEASUREMENTS),
    }


ENCLAVE_OPTIONS = ("name", "timeout", "lock_timeout", "measurements", "memory_mib", "cpu_count", "cpu_ids",
                   "enclave_cid", "wait_for.port", "wait_for.timeout", "eif_path", "config_path")  # fmt: skip


@fuzz(1000)
@given(params=enclave_params())
def test_enclave_argument_rules(params: dict[str, Any]) -> None:
    fuzz_counts.tried("nitro_enclave argument rules")
    problem = argument_problem(params)
    if problem is not None:
        _clean_message(problem, *ENCLAVE_OPTIONS)
    else:
        assert NAME_RE.fullmatch(params["name"])
        assert 0 <= params["timeout"] <= MAX_TIMEOUT and 0 <= params["lock_timeout"] <= MAX_TIMEOUT
        if params["state"] != "absent":
            assert params["eif_path"] is not None
            assert MIN_MEMORY_MIB <= params["memory_mib"] <= MAX_MEMORY_MIB
            if params["cpu_ids"] is None:
                assert 1 <= params["cpu_count"] <= MAX_VCPUS
            else:
                ids = params["cpu_ids"]
                assert ids and len(set(ids)) == len(ids) and all(0 <= cpu < MAX_VCPUS for cpu in ids)
            assert params["enclave_cid"] is None or MIN_CID <= params["enclave_cid"] <= MAX_CID
            given_keys = set(params["measurements"] or {})
            assert given_keys <= set(MEASUREMENT_KEYS)  # a misspelled key is never dropped silently
            kept = expected_measurements(params["measurements"])
            assert set(kept) == given_keys & {"PCR0", "PCR1", "PCR2"}
    fuzz_counts.clean("nitro_enclave argument rules")


# ---------------------------------------------------------------------------------------------
# nitro_allocator's rules (plugins/module_utils/allocator.py)

TOPOLOGY = HostTopology(
    online=list(range(8)),
    siblings={cpu: [cpu % 4, cpu % 4 + 4] for cpu in range(8)},
    nodes={0: list(range(8))},
    mem_available_mib=16384,
)
CPU_NUMBER = st.one_of(st.integers(0, 16), st.integers(0, 10**12), EDGE_INTS.map(abs)).map(str)
CPU_ITEM = st.one_of(CPU_NUMBER, st.tuples(CPU_NUMBER, CPU_NUMBER).map("-".join))
CPU_LIST_TEXT = st.one_of(
    st.lists(CPU_ITEM, min_size=1, max_size=8).map(",".join),
    st.text(alphabet="0123456789-, \tx", max_size=40),
    st.text(max_size=40),
)


@fuzz(600)
@given(text=CPU_LIST_TEXT, max_cpu=st.one_of(st.integers(0, 64), st.integers(0, 8191)))
def test_cpu_lists_are_bounded_before_expansion(text: str, max_cpu: int) -> None:
    fuzz_counts.tried("cpu-list parser")
    try:
        cpus = parse_cpu_list(text, max_cpu)
    except CpuListError as exc:
        assert len(str(exc)) < MAX_MESSAGE
    else:
        assert cpus == sorted(set(cpus)) and cpus and cpus[0] >= 0 and cpus[-1] <= max_cpu
        assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    fuzz_counts.clean("cpu-list parser")


YAML_LINE = st.one_of(
    st.just("---"),
    st.just("# comment"),
    st.tuples(st.sampled_from(["memory_mib", "cpu_count", "cpu_pool", "bogus"]), st.one_of(CPU_LIST_TEXT, CPU_NUMBER))
    .map(lambda kv: f"{kv[0]}: {kv[1]}"),
    st.text(max_size=30),
)  # fmt: skip


@fuzz(400)
@given(lines=st.lists(YAML_LINE, max_size=8), newline=st.booleans())
def test_allocator_yaml_parses_or_names_the_problem(lines: list[str], newline: bool) -> None:
    fuzz_counts.tried("allocator.yaml parser + host rules")
    text = "\n".join(lines) + ("\n" if newline else "")
    try:
        config = parse_allocator_yaml(text, "/etc/nitro_enclaves/allocator.yaml")
    except AllocatorConfigError as exc:
        assert len(str(exc)) < MAX_MESSAGE
    else:
        assert isinstance(config, AllocatorConfig) and config.memory_mib >= 0
        for problem in validate(config, TOPOLOGY):
            _clean_message(problem, "cpu_count", "cpu_pool", "memory_mib")
    fuzz_counts.clean("allocator.yaml parser + host rules")


@fuzz(200, fixtures=True)
@given(data=st.binary(max_size=300))
def test_allocator_yaml_bytes_decode_or_name_the_file(tmp_path: Path, data: bytes) -> None:
    fuzz_counts.tried("allocator.yaml bytes")
    path = tmp_path / "allocator.yaml"
    path.write_bytes(data)
    try:
        text = read_config_text(str(path))
    except AllocatorConfigError as exc:
        assert str(exc).startswith(f"{path} is not UTF-8 text: byte 0x")
    else:
        assert text is not None and text.encode("utf-8") == data
    fuzz_counts.clean("allocator.yaml bytes")


# ---------------------------------------------------------------------------------------------
# the pool check (plugins/module_utils/enclave_pool.py), with hostile describe-enclaves records

RECORD = st.dictionaries(
    st.sampled_from(["EnclaveName", "EnclaveID", "EnclaveCID", "CPUIDs", "MemoryMiB", "State"]),
    st.one_of(JSONISH, st.lists(st.integers(0, 16), max_size=6)),
)


@fuzz(400)
@given(
    cpus=st.lists(st.integers(0, 64), min_size=1, max_size=16, unique=True),
    memory=st.one_of(st.none(), st.integers(0, 1 << 20)),
    count=st.one_of(st.none(), st.integers(1, MAX_VCPUS)),
    ids=st.one_of(st.none(), st.lists(st.integers(0, MAX_VCPUS - 1), min_size=1, max_size=8, unique=True)),
    want_memory=st.integers(MIN_MEMORY_MIB, MAX_MEMORY_MIB),
    cid=st.one_of(st.none(), st.integers(MIN_CID, MAX_CID)),
    others=st.lists(RECORD, max_size=4),
)
def test_pool_check_names_value_and_pool(
    cpus: list[int],
    memory: int | None,
    count: int | None,
    ids: list[int] | None,
    want_memory: int,
    cid: int | None,
    others: list[dict[str, Any]],
) -> None:
    fuzz_counts.tried("enclave pool check")
    pool = EnclavePool(tuple(sorted(cpus)), memory, "/sys/module/nitro_enclaves/parameters/ne_cpus")
    problems = enclave_pool_problems(
        pool, cpu_count=None if ids else count, cpu_ids=ids, memory_mib=want_memory, enclave_cid=cid, others=others
    )
    for problem in problems:
        assert len(problem) < 4000  # names every holder; bounded by the (few) records
        assert problem.startswith(("cpu_count", "cpu_ids", "memory_mib", "enclave_cid")), problem
    if not others and ids is None and count is not None and count <= len(cpus) and memory is not None:
        assert bool(problems) == (want_memory + want_memory % 2 > memory)
    fuzz_counts.clean("enclave pool check")


# ---------------------------------------------------------------------------------------------
# PCR specs: nitro-attest --measurements and the kms policy module's statements


@fuzz(300)
@given(
    value=st.one_of(
        JSONISH,
        st.dictionaries(st.sampled_from(["Measurements", "measurements"]), st.dictionaries(MEASUREMENT_KEY, JSONISH)),
        st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),
    )
)
def test_measurement_artifacts(value: Any) -> None:
    fuzz_counts.tried("nitro-attest measurements")
    try:
        pcrs = pcrs_from_measurements(value if isinstance(value, str) else json.dumps(value))
    except AttestationError as exc:
        assert exc.check == "input" and len(exc.message) < MAX_MESSAGE
    else:
        assert 0 in pcrs and all(len(v) == 96 for v in pcrs.values())
    fuzz_counts.clean("nitro-attest measurements")


KMS_KEYS = st.sampled_from(["sid", "principals", "actions", "image_sha384", "pcr0", "pcr8", "pcr3_role_arn",
                            "pcr4_instance_id"])  # fmt: skip


@fuzz(300)
@given(raw=st.dictionaries(KMS_KEYS, st.one_of(JSONISH, HEX96, st.lists(HEX96, max_size=3))), debug=st.booleans())
def test_kms_statement_specs(raw: dict[str, Any], debug: bool) -> None:
    fuzz_counts.tried("kms_enclave_policy statement specs")
    try:
        spec = parse_statement_spec(raw, allow_debug=debug)
    except PolicyError as exc:
        assert len(str(exc)) < 4 * MAX_MESSAGE  # quotes the bad value (repr of at most a few small items)
    else:
        assert isinstance(spec, StatementSpec)
        assert all(len(v) == 96 for values in spec.conditions.values() for v in values)
    fuzz_counts.clean("kms_enclave_policy statement specs")


# ---------------------------------------------------------------------------------------------
# through the real module entry points


@contextlib.contextmanager
def _emulated_host(root: Path) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NITRO_EMULATED", "1")
        patch.setenv("NITRO_EMULATOR_HOME", str(root / "emulator-home"))  # no pool: no nitro-cli call
        patch.setenv("NITRO_CLI_BIN", str(root / "no-nitro-cli"))
        patch.delenv("NITRO_EMULATOR_SYSFS_ROOT", raising=False)
        patch.delenv("NITRO_ALLOCATOR_CONFIG", raising=False)
        yield root


@pytest.fixture(scope="module")
def host_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("module-fuzz")
    make_eif(root / "app.eif", b"APP")
    make_sysfs(root / "sysfs", cpus=8, threads=2)
    os.mkfifo(root / "fifo")
    with _emulated_host(root):
        yield root


ARG_VALUE = st.one_of(JSONISH, st.just("256"), st.just("2"), st.just("0-1000000000"), CPU_LIST_TEXT)


def _run(module: Any, args: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    result = run_module(module, args, capsys)  # a traceback escapes here and fails the test
    if result.get("failed"):
        _clean_message(result["msg"], "")
        assert "exception" not in result
    return result


@fuzz(40, fixtures=True)
@given(
    extra=st.dictionaries(st.sampled_from(["memory_mib", "cpu_count", "cpu_ids", "enclave_cid", "measurements"]),
                          ARG_VALUE, max_size=4),
    eif=st.sampled_from(["app.eif", "fifo", ".", "/dev/zero", "absent.eif"]),
    check=st.booleans(),
)  # fmt: skip
def test_nitro_enclave_entry_point(
    capsys: pytest.CaptureFixture[str], host_root: Path, extra: dict[str, Any], eif: str, check: bool
) -> None:
    fuzz_counts.tried("nitro_enclave module (configured)")
    config = host_root / "tok.json"
    config.unlink(missing_ok=True)
    args = {"name": "tok", "state": "configured", "eif_path": str(host_root / eif), "config_path": str(config),
            "memory_mib": 256, "cpu_count": 2, **extra, "_ansible_check_mode": check}  # fmt: skip
    if "cpu_ids" in extra:
        args.pop("cpu_count")
    result = _run(load_enclave(), args, capsys)
    if not result.get("failed"):
        written = result["config"]
        assert MIN_MEMORY_MIB <= written["memory_mib"] <= MAX_MEMORY_MIB and eif == "app.eif"
        assert config.exists() != check
    else:
        assert not config.exists()
    fuzz_counts.clean("nitro_enclave module (configured)")


@fuzz(40, fixtures=True)
@given(
    extra=st.dictionaries(st.sampled_from(["memory_mib", "min_memory_mib", "cpu_count", "cpu_pool"]), ARG_VALUE,
                          min_size=1, max_size=3),
    config=st.one_of(st.none(), st.binary(max_size=80), st.just(b"---\ncpu_pool: 0-1000000000\nmemory_mib: 512\n")),
)  # fmt: skip
def test_nitro_allocator_entry_point(
    capsys: pytest.CaptureFixture[str], host_root: Path, extra: dict[str, Any], config: bytes | None
) -> None:
    fuzz_counts.tried("nitro_allocator module (check mode)")
    path = host_root / "allocator.yaml"
    path.unlink(missing_ok=True)
    if config is not None:
        path.write_bytes(config)
    args = {"path": str(path), "sysfs_root": str(host_root / "sysfs"), "restart": False, **extra,
            "_ansible_check_mode": True}  # fmt: skip
    result = _run(load_allocator(), args, capsys)
    if not result.get("failed"):
        assert result["config"]["memory_mib"] >= MIN_MEMORY_MIB
    fuzz_counts.clean("nitro_allocator module (check mode)")


@fuzz(40, fixtures=True)
@given(content=st.one_of(st.binary(max_size=200), st.just(None)), name=st.sampled_from(["x.eif", "fifo", "."]))
def test_nitro_eif_described_entry_point(
    capsys: pytest.CaptureFixture[str], host_root: Path, content: bytes | None, name: str
) -> None:
    fuzz_counts.tried("nitro_eif module (described)")
    path = host_root / name
    if name == "x.eif":
        path.unlink(missing_ok=True)
        if content is not None:
            path.write_bytes(content)
    result = _run(load_eif(), {"path": str(path), "state": "described"}, capsys)
    assert result.get("failed") is True  # none of these is an EIF
    assert result["msg"].startswith(f"path {path}: ")
    fuzz_counts.clean("nitro_eif module (described)")


_MODULES: dict[str, Any] = {}


def _load(name: str) -> Any:
    if name not in _MODULES:
        _MODULES[name] = load_module(name)
    return _MODULES[name]


def load_enclave() -> Any:
    return _load("nitro_enclave")


def load_allocator() -> Any:
    return _load("nitro_allocator")


def load_eif() -> Any:
    return _load("nitro_eif")
