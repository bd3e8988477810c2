"""The shared PCR value check (plugins/module_utils/pcr.py) and that each of its users refuses the same values."""

from __future__ import annotations

import argparse

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import enclave_spec, kms_policy
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.pcr import PCR_HEX_LEN, is_pcr_hex, pcr_hex_problem
from enclave_tokenizer import attestation_cli
from enclave_tokenizer.attestation import AttestationError, pcrs_from_measurements

GOOD = "ab" * 48
BAD = {
    "short": ("a" * 95, "95 characters"),
    "long": ("a" * 97, "97 characters"),
    "empty": ("", "0 characters"),
    "non-hex": ("g" * 96, "non-hex characters"),
    "space": (" " + "a" * 95, "non-hex characters"),
    "newline": ("a" * 96 + "\n", "non-hex characters"),
    "bytes": (b"a" * 96, "not a string (bytes)"),
    "none": (None, "not a string (NoneType)"),
}


def test_good_values_any_case() -> None:
    assert PCR_HEX_LEN == 96
    assert is_pcr_hex(GOOD) and is_pcr_hex(GOOD.upper()) and pcr_hex_problem(GOOD) is None


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_problem_is_named(name: str) -> None:
    value, problem = BAD[name]
    assert not is_pcr_hex(value)
    assert pcr_hex_problem(value) == problem


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_user_refuses_the_same_values(name: str) -> None:
    value, _ = BAD[name]
    assert enclave_spec.invalid_pcrs({"PCR0": value, "PCR1": GOOD}) == ["PCR0"]
    if isinstance(value, str) and value.strip() != value:
        value = value.strip() + "x"  # normalize_pcr strips blanks first, as IAM condition values allow
    with pytest.raises(kms_policy.PolicyError, match="PCR value must be"):
        kms_policy.normalize_pcr(value, "pcr0")
    with pytest.raises(AttestationError, match="PCR0 is not 96 hex"):
        pcrs_from_measurements({"Measurements": {"PCR0": value}})
    if isinstance(value, str):
        with pytest.raises(argparse.ArgumentTypeError, match="96 hex characters"):
            attestation_cli._parse_pcr(f"0={value}")


def test_every_user_accepts_a_good_value() -> None:
    assert enclave_spec.invalid_pcrs({"PCR0": GOOD.upper()}) == []
    assert kms_policy.normalize_pcr(GOOD.upper(), "pcr0") == GOOD
    assert pcrs_from_measurements({"Measurements": {"PCR0": GOOD.upper()}}) == {0: GOOD}
    assert attestation_cli._parse_pcr(f"PCR0={GOOD.upper()}") == (0, GOOD)
