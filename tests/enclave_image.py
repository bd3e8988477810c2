"""The tokenizer's enclave image, built the way the enclave_image role builds it: the wheelhouse from
roles/nitro_cli/files/build-wheelhouse.sh (the enclave's own wheel from enclave_src/enclave-files.txt),
the Docker build through roles/enclave_image/files/build-image.sh (the context holds the Dockerfile and
every wheel but the project one). Tests and benches share it, so they measure what the role ships."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PYTHON_BASE_IMAGE, REPO_ROOT

WHEELHOUSE_SCRIPT = REPO_ROOT / "roles" / "nitro_cli" / "files" / "build-wheelhouse.sh"
IMAGE_SCRIPT = REPO_ROOT / "roles" / "enclave_image" / "files" / "build-image.sh"


def dependency_wheelhouse() -> Path:
    """The controller's wheelhouse (pinned dependency wheels), as `make setup` builds it."""
    return Path(os.environ.get("NITRO_ANSIBLE_WHEELHOUSE", REPO_ROOT / ".cache" / "wheelhouse"))


def _sh(*argv: str | Path) -> str:
    proc = subprocess.run(["sh", *map(str, argv)], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{Path(argv[0]).name} failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def build_enclave_image(tag: str, work: Path, source: Path = REPO_ROOT) -> str:
    """Build the enclave image of the collection at ``source`` as ``tag``; returns the image id. ``work``
    keeps the wheelhouse between calls: a second build of unchanged enclave files rebuilds no wheel."""
    wheelhouse = work / "wheelhouse"
    _sh(WHEELHOUSE_SCRIPT, source, wheelhouse, sys.executable, dependency_wheelhouse())
    out = _sh(
        IMAGE_SCRIPT,
        tag,
        source / "enclave_src",
        wheelhouse,
        work / "build",
        f"--build-arg=BASE_IMAGE={PYTHON_BASE_IMAGE}",
    )
    return out.split()[0]
