"""The PCR value check every caller shares: a SHA-384 measurement in hex, as nitro-cli prints it.

The PCR formulas (PCR0-4, PCR8) stay with the EIF reader in eif.py; this file only says what a PCR value
written by a user, a measurements artifact or a run configuration must look like.
"""

from __future__ import annotations

import re

PCR_HEX_LEN = 96  # SHA-384: 48 bytes
_HEX = re.compile(r"[0-9A-Fa-f]*")


def pcr_hex_problem(value: object) -> str | None:
    """None for 96 hex characters (any case); otherwise what is wrong with ``value``, for an error message."""
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    if not _HEX.fullmatch(value):
        return "non-hex characters"
    if len(value) != PCR_HEX_LEN:
        return f"{len(value)} characters"
    return None


def is_pcr_hex(value: object) -> bool:
    return pcr_hex_problem(value) is None
