"""service.encode_answer writes a tokenize batch's answer without the JSON encoder's per-string work: its
bytes must be exactly protocol.encode_frame's, for every mode, id and rid, and with errors (encoder)."""

from __future__ import annotations

import pytest
from enclave_tokenizer import protocol
from enclave_tokenizer.config import ServerConfig
from enclave_tokenizer.service import TokenBatch, TokenizerService, encode_answer
from enclave_tokenizer.tokens import Tokenizer, luhn_check_digit

PANS = [body + luhn_check_digit(body) for body in (f"{411111000000000 + i * 7919:015d}" for i in range(40))]


@pytest.fixture
def service() -> TokenizerService:
    service = TokenizerService(ServerConfig())
    service.key.tokenizer = Tokenizer.from_data_key(bytes(range(32)))
    return service


@pytest.mark.parametrize("mode", ["opaque", "fpe", "reversible"])
@pytest.mark.parametrize("request_id", [0, -(2**63), 2**63 - 1, "", 'a"\\b\u00e9\n</'])
@pytest.mark.parametrize("rid", [None, "req-1", '"\\\u2028'])
def test_batch_answer_is_the_encoders_bytes(
    service: TokenizerService, mode: str, request_id: object, rid: str | None
) -> None:
    request = {"v": 1, "id": request_id, "op": "tokenize", "pans": PANS, "mode": mode}
    if rid is not None:
        request["rid"] = rid
    answer = service.handle_fast(request_id, "tokenize", request)
    assert type(answer["result"]) is TokenBatch and not answer["result"]["errors"]
    fast = encode_answer(answer)
    assert fast == protocol.encode_frame(answer)
    assert protocol.decode_message(fast[4:])["result"]["tokens"] == answer["result"]["tokens"]


@pytest.mark.parametrize(
    "pans",
    [[], ["4111111111111112", *PANS[:3]], [*PANS[:3], 42, "4111-1111-1111-1111"], ["4111 1111 1111 1111"]],
)
def test_other_answers_too(service: TokenizerService, pans: list[object]) -> None:
    """Empty batches, refused items (None in the lists), separators, errors: the same bytes as the encoder."""
    request = {"v": 1, "id": 7, "op": "tokenize", "pans": pans, "rid": "r"}
    answer = service.handle_fast(7, "tokenize", request)
    assert encode_answer(answer) == protocol.encode_frame(answer)
    for other in (protocol.error(1, "bad_request", "x"), service.handle_fast(1, "health", {"op": "health"})):
        assert encode_answer(other) == protocol.encode_frame(other)


def test_a_changed_batch_falls_back_to_the_encoder(service: TokenizerService) -> None:
    answer = service.handle_fast(1, "tokenize", {"v": 1, "id": 1, "op": "tokenize", "pans": PANS[:2]})
    answer["result"]["extra"] = 'x"'  # keys the fast path does not know: the encoder writes it
    answer["more"] = True
    assert encode_answer(answer) == protocol.encode_frame(answer)
