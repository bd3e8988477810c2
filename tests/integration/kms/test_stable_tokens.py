"""Issue 15's promise: two controller checkouts converge the same host alternately, the local KMS restarts,
and the tokens of a fixed set of card numbers never change.

Real pieces only: ansible-playbook runs the kms_enclave_policy role from two checkout directories (each with
its own playbook_dir, so its own `.cache/kms/`; the second one even holds a stale ciphertext of another key,
as a colleague's laptop would), a real `nitro-local-aws` that is stopped and started again on the same port
with its state file, the emulator's NSM and vsock-proxy, and a fresh tokenizer server (an enclave restart)
provisioned after every converge from the data key record the role delivered to the "host".

The restart step needs the local endpoint to persist keys and SSM parameters (`NITRO_LOCAL_AWS_STATE`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enclave_tokenizer import parent, vsock
from enclave_tokenizer.client import Client

from nitro_emulator.nsm import start_nsm_server
from tests.conftest import VENV_BIN, free_port, wait_for_port
from tests.integration.ec2.conftest import DUMMY_ENV, REGION
from tests.unit.tokenizer_harness import running_server

from .conftest import ACCOUNT, ROLE, endpoint_client, run_playbook

PANS = ["4111111111111111", "5500000000000004", "340000000000009", "6011000000000004", "3530111333300000"]
PCRS = {0: hashlib.sha384(b"stable image").digest(), 1: b"\x11" * 48, 2: b"\x22" * 48}
CONVERGE = [
    {
        "name": "Converge the fleet's KMS key and data key (one checkout)",
        "hosts": "localhost",
        "gather_facts": False,
        "tasks": [{"name": "KMS", "ansible.builtin.include_role": {"name": "nitro_enclaves.fleet.kms_enclave_policy"}}],
    }
]


class LocalAws:
    """nitro-local-aws on a fixed port, restartable, keeping its state in a root-only file."""

    def __init__(self, workdir: Path, emulator_home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.state = workdir / "state" / "local-aws.json"
        self.env = {**os.environ, "NITRO_EMULATOR_HOME": str(emulator_home), "NITRO_LOCAL_AWS_STATE": str(self.state)}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with (self.workdir / "local-aws.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "nitro-local-aws"), "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.env,
            )
        wait_for_port("127.0.0.1", self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def local_aws(tmp_path: Path, emulator_home: Path) -> Iterator[LocalAws]:
    server = LocalAws(tmp_path, emulator_home)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def parent_side(
    tmp_path: Path, local_aws: LocalAws, emulator_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, int]]:
    """Emulated vsock, the emulator's NSM measuring PCRS, and a vsock-proxy to the local KMS."""
    vsock_dir = tmp_path / "vsock"
    vsock_dir.mkdir()
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(vsock_dir))
    monkeypatch.delenv("NITRO_ENCLAVE_CID", raising=False)
    for name, value in {**DUMMY_ENV, "AWS_SESSION_TOKEN": "testing-session"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    nsm = start_nsm_server(
        tmp_path / "nsm.sock", dict(PCRS), "i-0123456789abcdef0-enc0123456789abcdef", home=emulator_home
    )
    monkeypatch.setenv("NITRO_NSM_SOCKET", str(tmp_path / "nsm.sock"))
    allowlist = tmp_path / "vsock-proxy.yaml"
    allowlist.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {local_aws.port}}}\n")
    port = free_port()
    proxy = subprocess.Popen(
        [
            *(str(VENV_BIN / "nitro-cli-emulator"), "vsock-proxy", str(port), "127.0.0.1", str(local_aws.port)),
            *("--config", str(allowlist)),
        ],
        env={**os.environ, "NITRO_VSOCK_DIR": str(vsock_dir)},
    )
    deadline = time.monotonic() + 20
    while not vsock.unix_path(3, port).exists():
        assert proxy.poll() is None and time.monotonic() < deadline, "vsock-proxy did not start"
        time.sleep(0.05)
    try:
        yield vsock_dir, port
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        nsm.close()


def _checkout(root: Path, stale_key: bytes | None = None) -> Path:
    """A controller checkout as far as the data key goes: its playbook_dir, hence its own .cache/kms/."""
    (root / "playbooks").mkdir(parents=True)
    playbook = root / "playbooks" / "converge.yml"
    playbook.write_text(json.dumps(CONVERGE))
    if stale_key is not None:
        cache = root / ".cache" / "kms"
        cache.mkdir(parents=True)
        (cache / "nitro-enclave-tokenizer.datakey").write_text(base64.b64encode(stale_key).decode() + "\n")
    return playbook


def _tokens(vsock_dir: Path, proxy_port: int, local_aws: LocalAws, record: Path) -> dict[str, list[str]]:
    """A fresh enclave (as after a restart), provisioned as the gateway does, tokenizing PANS."""
    config = parent.GatewayConfig(
        enclave_cid=16,
        kms_region=REGION,
        kms_ciphertext_file=str(record),
        kms_endpoint=local_aws.url,
        kms_proxy_port=proxy_port,
    )
    with running_server(vsock_dir, proxy_port=proxy_port), Client(16, 5000, timeout=30) as client:
        client.provision(parent.provision_request(config))
        return {mode: [client.tokenize(pan, mode)["token"] for pan in PANS] for mode in ("opaque", "fpe")}


def _kms(local_aws: LocalAws) -> Any:
    return endpoint_client(local_aws.url)


def _role_vars(alias: str, local_aws: LocalAws, host_record: Path) -> dict[str, Any]:
    return {
        "kms_enclave_policy_key_alias": alias,
        "kms_enclave_policy_local_endpoint": False,
        "kms_enclave_policy_endpoint_url": local_aws.url,
        "kms_enclave_policy_region": REGION,
        "kms_enclave_policy_pcr0": [PCRS[0].hex()],
        "kms_enclave_policy_principals": [ROLE],
        "kms_enclave_policy_account_id": ACCOUNT,
        "kms_enclave_policy_admin_principals": [f"arn:aws:iam::{ACCOUNT}:root"],
        "kms_enclave_policy_host_data_key_file": str(host_record),
    }


def test_two_checkouts_and_a_kms_restart_never_change_a_token(
    tmp_path: Path, local_aws: LocalAws, parent_side: tuple[Path, int]
) -> None:
    vsock_dir, proxy_port = parent_side
    alias = f"alias/stable-{uuid.uuid4().hex[:8]}"
    kms = _kms(local_aws)
    stranger = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    stale = kms.generate_data_key_without_plaintext(KeyId=stranger, KeySpec="AES_256")["CiphertextBlob"]
    first = _checkout(tmp_path / "checkout-a")
    second = _checkout(tmp_path / "checkout-b", stale_key=stale)
    host_record = tmp_path / "host" / "datakey.json"
    extra_vars = {
        **_role_vars(alias, local_aws, host_record),
        # The stale file is named after the default alias: point the migration at it.
        "kms_enclave_policy_data_key_migrate_from": [
            "{{ playbook_dir }}/../.cache/kms/nitro-enclave-tokenizer.datakey"
        ],
    }
    seen: list[dict[str, list[str]]] = []
    found: list[str] = []
    for step, playbook in enumerate([first, second, first, "restart", second, first]):
        if playbook == "restart":
            local_aws.stop()
            local_aws.start()
            continue
        run = run_playbook(playbook, extra_vars=extra_vars)
        assert run.rc == 0, f"step {step}: {run.stdout[-3000:]}\n{run.stderr[-2000:]}"
        data_key = next(r for r in run.results if r.get("action") == "nitro_enclaves.fleet.kms_enclave_key")
        found.append(data_key["found_in"])
        seen.append(_tokens(vsock_dir, proxy_port, local_aws, host_record))
    assert found[0] == "generated" and all(f.startswith("ssm:/nitro-enclaves/stable-") for f in found[1:]), found
    assert all(tokens == seen[0] for tokens in seen), "a token changed between converges"
    assert len(set(seen[0]["opaque"])) == len(PANS)


def test_the_data_key_a_host_holds_is_adopted_when_the_fleet_has_no_record(tmp_path: Path, local_aws: LocalAws) -> None:
    """No SSM record and no checkout cache (the controller that converged the fleet is gone): the role reads the
    host's copy and keeps that data key, so the host's tokens stay the same."""
    kms = _kms(local_aws)
    alias = f"alias/adopt-{uuid.uuid4().hex[:8]}"
    key_id = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    blob = kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")["CiphertextBlob"]
    host_record = tmp_path / "host" / "datakey.json"
    host_record.parent.mkdir(mode=0o700)
    host_record.write_text(base64.b64encode(blob).decode() + "\n")
    run = run_playbook(_checkout(tmp_path / "checkout"), extra_vars=_role_vars(alias, local_aws, host_record))
    assert run.rc == 0, f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    data_key = next(r for r in run.results if r.get("action") == "nitro_enclaves.fleet.kms_enclave_key")
    assert data_key["found_in"] == "migrated:migrate_ciphertext[0]" and not data_key["data_key_generated"], data_key
    delivered = json.loads(host_record.read_text())  # the host now holds the fleet's record of that key
    assert base64.b64decode(delivered["ciphertext"]) == blob, delivered
