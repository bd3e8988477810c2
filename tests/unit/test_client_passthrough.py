"""AsyncClient.request_json (what the gateway's batch routes answer): the result as the enclave encoded it,
the same JSON as the decoded result, whatever the request id; errors raised as by request()."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from enclave_tokenizer.client import AsyncClient, TokenizerError, _answer_id
from tokenizer_harness import CAPABILITY, ENCLAVE_CID, running_server

PANS = ["4111111111111111", "4111111111111112", "5500 0000 0000 0004", "12"]


def test_request_json_is_the_decoded_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path))
    with running_server(tmp_path) as server:
        server.provision_directly()

        async def main() -> None:
            client = AsyncClient(ENCLAVE_CID, 5000, pool_size=1)
            try:
                for rid in (None, "plain-id.1", "with/slash", 'quote"d'):
                    request = {"op": "tokenize", "mode": "opaque", "pans": PANS}
                    if rid is not None:
                        request["rid"] = rid
                    raw = await client.request_json(dict(request))
                    assert json.loads(raw) == await client.request(dict(request))
                    assert json.loads(raw)["errors"] and b'"rid"' not in raw
                tokens = json.loads(await client.request_json({"op": "tokenize", "pans": PANS[:1]}))["tokens"]
                raw = await client.request_json({"op": "detokenize", "tokens": tokens, "capability": CAPABILITY})
                assert json.loads(raw)["pans"] == [None]  # opaque tokens are not reversible: an item error
                with pytest.raises(TokenizerError) as refused:
                    await client.request_json({"op": "detokenize", "tokens": tokens, "capability": "wrong"})
                assert refused.value.code == "forbidden"
            finally:
                await client.close()

        asyncio.run(main())


def test_answer_ids_are_read_only_from_the_usual_prefix() -> None:
    assert _answer_id(b'{"v":1,"id":42,"ok":true,"result":{}}') == 42
    assert _answer_id(b'{"v":1,"id":null,"ok":false}') is None
    assert _answer_id(b'{"v":1,"id":-3,"ok":true}') is None  # decoded in full instead
    assert _answer_id(b'{"id":42,"v":1}') is None
