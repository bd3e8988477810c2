"""End to end in the emulator: build the tokenizer EIF, run it, provision its key through the
attestation-enforcing local KMS (emulated NSM -> vsock-proxy -> nitro-local-aws), tokenize through the
gateway, restart the enclave and see it re-provisioned; an EIF whose PCR0 is not in the key policy
stays unprovisioned and /healthz says why.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.conftest import REPO_ROOT, VENV_BIN, attested_key_policy, free_port, wait_for_port
from tests.enclave_image import build_enclave_image

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]

EMULATOR = str(VENV_BIN / "nitro-cli-emulator")
ENCLAVE_NAME = "tokenizer"
ENCLAVE_CID = 21
PAN = "4111111111111111"
ROLE = "arn:aws:iam::123456789012:role/enclave-parent"  # the local KMS's local-instance-role


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd[:3]} failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


@dataclass
class Eif:
    path: Path
    measurements: Path
    pcr0: str


def _build_eif(tag: str, out_dir: Path, env: dict[str, str]) -> Eif:
    out = out_dir / f"{tag.replace(':', '-').replace('/', '-')}.eif"
    built = json.loads(_run([EMULATOR, "build-enclave", "--docker-uri", tag, "--output-file", str(out)], env))
    measurements = built["Measurements"]
    artifact = out.with_name(out.name + ".measurements.json")
    artifact.write_text(
        json.dumps({"Measurements": measurements, "ImageDigest": "", "EifSha384": "", "EifPath": str(out)})
    )
    return Eif(out, artifact, measurements["PCR0"].lower())


@pytest.fixture(scope="module")
def eifs(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Eif, Eif]]:
    """The tokenizer EIF (from enclave_src/Dockerfile) and a variant with another PCR0 (built once)."""
    tag = f"nitro-ansible-test/tokenizer:{uuid.uuid4().hex[:10]}"
    variant = f"{tag}-variant"
    build_enclave_image(tag, tmp_path_factory.mktemp("tokenizer-ctx"))
    variant_ctx = tmp_path_factory.mktemp("tokenizer-variant")
    (variant_ctx / "Dockerfile").write_text(f"FROM {tag}\nENV TOKENIZER_VARIANT=unapproved\n")
    _run(["docker", "build", "-q", "-t", variant, str(variant_ctx)])
    out = tmp_path_factory.mktemp("tokenizer-eif")
    env = dict(os.environ, NITRO_CLI_ARTIFACTS=str(tmp_path_factory.mktemp("artifacts")))
    try:
        good, bad = _build_eif(tag, out, env), _build_eif(variant, out, env)
    finally:
        subprocess.run(["docker", "image", "rm", variant, tag], capture_output=True, check=False)
    assert good.pcr0 != bad.pcr0
    yield good, bad


def _load_fakes() -> Any:
    spec = importlib.util.spec_from_file_location("nitro_fakes_tok", REPO_ROOT / "tests/unit/nitro_fakes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Host:
    """One emulated parent: private emulator locations, local KMS, vsock-proxy, gateway."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("sock", "vs", "home"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        _load_fakes().make_sysfs(root / "sysfs", cpus=8, threads=2, mem_available_mib=16384)
        self.env = dict(
            os.environ,
            NITRO_CLI_SOCKETS_PATH=str(root / "sock"),
            NITRO_VSOCK_DIR=str(root / "vs"),
            NITRO_EMULATOR_HOME=str(root / "home"),
            NITRO_ALLOCATOR_CONFIG=str(root / "allocator.yaml"),
            NITRO_EMULATOR_SYSFS_ROOT=str(root / "sysfs"),
            AWS_ACCESS_KEY_ID="local-instance-role",  # the parent hands the enclave its instance role
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        self.env.pop("AWS_PROFILE", None)
        self.procs: list[subprocess.Popen[bytes]] = []

    def emulator(self, *args: str, timeout: float = 300) -> str:
        return _run([EMULATOR, *args], self.env, timeout)

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        subprocess.run([EMULATOR, "terminate-enclave", "--all"], env=self.env, capture_output=True, check=False)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def host() -> Iterator[Host]:
    root = Path(f"/tmp/ntok-{uuid.uuid4().hex[:10]}")  # short: UNIX socket paths stay < 108 bytes
    h = Host(root)
    try:
        yield h
    finally:
        h.close()
        shutil.rmtree(root, ignore_errors=True)


def _start_services(host: Host, eif: Eif) -> tuple[str, str]:
    """Allocator, local KMS with a key bound to ``eif``'s PCR0, vsock-proxy, gateway; returns
    (gateway URL, KMS URL)."""
    size_mib = eif.path.stat().st_size // (1 << 20) + 1
    memory = max(512, size_mib * 4 + 64)
    (host.root / "allocator.yaml").write_text(f"---\nmemory_mib: {memory}\ncpu_count: 2\n")
    host.emulator("allocator", "apply")

    kms_port = free_port()
    kms_proc = host.spawn("kms", [str(VENV_BIN / "nitro-local-aws"), "--port", str(kms_port)])
    wait_for_port("127.0.0.1", kms_port, proc=kms_proc)
    kms_url = f"http://127.0.0.1:{kms_port}"
    kms = boto3.client(
        "kms",
        endpoint_url=kms_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    key_id = kms.create_key(Description="tokenizer e2e")["KeyMetadata"]["KeyId"]
    policy = attested_key_policy(ROLE, eif.pcr0)
    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    blob = kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")["CiphertextBlob"]
    (host.root / "data-key.b64").write_text(base64.b64encode(blob).decode())

    allowlist = host.root / "vsock-proxy.yaml"
    allowlist.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {kms_port}}}\n")
    host.spawn("proxy", [EMULATOR, "vsock-proxy", "8000", "127.0.0.1", str(kms_port), "--config", str(allowlist)])

    port = free_port()
    config = {
        "listen_port": port,
        "enclave_name": ENCLAVE_NAME,
        "nitro_cli": EMULATOR,
        "monitor_interval": 0.5,
        "request_timeout": 15.0,
        "kms_region": "us-east-1",
        "kms_ciphertext_file": str(host.root / "data-key.b64"),
        "kms_endpoint": kms_url,
        "kms_proxy_port": 8000,
        "measurements_file": str(eif.measurements),
        "attestation_root_pem": str(host.root / "home" / "root-ca.pem"),
    }
    (host.root / "gateway.yaml").write_text(json.dumps(config))  # JSON is YAML
    gateway = host.spawn(
        "gateway", [str(VENV_BIN / "enclave-tokenizer"), "gateway", "--config", str(host.root / "gateway.yaml")]
    )
    wait_for_port("127.0.0.1", port, proc=gateway)
    return f"http://127.0.0.1:{port}", kms_url


def _run_enclave(host: Host, eif: Eif) -> dict[str, Any]:
    size_mib = eif.path.stat().st_size // (1 << 20) + 1
    memory = max(512, size_mib * 4 + 64)
    out = host.emulator(
        "run-enclave",
        "--eif-path",
        str(eif.path),
        "--memory",
        str(memory),
        "--cpu-count",
        "2",
        "--enclave-cid",
        str(ENCLAVE_CID),
        "--enclave-name",
        ENCLAVE_NAME,
    )
    return json.loads(out)


def _http(method: str, url: str, body: Any = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait(url: str, predicate: Any, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    report: dict = {}
    while time.monotonic() < deadline:
        try:
            _, report = _http("GET", url)
        except (OSError, ValueError):
            report = {}
        if report and predicate(report):
            return report
        time.sleep(0.5)
    raise AssertionError(f"condition not reached within {timeout} s; last /healthz: {report}")


def test_tokenizer_end_to_end_in_the_emulator(host: Host, eifs: tuple[Eif, Eif]) -> None:
    good, bad = eifs
    gateway, _ = _start_services(host, good)
    _run_enclave(host, good)
    report = _wait(f"{gateway}/healthz", lambda r: r["status"] == "ok")
    assert report["enclave"]["state"] == "RUNNING" and report["enclave"]["cid"] == ENCLAVE_CID
    key_check = report["key"]["key_check"]
    code, token = _http("POST", f"{gateway}/v1/tokenize", {"pan": "4111-1111-1111-1111"})
    assert code == 200 and token["last_four"] == "1111" and len(token["token"]) == 32
    code, attested = _http("GET", f"{gateway}/healthz?attest=1")
    assert code == 200 and attested["attestation"]["valid"] is True, attested
    assert attested["attestation"]["pcrs"]["0"] == good.pcr0

    # Restart: the new enclave has no key; the gateway notices and provisions it again.
    host.emulator("terminate-enclave", "--enclave-name", ENCLAVE_NAME)
    _wait(f"{gateway}/healthz", lambda r: r["status"] != "ok")
    _run_enclave(host, good)
    report = _wait(f"{gateway}/healthz", lambda r: r["status"] == "ok")
    assert report["key"]["key_check"] == key_check
    assert _http("POST", f"{gateway}/v1/tokenize", {"pan": PAN})[1]["token"] == token["token"]

    # An image whose PCR0 is not in the key policy never gets the key, and /healthz says why.
    host.emulator("terminate-enclave", "--enclave-name", ENCLAVE_NAME)
    _run_enclave(host, bad)
    report = _wait(f"{gateway}/healthz", lambda r: r["key"]["last_error"] is not None and r["app"]["answering"])
    assert report["status"] == "unavailable" and report["enclave"]["state"] == "RUNNING"
    assert report["key"]["provisioned"] is False
    assert report["key"]["last_error"]["code"] == "kms_denied", report
    code, body = _http("POST", f"{gateway}/v1/tokenize", {"pan": PAN})
    assert code == 503 and body["error"]["code"] == "not_provisioned"
    code, attested = _http("GET", f"{gateway}/healthz?attest=1")
    assert code == 503 and attested["attestation"]["valid"] is False


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
