"""Fixtures for the KMS tests: a dedicated real `nitro-local-aws`, attestation documents, Ansible runs.

The KMS tests get their own server (not the shared `local_aws`) because the server must see the same
NITRO_EMULATOR_HOME as the tests that sign documents (it trusts that emulator root), and because the
throttling tests drive the server's test-only fault file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import kms_policy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from nitro_emulator.local_aws.identities import INSTANCE_ROLE_KEY, KEY_ADMIN_KEY, OPERATOR_KEY
from nitro_emulator.nsm import build_attestation_document
from tests.conftest import REPO_ROOT, VENV_BIN, running_local_aws
from tests.integration.ec2.conftest import DUMMY_ENV, REGION, ansible_env

ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/enclave-parent"
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
OLD_PCR0 = "a1" * 48
NEW_PCR0 = "b2" * 48


def endpoint_client(url: str, service: str = "kms", access_key_id: str = DUMMY_ENV["AWS_ACCESS_KEY_ID"]) -> Any:
    """A boto3 client of the local endpoint at ``url`` (it takes any secret key)."""
    return boto3.client(
        service,
        region_name=REGION,
        endpoint_url=url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
    )


@dataclass
class KmsEndpoint:
    url: str
    emulator_home: Path
    faults: Path

    def client(self, access_key_id: str = OPERATOR_KEY, service: str = "kms") -> Any:
        """A client as one of the endpoint's documented identities (identities.py): the operator by
        default, INSTANCE_ROLE_KEY for the parent instance, KEY_ADMIN_KEY for the key administrator."""
        return endpoint_client(self.url, service, access_key_id)

    def set_faults(self, **counts: int) -> None:
        self.faults.write_text(json.dumps(counts))

    def faults_left(self) -> dict[str, int]:
        return json.loads(self.faults.read_text() or "{}")


def kms_key_certificate(kms: Any, key: dict[str, Any], path: Path) -> Path:
    """A PEM certificate for a KMS key's public key (no private key leaves KMS): the EIF signing tests
    sign with the key ARN, and nitro-cli checks the certificate carries that key."""
    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key["KeyId"])["PublicKey"])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms-publisher")])
    now = dt.datetime.now(dt.UTC)
    # cryptography signs a certificate only with a private key: a throwaway CA key issues it; what
    # matters for EIF signing is the subject public key.
    ca = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")]))
        .public_key(public)
        .serial_number(7)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(ca, hashes.SHA384())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="session")
def emulator_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nitro-emulator-home")


@pytest.fixture(scope="session")
def kms_endpoint(tmp_path_factory: pytest.TempPathFactory, emulator_home: Path) -> Iterator[KmsEndpoint]:
    workdir = tmp_path_factory.mktemp("kms-local-aws")
    faults = workdir / "faults.json"
    faults.write_text("{}")
    env = {**os.environ, "NITRO_EMULATOR_HOME": str(emulator_home), "NITRO_LOCAL_AWS_KMS_FAULTS": str(faults)}
    with running_local_aws(workdir, env) as url:
        yield KmsEndpoint(url, emulator_home, faults)


@pytest.fixture
def kms(kms_endpoint: KmsEndpoint) -> Any:
    kms_endpoint.set_faults()
    return kms_endpoint.client()


@pytest.fixture
def parent_kms(kms_endpoint: KmsEndpoint) -> Any:
    """The parent instance's credentials (its IAM role): what the enclave is handed."""
    return kms_endpoint.client(INSTANCE_ROLE_KEY)


@pytest.fixture
def admin_kms(kms_endpoint: KmsEndpoint) -> Any:
    """The key administrator's credentials."""
    return kms_endpoint.client(KEY_ADMIN_KEY)


@pytest.fixture
def key_id(kms: Any) -> str:
    """A fresh symmetric key with KMS's default policy (moto: the account root may do anything)."""
    return kms.create_key(Description=f"test {uuid.uuid4()}")["KeyMetadata"]["KeyId"]


def get_policy(kms: Any, key_id: str) -> dict[str, Any]:
    return json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])


def put_attested_statement(kms: Any, key_id: str, pcr0: list[str], actions: list[str], **more: list[str]) -> None:
    spec = kms_policy.parse_statement_spec(
        {"sid": "EnclaveUse", "principals": [ROLE], "actions": actions, "pcr0": pcr0, **more}
    )
    result = kms_policy.apply_statements(get_policy(kms, key_id), [spec])
    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=kms_policy.dump_policy(result.policy))


@dataclass
class Enclave:
    """What an enclave holds: an RSA key whose public half goes into its attestation documents."""

    private_key: rsa.RSAPrivateKey

    @property
    def public_der(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="session")
def enclave() -> Enclave:
    return Enclave(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def document(
    home: Path, pcr0: str, public_key: bytes | None, *, debug: bool = False, pcrs: dict[int, bytes] | None = None
) -> bytes:
    measured = {0: bytes.fromhex(pcr0), 1: b"\x11" * 48, 2: b"\x22" * 48, **(pcrs or {})}
    return build_attestation_document(measured, MODULE_ID, public_key=public_key, debug=debug, home=home)


def recipient(doc: bytes) -> dict[str, Any]:
    return {"AttestationDocument": doc, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}


# ------------------------------------------------------------------ Ansible


@dataclass
class PlayRun:
    rc: int
    results: list[dict[str, Any]]
    stdout: str
    stderr: str


def run_playbook(
    path: Path,
    *,
    extra_vars: dict[str, Any] | None = None,
    inventory: Path | None = None,
    check: bool = False,
    diff: bool = False,
    env: dict[str, str] | None = None,
) -> PlayRun:
    """ansible-playbook with the JSON callback; returns localhost's (or the first host's) task results."""
    argv = [str(VENV_BIN / "ansible-playbook"), str(path)]
    if inventory is not None:
        argv += ["-i", str(inventory)]
    if extra_vars:
        argv += ["-e", json.dumps(extra_vars)]
    if check:
        argv.append("--check")
    if diff:
        argv.append("--diff")
    proc = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=ansible_env(ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        # ansible.cfg's profile_tasks callback prints around the JSON document: cut it out.
        start = proc.stdout.index('{\n    "custom_stats"')
        report, _ = json.JSONDecoder().raw_decode(proc.stdout[start:])
    except (ValueError, json.JSONDecodeError) as exc:
        raise AssertionError(f"no JSON output (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from exc
    results = [
        {"task": task["task"]["name"], **next(iter(task["hosts"].values()))}
        for play in report["plays"]
        for task in play["tasks"]
        if task["hosts"]
    ]
    return PlayRun(proc.returncode, results, proc.stdout, proc.stderr)


def run_module_tasks(tmp_path: Path, endpoint: KmsEndpoint, tasks: list[dict[str, Any]], **kwargs: Any) -> PlayRun:
    """Each task is `{"name": ..., "<module>": {...}}`; the endpoint is added and failures are kept going."""
    module_tasks = []
    for task in tasks:
        task = dict(task)
        module = next(k for k in task if k != "name")
        task[module] = {"endpoint_url": endpoint.url, "region": REGION, **task[module]}
        task["ignore_errors"] = True
        module_tasks.append(task)
    playbook = [{"name": "kms test", "hosts": "localhost", "gather_facts": False, "tasks": module_tasks}]
    path = tmp_path / f"play-{uuid.uuid4().hex[:8]}.yml"
    path.write_text(yaml.safe_dump(playbook, sort_keys=False))
    return run_playbook(path, **kwargs)
