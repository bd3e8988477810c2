"""Runs every role's molecule scenario (converge, idempotence, verify) against systemd containers.

Scenarios need no state from each other, so `make test` runs them with pytest-xdist workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BASE_CONFIG = REPO_ROOT / "tests" / "molecule" / "base.yml"
# Each role's scenarios, plus the project's own (tests/molecule/<name>: multi-host runs of the plays).
SCENARIOS = sorted(p.parent for p in (REPO_ROOT / "roles").glob("*/molecule/*/molecule.yml")) + sorted(
    p.parent for p in (REPO_ROOT / "tests" / "molecule").glob("*/molecule.yml")
)


def scenario_id(path: Path) -> str:
    owner = path.parent.parent
    return f"{owner.name}:{path.name}" if owner.parent.name == "roles" else f"project:{path.name}"


@pytest.mark.docker
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario_id(s) for s in SCENARIOS])
def test_molecule_scenario(scenario: Path, docker_engine: str) -> None:
    project_dir = scenario.parent.parent  # the directory holding molecule/<scenario>
    env = dict(os.environ)
    env["MOLECULE_RUN_ID"] = f"{project_dir.name}-{scenario.name}".replace("_", "-")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.setdefault("NITRO_ANSIBLE_ROOT", str(REPO_ROOT))
    env.setdefault("NITRO_ANSIBLE_WHEELHOUSE", str(REPO_ROOT / ".cache" / "wheelhouse"))
    env.pop("ANSIBLE_CONFIG", None)  # molecule writes its own, from base.yml
    result = subprocess.run(
        # The console script, not `python -m molecule`: from tests/ that would import tests/molecule.
        [str(Path(sys.executable).parent / "molecule"), "--base-config", str(BASE_CONFIG), "test", "-s", scenario.name],
        cwd=project_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"molecule test failed for {scenario_id(scenario)}:\n{result.stdout[-20000:]}")
