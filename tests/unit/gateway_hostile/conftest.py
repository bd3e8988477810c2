"""Fixture of the hostile-client tests: the deployed chain as processes (see hostile_stack)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import boto3
import pytest
from hostile_stack import (
    ACCESS_KEY_ID,
    CAPABILITY,
    ENCLAVE_CID,
    PCRS,
    ROLE,
    SECRET_ACCESS_KEY,
    SESSION_TOKEN,
    Stack,
    _spawn,
    _wait_path,
    _wait_provisioned,
)

from tests.conftest import VENV_BIN, attested_key_policy, free_port, wait_for_port


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from nitro_emulator.nsm import start_nsm_server

    root = tmp_path_factory.mktemp("hostile-gateway")
    home, vsock_dir = root / "emulator-home", root / "vsock"
    vsock_dir.mkdir()
    (vsock_dir / str(ENCLAVE_CID)).mkdir()
    # The test process's own records (NSM server thread, boto3, botocore) are searched as well.
    own = logging.FileHandler(root / "test-process.log")
    own.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(own)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ENCLAVE_TOKENIZER_", "TOKENIZER_"))}
    base |= {"NITRO_EMULATOR_HOME": str(home), "NITRO_VSOCK_DIR": str(vsock_dir)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    nsm = None
    try:
        kms_port = free_port()
        procs["local-aws"] = _spawn(
            root, "local-aws", [str(VENV_BIN / "nitro-local-aws"), "--port", str(kms_port)], base
        )
        wait_for_port("127.0.0.1", kms_port, proc=procs["local-aws"])
        kms_url = f"http://127.0.0.1:{kms_port}"
        client = boto3.client(
            "kms", endpoint_url=kms_url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        key_id = client.create_key(Description="hostile gateway test")["KeyMetadata"]["KeyId"]
        policy = attested_key_policy(ROLE, PCRS[0].hex())
        client.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
        blob = client.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")["CiphertextBlob"]
        (root / "data-key.b64").write_text(base64.b64encode(blob).decode())

        allowlist = root / "vsock-proxy.yaml"
        allowlist.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {kms_port}}}\n")
        proxy_port = free_port()
        procs["vsock-proxy"] = _spawn(
            root,
            "vsock-proxy",
            [
                *(str(VENV_BIN / "nitro-cli-emulator"), "vsock-proxy", str(proxy_port), "127.0.0.1", str(kms_port)),
                *("--config", str(allowlist)),
            ],
            base,
        )
        _wait_path(vsock_dir / "3" / str(proxy_port), procs["vsock-proxy"], "vsock-proxy")

        nsm = start_nsm_server(root / "nsm.sock", dict(PCRS), "i-0123456789abcdef0-enc0123456789abcdef", home=home)
        enclave_env = base | {"NITRO_NSM_SOCKET": str(root / "nsm.sock"), "TOKENIZER_CID": str(ENCLAVE_CID)}
        procs["enclave"] = _spawn(
            root,
            "enclave",
            [sys.executable, "-m", "enclave_tokenizer.server", "--proxy-port", str(proxy_port), "--log-level", "DEBUG"],
            enclave_env,
        )
        _wait_path(vsock_dir / str(ENCLAVE_CID) / "5000", procs["enclave"], "enclave server")

        gateway_port = free_port()
        config = root / "gateway.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen_port": gateway_port,
                    "enclave_cid": ENCLAVE_CID,
                    "monitor_interval": 0.5,
                    "request_timeout": 3.0,  # also how long an unfinished body is waited for
                    "kms_region": "us-east-1",
                    "kms_ciphertext_file": str(root / "data-key.b64"),
                    "kms_endpoint": kms_url,
                    "kms_proxy_port": proxy_port,
                    "detokenize_capability_sha256": hashlib.sha256(CAPABILITY.encode()).hexdigest(),
                    "log_level": "DEBUG",  # the most the gateway can say
                }
            )
        )
        creds = {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY}
        creds["AWS_SESSION_TOKEN"] = SESSION_TOKEN
        gw = procs["gateway"] = _spawn(
            root, "gateway", [str(VENV_BIN / "enclave-tokenizer"), "gateway", "--config", str(config)], base | creds
        )
        wait_for_port("127.0.0.1", gateway_port, proc=gw)
        stack = Stack(root, f"http://127.0.0.1:{gateway_port}", gateway_port, gw, procs)
        _wait_provisioned(stack)
        yield stack
        for name in ("gateway", "enclave"):  # shutdown logs are searched too
            procs[name].send_signal(signal.SIGTERM)
            procs[name].wait(15)
        leaked = stack.leaked()
        assert not leaked, f"card numbers or credentials in logs after shutdown: {leaked}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if nsm is not None:
            nsm.close()
        logging.getLogger().removeHandler(own)
        own.close()
