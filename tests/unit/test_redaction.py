"""enclave_tokenizer.redaction: what is masked, what must stay readable, and that every path a record
takes (any logger, any handler, exceptions, stacks, extras, uncaught exceptions) goes through it."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import uuid
from collections.abc import Iterator

import pytest
from enclave_tokenizer import redaction
from enclave_tokenizer.redaction import redact
from enclave_tokenizer.tokens import Tokenizer

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SESSION = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQDx7u3BxampleSessionToken0123456789abcdefABCDEF=="


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("pan=4111111111111111", "4111111111111111"),
        ('{"pan": "5500 0000 0000 0004"}', "5500 0000 0000 0004"),
        ("card 4000-0566-5566-5556.", "4000-0566-5566-5556"),
        ("amex 378282246310005", "378282246310005"),
        ("maestro 6759649826438453", "6759649826438453"),
        ("19 digits 6011000990139424123", "6011000990139424123"),
        ("12 digits 501234567893", "501234567893"),
        ("url-encoded ?pan=4111%201111%201111%201111", "4111%201111%201111%201111"),
        ("form ?pan=4111+1111+1111+1111", "4111+1111+1111+1111"),
        ("glued to letters GET /x4111111111111111 HTTP/1.1", "4111111111111111"),
        ('bytes b\'\\r\\n{"pan": "4111111111111111"}\'', "4111111111111111"),
        ("key id AKIAIOSFODNN7EXAMPLE in text", "IOSFODNN7EXAMPLE"),
        ("temporary ASIAY34FZKBOKMUTVV7A", "Y34FZKBOKMUTVV7A"),
        (f"secret {SECRET} end", SECRET),
        (f"aws_secret_access_key={SECRET}", SECRET),
        (f"'X-Amz-Security-Token': '{SESSION}'", SESSION),
        ("Authorization: AWS4-HMAC-SHA256 Credential=AKID/20261202/us-east-1/kms/aws4_request, Signature=ab12", "ab12"),
        ("{'Authorization': 'Bearer abc.def'}", "abc.def"),
        ('"SessionToken": "short-but-named"', "short-but-named"),
        ("X-Detokenize-Capability: test-capability-secret", "test-capability-secret"),
        ('{"capability": "test-capability-secret"}', "test-capability-secret"),
        ('{"token": "rv1.AbCd_efGH-ij"}', "rv1.AbCd_efGH-ij"),
        ('{"CiphertextBlob": "AQIDAHh0b2tlbml6ZXI="}', "AQIDAHh0b2tlbml6ZXI="),
        ("blob AQICAHhBqNlqLjJ7b8AaY0FGHn2S3vNbqLpxJzmVo1H9Tn5WQgFq9w0BBwagbjBsAgEAMGcG", "AQICAHhBqNlq"),
    ],
)
def test_masked(text: str, hidden: str) -> None:
    out = redact(text)
    assert hidden not in out, out
    assert redact(out) == out  # masking is stable: a masked line is not masked again differently


def test_pan_mask_keeps_only_the_last_four() -> None:
    assert redact("pan 4111 1111 1111 1234 x") == "pan [PAN ...1234] x"
    assert redact("AKIAIOSFODNN7EXAMPLE") == "AKIA[REDACTED]"


@pytest.mark.parametrize(
    "text",
    [
        "took 12 ms, 1048576 bytes, 10000 items, port 5000, cid 16",
        "batch of 123456789 (9 digits) and 12345678901 (11 digits)",
        "key check 066cf292",
        "opaque token 9f86d081884c7d659a2feaa0c55ad015",
        "opaque token 01234567890123456789abcdef012345",
        "request id 550e8400-e29b-41d4-a716-446655440000",
        "request id 0b1d2a3c-0000-4000-8000-123456789012",
        "2026-12-02 01:17:50,220 enclave_tokenizer.gateway INFO x",
        "at 2026-12-02T01:17:50.220123+00:00 and [02/Dec/2026 01:17:45]",
        "epoch 1764637070, ms 1764637070220, us 1764637070220123, ns 1764637070220123456",
        "arn:aws:iam::123456789012:role/enclave-host",
        "arn:aws:kms:us-east-1:123456789012:key/0b1d2a3c-0000-4000-8000-123456789012",
        "PCR0 " + "a1" * 48,
        "sha256:" + "0123456789abcdef" * 4,
        "X-Amz-Date: 20261202T005919Z",
        "/work/wt-redact/enclave_src/enclave_tokenizer/gateway.py line 310",
        "enclave_tokenizer.gateway INFO tokenize took 3 ms; tokens: 5",
        "IPv6 2001:db8::1 and 127.0.0.1:8080",
    ],
)
def test_not_masked(text: str) -> None:
    assert redact(text) == text


def test_real_identifiers_stay_readable() -> None:
    tk = Tokenizer.from_data_key(bytes(range(32)))
    for _ in range(200):
        request_id = str(uuid.uuid4())
        assert redact(f"id {request_id}") == f"id {request_id}"
    assert redact(f"key check {tk.key_check}") == f"key check {tk.key_check}"
    opaque = tk.opaque("4111111111111111")
    assert redact(opaque) == opaque


def test_fpe_tokens_are_masked_like_pans() -> None:
    # Decision (see the module docstring): an fpe token is PAN-shaped and belongs in no log either.
    token = Tokenizer.from_data_key(bytes(range(32))).fpe("4111111111111111")
    assert token.isdigit() and len(token) == 16
    assert redact(f"token {token}") == f"token [PAN ...{token[-4:]}]"


# ------------------------------------------------------------------------------ records and handlers


@pytest.fixture
def installed() -> Iterator[io.StringIO]:
    """Masking installed for one test, with a plain handler on a third-party logger that does not
    propagate (as werkzeug adds its own), restored afterwards."""
    redaction.install()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    library = logging.getLogger("thirdparty.server")
    library.addHandler(handler)
    library.propagate = False
    library.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        library.removeHandler(handler)
        library.propagate = True
        redaction.uninstall()


def test_every_part_of_a_record_is_masked(installed: io.StringIO) -> None:
    lib = logging.getLogger("thirdparty.server")
    lib.error("Error handling request %r", b"POST / HTTP/1.1\r\n\r\n{'pan': '4111111111111111'}")
    lib.info("dict args %(pan)s", {"pan": "5500 0000 0000 0004"})
    try:
        raise ValueError("bad card 4000-0566-5566-5556 from AKIAIOSFODNN7EXAMPLE")
    except ValueError:
        lib.exception("failed")
    lib.warning("with stack", stack_info=True, extra={"raw": "4111111111111111"})
    lib.warning("broken format %s %s", "4111111111111111")  # wrong arity: args are not leaked either
    logging.getLogger("thirdparty.server.child").critical("child %s", "6011000990139424")
    out = installed.getvalue()
    for secret in (
        "4111111111111111",
        "5500 0000 0000 0004",
        "4000-0566-5566-5556",
        "IOSFODNN7EXAMPLE",
        "6011000990139424",
    ):
        assert secret not in out, out
    assert "ValueError: bad card [PAN ...5556]" in out and "Traceback (most recent call last)" in out
    assert out.count("[PAN ...1111]") >= 2


def test_extra_attributes_are_masked_by_the_handler_filter() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain", None, None)
    record.client_pan = "4111111111111111"
    assert redaction.RedactingFilter().filter(record) is True
    assert record.client_pan == "[PAN ...1111]"


def test_setup_filters_every_configured_handler_and_last_resort(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []
    stream = io.StringIO()
    try:
        redaction.setup("INFO", stream=stream)
        assert all(any(isinstance(f, redaction.RedactingFilter) for f in h.filters) for h in root.handlers)
        logging.getLogger("aiohttp.server").error("raw %s", "4111 1111 1111 1111", extra={"peer": "4111111111111111"})
        root.handlers = []
        logging.getLogger("nohandler.x").error("last resort %s", "AKIAIOSFODNN7EXAMPLE")  # no handler anywhere
    finally:
        root.handlers = saved
        redaction.uninstall()
    assert "[PAN ...1111]" in stream.getvalue() and "4111" not in stream.getvalue()
    err = capsys.readouterr().err
    assert "AKIA[REDACTED]" in err and "IOSFODNN7EXAMPLE" not in err


def test_uncaught_thread_exception_goes_through_the_masking(installed: io.StringIO) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    uncaught = logging.getLogger("uncaught")
    uncaught.addHandler(handler)
    try:

        def boom() -> None:
            raise RuntimeError("card 4111111111111111")

        thread = threading.Thread(target=boom, name="worker")
        thread.start()
        thread.join()
    finally:
        uncaught.removeHandler(handler)
    assert "RuntimeError: card [PAN ...1111]" in stream.getvalue()
    assert "4111111111111111" not in stream.getvalue()


# ------------------------------------------------------------------------------ JSON lines


def _json_setup(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch, env: str | None = None) -> list[logging.Handler]:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []
    if env is None:
        monkeypatch.delenv(redaction.LOG_FORMAT_ENV, raising=False)
    else:
        monkeypatch.setenv(redaction.LOG_FORMAT_ENV, env)
    return saved


def test_services_write_masked_json_lines_with_the_request_id(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    saved = _json_setup(stream, monkeypatch)
    try:
        redaction.setup("INFO", stream=stream)  # the services' call: default format -> JSON
        log = logging.getLogger("enclave_tokenizer.gateway")
        reset = redaction.request_id.set("req-42")
        try:
            log.info("tokenized %s", "4111111111111111", extra={"op": "tokenize", "status": 200, "duration_ms": 1.5})
        finally:
            redaction.request_id.reset(reset)
        log.warning("key change", extra={"event": "key_change", "old_key_check": "aa", "pan": "5500000000000004"})
        try:
            raise ValueError("card 4000056655665556")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().handlers = saved
        redaction.uninstall()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first, second, third = lines
    assert first["msg"] == "tokenized [PAN ...1111]" and first["level"] == "INFO"
    assert first["request_id"] == "req-42" and first["op"] == "tokenize" and first["status"] == 200
    assert first["duration_ms"] == 1.5 and first["host"] == socket.gethostname()
    assert first["ts"].endswith("Z") and first["logger"] == "enclave_tokenizer.gateway"
    assert "request_id" not in second and second["event"] == "key_change" and second["old_key_check"] == "aa"
    assert second["pan"] == "[PAN ...0004]"
    assert "ValueError: card [PAN ...5556]" in third["exc"]
    for secret in ("4111111111111111", "5500000000000004", "4000056655665556"):
        assert secret not in stream.getvalue()


def test_tools_write_text_unless_the_env_asks_for_json(monkeypatch: pytest.MonkeyPatch) -> None:
    for env, is_json in ((None, False), ("json", True), ("text", False)):
        stream = io.StringIO()
        saved = _json_setup(stream, monkeypatch, env)
        try:
            redaction.setup("WARNING", "%(levelname)s %(name)s: %(message)s", stream=stream)
            logging.getLogger("tool").warning("card %s", "4111111111111111")
        finally:
            logging.getLogger().handlers = saved
            redaction.uninstall()
        out = stream.getvalue()
        assert out.startswith("{") is is_json, (env, out)
        assert "[PAN ...1111]" in out and "4111111111111111" not in out
    monkeypatch.setenv(redaction.LOG_FORMAT_ENV, "xml")
    with pytest.raises(ValueError, match="'xml': expected 'json' or 'text'"):
        redaction.setup("INFO")
    redaction.uninstall()
