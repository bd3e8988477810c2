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


def test_a_malformed_answer_is_a_bad_response(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer whose first bytes route it but whose JSON is broken fails its caller as bad_response."""
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path))
    from enclave_tokenizer import protocol, vsock

    async def main() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while header := await reader.read(4):
                body = await reader.readexactly(int.from_bytes(header, "big"))
                request_id = json.loads(body)["id"]
                writer.write(protocol.frame(b'{"v":1,"id":%d,"ok":true,"result":{"tok' % request_id))
                await writer.drain()

        path = vsock.unix_path(ENCLAVE_CID, 5009)
        path.parent.mkdir(parents=True, exist_ok=True)
        server = await asyncio.start_unix_server(answer, str(path))
        client = AsyncClient(ENCLAVE_CID, 5009, pool_size=1, timeout=5)
        try:
            for call in (client.request, client.request_json):
                with pytest.raises(TokenizerError) as failed:
                    await call({"op": "tokenize", "pans": ["4111111111111111"]})
                assert failed.value.code == "bad_response"
        finally:
            await client.close()
            server.close()

    asyncio.run(main())
