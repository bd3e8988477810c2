"""The gateway skips measuring (re-encoding) small flat requests: that shortcut must never let a request
past the enclave's frame limit, so its bound is checked against the real encoder."""

from __future__ import annotations

import json

from enclave_tokenizer import protocol
from enclave_tokenizer.gateway_requests import flat_and_small as _flat_and_small
from hypothesis import given
from hypothesis import strategies as st


@given(st.one_of(st.text(), st.lists(st.text(), max_size=20)), st.text(max_size=8))
def test_flat_small_requests_stay_within_the_frame_limit(value: object, mode: str) -> None:
    body = json.dumps({"pans": value, "mode": mode}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    fields = {"op": "tokenize", "mode": mode, "pans": value}
    assert _flat_and_small(fields, len(body))
    # The bound the shortcut relies on: a string re-encodes to at most 3x its UTF-8 bytes (+ quotes).
    assert protocol.encoded_size(fields) <= 3 * len(body) + 64


def test_shortcut_only_for_flat_small_bodies() -> None:
    assert _flat_and_small({"op": "tokenize", "mode": "opaque", "pan": "4111111111111111"}, 30)
    assert not _flat_and_small({"op": "tokenize", "pan": "4111111111111111"}, None)  # chunked: unknown size
    assert not _flat_and_small({"op": "tokenize", "pan": ["4111111111111111", [1]]}, 40)  # nested
    assert not _flat_and_small({"op": "tokenize", "pan": 1e15}, 10)  # numbers may grow (1e15 -> 1000...0.0)
    assert not _flat_and_small({"op": "tokenize", "pans": ["x"]}, protocol.MAX_REQUEST_BYTES // 4)
