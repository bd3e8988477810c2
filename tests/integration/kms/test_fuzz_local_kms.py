"""Fuzz suite (hypothesis) for the local KMS, against the real `nitro-local-aws` process.

Random JSON bodies for every KMS action (members of the right names with values of any JSON type,
strings with NUL / CR-LF / non-ASCII, unknown members, bodies that are not JSON objects or not JSON),
and random key policies stored and then evaluated. Every answer must be AWS-shaped: HTTP 200 with a
JSON body, or HTTP 4xx with a JSON `__type`; never 500, never an HTML traceback page. The suite ends
with a valid attested Decrypt, which must still work. Counts (tried / clean) are printed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from enclave_tokenizer.cms import decrypt_enveloped_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import OLD_PCR0, ROLE, document, get_policy, put_attested_statement, recipient

MODEL = botocore.session.get_session().get_service_model("kms")
ACTIONS = sorted(MODEL.operation_names)
NASTY = ["", "\x00", "a\r\nb", "é🔑", "alias/\x00x", "arn:aws:kms:us-east-1:123456789012:key/" + "0" * 36, "*" * 300]
STRINGS = st.one_of(st.text(max_size=40), st.sampled_from(NASTY))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), STRINGS)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=4), max_leaves=12
)


def post(url: str, action: str, body: bytes, access_key: str = "local-endpoint") -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "X-Amz-Target": f"TrentService.{action}",
            "Content-Type": "application/x-amz-json-1.1",
            "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/20260101/us-east-1/kms/aws4_request, "
            "SignedHeaders=host, Signature=00",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def aws_shaped(status: int, body: bytes) -> bool:
    if status >= 500:
        return False
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        return False
    if status == 200:
        return parsed is None or isinstance(parsed, dict)  # moto answers `null` for operations without output
    return 400 <= status < 500 and isinstance(parsed, dict) and bool(parsed.get("__type"))


@st.composite
def request_bodies(draw: Any, key_id: str) -> tuple[str, bytes]:
    action = draw(st.sampled_from([*ACTIONS, "NoSuchAction", ""]))
    kind = draw(st.sampled_from(["members", "members", "members", "json", "raw"]))
    if kind == "raw":
        return action, draw(st.binary(max_size=64))
    if kind == "json":
        return action, json.dumps(draw(JSON)).encode()
    members = list(MODEL.operation_model(action).input_shape.members) if action in ACTIONS else []
    body: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(members or ["KeyId"]), max_size=5, unique=True)):
        body[name] = draw(st.one_of(JSON, st.just(key_id), st.just(base64.b64encode(b"x" * 40).decode())))
    if draw(st.booleans()):
        body[draw(STRINGS)] = draw(JSON)
    return action, json.dumps(body).encode()


@st.composite
def policies(draw: Any) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Effect": draw(st.sampled_from(["Allow", "Deny", "Maybe", 1])),
        "Principal": draw(st.sampled_from(["*", {"AWS": ROLE}, {"AWS": "123456789012"}, {"AWS": 5}, []])),
        "Action": draw(st.sampled_from(["kms:*", "kms:Decrypt", ["kms:Describe*"], 7, "s3:*"])),
        "Resource": "*",
    }
    if draw(st.booleans()):
        statement["Condition"] = draw(
            st.one_of(
                JSON,
                st.dictionaries(
                    st.sampled_from(["StringEquals", "Bool", "NumericLessThan", "ForAnyValue:StringLike", "Nope"]),
                    st.one_of(JSON, st.dictionaries(st.sampled_from(["kms:RecipientAttestation:PCR0", "aws:x"]), JSON)),
                    max_size=3,
                ),
            )
        )
    admin = {
        "Sid": "Admin",
        "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
        "Action": "kms:*",
        "Resource": "*",
    }
    return {"Version": "2012-10-17", "Statement": [admin, statement]}


def server_rss_mib(url: str) -> float:
    """Resident memory of the `nitro-local-aws` process serving ``url``."""
    port = url.rsplit(":", 1)[1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if any(a.endswith(b"nitro-local-aws") for a in argv) and port.encode() in argv:
                status = (cmdline.parent / "status").read_text()
                return int(status.split("VmRSS:")[1].split()[0]) / 1024
    raise AssertionError(f"no nitro-local-aws process serves {url}")


def test_fuzz_local_kms_requests_and_policies(kms_endpoint, kms, parent_kms, key_id, enclave, capsys) -> None:
    rss_before = server_rss_mib(kms_endpoint.url)
    counts: Counter[str] = Counter()
    bad: list[str] = []
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"fuzz")["CiphertextBlob"]

    def record(kind: str, what: str, status: int, body: bytes) -> None:
        counts[f"{kind} tried"] += 1
        if aws_shaped(status, body):
            counts[f"{kind} clean"] += 1
        else:
            bad.append(f"{what}: HTTP {status} {body[:200]!r}")

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request_bodies(key_id))
    def requests(case: tuple[str, bytes]) -> None:
        action, body = case
        record("requests", f"{action} {body[:120]!r}", *post(kms_endpoint.url, action, body))

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(policies(), st.sampled_from(["local-endpoint", "local-instance-role", "local-key-admin"]))
    def stored(policy: dict[str, Any], who: str) -> None:
        text = json.dumps(policy)
        body = json.dumps(
            {"KeyId": key_id, "PolicyName": "default", "Policy": text, "BypassPolicyLockoutSafetyCheck": True}
        )
        record("policies", f"PutKeyPolicy {text[:160]}", *post(kms_endpoint.url, "PutKeyPolicy", body.encode()))
        for action, extra in (
            ("Decrypt", {"CiphertextBlob": base64.b64encode(blob).decode()}),
            ("DescribeKey", {"KeyId": key_id}),
        ):
            answer = post(kms_endpoint.url, action, json.dumps(extra).encode(), access_key=who)
            record("policies", f"{action} as {who} under {text[:160]}", *answer)

    requests()
    stored()
    with capsys.disabled():
        print(
            f"\nlocal KMS fuzz: requests {counts['requests clean']}/{counts['requests tried']} clean, "
            f"stored policies {counts['policies clean']}/{counts['policies tried']} clean"
        )
    assert not bad, "\n".join(bad[:20])
    # Still answering a valid attested request correctly (a fresh key: the fuzz may have disabled or
    # scheduled the deletion of the first one, as it is allowed to).
    fresh = kms.create_key(Description="after the fuzz")["KeyMetadata"]["KeyId"]
    put_attested_statement(kms, fresh, [OLD_PCR0], ["kms:Decrypt"])
    assert get_policy(kms, fresh)["Statement"][-1]["Sid"] == "EnclaveUse"
    blob = kms.encrypt(KeyId=fresh, Plaintext=b"fuzz")["CiphertextBlob"]
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    answer = parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
    assert "Plaintext" not in answer
    assert decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key) == b"fuzz"
    growth = server_rss_mib(kms_endpoint.url) - rss_before
    with capsys.disabled():
        print(f"local KMS after fuzzing: RSS {growth:+.1f} MiB")
    assert growth < 128, f"the local KMS grew by {growth:.0f} MiB over the fuzz"


@pytest.mark.parametrize("value", ["\x00", "a\r\nb", "é🔑", "alias/\r\n", "\ud800"])
def test_control_and_non_ascii_characters_in_fields(kms_endpoint, key_id, value) -> None:
    for action, field in (
        ("DescribeKey", "KeyId"),
        ("CreateAlias", "AliasName"),
        ("Encrypt", "KeyId"),
        ("ListAliases", "KeyId"),
    ):
        body = json.dumps({field: value, "TargetKeyId": key_id, "Plaintext": "eA=="}).encode()
        status, answer = post(kms_endpoint.url, action, body)
        assert 400 <= status < 500 and json.loads(answer)["__type"], (action, value, status, answer[:200])


@pytest.mark.parametrize(
    "body", [b"[" * 200000 + b"]" * 200000, b'{"KeyId": ' + b"[" * 200000 + b"]" * 200000 + b"}", b"\xff\xfe", b"NaN"]
)
def test_deep_or_undecodable_bodies(kms_endpoint, body) -> None:
    status, answer = post(kms_endpoint.url, "DescribeKey", body)
    assert status == 400 and json.loads(answer)["__type"] == "SerializationException", (status, answer[:200])
