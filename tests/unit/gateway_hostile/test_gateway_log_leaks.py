"""Issue 20's card-numbers-in-logs defects, against the real gateway process: every request shape that
made aiohttp log the raw request (PAN included) at ERROR, plus bodies that gave 500s, sent over raw
sockets; every answer is JSON with a code and no 5xx, and no log of any process holds a card number, a
credential or a traceback afterwards.
"""

from __future__ import annotations

import json

import pytest
from hostile_stack import (
    ACCESS_KEY_ID,
    CAPABILITY,
    PANS,
    SECRET_ACCESS_KEY,
    SESSION_TOKEN,
    HttpAnswer,
    Stack,
    leaks,
    parse_answers,
    raw_exchange,
)


def _post(body: bytes, *, length: int | None = None, headers: str = "", path: str = "/v1/tokenize") -> bytes:
    size = len(body) if length is None else length
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
    return f"{head}Content-Length: {size}\r\n\r\n".encode() + body


def _chunked(chunks: bytes, headers: str = "") -> bytes:
    head = "POST /v1/tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
    return f"{head}{headers}\r\n".encode() + chunks


PAN_BODY = json.dumps({"pan": PANS[0]}).encode()
NAMED = json.dumps({"name": "Zoë Ünïcødé-Ørsted", "pan": PANS[1]}, ensure_ascii=False)
AUTH = f"Authorization: AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/20261202/us-east-1/kms/aws4_request\r\n"
TOKEN = f"X-Amz-Security-Token: {SESSION_TOKEN}\r\n"

# (name, raw bytes): each was answered 400 but logged the request bytes, or answered 500 with a traceback.
SHAPES: list[tuple[str, bytes]] = [
    ("body longer than Content-Length, Connection: close", _post(PAN_BODY, length=3, headers="Connection: close\r\n")),
    ("body longer than Content-Length, keep-alive", _post(PAN_BODY + b"\r\n" + PAN_BODY, length=5)),
    ("Content-Length in characters", _post(NAMED.encode(), length=len(NAMED), headers="Connection: close\r\n")),
    ("Content-Length in characters, keep-alive", _post(NAMED.encode(), length=len(NAMED))),
    ("PAN in a malformed request line", f"GET /v1/tokenize?pan={PANS[2]} HTTP/1.1 x\r\nHost: a\r\n\r\n".encode()),
    ("PAN with spaces in the request target", f"POST /v1/{PANS[1]} HTTP/1.1\r\nHost: a\r\n\r\n".encode()),
    ("PAN as the method", f"{PANS[0]} / HTTP/1.1\r\nHost: a\r\n\r\n".encode()),
    ("PAN as the HTTP version", f"GET / HTTP/{PANS[3]}\r\nHost: a\r\n\r\n".encode()),
    ("PAN in a header without a colon", f"GET /healthz HTTP/1.1\r\nX-Card {PANS[0]}\r\n\r\n".encode()),
    ("PAN in a header name", f"GET /healthz HTTP/1.1\r\n{PANS[4]}(: x\r\n\r\n".encode()),
    ("PAN in a header value with a NUL", f"GET /healthz HTTP/1.1\r\nX-Card: {PANS[0]}\x00\r\n\r\n".encode()),
    ("PAN after a bare LF", f"GET /healthz HTTP/1.1\nX: {PANS[0]}\r\n\r\n".encode()),
    ("NUL in a chunk size", _chunked(b"1a\x00\r\n" + PAN_BODY + b"\r\n0\r\n\r\n")),
    ("NUL in chunk data", _chunked(b"%x\r\n" % (len(PAN_BODY) + 1) + PAN_BODY[:-1] + b"\x00}\r\n0\r\n\r\n")),
    ("PAN in a chunk extension", _chunked(f"5;ext={PANS[2]}\x00\r\nhello\r\n0\r\n\r\n".encode())),
    ("PAN as a chunk size", _chunked(f"{PANS[0]}\r\n".encode() + PAN_BODY + b"\r\n0\r\n\r\n")),
    ("chunk longer than its size", _chunked(b"2\r\n" + PAN_BODY + b"\r\n0\r\n\r\n")),
    ("PAN in a bad trailer", _chunked(b"%x\r\n" % len(PAN_BODY) + PAN_BODY + f"\r\n0\r\nX {PANS[1]}\r\n\r\n".encode())),
    ("Content-Length and chunked", _post(PAN_BODY, headers="Transfer-Encoding: chunked\r\n")),
    ("two Content-Lengths", _post(PAN_BODY, headers=f"Content-Length: {len(PAN_BODY) + 1}\r\n")),
    ("negative Content-Length", _post(PAN_BODY, length=-1)),
    ("credentials in a malformed request", f"GET /healthz HTTP/1.1\r\n{AUTH}{TOKEN}X {PANS[0]}\r\n\r\n".encode()),
    (
        "capability in a malformed request",
        f"POST /v1/detokenize HTTP/1.1\r\nX-Detokenize-Capability: {CAPABILITY}\r\n\x01\r\n\r\n".encode(),
    ),
    ("secret key in a request line", f"GET /?k={SECRET_ACCESS_KEY} HTTP/1.1 z\r\n\r\n".encode()),
    ("non-finite number", _post(b'{"pan": -1e999}')),
    ("NaN", _post(b'{"pan": NaN, "card": "%s"}' % PANS[0].encode())),
    ("Infinity in a batch", _post(b'{"pans": ["%s", Infinity]}' % PANS[0].encode())),
    ("-Infinity as the mode", _post(b'{"pan": "%s", "mode": -Infinity}' % PANS[0].encode())),
    ("not UTF-8", _post(b'{"pan": "%s\xff\xfe"}' % PANS[0].encode())),
    (
        "frame over the enclave limit",
        _post(json.dumps({"pans": ["\u00e9" * 999] * 200 + [PANS[0]]}, ensure_ascii=False).encode()),
    ),
    ("body over max_body", _post(b'{"pan": "' + PANS[0].encode() + b'", "x": "' + b"a" * (1 << 20) + b'"}')),
    ("deep nesting", _post(b'{"pan": ' + b"[" * 100000 + b"]" * 100000 + b"}")),
    ("not found", _post(PAN_BODY, path=f"/v1/{PANS[0]}")),
    ("method not allowed", f"DELETE /v1/tokenize?pan={PANS[0]} HTTP/1.1\r\nHost: a\r\n\r\n".encode()),
    ("invalid PAN", _post(json.dumps({"pan": PANS[0][:-1] + "2"}).encode())),
    ("wrong types", _post(json.dumps({"pan": [PANS[0]], "mode": {"m": PANS[1]}}).encode())),
    ("detokenize a PAN", _post(json.dumps({"token": PANS[0]}).encode(), path="/v1/detokenize")),
]


def _check_answers(name: str, stream: bytes) -> list[HttpAnswer]:
    answers = parse_answers(stream)
    assert answers, f"{name}: no answer"
    for answer in answers:
        assert answer.status < 500, f"{name}: {answer.status} {answer.body[:300]!r}"
        assert answer.headers["content-type"].startswith("application/json"), f"{name}: {answer.headers}"
        body = answer.json()
        assert answer.status == 200 or isinstance(body["error"]["code"], str), f"{name}: {body}"
        assert not leaks(answer.body.decode()), f"{name}: the answer quotes what was sent: {answer.body[:300]!r}"
    return answers


@pytest.mark.parametrize(("name", "data"), SHAPES, ids=[s[0] for s in SHAPES])
def test_malformed_request_answered_as_json(stack: Stack, name: str, data: bytes) -> None:
    _check_answers(name, raw_exchange(stack.gateway_port, data))


def test_error_codes_of_the_reported_defects(stack: Stack) -> None:
    def answer(data: bytes) -> HttpAnswer:
        return parse_answers(raw_exchange(stack.gateway_port, data))[0]

    for body in (b'{"pan": -1e999}', b'{"pan": NaN}', b'{"pan": Infinity}', b'{"pans": [-Infinity]}'):
        got = answer(_post(body, headers="Connection: close\r\n"))
        assert (got.status, got.json()["error"]["code"]) == (400, "bad_json"), body
    big = answer(
        _post(
            json.dumps({"pans": ["\u00e9" * 999] * 200}, ensure_ascii=False).encode(), headers="Connection: close\r\n"
        )
    )
    assert (big.status, big.json()["error"]["code"]) == (413, "request_too_large")
    assert "at most" in big.json()["error"]["message"]
    over = answer(_post(b"x" * ((1 << 20) + 1), headers="Connection: close\r\n"))
    assert (over.status, over.json()["error"]["code"]) == (413, "request_too_large")
    missing = answer(b"GET /nowhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (missing.status, missing.json()["error"]["code"]) == (404, "not_found")
    wrong = answer(b"PUT /v1/tokenize HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert (wrong.status, wrong.json()["error"]["code"]) == (405, "method_not_allowed")
    assert "POST" in wrong.headers["allow"]
    parser = answer(f"GET /?pan={PANS[2]} HTTP/1.1 x\r\n\r\n".encode())
    assert (parser.status, parser.json()["error"]["code"]) == (400, "bad_http")
    # The enclave stayed connected and answers (the oversize request never reached it).
    ok = answer(_post(json.dumps({"pan": PANS[0]}).encode(), headers="Connection: close\r\n"))
    assert ok.status == 200 and ok.json()["last_four"] == "1111"


def test_no_card_number_credential_or_traceback_in_any_log(stack: Stack) -> None:
    for _name, data in SHAPES:  # again, whatever ran before: this test stands on its own
        raw_exchange(stack.gateway_port, data)
    # A successful detokenize (capability header) and an fpe tokenize: what a normal day logs.
    detok = parse_answers(
        raw_exchange(
            stack.gateway_port,
            _post(json.dumps({"pan": PANS[0], "mode": "reversible"}).encode(), headers="Connection: close\r\n"),
        )
    )[0].json()
    back = parse_answers(
        raw_exchange(
            stack.gateway_port,
            _post(
                json.dumps({"token": detok["token"]}).encode(),
                path="/v1/detokenize",
                headers=f"X-Detokenize-Capability: {CAPABILITY}\r\nConnection: close\r\n",
            ),
        )
    )[0].json()
    assert back["pan"] == PANS[0]
    logs = stack.logs()
    assert {"gateway.log", "enclave.log", "local-aws.log", "vsock-proxy.log", "test-process.log"} <= set(logs)
    # The logs are not empty: the gateway did log each refusal (so the search below searched something).
    assert logs["gateway.log"].count("refused a malformed HTTP request") >= 10, logs["gateway.log"][-3000:]
    assert stack.leaked() == {}
    assert stack.tracebacks() == {}
