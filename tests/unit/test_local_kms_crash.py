"""A crash inside moto answers a clean ValidationException and logs one line through logging, without values."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from nitro_emulator.local_aws import kms, kms_requests

SECRET = "4111111111111111-key-material"


class _Response:
    response_headers: dict[str, str] = {}
    body = json.dumps({"Plaintext": SECRET})

    def _get_action(self) -> str:
        return "Encrypt"


def test_a_moto_crash_is_a_validation_error_logged_by_class_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("_take_fault", "_authorize_request", "_check_new_policy"):
        monkeypatch.setattr(kms, name, lambda *_args: False)
    monkeypatch.setattr(kms_requests, "check_request", lambda *_args: None)

    def crash(_self: Any) -> Any:
        raise KeyError(SECRET)

    with caplog.at_level(logging.ERROR, logger="nitro-local-aws"):
        status, headers, body = kms._patched_call_action(crash)(_Response())  # type: ignore[arg-type]

    assert status == 400
    assert headers["Content-Type"] == "application/x-amz-json-1.1"
    assert json.loads(body)["__type"] == "ValidationException"
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("nitro-local-aws", "Encrypt failed in moto: KeyError")
    ]
    assert SECRET not in body and SECRET not in caplog.text
