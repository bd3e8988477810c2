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
_HEX_PCR = re.compile(r"[0-9A-Fa-f]{96}")


def invalid_pcrs(values: dict[str, Any]) -> list[str]:
    """The keys whose value is not a SHA-384 in hex (96 characters)."""
    return [key for key, value in values.items() if not (isinstance(value, str) and _HEX_PCR.fullmatch(value))]


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
