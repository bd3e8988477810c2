"""The EIF measures only what runs in the enclave: in a copy of the collection, an edit to the emulator or
to a module_utils file the enclave does not import leaves PCR0-2 (and the enclave_image role's build
fingerprint) unchanged, and an edit to the enclave's own code changes PCR0. Real Docker build through the
role's scripts and the emulator's build-enclave."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import PYTHON_BASE_IMAGE, REPO_ROOT
from tests.enclave_image import build_enclave_image, dependency_wheelhouse
from tests.integration.test_tokenizer_e2e import EMULATOR, _run

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# What build-wheelhouse.sh reads (both wheels) and the enclave_image role's build context.
SOURCES = ("pyproject.toml", "plugins/module_utils", "nitro_emulator", "enclave_src", "roles/enclave_image")
FINGERPRINT = "roles/enclave_image/files/build-fingerprint.sh"
# The role's fingerprint over the build code (roles/enclave_image/vars/main.yml's list, minus blobs).
BUILD_CODE = ("nitro_emulator/build.py", "nitro_emulator/eif_writer.py", "plugins/module_utils/eif.py")


def _pcrs(source: Path, work: Path, tag: str) -> dict[str, str]:
    build_enclave_image(tag, work, source)
    out = work / f"{tag.rpartition(':')[2]}.eif"
    env = dict(os.environ, NITRO_CLI_ARTIFACTS=str(work / "artifacts"))
    built = json.loads(_run([EMULATOR, "build-enclave", "--docker-uri", tag, "--output-file", str(out)], env))
    return {pcr: built["Measurements"][pcr] for pcr in ("PCR0", "PCR1", "PCR2")}


def _fingerprint(source: Path, wheelhouse: Path) -> str:
    paths = [str(source / "enclave_src"), *(str(source / path) for path in BUILD_CODE)]
    return _run(
        ["sh", str(source / FINGERPRINT), "key", str(wheelhouse), PYTHON_BASE_IMAGE, EMULATOR, str(source), *paths]
    )


def _append_comment(path: Path) -> None:
    with path.open("a") as handle:
        handle.write("# an edit that must not reach the enclave\n")


def test_only_the_enclaves_files_are_measured(docker_engine: str, tmp_path: Path) -> None:
    source = tmp_path / "collection"
    source.mkdir()
    for part in SOURCES:
        if (REPO_ROOT / part).is_dir():
            shutil.copytree(REPO_ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__", "molecule"))
        else:
            shutil.copy2(REPO_ROOT / part, source / part)
    assert any(dependency_wheelhouse().glob("cbor2-*.whl")), "run `make setup` first"
    work = tmp_path / "work"
    # Images stay until the end: as in the role, an unchanged context is Docker's cached image (a build
    # without that cache is a new rootfs: install times in it).
    tag = f"nitro-ansible-test/measure:{uuid.uuid4().hex[:10]}"
    tags = [f"{tag}-{name}" for name in ("before", "outside", "inside")]
    try:
        before = _pcrs(source, work, tags[0])
        fingerprint = _fingerprint(source, work / "wheelhouse")

        _append_comment(source / "nitro_emulator" / "allocator.py")
        _append_comment(source / "plugins" / "module_utils" / "allocator.py")
        outside = _pcrs(source, work, tags[1])
        assert outside == before
        assert _fingerprint(source, work / "wheelhouse") == fingerprint

        _append_comment(source / "enclave_src" / "enclave_tokenizer" / "tokens.py")
        inside = _pcrs(source, work, tags[2])
        assert inside["PCR0"] != before["PCR0"]
        assert _fingerprint(source, work / "wheelhouse") != fingerprint
    finally:
        subprocess.run(["docker", "image", "rm", *tags], capture_output=True, check=False)
