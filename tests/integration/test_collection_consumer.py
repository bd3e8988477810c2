"""The collection as a user gets it: the tarball `make collection` builds, installed by ansible-galaxy from
a requirements.yml into an empty playbook repository whose playbook names only FQCNs (the collection's
site playbook, one of its modules, a module_defaults group). It converges one emulated host (a systemd
container, as test_rollout_rollback's). Then tokenization works through the gateway, and the project wheel
the roles built from the installed collection's own files holds the same code as the repository's."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, VENV_BIN, one_host_inventory, start_systemd_host

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]

HOST = "nitro-collection-consumer-1"
KMS_PORT = 44621
GATEWAY = "127.0.0.1:19521"
PAN = "4111 1111 1111 1111"

PLAYBOOK = [
    {
        "name": "The whole flow, from the installed collection",
        "ansible.builtin.import_playbook": "nitro_enclaves.fleet.site",
    },
    {
        "name": "One of its modules by FQCN, with its action group's defaults",
        "hosts": "enclave_hosts",
        "gather_facts": False,
        "module_defaults": {"group/nitro_enclaves.fleet.nitro": {"nitro_cli_path": "/usr/local/bin/nitro-cli"}},
        "tasks": [
            {
                "name": "Describe the EIF the host runs",
                "nitro_enclaves.fleet.nitro_eif": {
                    "path": "/opt/nitro-enclaves/images/tokenizer.eif",
                    "state": "described",
                },
                "register": "consumer_eif",
            },
            {
                "name": "Show its PCR0",
                "ansible.builtin.debug": {"msg": "consumer PCR0 {{ consumer_eif.measurements.PCR0 }}"},
            },
        ],
    },
]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _code_members(wheel: Path) -> dict[str, int]:
    """A wheel's files and their CRCs, without the dist-info (RECORD lists them in build order)."""
    with zipfile.ZipFile(wheel) as archive:
        return {i.filename: i.CRC for i in archive.infolist() if ".dist-info/" not in i.filename}


@pytest.fixture
def host(docker_engine: str) -> Iterator[str]:
    start_systemd_host(HOST)
    try:
        yield HOST
    finally:
        subprocess.run(["docker", "rm", "-f", HOST], capture_output=True, check=False)
        env = dict(os.environ, ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
        _run([str(VENV_BIN / "ansible-playbook"), "tests/molecule/cleanup.yml",
              "-e", f"kms_enclave_policy_local_port={KMS_PORT}"], REPO_ROOT, env)  # fmt: skip


def test_installed_collection_converges_a_host_through_fqcns_only(host: str, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = _run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(dist), str(REPO_ROOT)],
                 REPO_ROOT, dict(os.environ))  # fmt: skip
    assert build.returncode == 0, build.stderr
    (tarball,) = dist.glob("nitro_enclaves-fleet-*.tar.gz")

    # An empty playbook repository: no path into this checkout except the tarball and the dependency wheels.
    repo = tmp_path / "my-playbooks"
    repo.mkdir()
    (repo / "requirements.yml").write_text(yaml.safe_dump({"collections": [{"name": str(tarball), "type": "file"}]}))
    (repo / "ansible.cfg").write_text(
        "[defaults]\ninventory = hosts.yml\ncollections_path = ./collections\nhost_key_checking = False\n"
        "interpreter_python = auto_silent\n[connection]\npipelining = True\n"
    )
    dependency_wheels = os.environ.get("NITRO_ANSIBLE_WHEELHOUSE") or str(REPO_ROOT / ".cache" / "wheelhouse")
    group_vars = {
        "vsock_tokenizer_gateway_listen": GATEWAY,
        # Pinned dependency wheels the controller would otherwise download (tests reach no registry).
        "nitro_cli_dependency_wheelhouse": dependency_wheels,
    }
    one_host_inventory(repo / "hosts.yml", host, KMS_PORT, group_vars)
    (repo / "site.yml").write_text(yaml.safe_dump(PLAYBOOK, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "NITRO_ANSIBLE_"))}
    env.update(ANSIBLE_CONFIG=str(repo / "ansible.cfg"), ANSIBLE_NOCOLOR="1", PATH=f"{VENV_BIN}:{env.get('PATH', '')}")

    install = _run([str(VENV_BIN / "ansible-galaxy"), "collection", "install", "-r", "requirements.yml",
                    "-p", "./collections"], repo, env, timeout=300)  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    installed = repo / "collections" / "ansible_collections" / "nitro_enclaves" / "fleet"
    assert json.loads((installed / "MANIFEST.json").read_text())["collection_info"]["name"] == "fleet"

    started = time.monotonic()
    converge = _run(
        [
            str(
                VENV_BIN / "ansible-playbook",
            ),
            "site.yml",
        ],
        repo,
        env,
    )
    print(f"\nconsumer converge (collection tarball, 1 emulated host): {time.monotonic() - started:.0f} s")
    assert converge.returncode == 0, converge.stdout[-6000:] + converge.stderr[-2000:]
    assert f"{host}" in converge.stdout and "failed=0" in converge.stdout

    # The roles built the project wheel from the installed collection, into a cache under the playbook
    # directory (the collection's playbooks/, as the flow is its site playbook): the repository's code.
    # Both wheels: the project's, and the enclave's (from enclave-files.txt, which the tarball must carry).
    for dist in ("nitro_enclaves_ansible", "nitro_enclaves_tokenizer_enclave"):
        (built,) = (installed / "playbooks" / ".nitro-enclaves" / "wheelhouse").glob(f"{dist}-*.whl")
        (reference,) = Path(dependency_wheels).glob(f"{dist}-*.whl")
        assert _code_members(built) == _code_members(reference)

    def tokenize() -> dict:
        request = urllib.request.Request(
            f"http://{GATEWAY}/v1/tokenize", data=json.dumps({"pan": PAN}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read())

    first, second = tokenize(), tokenize()
    assert first["last_four"] == "1111" and len(first["token"]) >= 32
    assert first["token"] == second["token"]
    assert "4111111111111111" not in first["token"]
    with urllib.request.urlopen(f"http://{GATEWAY}/healthz?attest=1&wait=60", timeout=90) as answer:
        pcr0 = json.loads(answer.read())["attestation"]["pcrs"]["0"]
    assert f"consumer PCR0 {pcr0}" in converge.stdout
