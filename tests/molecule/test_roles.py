"""Runs every role's molecule scenario (converge, idempotence, verify) against systemd containers.

Scenarios need no state from each other, so `make test` runs them with pytest-xdist workers. molecule
finds the shared settings itself (.config/molecule/config.yml), as from a role directory by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# Each role's scenarios, plus the project's own (tests/molecule/<name>: multi-host runs of the plays).
SCENARIOS = sorted(p.parent for p in (REPO_ROOT / "roles").glob("*/molecule/*/molecule.yml")) + sorted(
    p.parent for p in (REPO_ROOT / "tests" / "molecule").glob("*/molecule.yml")
)


def scenario_id(path: Path) -> str:
    owner = path.parent.parent
    return f"{owner.name}:{path.name}" if owner.parent.name == "roles" else f"project:{path.name}"


@pytest.mark.docker
# The fleet scenario (site, two rollouts and a signing-certificate rotation over three hosts) takes ~6 min
# alone and more beside another scenario on two cores: the suite's 900 s default is too close.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario_id(s) for s in SCENARIOS])
def test_molecule_scenario(scenario: Path, docker_engine: str) -> None:
    project_dir = scenario.parent.parent  # the directory holding molecule/<scenario>
    env = dict(os.environ)
    # Instance names are per project (the .env.yml beside molecule/): the scenario name completes them.
    env["MOLECULE_RUN_ID"] = scenario.name.replace("_", "-")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("ANSIBLE_CONFIG", None)  # molecule writes its own, from .config/molecule/config.yml
    result = subprocess.run(
        # The console script, not `python -m molecule`: from tests/ that would import tests/molecule.
        [str(Path(sys.executable).parent / "molecule"), "test", "-s", scenario.name],
        cwd=project_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"molecule test failed for {scenario_id(scenario)}:\n{result.stdout[-20000:]}")
