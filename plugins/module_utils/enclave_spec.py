"""What identifies a running enclave: the comparison the nitro_enclave module and the enclave
supervisor share, so "already running as configured" means the same thing to both.

A spec uses the nitro_enclave module's option names: cpu_count or cpu_ids, memory_mib, enclave_cid,
debug_mode; measurements are the EIF's PCR0/PCR1/PCR2 (lowercase hex).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .pcr import is_pcr_hex

# The Nitro driver's smallest enclave (nitro-cli reports it as E29).
MIN_MEMORY_MIB = 64


def eif_memory_mib(eif_size: int) -> int:
    """nitro-cli's E26 rule: at least 4x the EIF's size, in MiB rounded up as nitro-cli rounds."""
    return math.ceil(math.ceil(eif_size / 1024) / 1024) * 4


def min_memory_mib(eif_size: int) -> int:
    """The smallest memory an enclave of this EIF can run with (E26 and the driver's minimum)."""
    return max(eif_memory_mib(eif_size), MIN_MEMORY_MIB)


def memory_matches(requested: int, reported: Any) -> bool:
    """nitro-cli reports the hugepage regions it allocated, rounded up to 2 MiB pages."""
    return reported in (requested, requested + (requested % 2))


def differences(record: dict[str, Any], params: dict[str, Any], measurements: dict[str, str]) -> list[str]:
    """What differs between a running enclave and the request; [] means no change."""
    out: list[str] = []
    if record.get("State") != "RUNNING":
        out.append(f"state {record.get('State')} -> RUNNING")
    running = record.get("Measurements") or {}
    for pcr in ("PCR0", "PCR1", "PCR2"):
        if running.get(pcr) != measurements.get(pcr):
            out.append(f"{pcr} {str(running.get(pcr))[:16]}... -> {measurements.get(pcr, '')[:16]}...")
    if params["cpu_ids"] is not None:
        if sorted(record.get("CPUIDs") or []) != sorted(params["cpu_ids"]):
            out.append(f"cpu_ids {record.get('CPUIDs')} -> {sorted(params['cpu_ids'])}")
    elif record.get("NumberOfCPUs") != params["cpu_count"]:
        out.append(f"cpu_count {record.get('NumberOfCPUs')} -> {params['cpu_count']}")
    if not memory_matches(params["memory_mib"], record.get("MemoryMiB")):
        out.append(f"memory_mib {record.get('MemoryMiB')} -> {params['memory_mib']}")
    if params["enclave_cid"] is not None and record.get("EnclaveCID") != params["enclave_cid"]:
        out.append(f"enclave_cid {record.get('EnclaveCID')} -> {params['enclave_cid']}")
    debug = record.get("Flags") == "DEBUG_MODE"
    if debug != params["debug_mode"]:
        out.append(f"debug_mode {debug} -> {params['debug_mode']}")
    return out


def unexpected_measurements(measurements: dict[str, str], expected: dict[str, str]) -> list[str]:
    """The PCRs an EIF measures other than expected (the build host's record); [] when it is the image."""
    return [
        f"{pcr} {measurements.get(pcr, '')[:16]}..., expected {value[:16]}..."
        for pcr, value in sorted(expected.items())
        if measurements.get(pcr, "").lower() != value.lower()
    ]


# The run configuration: nitro-cli's `run-enclave --config` JSON (it ignores unknown keys) plus the PCRs
# the EIF must measure. Written by the nitro_enclave module (state=configured), applied by enclave-supervisor.
RUN_CONFIG_PCRS = ("PCR0", "PCR1", "PCR2")


def invalid_pcrs(values: dict[str, Any]) -> list[str]:
    """The keys whose value is not a SHA-384 in hex (96 characters)."""
    return [key for key, value in values.items() if not is_pcr_hex(value)]


# Realistic ceilings, so a typo (an extra digit, 2**63) is refused by name instead of reaching nitro-cli: the
# largest EC2 instances (u7in-24tb.224xlarge, u-24tb1.metal) have 448 vCPUs and 24 TiB of memory.
MAX_VCPUS = 448
MAX_MEMORY_MIB = 24 * 1024 * 1024
# nitro-cli refuses CIDs 0-3 (reserved, 3 = the parent) and u32::MAX and above (E03).
MIN_CID, MAX_CID = 4, 2**32 - 2
MAX_VSOCK_PORT = 2**32 - 2
MAX_TIMEOUT = 86400  # a day: longer is a typo, and larger values overflow the timers underneath
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# nitro-cli's describe-eif Measurements keys (what nitro_eif returns): PCR0-2 are checked, the rest accepted.
MEASUREMENT_KEYS = ("HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8")


def expected_measurements(given: Any) -> dict[str, str]:
    """The PCR0-2 an EIF must measure, from the measurements option; ValueError names a bad key or value.

    Keys are case-sensitive and unknown ones are refused: a dropped ``pcr0`` would silently turn image
    pinning off."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ValueError(f"measurements must be a dict of PCRn to hex, got {type(given).__name__}")
    unknown = [key for key in given if key not in MEASUREMENT_KEYS]
    if unknown:
        shown = ", ".join(repr(str(key)[:40]) for key in unknown[:5])
        raise ValueError(
            f"measurements key(s) {shown} not allowed: use {', '.join(MEASUREMENT_KEYS)} (case-sensitive; "
            "PCR0, PCR1 and PCR2 are checked, the others accepted as nitro_eif returns them)"
        )
    bad = invalid_pcrs({key: value for key, value in given.items() if key != "HashAlgorithm"})
    if bad:
        raise ValueError(f"measurements {', '.join(bad)}: expected 96 hexadecimal characters (a SHA-384)")
    return {pcr: str(value) for pcr, value in given.items() if pcr in RUN_CONFIG_PCRS}


def _bounded(name: str, value: Any, low: int, high: int, why: str = "") -> str | None:
    if value is None or low <= value <= high:
        return None
    return f"{name} {value} is not allowed: use {low} to {high}{why}"


def argument_problem(params: dict[str, Any]) -> str | None:
    """The first nitro_enclave argument that breaks a rule, as a message naming it and what is allowed."""
    name = params["name"]
    if not NAME_RE.fullmatch(name):
        return (
            f"name {name[:80]!r} is not allowed: use letters, digits, '.', '_' and '-', starting with a letter "
            "or digit, at most 64 characters"
        )
    for option, high in (("timeout", MAX_TIMEOUT), ("lock_timeout", MAX_TIMEOUT)):
        problem = _bounded(option, params.get(option), 0, high, " seconds")
        if problem:
            return problem
    if params["state"] == "absent":
        return None
    # An explicit null passes the argument spec's required_if; nothing below may meet a None.
    for option in ("eif_path", "memory_mib", *(("config_path",) if params["state"] == "configured" else ())):
        if option in params and params[option] is None:
            return f"{option} must not be null with state={params['state']}"
    if params["cpu_count"] is None and params["cpu_ids"] is None:
        return f"cpu_count or cpu_ids must be given (not null) with state={params['state']}"
    try:
        expected_measurements(params["measurements"])
    except ValueError as exc:
        return str(exc)
    memory = params["memory_mib"]
    if memory < MIN_MEMORY_MIB:
        return f"memory_mib {memory} is below the minimum enclave memory of {MIN_MEMORY_MIB} MiB"
    if memory > MAX_MEMORY_MIB:
        return f"memory_mib {memory} is above {MAX_MEMORY_MIB} MiB (24 TiB, the largest EC2 instance's memory)"
    count = params["cpu_count"]
    if count is not None and count <= 0:
        return f"cpu_count {count} must be greater than 0"
    if count is not None and count > MAX_VCPUS:
        return f"cpu_count {count} is above {MAX_VCPUS} (the largest EC2 instance's vCPUs); use 1 to {MAX_VCPUS}"
    ids = params["cpu_ids"]
    if ids is not None:
        shown = str(ids) if len(ids) <= 16 else f"{str(ids[:16])[:-1]}, ...]"
        if not ids:
            return "cpu_ids is empty; give at least one CPU id (or use cpu_count)"
        if any(cpu < 0 for cpu in ids):
            return f"cpu_ids {shown} has a negative CPU id"
        if any(cpu >= MAX_VCPUS for cpu in ids):
            return f"cpu_ids {shown} has a CPU id above {MAX_VCPUS - 1}: the largest EC2 instance has {MAX_VCPUS} vCPUs"
        if len(set(ids)) != len(ids):
            return f"cpu_ids {shown} names a CPU more than once"
    cid = params["enclave_cid"]
    if cid is not None and not MIN_CID <= cid <= MAX_CID:
        return (
            f"enclave_cid {cid} is not allowed: CIDs 0-2 are reserved, 3 is the parent instance; "
            f"use {MIN_CID} to {MAX_CID}"
        )
    wait = params.get("wait_for")
    if wait is not None:
        if not 1 <= wait["port"] <= MAX_VSOCK_PORT:
            return f"wait_for.port {wait['port']} is not a vsock port (1 to {MAX_VSOCK_PORT})"
        if wait["timeout"] < 0:
            return f"wait_for.timeout {wait['timeout']} must not be negative"
        if wait["timeout"] > MAX_TIMEOUT:
            return f"wait_for.timeout {wait['timeout']} is above {MAX_TIMEOUT} seconds"
    return None


def render_run_config(params: dict[str, Any], measurements: dict[str, str]) -> str:
    """The run configuration of a spec (module option names), as JSON text with sorted keys."""
    config = {
        "enclave_name": params["name"],
        "eif_path": params["eif_path"],
        "memory_mib": params["memory_mib"],
        "cpu_count": params["cpu_count"] if params["cpu_ids"] is None else None,
        "cpu_ids": params["cpu_ids"],
        "enclave_cid": params["enclave_cid"],
        "debug_mode": bool(params["debug_mode"]),
        "measurements": {pcr: value.lower() for pcr, value in measurements.items() if pcr in RUN_CONFIG_PCRS},
    }
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def parse_run_config(text: str) -> dict[str, Any]:
    """A run configuration as a spec (module option names, plus `measurements`); ValueError names the problem."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("expected a JSON object")
    missing = [key for key in ("eif_path", "memory_mib", "enclave_name") if raw.get(key) in (None, "")]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if (raw.get("cpu_count") is None) == (raw.get("cpu_ids") is None):
        raise ValueError("exactly one of cpu_count and cpu_ids must be set")
    expected = raw.get("measurements") or {}
    if not isinstance(expected, dict) or set(expected) - set(RUN_CONFIG_PCRS) or invalid_pcrs(expected):
        raise ValueError(f"measurements {expected!r} must map PCR0, PCR1 or PCR2 to 96 hexadecimal characters")
    return {
        "name": str(raw["enclave_name"]),
        "eif_path": str(raw["eif_path"]),
        "memory_mib": int(raw["memory_mib"]),
        "cpu_count": None if raw.get("cpu_count") is None else int(raw["cpu_count"]),
        "cpu_ids": None if raw.get("cpu_ids") is None else [int(cpu) for cpu in raw["cpu_ids"]],
        "enclave_cid": None if raw.get("enclave_cid") is None else int(raw["enclave_cid"]),
        "debug_mode": bool(raw.get("debug_mode", False)),
        "measurements": {key: value.lower() for key, value in expected.items()},
    }


def summary(record: dict[str, Any] | None) -> dict[str, Any]:
    """The compared fields of a describe record, for the diff."""
    if not record:
        return {}
    measurements = record.get("Measurements") or {}
    return {
        "name": record.get("EnclaveName"),
        "enclave_id": record.get("EnclaveID"),
        "state": record.get("State"),
        "cpu_ids": record.get("CPUIDs"),
        "cpu_count": record.get("NumberOfCPUs"),
        "memory_mib": record.get("MemoryMiB"),
        "enclave_cid": record.get("EnclaveCID"),
        "debug_mode": record.get("Flags") == "DEBUG_MODE",
        "pcr0": measurements.get("PCR0"),
        "pcr1": measurements.get("PCR1"),
        "pcr2": measurements.get("PCR2"),
    }


def wanted(params: dict[str, Any], measurements: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": params["name"], "state": "RUNNING", "eif_path": params["eif_path"]}
    if params["cpu_ids"] is not None:
        out["cpu_ids"] = sorted(params["cpu_ids"])
    else:
        out["cpu_count"] = params["cpu_count"]
    out["memory_mib"] = params["memory_mib"]
    if params["enclave_cid"] is not None:
        out["enclave_cid"] = params["enclave_cid"]
    out["debug_mode"] = params["debug_mode"]
    out.update({pcr.lower(): measurements.get(pcr) for pcr in ("PCR0", "PCR1", "PCR2")})
    return out
