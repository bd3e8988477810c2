"""Provisioning that cannot be hijacked: the real server on emulated vsock, the emulator's NSM, the real
nitro-local-aws behind the emulator's vsock-proxy, and a fake KMS on a parent vsock port that answers with
a key wrapped for the enclave's own attested public key (what a hostile parent can do)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.data_key_record import GENERATION_CONTEXT_KEY
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from enclave_tokenizer import provisioning, vsock
from enclave_tokenizer.client import Client, TokenizerError
from enclave_tokenizer.cms import build_enveloped_data
from enclave_tokenizer.tokens import Tokenizer
from test_client_gateway import (  # the same real processes as the gateway tests
    PAN,
    PCRS,
    ROLE,
    GatewayThread,
    _gateway_config,
    _kms_client,
    aws_creds,
    emulator_home,
    local_kms,
    nsm,
    proxy,
    vsock_dir,
)
from tokenizer_harness import running_server

from tests.conftest import attested_key_policy, free_port

__all__ = ["aws_creds", "emulator_home", "local_kms", "nsm", "proxy", "vsock_dir"]

FAKE_KEY = bytes(range(100, 132))


def _key(url: str) -> str:
    client = _kms_client(url)
    meta = client.create_key(Description="provision pinning test")["KeyMetadata"]
    policy = attested_key_policy(ROLE, PCRS[0].hex())
    client.put_key_policy(KeyId=meta["KeyId"], PolicyName="default", Policy=json.dumps(policy))
    return meta["Arn"]


def _request(url: str, key_arn: str, proxy_port: int, generation: int = 0, **more: Any) -> dict[str, Any]:
    context = {GENERATION_CONTEXT_KEY: str(generation)} if generation else {}
    blob = _kms_client(url).generate_data_key_without_plaintext(
        KeyId=key_arn, KeySpec="AES_256", **({"EncryptionContext": context} if context else {})
    )["CiphertextBlob"]
    return {
        "ciphertext_blob": base64.b64encode(blob).decode(),
        "region": "us-east-1",
        "credentials": {"access_key_id": "testing", "secret_access_key": "testing"},
        "endpoint": url,
        "proxy_port": proxy_port,
        **({"encryption_context": context} if context else {}),
        **more,
    }


def _refused(client: Client, request: dict[str, Any]) -> str:
    with pytest.raises(TokenizerError) as info:
        client.provision(request)
    return info.value.code


class FakeKms:
    """A stand-in KMS on a parent vsock port: answers Decrypt with FAKE_KEY wrapped for the public key in
    the request's attestation document, under whatever KeyId it is told to claim."""

    def __init__(self, port: int, key_id: str, tls: ssl.SSLContext | None = None) -> None:
        self.port, self.key_id, self.tls = port, key_id, tls
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.tls is not None:
                await writer.start_tls(self.tls)
            head = await reader.readuntil(b"\r\n\r\n")
            fields = {k.lower(): v for k, v in (line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)}
            body = json.loads(await reader.readexactly(int(fields[b"content-length"])))
            self.requests += 1
            document = base64.b64decode(body["Recipient"]["AttestationDocument"])
            public_key = cbor2.loads(cbor2.loads(document)[2])["public_key"]
            envelope = build_enveloped_data(FAKE_KEY, public_key)
            answer = json.dumps({"KeyId": self.key_id, "CiphertextForRecipient": base64.b64encode(envelope).decode()})
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer.encode()))
            await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the enclave refused our certificate: exactly what should happen
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(vsock.start_server(self._handle, self.port, cid=3))
        self._ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())

    def __enter__(self) -> FakeKms:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _self_signed(tmp_path: Path, host: str) -> ssl.SSLContext:
    """A certificate for the real KMS host name, signed by nobody the enclave trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "fake-kms.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem)
    return context


@pytest.fixture
def enclave(vsock_dir: Path, nsm: Path, proxy: int, aws_creds: None) -> Iterator[Client]:
    with running_server(vsock_dir, proxy_port=proxy), Client(16, 5000, timeout=30) as client:
        yield client


def test_a_second_provision_with_another_key_is_refused(enclave: Client, local_kms: str, proxy: int) -> None:
    fleet_key = _key(local_kms)
    first = enclave.provision(_request(local_kms, fleet_key, proxy))
    token = enclave.tokenize(PAN)["token"]
    # Another data key of the same generation, even under the fleet's own KMS key: refused, no KMS call.
    assert _refused(enclave, _request(local_kms, fleet_key, proxy)) == "provision_refused"
    # A "rotation" under the caller's own KMS key (KMS names it in its answer): refused after Decrypt.
    other_key = _key(local_kms)
    assert _refused(enclave, _request(local_kms, other_key, proxy, generation=5)) == "provision_refused"
    health = enclave.health()
    assert health["key_check"] == first["key_check"] and health["key_arn"] == fleet_key
    assert health["provision_refused"] == 2 and health["key_changes"] == 0
    assert f"not the pinned key {fleet_key}" in health["last_provision_refusal"]["message"]
    assert enclave.tokenize(PAN)["token"] == token


def test_the_same_key_again_and_after_a_restart_is_accepted(
    vsock_dir: Path, nsm: Path, proxy: int, aws_creds: None, local_kms: str
) -> None:
    request = _request(local_kms, _key(local_kms), proxy)
    with running_server(vsock_dir, proxy_port=proxy), Client(16, 5000, timeout=30) as client:
        first = client.provision(request)
        assert client.provision(request) == first  # a gateway restart provisions again: nothing changes
        token = client.tokenize(PAN)["token"]
    with running_server(vsock_dir, proxy_port=proxy), Client(16, 5000, timeout=30) as client:
        assert client.provision(request)["key_check"] == first["key_check"]
        assert client.tokenize(PAN)["token"] == token and client.health()["provision_refused"] == 0


def test_rotation_to_a_newer_generation_keeps_old_tokens_usable(
    vsock_dir: Path, nsm: Path, proxy: int, aws_creds: None, local_kms: str, caplog: pytest.LogCaptureFixture
) -> None:
    from enclave_tokenizer.tokens import capability_digest
    from tokenizer_harness import CAPABILITY

    fleet_key = _key(local_kms)
    capability = {"detokenize_capability_sha256": capability_digest(CAPABILITY)}
    gen1 = _request(local_kms, fleet_key, proxy, generation=1, **capability)
    gen2 = _request(local_kms, fleet_key, proxy, generation=2, **capability)
    with running_server(vsock_dir, proxy_port=proxy), Client(16, 5000, timeout=30) as client:
        old = client.provision(gen1)
        old_opaque = client.tokenize(PAN)["token"]
        old_reversible = client.tokenize(PAN, mode="reversible")["token"]
        new = client.provision(gen2)
        assert new["key_check"] != old["key_check"] and new["generation"] == 2
        assert _refused(client, gen1) == "provision_refused"  # generations only move forward
        health = client.health()
        assert health["key_changes"] == 1 and health["previous_key_check"] == old["key_check"]
        change = health["last_key_change"]
        assert (change["old_key_check"], change["new_key_check"]) == (old["key_check"], new["key_check"])
        fresh = client.tokenize(PAN)
        assert fresh["token"] != old_opaque and fresh["key_check"] == new["key_check"]
        # Migration window: old tokens still detokenize and can be looked up, and say which key made them.
        back = client.detokenize(old_reversible, CAPABILITY)
        assert back["pan"] == PAN and back["key_check"] == old["key_check"]
        looked_up = client.request({"op": "tokenize", "pan": PAN, "key": "previous"})
        assert looked_up["token"] == old_opaque and looked_up["key_check"] == old["key_check"]
    assert any("data key rotated" in r.getMessage() and old["key_check"] in r.getMessage() for r in caplog.records)
    # After a restart the gateway sends the current key and the previous one (the fleet's record).
    previous = {"ciphertext_blob": gen1["ciphertext_blob"], "encryption_context": gen1["encryption_context"]}
    with running_server(vsock_dir, proxy_port=proxy), Client(16, 5000, timeout=30) as client:
        assert client.provision({**gen2, "previous": previous})["key_check"] == new["key_check"]
        assert client.detokenize(old_reversible, CAPABILITY)["pan"] == PAN
        assert client.health()["previous_key_generation"] == 1


def test_a_fake_kms_cannot_replace_the_key(
    enclave: Client, vsock_dir: Path, local_kms: str, proxy: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet_key = _key(local_kms)
    first = enclave.provision(_request(local_kms, fleet_key, proxy))
    fake_port = free_port()
    with FakeKms(fake_port, key_id=fleet_key) as fake:
        # The fake on a port of the caller's choosing: refused, only the configured vsock-proxy is used.
        hijack = {**_request(local_kms, fleet_key, proxy, generation=9), "proxy_port": fake_port}
        assert _refused(enclave, hijack) == "bad_request"
        assert fake.requests == 0
    fake_tokens = Tokenizer.from_data_key(FAKE_KEY)
    assert enclave.health()["key_check"] == first["key_check"] != fake_tokens.key_check

    # A Nitro host (not the emulated NSM): only https to the regional endpoint, certificate verified.
    monkeypatch.setattr(provisioning, "_emulated_nsm", lambda: False)
    with running_server(vsock_dir, cid=17, proxy_port=fake_port), Client(17, 5000, timeout=30) as real_host:
        plain = _request(local_kms, fleet_key, fake_port)
        assert _refused(real_host, plain) == "bad_request"  # plain http endpoint
        tls = _self_signed(tmp_path, "kms.us-east-1.amazonaws.com")
        with FakeKms(fake_port, key_id=fleet_key, tls=tls) as fake:
            request = {k: v for k, v in plain.items() if k != "endpoint"}
            with pytest.raises(TokenizerError) as info:
                real_host.provision(request)
            assert info.value.code == "kms_error" and "SSLCertVerificationError" in info.value.message
            assert fake.requests == 0  # the TLS handshake failed: no request was sent
            health = real_host.health()
            assert health["provisioned"] is False and health["key_check"] is None


@pytest.mark.parametrize(
    ("region", "field"),
    [("us-east-1\r\nX-Evil: 1", "region"), ("us-\x00east-1", "region"), ("üs-east-1", "region"), (7, "region")],
)
def test_region_and_credentials_are_checked_strictly(enclave: Client, region: Any, field: str) -> None:
    request = {
        "ciphertext_blob": "AAAA",
        "region": region,
        "credentials": {"access_key_id": "a", "secret_access_key": "b"},
    }
    with pytest.raises(TokenizerError) as info:
        enclave.provision(request)
    assert info.value.code == "bad_request" and f"'{field}'" in info.value.message
    bad_creds = {**request, "region": "us-east-1", "credentials": {"access_key_id": "a\r\nb", "secret_access_key": "b"}}
    with pytest.raises(TokenizerError) as info:
        enclave.provision(bad_creds)
    assert info.value.code == "bad_request" and "'access_key_id'" in info.value.message


def _record(key_arn: str, *entries: dict[str, Any]) -> str:
    """The fleet's data key record (as kms_enclave_data_key stores it) from provision requests."""
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import data_key_record

    def entry(request: dict[str, Any]) -> dict[str, Any]:
        blob = base64.b64decode(request["ciphertext_blob"])
        return data_key_record.entry(blob, request.get("encryption_context", {}), "2026-01-01T00:00:00Z")

    current, *previous = entries
    return data_key_record.dumps(
        data_key_record.build(key_arn, entry(current), entry(previous[0]) if previous else None)
    )


def _fleet_gateway(tmp_path: Path, local_kms: str, proxy: int) -> tuple[Any, Callable[[], None]]:
    """A gateway configuration whose delivered data key record holds generation 1 of a fleet key, and the
    rotation kms_enclave_data_key rotate=true would deliver (generation 2, generation 1 kept as previous)."""
    fleet_key = _key(local_kms)
    gen1 = _request(local_kms, fleet_key, proxy, generation=1)
    gen2 = _request(local_kms, fleet_key, proxy, generation=2)
    record = tmp_path / "datakey.json"
    record.write_text(_record(fleet_key, gen1) + "\n")
    config = _gateway_config(
        tmp_path, kms_region="us-east-1", kms_ciphertext_file=str(record), kms_endpoint=local_kms, kms_proxy_port=proxy
    )

    def deliver_rotation() -> None:
        record.write_text(_record(fleet_key, gen2, gen1) + "\n")

    return config, deliver_rotation


def test_gateway_applies_a_rotation_and_notices_an_unexpected_key(
    vsock_dir: Path, tmp_path: Path, local_kms: str, nsm: Path, proxy: int, aws_creds: None
) -> None:
    config, deliver_rotation = _fleet_gateway(tmp_path, local_kms, proxy)
    with running_server(vsock_dir, proxy_port=proxy), GatewayThread(config) as gw:
        first = gw.wait_health(200)["key"]
        assert first["generation"] == 1 and first["unexpected_change"] is None
        token = gw.request("POST", "/v1/tokenize", {"pan": PAN})[1]["token"]
        # kms_enclave_data_key rotate=true delivered a new record: the gateway provisions it, no restart.
        deliver_rotation()
        deadline = time.monotonic() + 30
        while (key := gw.request("GET", "/healthz")[1]["key"])["generation"] != 2:
            assert time.monotonic() < deadline, key
            time.sleep(0.2)
        assert key["key_check"] != first["key_check"] and key["unexpected_change"] is None
        assert gw.request("POST", "/v1/tokenize", {"pan": PAN})[1]["token"] != token
    # The enclave restarts and someone else provisions it first with their own key: the gateway says so.
    config.monitor_interval = 60.0  # only our /healthz requests look at the enclave
    with GatewayThread(config) as gw:
        with running_server(vsock_dir, proxy_port=proxy):
            known = gw.wait_health(200)["key"]["key_check"]
        # Holding the intruder's key before it listens: a gateway check racing the start cannot provision it first.
        with running_server(vsock_dir, proxy_port=proxy, provisioned_with=FAKE_KEY):
            report = gw.request("GET", "/healthz")[1]
            change = report["key"]["unexpected_change"]
            assert change == {"old_key_check": known, "new_key_check": Tokenizer.from_data_key(FAKE_KEY).key_check}
            # The intruder's key is of generation 0: the gateway put the fleet's newer key back.
            assert report["key"]["key_check"] == known


def test_concurrent_checks_provision_once_and_see_the_rotation_as_expected(
    vsock_dir: Path,
    tmp_path: Path,
    local_kms: str,
    nsm: Path,
    proxy: int,
    aws_creds: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from enclave_tokenizer.gateway_session import EnclaveSession

    config, deliver_rotation = _fleet_gateway(tmp_path, local_kms, proxy)

    def provisions() -> list[str]:
        # The gateway's successful provision calls (the server logs only a change of key).
        return [r.getMessage() for r in caplog.records if r.msg.startswith("enclave provisioned")]

    async def scenario() -> None:
        session = EnclaveSession(config, monitor=False)
        # The monitor, /healthz and a held request can all check at once.
        reports = await asyncio.gather(*(session.check() for _ in range(4)))
        assert [r["key"]["generation"] for r in reports] == [1, 1, 1, 1]
        assert len(provisions()) == 1, provisions()  # one KMS Decrypt, not one per check
        deliver_rotation()
        reports = await asyncio.gather(*(session.check() for _ in range(4)))
        assert [r["key"]["generation"] for r in reports] == [2, 2, 2, 2]
        assert len(provisions()) == 2, provisions()
        assert [r["key"]["unexpected_change"] for r in reports] == [None] * 4, reports

    with running_server(vsock_dir, proxy_port=proxy), caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    unexpected = [r for r in caplog.records if getattr(r, "event", None) == "key_change" and r.levelname == "ERROR"]
    assert not unexpected, unexpected
