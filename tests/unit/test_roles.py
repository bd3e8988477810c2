"""Roles document every variable they have: argument_specs, defaults and README agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scripts.role_readmes import main as readmes_main
from tests.conftest import REPO_ROOT

ROLES = sorted(p for p in (REPO_ROOT / "roles").iterdir() if p.is_dir())


def test_readmes_are_generated_from_argument_specs() -> None:
    assert readmes_main(["--check"]) == 0


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_every_default_is_documented_and_every_option_has_a_prefix(role: Path) -> None:
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]
    options = set(spec["options"])
    defaults_file = role / "defaults" / "main.yml"
    defaults = set(yaml.safe_load(defaults_file.read_text()) or {}) if defaults_file.exists() else set()
    assert defaults <= options, f"undocumented defaults: {sorted(defaults - options)}"
    assert all(name.startswith(f"{role.name}_") for name in options)
    for name, option in spec["options"].items():
        assert option.get("description"), f"{name} has no description"
