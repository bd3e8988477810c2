"""Parent side against real processes: the tokenizer server on emulated vsock, the emulator's NSM
server and vsock-proxy, the project's attestation-enforcing local KMS (nitro-local-aws), and the
aiohttp gateway. Covers the clients, the SigV4 signer, the attested key bootstrap and the gateway API.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from enclave_tokenizer import gateway as gateway_module
from enclave_tokenizer import kms, upgrade, vsock
from enclave_tokenizer.client import AsyncClient, Client, EnclaveUnavailable, TokenizerError
from enclave_tokenizer.gateway import Gateway, serve
from enclave_tokenizer.parent import ConfigError, GatewayConfig, load_measurements
from enclave_tokenizer.supervisor_state import StatusFile
from enclave_tokenizer.tokens import Tokenizer, capability_digest
from enclave_tokenizer.upgrade import UpgradeWatch
from tokenizer_harness import CAPABILITY, TEST_KEY, RunningServer, running_server

from tests.conftest import VENV_BIN, attested_key_policy, free_port, wait_for_port

PAN = "4111111111111111"
TK = Tokenizer.from_data_key(TEST_KEY)
PCRS = {0: hashlib.sha384(b"image").digest(), 1: hashlib.sha384(b"kernel").digest(), 2: hashlib.sha384(b"app").digest()}
OTHER_PCR0 = hashlib.sha384(b"another image").hexdigest()
ROLE = "arn:aws:iam::123456789012:role/enclave-parent"  # the local KMS's local-instance-role


# ------------------------------------------------------------------------------------------ SigV4


def test_sigv4_matches_botocore() -> None:
    creds = kms.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session/token+=")
    body = b'{"CiphertextBlob":"AAAA"}'
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.Decrypt"}
    host = "kms.eu-west-1.amazonaws.com"
    request = AWSRequest(method="POST", url=f"https://{host}/", data=body, headers=dict(headers))
    boto_creds = BotoCredentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    SigV4Auth(boto_creds, "kms", "eu-west-1").add_auth(request)
    # botocore takes "now" itself: sign at the same instant.
    now = dt.datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    ours = kms.sign_v4(
        method="POST", host=host, path="/", headers=headers, body=body, region="eu-west-1", credentials=creds, now=now
    )
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Security-Token"] == "session/token+="
    assert "wJalr" not in repr(creds)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def vsock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "vsock"
    path.mkdir()
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(path))
    monkeypatch.delenv("NITRO_ENCLAVE_CID", raising=False)
    return path


@pytest.fixture
def server(vsock_dir: Path) -> Iterator[RunningServer]:
    with running_server(vsock_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def emulator_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizer-emulator-home")


@pytest.fixture(scope="module")
def local_kms(tmp_path_factory: pytest.TempPathFactory, emulator_home: Path) -> Iterator[str]:
    """The project's nitro-local-aws (moto + attestation-enforcing KMS) trusting this module's root."""
    workdir = tmp_path_factory.mktemp("tokenizer-local-aws")
    port = free_port()
    env = {**os.environ, "NITRO_EMULATOR_HOME": str(emulator_home)}
    with (workdir / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "nitro-local-aws"), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def aws_creds(monkeypatch: pytest.MonkeyPatch) -> None:
    # The gateway hands the enclave the instance role's credentials (the local KMS's `local-instance-role`).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local-instance-role")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing-session")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _kms_client(url: str) -> Any:
    return boto3.client(
        "kms", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def _data_key(url: str, workdir: Path, pcr0: str) -> Path:
    """A key whose attested statement allows Decrypt for ``pcr0``; its data key's ciphertext (base64 file)."""
    client = _kms_client(url)
    key_id = client.create_key(Description="tokenizer test")["KeyMetadata"]["KeyId"]
    policy = attested_key_policy(ROLE, pcr0)
    client.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    blob = client.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")["CiphertextBlob"]
    path = workdir / f"data-key-{key_id}.b64"
    path.write_text(base64.b64encode(blob).decode())
    return path


@pytest.fixture
def nsm(tmp_path: Path, emulator_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from nitro_emulator.nsm import start_nsm_server

    sock = tmp_path / "nsm.sock"
    server = start_nsm_server(sock, dict(PCRS), "i-0123456789abcdef0-enc0123456789abcdef", home=emulator_home)
    monkeypatch.setenv("NITRO_NSM_SOCKET", str(sock))
    try:
        yield sock
    finally:
        server.close()


@pytest.fixture
def proxy(vsock_dir: Path, local_kms: str, tmp_path: Path) -> Iterator[int]:
    """The emulator's vsock-proxy: parent vsock port -> the local KMS (allowlisted)."""
    kms_port = int(local_kms.rsplit(":", 1)[1])
    allowlist = tmp_path / "vsock-proxy.yaml"
    allowlist.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {kms_port}}}\n")
    port = free_port()  # any free number will do as a vsock port
    proc = subprocess.Popen(
        [
            *(str(VENV_BIN / "nitro-cli-emulator"), "vsock-proxy", str(port), "127.0.0.1", str(kms_port)),
            *("--config", str(allowlist)),
        ],
        env={**os.environ, "NITRO_VSOCK_DIR": str(vsock_dir)},
        stderr=subprocess.PIPE,
    )
    path = vsock.unix_path(3, port)
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "vsock-proxy exited"
        assert time.monotonic() < deadline, "vsock-proxy did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class GatewayThread:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.url = f"http://127.0.0.1:{config.listen_port}"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        ready = asyncio.Event()

        async def main() -> None:
            self._task = asyncio.current_task()
            watcher = asyncio.ensure_future(ready.wait())
            watcher.add_done_callback(lambda _: self._ready.set())
            await serve(self.config, ready)

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass
        finally:
            self._ready.set()
            self.loop.close()

    def __enter__(self) -> GatewayThread:
        self.thread.start()
        assert self._ready.wait(20)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self.loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(20)

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def wait_health(self, status: int, timeout: float = 30.0, path: str = "/healthz") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            code, report = self.request("GET", path)
            if code == status or time.monotonic() > deadline:
                assert code == status, report
                return report
            time.sleep(0.2)


def _gateway_config(tmp_path: Path, **kw: Any) -> GatewayConfig:
    measurements = tmp_path / "app.eif.measurements.json"
    measurements.write_text(
        json.dumps(
            {
                "Measurements": {"HashAlgorithm": "Sha384 { ... }", **{f"PCR{i}": v.hex() for i, v in PCRS.items()}},
                "ImageDigest": "sha256:00",
                "EifSha384": "00",
                "EifPath": "app.eif",
            }
        )
    )
    base: dict[str, Any] = {
        "listen_port": free_port(),
        "enclave_cid": 16,
        "monitor_interval": 0.3,
        "request_timeout": 10.0,
        # Requests to a missing enclave are held this long (tests of the 503 answer stay quick).
        "hold_timeout": 0.5,
        "measurements_file": str(measurements),
        "detokenize_capability_sha256": capability_digest(CAPABILITY),
    }
    base.update(kw)
    return GatewayConfig(**base)


# ------------------------------------------------------------------------------------------ clients


def test_sync_client_ops_batches_and_reconnect(vsock_dir: Path) -> None:
    with running_server(vsock_dir) as srv:
        srv.provision_directly()
        time.sleep(0.05)
        client = Client(16, 5000, timeout=5, pool_size=2)
        assert client.tokenize("4111-1111-1111-1111") == {
            "token": TK.opaque(PAN),
            "last_four": "1111",
            "key_check": TK.key_check,
        }
        pans = [PAN, "bad", "5500000000000004"] * 700  # 2100 items -> 3 pipelined requests of 1000
        result = client.tokenize_batch(pans, mode="fpe", batch_size=1000)
        assert len(result["tokens"]) == 2100 and result["tokens"][2099] == TK.fpe("5500000000000004")
        assert [e["index"] for e in result["errors"]][:3] == [1, 4, 7]
        assert result["errors"][-1]["index"] == 2098
        rev = client.tokenize(PAN, mode="reversible")["token"]
        assert client.detokenize(rev, CAPABILITY)["pan"] == PAN
        with pytest.raises(TokenizerError) as info:
            client.detokenize(rev, "wrong")
        assert info.value.code == "forbidden"
        assert client.detokenize_batch([rev, rev], CAPABILITY)["pans"] == [PAN, PAN]
    # The enclave restarts: pooled connections are dead; the client reconnects and retries.
    with running_server(vsock_dir) as srv:
        srv.provision_directly()
        time.sleep(0.05)
        assert client.tokenize(PAN)["token"] == TK.opaque(PAN)
    with pytest.raises(EnclaveUnavailable):
        client.health()
    client.close()


def test_async_client_concurrency_and_retry(server: RunningServer) -> None:
    server.provision_directly()

    async def main() -> None:
        client = AsyncClient(16, 5000, pool_size=3, timeout=5)
        results = await asyncio.gather(*(client.tokenize(PAN) for _ in range(500)))
        assert {r["token"] for r in results} == {TK.opaque(PAN)}
        batch = await client.tokenize_batch([PAN] * 2500, batch_size=1000)
        assert batch["tokens"] == [TK.opaque(PAN)] * 2500 and batch["errors"] == []
        with pytest.raises(TokenizerError) as info:
            await client.tokenize("4111111111111112")
        assert info.value.code == "invalid_pan"
        # Kill every pooled connection from the server side: the next calls reconnect transparently.
        asyncio.run_coroutine_threadsafe(_abort_all(server), server.loop).result(5)
        await asyncio.sleep(0.05)
        assert (await client.tokenize(PAN))["token"] == TK.opaque(PAN)
        await client.close()
        missing = AsyncClient(99, 5000, retries=1, connect_timeout=1)
        with pytest.raises(EnclaveUnavailable):
            await missing.health()

    asyncio.run(main())


async def _abort_all(server: RunningServer) -> None:
    for conn in list(server.server.connections):
        conn.abort()


# ------------------------------------------------------------------------------------------ KMS refusal


def test_kms_answer_without_ciphertext_for_recipient_is_refused(vsock_dir: Path) -> None:
    """A KMS (or proxy) that answers with a plaintext, or without CiphertextForRecipient, is refused."""
    answers = iter([{"Plaintext": base64.b64encode(b"k" * 32).decode()}, {"KeyId": "x"}])

    async def fake_kms(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
        length = int({k.lower(): v for k, v in fields.items()}[b"content-length"])
        await reader.readexactly(length)
        body = json.dumps(next(answers)).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def main() -> list[str]:
        server = await vsock.start_server(fake_kms, 8123, cid=3)
        codes = []
        async with server:
            for _ in range(2):
                try:
                    await asyncio.to_thread(
                        kms.decrypt_for_recipient,
                        b"blob",
                        b"doc",
                        region="us-east-1",
                        credentials=kms.Credentials("a", "b"),
                        endpoint="http://kms.local",
                        proxy_port=8123,
                        allow_plain_http=True,
                    )
                except kms.KmsError as exc:
                    codes.append(exc.code)
        return codes

    assert asyncio.run(main()) == ["PlaintextRefused", "MissingCiphertextForRecipient"]


# ------------------------------------------------------------------------------------------ gateway


def test_gateway_provisions_through_attested_kms_serves_and_reprovisions(
    vsock_dir: Path, tmp_path: Path, local_kms: str, nsm: Path, proxy: int, aws_creds: None, emulator_home: Path
) -> None:
    from nitro_emulator.nsm import emulator_root_pem

    root = tmp_path / "root.pem"
    root.write_bytes(emulator_root_pem(emulator_home))
    config = _gateway_config(
        tmp_path,
        kms_region="us-east-1",
        kms_ciphertext_file=str(_data_key(local_kms, tmp_path, PCRS[0].hex())),
        kms_endpoint=local_kms,
        kms_proxy_port=proxy,
        attestation_root_pem=str(root),
    )
    with running_server(vsock_dir, proxy_port=proxy) as srv, GatewayThread(config) as gw:
        report = gw.wait_health(200)
        assert report["status"] == "ok" and report["key"]["provisioned"] and report["app"]["answering"]
        key_check = report["key"]["key_check"]
        code, single = gw.request("POST", "/v1/tokenize", {"pan": "4111 1111 1111 1111"})
        assert code == 200 and single["last_four"] == "1111" and len(single["token"]) == 32
        code, batch = gw.request("POST", "/v1/tokenize", {"pans": [PAN, "x"], "mode": "fpe"})
        assert code == 200 and batch["tokens"][0][:6] == "411111" and batch["errors"][0]["index"] == 1
        code, rev = gw.request("POST", "/v1/tokenize", {"pan": PAN, "mode": "reversible"})
        code, back = gw.request(
            "POST", "/v1/detokenize", {"token": rev["token"]}, {"X-Detokenize-Capability": CAPABILITY}
        )
        assert code == 200 and back["pan"] == PAN
        code, denied = gw.request("POST", "/v1/detokenize", {"token": rev["token"]})
        assert code == 403 and denied["error"]["code"] == "forbidden"
        code, attested = gw.request("GET", "/healthz?attest=1")
        assert code == 200 and attested["attestation"]["valid"] is True
        assert attested["attestation"]["pcrs"]["0"] == PCRS[0].hex()
        assert "canary" not in attested
        # The rollout gate's one request: attested health plus a tokenization of the test card number.
        code, deep = gw.request("GET", "/healthz?attest=1&canary=1")
        assert code == 200 and deep["attestation"]["valid"] is True and deep["canary"] == {"ok": True}
        # The plaintext key never crossed the parent: nothing the parent saw contains it.
        assert srv.server.service.key.tokenizer is not None
    # Enclave restart: a fresh (unprovisioned) server at the same address; the gateway re-provisions.
    with running_server(vsock_dir, proxy_port=proxy), GatewayThread(config) as gw:
        report = gw.wait_health(200)
        assert report["key"]["key_check"] == key_check
        code, again = gw.request("POST", "/v1/tokenize", {"pan": PAN})
        assert again["token"] == single["token"]


def test_gateway_detects_restart_and_reprovisions(
    vsock_dir: Path, tmp_path: Path, local_kms: str, nsm: Path, proxy: int, aws_creds: None
) -> None:
    config = _gateway_config(
        tmp_path,
        kms_region="us-east-1",
        kms_ciphertext_file=str(_data_key(local_kms, tmp_path, PCRS[0].hex())),
        kms_endpoint=local_kms,
        kms_proxy_port=proxy,
    )
    with GatewayThread(config) as gw:
        with running_server(vsock_dir, proxy_port=proxy):
            first = gw.wait_health(200)
            token = gw.request("POST", "/v1/tokenize", {"pan": PAN})[1]["token"]
        down = gw.wait_health(503)
        assert down["app"]["answering"] is False
        assert gw.request("POST", "/v1/tokenize", {"pan": PAN})[0] == 503
        with running_server(vsock_dir, proxy_port=proxy):
            again = gw.wait_health(200)
            assert again["key"]["key_check"] == first["key"]["key_check"]
            assert gw.request("POST", "/v1/tokenize", {"pan": PAN})[1]["token"] == token


def test_gateway_pcr0_not_in_policy_stays_unprovisioned(
    vsock_dir: Path, tmp_path: Path, local_kms: str, nsm: Path, proxy: int, aws_creds: None
) -> None:
    config = _gateway_config(
        tmp_path,
        kms_region="us-east-1",
        kms_ciphertext_file=str(_data_key(local_kms, tmp_path, OTHER_PCR0)),
        kms_endpoint=local_kms,
        kms_proxy_port=proxy,
    )
    with running_server(vsock_dir, proxy_port=proxy), GatewayThread(config) as gw:
        deadline = time.monotonic() + 30
        while True:
            code, report = gw.request("GET", "/healthz")
            if report["key"]["last_error"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code == 503 and report["status"] == "unavailable"
        assert report["app"]["answering"] is True and report["key"]["provisioned"] is False
        assert report["key"]["last_error"]["code"] == "kms_denied"
        assert "AccessDenied" in report["key"]["last_error"]["message"]
        code, body = gw.request("POST", "/v1/tokenize", {"pan": PAN})
        assert code == 503 and body["error"]["code"] == "not_provisioned"
        code, deep = gw.request("GET", "/healthz?canary=1")
        assert code == 503 and deep["canary"]["ok"] is False
        assert deep["canary"]["error"].startswith("not_provisioned:")


def test_gateway_http_errors(vsock_dir: Path, tmp_path: Path) -> None:
    config = _gateway_config(tmp_path, max_batch=10)
    with running_server(vsock_dir) as srv, GatewayThread(config) as gw:
        srv.provision_directly()
        report = gw.wait_health(200)
        assert report["enclave"]["state"] == "UNCHECKED"  # no enclave_name: nitro-cli not consulted
        cases = [
            (b"not json", 400, "bad_json"),
            ([1, 2], 400, "bad_request"),
            ({}, 400, "bad_request"),
            ({"pan": "4111111111111112"}, 400, "invalid_pan"),
            ({"pans": [PAN] * 11}, 413, "batch_too_large"),
            ({"pan": PAN, "mode": "rot13"}, 400, "bad_request"),
        ]
        for body, status, code in cases:
            got, answer = gw.request("POST", "/v1/tokenize", body)
            assert (got, answer["error"]["code"]) == (status, code)
            assert "4111111111111112" not in json.dumps(answer)
        got, answer = gw.request("POST", "/v1/detokenize", {"token": "rv1.AAAA", "capability": CAPABILITY})
        assert (got, answer["error"]["code"]) == (400, "invalid_token")
        # Unprovisioned and no KMS settings: health names the missing configuration.
        srv.unprovision()
        report = gw.wait_health(503)
        assert report["key"]["last_error"]["code"] == "config_error"


def test_healthz_wait_holds_the_answer_until_healthy(vsock_dir: Path, tmp_path: Path) -> None:
    with GatewayThread(_gateway_config(tmp_path)) as gw:
        for bad in ("abc", "301", "-1"):
            code, body = gw.request("GET", f"/healthz?wait={bad}")
            assert code == 400 and f"wait='{bad}'" in body["error"]["message"]
        # No enclave: the answer comes when the wait is over, still unhealthy.
        start = time.monotonic()
        code, report = gw.request("GET", "/healthz?wait=1")
        assert code == 503 and report["app"]["answering"] is False and time.monotonic() - start >= 1
        # An enclave that comes up and is provisioned while the request waits: one healthy answer.
        answer: dict[str, Any] = {}
        waiting = threading.Thread(target=lambda: answer.update(result=gw.request("GET", "/healthz?wait=25")))
        waiting.start()
        time.sleep(0.5)
        with running_server(vsock_dir) as srv:
            srv.provision_directly()
            waiting.join(30)
        assert answer["result"][0] == 200 and answer["result"][1]["key"]["provisioned"] is True


def test_requests_during_a_relaunch_are_held_not_failed(
    vsock_dir: Path, tmp_path: Path, local_kms: str, nsm: Path, proxy: int, aws_creds: None
) -> None:
    config = _gateway_config(
        tmp_path,
        kms_region="us-east-1",
        kms_ciphertext_file=str(_data_key(local_kms, tmp_path, PCRS[0].hex())),
        kms_endpoint=local_kms,
        kms_proxy_port=proxy,
        monitor_interval=30.0,  # the held requests themselves bring the new enclave back, not the monitor
        hold_timeout=20.0,
    )
    answers: list[tuple[int, float]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            code, body = gw.request("POST", "/v1/tokenize", {"pan": PAN})
            answers.append((code, time.monotonic() - start))
            assert code != 200 or body["token"] == token

    with GatewayThread(config) as gw:
        with running_server(vsock_dir, proxy_port=proxy):
            gw.wait_health(200)
            token = gw.request("POST", "/v1/tokenize", {"pan": PAN})[1]["token"]
            clients = [threading.Thread(target=client) for _ in range(4)]
            for thread in clients:
                thread.start()
            time.sleep(0.3)
        time.sleep(1.5)  # the enclave is being relaunched: nothing listens
        with running_server(vsock_dir, proxy_port=proxy):
            time.sleep(0.5)
            stop.set()
            for thread in clients:
                thread.join(30)
        assert answers and all(code == 200 for code, _ in answers), answers
        assert max(seconds for _, seconds in answers) >= 1.5  # some were held through the relaunch
        # A relaunch that does not come back within the bound is answered 503 after it.
        start = time.monotonic()
        code, body = gw.request("POST", "/v1/tokenize", {"pan": PAN})
        assert code == 503 and body["error"]["code"] == "enclave_unavailable"
        assert 20 <= time.monotonic() - start < 29


def test_a_stopping_gateway_answers_held_requests_and_health_waits_at_once(tmp_path: Path, vsock_dir: Path) -> None:
    """No enclave answers: a tokenize is held (hold_timeout) and a /healthz?wait waits; stopping the gateway
    ends both with their 503 instead of waiting out aiohttp's shutdown timeout (systemd would kill it)."""
    config = _gateway_config(tmp_path, hold_timeout=120.0)
    answers: dict[str, int] = {}

    def ask(name: str, method: str, path: str, body: Any = None) -> None:
        answers[name] = gw.request(method, path, body)[0]

    gw = GatewayThread(config)
    with gw:
        waiting = [
            threading.Thread(target=ask, args=("tokenize", "POST", "/v1/tokenize", {"pan": PAN})),
            threading.Thread(target=ask, args=("health", "GET", "/healthz?wait=120")),
        ]
        for thread in waiting:
            thread.start()
        time.sleep(1.0)  # both are waiting for the enclave now
        assert answers == {}
    assert not gw.thread.is_alive(), "the gateway did not stop within 20 s"
    for thread in waiting:
        thread.join(5)
    assert answers == {"tokenize": 503, "health": 503}


def test_held_requests_are_released_by_the_previous_configuration_serving(tmp_path: Path) -> None:
    """After a rejected change the last good configuration serves (degraded): held requests go to it."""
    gateway = Gateway(_gateway_config(tmp_path))
    down = {"status": "unavailable", "app": {"answering": False}, "key": {"last_error": None}}
    reports = iter([down, down, {"status": "degraded", "app": {"answering": True}, "key": {"last_error": None}}])

    async def check(provision: bool = True) -> dict[str, Any]:
        return next(reports)

    gateway.check = check  # type: ignore[method-assign]
    start = time.monotonic()
    assert asyncio.run(gateway.recovered(time.monotonic() + 20)) is True
    assert time.monotonic() - start < 10
    # An enclave that answers but whose key was refused will not change by waiting: released at once, False.
    refused = {"status": "unavailable", "app": {"answering": True}, "key": {"last_error": {"code": "kms_denied"}}}
    reports = iter([refused])
    assert asyncio.run(gateway.recovered(time.monotonic() + 20)) is False


def test_healthz_reports_the_supervisors_reason(vsock_dir: Path, tmp_path: Path) -> None:
    run_config = tmp_path / "tok.json"
    run_config.write_text("{}")
    status = tmp_path / "tok.json.status"
    supervisor = StatusFile(status, run_config)
    config = _gateway_config(tmp_path, supervisor_status_file=str(status))
    sha = hashlib.sha256(run_config.read_bytes()).hexdigest()
    reason = "E22: Insufficient CPUs available in the pool; running the previous configuration"
    with GatewayThread(config) as gw:
        # Nothing runs and the supervisor says why: the 503 carries its reason, not a bare status.
        failed = "E26: Insufficient memory requested; retrying in 5 s"
        supervisor.report("failed", sha, failed)
        code, report = gw.request("GET", "/healthz")
        assert code == 503 and report["reason"] == f"supervisor: failed: {failed}"
        with running_server(vsock_dir) as srv:
            srv.provision_directly()
            supervisor.report("running", sha, running="current")
            assert gw.wait_health(200)["reason"] is None
            # The configuration on disk was rejected; the previous one serves: degraded, with the reason, and a
            # waiting health request answers at once (waiting changes nothing).
            supervisor.report("fallback", sha, reason, running="last-good")
            start = time.monotonic()
            code, report = gw.request("GET", "/healthz?wait=20")
            assert time.monotonic() - start < 10
            assert (code, report["status"], report["reason"]) == (200, "degraded", f"supervisor: fallback: {reason}")
            assert report["supervisor"]["current"] is True and report["supervisor"]["running"] == "last-good"
            # A new configuration the supervisor has not applied yet: its old report is not about it.
            run_config.write_text('{"new": 1}')
            code, report = gw.request("GET", "/healthz")
            assert (code, report["status"], report["supervisor"]["current"]) == (200, "ok", False)
            srv.unprovision()
            code, report = gw.request("GET", "/healthz")
            assert (
                code == 503
                and report["reason"]
                == "key not provisioned: config_error: kms_region/kms_ciphertext_file not configured"
            )


def test_config_load_env_and_measurements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("enclave_name: tokenizer\nkms_region: eu-west-1\nkms_encryption_context: {app: pay}\n")
    monkeypatch.setenv("ENCLAVE_TOKENIZER_LISTEN_PORT", "9090")
    config = GatewayConfig.load(path)
    assert (config.listen_port, config.kms_region, config.kms_encryption_context) == (9090, "eu-west-1", {"app": "pay"})
    path.write_text("enclave_cid: 16\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        GatewayConfig.load(path)
    path.write_text("listen_port: 1\n")
    with pytest.raises(ValueError, match="enclave_cid or enclave_name"):
        GatewayConfig.load(path)
    config = _gateway_config(tmp_path)
    assert config.measurements_file is not None
    assert load_measurements(config.measurements_file) == {i: v.hex() for i, v in PCRS.items()}
    Path(config.measurements_file).write_text('{"eif_path": "/x.eif"}')
    with pytest.raises(ConfigError, match=f"cannot read measurements from {config.measurements_file}: .*lack"):
        load_measurements(config.measurements_file)


def test_gateway_hands_over_after_a_tools_upgrade(
    tmp_path: Path, vsock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_module, "_UPGRADE_CHECK_S", 0.05)
    record = tmp_path / ".wheelhouse.sha256"
    record.write_text("old\n")
    config = _gateway_config(tmp_path)

    async def main() -> tuple[int, bool]:
        ready = asyncio.Event()
        serving = asyncio.create_task(serve(config, ready, upgrade=UpgradeWatch(record)))
        await ready.wait()
        await asyncio.sleep(0.2)
        assert not serving.done()  # unchanged tools: it keeps serving
        _, writer = await asyncio.open_connection("127.0.0.1", config.listen_port)
        writer.close()
        record.write_text("new, longer\n")
        return config.listen_port, await asyncio.wait_for(serving, 10)

    port, upgraded = asyncio.run(main())
    assert upgraded is True
    with pytest.raises(OSError):  # the listener is closed before the re-exec
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    # main() re-executes when serve() reports an upgrade.
    execs: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(upgrade.os, "execv", lambda path, argv: execs.append((path, argv)))

    async def upgraded_serve(*_: Any, **__: Any) -> bool:
        return True

    monkeypatch.setattr(gateway_module, "serve", upgraded_serve)
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text("enclave_cid: 16\n")
    gateway_module.main(["--config", str(config_file)])
    assert len(execs) == 1


class _RelaunchingEnclave:
    """A fake enclave behind nitro-cli and vsock: describe shows it under ``cid``; it answers when its CID is in
    ``answering``; ``describes`` holds the (fake) clock of each describe."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clock = [1000.0]
        self.cid = 16
        self.answering: dict[int, dict[str, Any]] = {}
        self.describes: list[float] = []
        monkeypatch.setattr(gateway_module.time, "monotonic", lambda: self.clock[0])
        monkeypatch.setattr(gateway_module.parent, "describe_enclave", self.describe)

    async def describe(self, nitro_cli: str, name: str) -> dict[str, Any]:
        self.describes.append(self.clock[0])
        return {"State": "RUNNING", "EnclaveName": name, "EnclaveID": "enc", "EnclaveCID": self.cid}

    def gateway(self, config: GatewayConfig) -> Gateway:
        gw = gateway_module.Gateway(config)

        async def app_health() -> tuple[dict[str, Any] | None, str | None]:
            health = self.answering.get(gw.cid) if gw.cid is not None else None
            return health, None if health else "not answering"

        gw.app_health = app_health  # type: ignore[method-assign]
        return gw


def test_nitro_cli_is_asked_sparingly_while_the_enclave_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _gateway_config(tmp_path, enclave_cid=None, enclave_name="tok")
    enclave = _RelaunchingEnclave(monkeypatch)
    clock = enclave.clock

    async def main() -> list[dict[str, Any]]:
        gw = enclave.gateway(config)
        reports = []
        for _ in range(12):  # 6 s of a ?wait loop (0.5 s steps) while the enclave boots
            reports.append(await gw.check())
            clock[0] += 0.5
        # It comes up under another CID: the next describe finds it, and the same check asks it.
        enclave.cid = 17
        enclave.answering[17] = {"provisioned": True, "version": "1", "uptime_s": 1.0}
        up_at = clock[0]
        while (report := await gw.check())["status"] != "ok":
            reports.append(report)
            clock[0] += 0.5
        reports.append(report)
        assert clock[0] - up_at <= 5.0
        return reports

    reports = asyncio.run(main())
    assert len(enclave.describes) == 3  # at 0 s and 5 s while booting (not every 2 s), then the one finding CID 17
    assert all(r["status"] == "unavailable" for r in reports[:-1])
    assert reports[-1]["enclave"]["cid"] == 17


def test_a_supervised_relaunch_is_described_when_the_supervisor_reports_not_by_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status_path = tmp_path / "enclave.run.status"
    config = _gateway_config(
        tmp_path, enclave_cid=None, enclave_name="tok", supervisor_status_file=str(status_path), monitor_interval=60
    )
    supervisor = StatusFile(status_path, tmp_path / "enclave.run")
    supervisor.report("starting", "c0ffee", "relaunching: config_changed")
    enclave = _RelaunchingEnclave(monkeypatch)
    clock = enclave.clock

    async def main() -> dict[str, Any]:
        gw = enclave.gateway(config)
        for _ in range(40):  # 20 s of a ?wait loop (0.5 s steps) while the new enclave boots
            assert (await gw.check())["status"] == "unavailable"
            clock[0] += 0.5
        assert enclave.describes == [1000.0]  # the supervisor's report did not change: nitro-cli was not asked
        clock[0] += 10.5  # no new report for 30 s (a supervisor that is gone): asked once more
        await gw.check()
        assert enclave.describes == [1000.0, 1030.5]
        # The supervisor saw the new enclave pass its health bound (under another CID): the next check sees
        # the new report, asks nitro-cli at once and asks the enclave under its new CID.
        enclave.cid = 17
        enclave.answering[17] = {"provisioned": True, "version": "1", "uptime_s": 1.0}
        supervisor.report("running", "c0ffee", running="current")
        clock[0] += 0.5
        return await gw.check()

    report = asyncio.run(main())
    assert enclave.describes == [1000.0, 1030.5, 1031.0]
    assert report["status"] == "ok" and report["enclave"]["cid"] == 17
    assert report["supervisor"]["state"] == "running"


def test_gateway_stop_request_wins_over_an_upgrade(
    tmp_path: Path, vsock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_module, "_UPGRADE_CHECK_S", 60.0)  # the watch has not looked yet
    record = tmp_path / ".wheelhouse.sha256"
    record.write_text("old\n")
    config = _gateway_config(tmp_path)

    async def main() -> bool:
        ready = asyncio.Event()
        serving = asyncio.create_task(serve(config, ready, signals=True, upgrade=UpgradeWatch(record)))
        await ready.wait()
        record.write_text("new, longer\n")  # tools upgraded...
        os.kill(os.getpid(), signal.SIGTERM)  # ...and the service stopped: it must stop, not re-execute
        return await asyncio.wait_for(serving, 10)

    assert asyncio.run(main()) is False
