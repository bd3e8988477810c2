"""Roles document every variable they have: argument_specs, defaults and README agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.role_readmes import main as readmes_main
from tests.conftest import REPO_ROOT

ROLES = sorted(p for p in (REPO_ROOT / "roles").iterdir() if p.is_dir())
# The role holding the defaults several roles and playbooks share; each is documented by the role it belongs to.
COMMON = REPO_ROOT / "roles" / "nitro_enclaves_common"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _defaults(role: Path) -> dict[str, Any]:
    return _yaml(role / "defaults" / "main.yml") or {}


def _options(role: Path) -> dict[str, Any]:
    return _yaml(role / "meta" / "argument_specs.yml")["argument_specs"]["main"].get("options") or {}


def _dependencies(role: Path) -> list[str]:
    deps = (_yaml(role / "meta" / "main.yml") or {}).get("dependencies") or []
    names = [dep if isinstance(dep, str) else dep["role"] for dep in deps]
    return [name.removeprefix("nitro_enclaves.fleet.") for name in names]


def test_readmes_are_generated_from_argument_specs() -> None:
    assert readmes_main(["--check"]) == 0


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_every_default_is_documented_and_every_option_has_a_prefix(role: Path) -> None:
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]
    options = set(spec["options"])
    defaults = set(_defaults(role)) - set(_defaults(COMMON))
    assert defaults <= options, f"undocumented defaults: {sorted(defaults - options)}"
    if role == COMMON:  # it documents only what belongs to no role (a playbook's variable, provision_*)
        assert not any(name.startswith(f"{other.name}_") for name in options for other in ROLES)
    else:
        assert all(name.startswith(f"{role.name}_") for name in options)
    for name, option in spec["options"].items():
        assert option.get("description"), f"{name} has no description"


def test_each_shared_default_belongs_to_a_role_that_declares_the_common_role() -> None:
    """Every shared default is valued once (in COMMON, in no other role's defaults), documented by its role,
    and that role lists COMMON among its dependencies so the value is there when it runs alone."""
    shared = _defaults(COMMON)
    assert shared
    for name, value in shared.items():
        owners = [role for role in ROLES if role != COMMON and name.startswith(f"{role.name}_")]
        if not owners:
            assert name in _options(COMMON), f"{name}: neither a role's variable nor documented by {COMMON.name}"
            continue
        (owner,) = owners
        assert name in _options(owner), f"{name} is not documented by {owner.name}"
        assert COMMON.name in _dependencies(owner), f"{owner.name} reads {name} but does not depend on {COMMON.name}"
        if "default" in _options(owner)[name]:
            assert _options(owner)[name]["default"] == value, f"{owner.name} documents another default for {name}"
        for role in ROLES:
            assert name not in _defaults(role) or role == COMMON, f"{name} is valued again in {role.name}"


@pytest.mark.parametrize("role", ROLES, ids=[r.name for r in ROLES])
def test_no_copied_default_of_another_role(role: Path) -> None:
    """Reading another role's variable with `| default(<its default copied>)` is what COMMON replaces."""
    shared = _defaults(COMMON)
    for path in sorted(role.rglob("*.yml")) + sorted(role.rglob("*.j2")):
        if "molecule" in path.parts:
            continue
        text = path.read_text()
        for name in shared:
            assert not re.search(rf"\b{name}\s*\|\s*default\(", text), f"{path}: {name} | default(...)"


def test_playbooks_read_shared_settings_without_copied_defaults() -> None:
    shared = _defaults(COMMON)
    for path in [*sorted((REPO_ROOT / "playbooks").glob("*.yml")), REPO_ROOT / "site.yml"]:
        text = path.read_text()
        for name in shared:
            assert not re.search(rf"\b{name}\s*\|\s*default\(", text), f"{path}: {name} | default(...)"
