"""execution-environment/ (ansible-builder v3): `ansible-builder create` writes the build context offline,
with the collection tarball and the same pins as the project's requirements.txt."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
EE_DIR = REPO / "execution-environment"


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_create_writes_the_build_context(tmp_path: Path) -> None:
    # A copy beside a dist/ holding a built collection, as after `make collection`.
    shutil.copytree(EE_DIR, tmp_path / "execution-environment")
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "nitro_enclaves-fleet-0.1.0.tar.gz").write_bytes(b"tarball")
    context = tmp_path / "context"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-builder"),
            "create",
            "-f",
            str(tmp_path / "execution-environment" / "execution-environment.yml"),
            "-c",
            str(context),
            "--output-filename",
            "Containerfile",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    containerfile = (context / "Containerfile").read_text()
    assert "quay.io/centos/centos:stream9" in containerfile
    build = context / "_build"
    assert (build / "requirements.txt").read_text() == (EE_DIR / "requirements.txt").read_text()
    assert (build / "bindep.txt").read_text() == (EE_DIR / "bindep.txt").read_text()
    galaxy = yaml.safe_load((build / "requirements.yml").read_text())
    assert {c["name"] for c in galaxy["collections"]} >= {"amazon.aws", "ansible.posix"}
    assert (build / "collections" / "nitro_enclaves-fleet-0.1.0.tar.gz").read_bytes() == b"tarball"
    assert "ansible-galaxy collection install --offline" in containerfile
    assert "session-manager-plugin" in containerfile


def test_ee_pins_are_the_projects() -> None:
    project = pins(REPO / "requirements.txt")
    ee = pins(EE_DIR / "requirements.txt")
    assert ee, "execution-environment/requirements.txt pins nothing"
    assert {name: project.get(name) for name in ee} == ee
    definition = yaml.safe_load((EE_DIR / "execution-environment.yml").read_text())
    assert definition["version"] == 3
    core = definition["dependencies"]["ansible_core"]["package_pip"]
    assert core == f"ansible-core=={project['ansible-core']}"
