"""The gateway's coalescing of one-PAN requests: every caller gets what a request of its own would have
answered, the enclave's real operation (TokenizerService, in process) answering both ways."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from enclave_tokenizer.client import TokenizerError, _result
from enclave_tokenizer.gateway_coalesce import MAX_PAN_CHARS, Coalescer
from enclave_tokenizer.server import ServerConfig, TokenizerService
from enclave_tokenizer.tokens import Tokenizer

TK = Tokenizer.from_data_key(b"k" * 32)
# Valid, Luhn failure, separators, too short, not digits, other scripts' digits, spaces around.
PANS = [
    "4111111111111111",
    "4111111111111112",
    "4111-1111-1111-1111",
    "12",
    "abc",
    "٤١١١١١١١١١١١١١١١",
    " 4111 1111 1111 1111 ",
]


def _enclave(provisioned: bool = True) -> tuple[TokenizerService, list[dict[str, Any]]]:
    service = TokenizerService(ServerConfig())
    if provisioned:
        service.key.tokenizer = TK
    return service, []


def _outcome(call: Any) -> Any:
    try:
        return call()
    except TokenizerError as exc:
        return ("error", exc.code, exc.message)


def _run(service: TokenizerService, sent: list[dict[str, Any]], calls: list[tuple[str, str]], max_items: int = 1000):
    async def request(enclave_request: dict[str, Any]) -> dict[str, Any]:
        sent.append(enclave_request)
        await asyncio.sleep(0)  # an answer comes in a later turn, as over vsock
        return _result(service.handle_fast(1, "tokenize", dict(enclave_request)))

    async def main() -> list[Any]:
        coalescer = Coalescer(lambda: request, max_items)
        outcomes = await asyncio.gather(
            *(coalescer.tokenize(pan, mode, f"rid-{i}") for i, (pan, mode) in enumerate(calls)), return_exceptions=True
        )
        await coalescer.close()
        return [("error", o.code, o.message) if isinstance(o, TokenizerError) else o for o in outcomes]

    return asyncio.run(main())


def test_each_caller_gets_the_answer_of_its_own_request() -> None:
    service, sent = _enclave()
    calls = [(pan, mode) for mode in ("opaque", "fpe", "reversible") for pan in PANS]
    got = _run(service, sent, calls)
    alone = [
        _outcome(lambda p=pan, m=mode: _result(service.handle_fast(1, "tokenize", {"pan": p, "mode": m})))
        for pan, mode in calls
    ]
    assert got == alone
    assert any(isinstance(o, tuple) for o in got) and any(isinstance(o, dict) for o in got)  # both kinds seen
    # One enclave request per mode, the PANs in the callers' order, no request id of any one caller.
    assert [(r["mode"], r["pans"]) for r in sent] == [(m, PANS) for m in ("opaque", "fpe", "reversible")]
    assert all("rid" not in r and "pan" not in r for r in sent)


def test_a_lone_pan_goes_as_a_single_request_with_its_request_id() -> None:
    service, sent = _enclave()
    alone = _result(service.handle_fast(1, "tokenize", {"pan": PANS[0], "mode": "opaque"}))
    assert _run(service, sent, [(PANS[0], "opaque")]) == [alone]
    assert sent == [{"op": "tokenize", "mode": "opaque", "pan": PANS[0], "rid": "rid-0"}]


def test_a_failed_batch_fails_every_caller_alike() -> None:
    service, sent = _enclave(provisioned=False)
    got = _run(service, sent, [(pan, "opaque") for pan in PANS[:3]])
    assert {o[:2] for o in got} == {("error", "not_provisioned")}
    service, sent = _enclave()
    got = _run(service, sent, [(pan, "nonsense") for pan in PANS[:3]])  # the mode the enclave refuses
    assert {o[:2] for o in got} == {("error", "bad_request")}


def test_batches_are_split_at_max_items() -> None:
    service, sent = _enclave()
    got = _run(service, sent, [(PANS[0], "opaque")] * 5, max_items=2)
    assert len(set(map(str, got))) == 1 and isinstance(got[0], dict)
    assert [len(r.get("pans", [r.get("pan")])) for r in sent] == [2, 2, 1]


@pytest.mark.parametrize(
    ("fields", "accepted"),
    [
        ({"op": "tokenize", "mode": "opaque", "pan": PANS[0]}, True),
        ({"op": "tokenize", "mode": "opaque", "pan": "1" * (MAX_PAN_CHARS + 1)}, False),  # goes alone, checked
        ({"op": "tokenize", "mode": "opaque", "pan": 4111111111111111}, False),  # the enclave's own error
        ({"op": "tokenize", "mode": ["opaque"], "pan": PANS[0]}, False),
        ({"op": "tokenize", "mode": "opaque", "pans": [PANS[0]]}, False),
    ],
)
def test_what_is_coalesced(fields: dict[str, Any], accepted: bool) -> None:
    assert Coalescer.accepts(fields) is accepted
