"""The gateway's HTTP contract against the real tokenizer server on emulated vsock: every answer (each
route's success and each error code) matches the OpenAPI document it serves at /openapi.json (validated
with openapi-spec-validator, bodies with jsonschema), carries a request id that reaches the enclave, and
gets one access log line; no card number or token appears in any log record."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enclave_tokenizer import protocol
from enclave_tokenizer.client import AsyncClient
from enclave_tokenizer.gateway import Gateway
from enclave_tokenizer.tokens import Tokenizer
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from tokenizer_harness import CAPABILITY, TEST_KEY, call, running_server

from tests.unit import test_client_gateway
from tests.unit.test_client_gateway import GatewayThread, _gateway_config

PAN, PAN2 = "4111111111111111", "5500000000000004"
TK = Tokenizer.from_data_key(TEST_KEY)
vsock_dir = test_client_gateway.vsock_dir  # the same fixture: an emulated vsock directory per test


class Contract:
    """Validates an answer against the operation's response in the served document."""

    def __init__(self, document: dict[str, Any]) -> None:
        validate_spec(document)
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry: Registry = Registry().with_resource("urn:gateway", resource)
        self.seen: set[tuple[str, str, int]] = set()

    def response(self, path: str, method: str, status: int) -> dict[str, Any]:
        shared = self.document["components"]["responses"]
        if path not in self.document["paths"]:  # paths outside the document: the shared NotFound answer
            return shared["NotFound"]
        operation = self.document["paths"][path].get(method.lower())
        if operation is None:  # a method the path does not have: the shared MethodNotAllowed answer
            assert status == 405, (method, path, status)
            return shared["MethodNotAllowed"]
        if str(status) not in operation["responses"]:
            raise AssertionError(f"{method} {path}: status {status} is not in the document")
        node = operation["responses"][str(status)]
        while "$ref" in node:
            node = _pointer(self.document, node["$ref"])
        return node

    def check(self, path: str, method: str, status: int, body: Any, headers: Any) -> None:
        response = self.response(path, method, status)
        schema = _absolute(response["content"]["application/json"]["schema"])
        Draft202012Validator(schema, registry=self.registry).validate(body)
        assert headers.get("Content-Type", "").startswith("application/json"), headers
        assert headers.get("X-Request-Id"), headers
        self.seen.add((path, method, status))


def _pointer(document: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _absolute(schema: dict[str, Any]) -> dict[str, Any]:
    """Local ``#/...`` references made absolute against the registered document."""
    return json.loads(json.dumps(schema).replace('"$ref": "#/', '"$ref": "urn:gateway#/'))


def _request(url: str, method: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def _raw(port: int, data: bytes, wait: float = 10.0) -> tuple[int, dict[str, str], Any]:
    """Send raw bytes; (status, headers, JSON body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    """Every record of every logger while the test runs (as a handler on the root sees them)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)


def test_served_document_is_valid_openapi_and_answers_match_it(
    vsock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured: list[logging.LogRecord]
) -> None:
    sent: list[dict[str, Any]] = []
    original = AsyncClient.call

    async def spy(self: AsyncClient, request: dict[str, Any], timeout: float | None = None) -> Any:
        sent.append(dict(request))
        return await original(self, request, timeout)

    monkeypatch.setattr(AsyncClient, "call", spy)
    config = _gateway_config(
        tmp_path, max_batch=5, max_body=4096, request_timeout=1.5, allowed_modes=["opaque", "reversible"]
    )
    tokens: list[str] = []
    with running_server(vsock_dir) as srv, GatewayThread(config) as gw:
        srv.provision_directly()
        gw.wait_health(200)
        status, document, _ = _request(gw.url + "/openapi.json", "GET")
        assert status == 200
        contract = Contract(document)

        def check(method: str, path: str, body: Any = None, want: int = 200, **headers: str) -> Any:
            got, answer, head = _request(gw.url + path, method, body, headers)
            assert got == want, (method, path, body, answer)
            contract.check(path.split("?", maxsplit=1)[0], method, got, answer, head)
            return answer, head

        # Success of each route (single and batch answers).
        single, head = check("POST", "/v1/tokenize", {"pan": PAN}, **{"X-Request-Id": "order-17.a"})
        assert single["token"] == TK.opaque(PAN) and head["X-Request-Id"] == "order-17.a"
        batch, _ = check("POST", "/v1/tokenize", {"pans": [PAN, "12", PAN2], "mode": "reversible"})
        assert batch["tokens"][1] is None and batch["errors"][0]["index"] == 1
        tokens += [single["token"], *(t for t in batch["tokens"] if t)]
        back, _ = check(
            "POST", "/v1/detokenize", {"token": batch["tokens"][0]}, **{"X-Detokenize-Capability": CAPABILITY}
        )
        assert back["pan"] == PAN
        both, _ = check(
            "POST", "/v1/detokenize", {"tokens": [batch["tokens"][2], "rv1.AAAA"], "capability": CAPABILITY}
        )
        assert both["pans"][0] == PAN2 and both["errors"][0]["code"] == "invalid_token"
        check("GET", "/healthz")
        check("GET", "/healthz?canary=1")
        # Each error code, JSON on every route.
        check("POST", "/v1/tokenize", b"{not json", want=400)
        check("POST", "/v1/tokenize", {"pan": "4111111111111112"}, want=400)
        check("GET", "/healthz?wait=abc", want=400)
        check("POST", "/v1/tokenize", {"pan": PAN, "mode": "fpe"}, want=403)
        check("POST", "/v1/detokenize", {"token": batch["tokens"][0], "capability": "wrong"}, want=403)
        check("GET", f"/v1/cards/{PAN}", want=404)
        check("GET", "/v1/tokenize", want=405)
        check("DELETE", "/healthz", want=405)
        check("POST", "/openapi.json", {}, want=405)
        check("POST", "/v1/tokenize", {"pans": [PAN] * 6}, want=413)
        check("POST", "/v1/detokenize", {"tokens": ["x" * 900] * 5, "capability": CAPABILITY}, want=413)
        head408 = (
            b"POST /v1/tokenize HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n"
        )
        status, headers, answer = _raw(config.listen_port, head408 + b'{"pan": "' + PAN.encode())
        assert status == 408
        contract.check("/v1/tokenize", "POST", status, answer, headers)
        srv.unprovision()
        check("POST", "/v1/tokenize", {"pan": PAN}, want=503)
        check("GET", "/healthz", want=503)
        # A client request id that looks like a card number is replaced, not echoed nor logged.
        _, head = check("POST", "/v1/tokenize", {"pan": PAN}, want=503, **{"X-Request-Id": PAN})
        assert head["X-Request-Id"] != PAN and len(head["X-Request-Id"]) == 32
    wanted = (
        {("/v1/tokenize", "POST", code) for code in (200, 400, 403, 408, 413, 503)}
        | {("/v1/detokenize", "POST", c) for c in (200, 403, 413)}
        | {("/healthz", "GET", c) for c in (200, 400, 503)}
        | {("/v1/tokenize", "GET", 405)}
    )
    assert wanted <= contract.seen, wanted - contract.seen
    # The request id went to the enclave with the request, and the enclave echoes it.
    assert {"op": "tokenize", "mode": "opaque", "pan": PAN, "rid": "order-17.a"} in sent
    # One access line per request, with the route's pattern (never the path as sent) and the request id.
    access = [r for r in captured if r.name == "enclave_tokenizer.access"]
    assert {(r.method, r.route, r.status) for r in access} >= {("GET", "?", 404), ("POST", "/v1/tokenize", 413)}
    first = next(r for r in access if r.route == "/v1/tokenize")
    assert first.op == "tokenize" and first.duration_ms >= 0
    codes = {(r.route, r.status, r.code) for r in access}
    assert ("/v1/tokenize", 403, "mode_not_allowed") in codes and ("/v1/tokenize", 503, "not_provisioned") in codes
    # Nothing logged a card number or a token.
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in captured)
    assert len(captured) >= 20
    for secret in (PAN, PAN2, "4111111111111112", *tokens):
        assert secret not in text, secret


def test_the_enclave_echoes_the_request_id_and_old_clients_are_unaffected(vsock_dir: Path) -> None:
    with running_server(vsock_dir) as srv:
        srv.provision_directly()
        time.sleep(0.05)
        with srv.connect() as sock:
            answer = call(sock, {"v": 1, "id": 1, "op": "tokenize", "pan": PAN, "rid": "abc-1"})
            assert answer["ok"] and answer["rid"] == "abc-1" and answer["result"]["token"] == TK.opaque(PAN)
            assert "rid" not in call(sock, {"v": 1, "id": 2, "op": "tokenize", "pan": PAN})  # no rid: as before
            bad = call(sock, {"v": 1, "id": 3, "op": "tokenize", "pan": "12", "rid": 7})  # invalid: ignored
            assert bad["ok"] is False and "rid" not in bad
            long = call(sock, {"v": 1, "id": 4, "op": "health", "rid": "x" * (protocol.MAX_ID_LENGTH + 1)})
            assert long["ok"] and "rid" not in long


def test_key_changes_are_logged_as_events_with_old_and_new_key_checks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gw = Gateway(_gateway_config(tmp_path))
    with caplog.at_level(logging.WARNING, logger="enclave_tokenizer.gateway"):
        gw._watch_key({"key_check": "aa11"}, rotated=False)  # first sight: no event
        gw._watch_key({"key_check": "bb22"}, rotated=True)  # a rotation this gateway provisioned
        gw._watch_key({"key_check": "cc33"}, rotated=False)  # nobody asked for this one
    # The gateway's records only: a pending task of an earlier test may be collected (asyncio logs it) meanwhile.
    records = [r for r in caplog.records if r.name == "enclave_tokenizer.gateway"]
    events = [(r.levelname, r.expected, r.old_key_check, r.new_key_check) for r in records if r.event == "key_change"]
    assert events == [("WARNING", True, "aa11", "bb22"), ("ERROR", False, "bb22", "cc33")]
    assert gw.unexpected_key_change == {"old_key_check": "bb22", "new_key_check": "cc33"}
