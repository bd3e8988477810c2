"""Fuzzing the real gateway process over raw sockets (hypothesis): random request lines, headers,
framings (Content-Length right, short, long, missing, chunked, broken chunks) and JSON shapes, each with a
test card number somewhere. Every answer must be a well-formed HTTP response with a JSON body (a result
or an error with a code) and never a 5xx; afterwards no log holds a card number, a credential or a
traceback, a valid tokenize still gives the same token, and the gateway's memory stayed bounded.
Tried / clean counts go to the terminal summary through fuzz_counts.
"""

from __future__ import annotations

import json

import fuzz_counts
from hostile_stack import PANS, HttpAnswer, Stack, leaks, parse_answers, raw_exchange
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = 250
SURFACE = "gateway HTTP (raw sockets)"
ROUTES = ("/v1/tokenize", "/v1/detokenize", "/healthz", "/", "/v1/tokenize/", "/healthz?wait=0&attest=0")
# No HEAD: whether its answer has a body depends on whether the parser got that far, which a raw
# reader cannot tell apart from pipelined bytes.
METHODS = ("GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE")
_line_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF, blacklist_characters="\r\n"), max_size=30)
_token = st.text("ABCDEFGHIJKLMNOPRSTUVWXYZ", min_size=1, max_size=8)
_header_names = st.sampled_from(
    ("Content-Type", "Accept", "User-Agent", "X-Detokenize-Capability", "Accept-Encoding", "Cookie", "X-Card")
)
_header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
_odd_names = st.text("abcdefXYZ-_!:( \x00\x7f", min_size=1, max_size=12)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(PANS),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


def _dumps(value: object) -> str:
    # json.dumps writes NaN/Infinity for non-finite floats: exactly the non-JSON the gateway must refuse.
    return json.dumps(value, ensure_ascii=False, allow_nan=True)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    pan = draw(st.sampled_from(PANS))
    kind = draw(st.sampled_from(("tokenize", "batch", "json", "bytes", "detokenize")))
    if kind == "tokenize":
        body: object = {"pan": pan, "mode": draw(st.sampled_from(("opaque", "fpe", "reversible", "x", 1.5)))}
    elif kind == "batch":
        body = {"pans": [*draw(st.lists(st.sampled_from(PANS) | _json, max_size=8)), pan]}
    elif kind == "detokenize":
        body = {"token": draw(st.sampled_from((pan, "rv1.AAAA", 7))), "capability": draw(_json)}
    elif kind == "json":
        body = {"pan": pan, "x": draw(_json)}
    else:
        raw = draw(st.binary(max_size=60))
        cut = draw(st.integers(0, len(raw)))
        return raw[:cut] + pan.encode() + raw[cut:]
    text = _dumps(body)
    if draw(st.booleans()):  # a truncated or spliced document
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(("", "}", "\x00", "NaN", "-1e999", '"\\ud800"'))) + text[cut:]
    return text.encode("utf-8", "surrogatepass")


def _chunks(draw: st.DrawFn, body: bytes) -> tuple[bytes, bool]:
    """A chunked encoding of ``body``: well formed, or broken in one of the ways parsers trip on."""
    parts, rest = [], body
    while rest:
        size = draw(st.integers(1, max(len(rest), 1)))
        parts.append(rest[:size])
        rest = rest[size:]
    broken = draw(st.sampled_from(("ok", "ok", "size", "nul", "ext", "short", "unterminated")))
    out = b""
    for part in parts:
        size = b"%x" % len(part)
        if broken == "size":
            size = draw(st.sampled_from((b"zz", b"-1", b"4111111111111111", b"", b"1 2")))
        elif broken == "nul":
            size += b"\x00"
        elif broken == "ext":
            size += b";" + draw(st.binary(max_size=12)).replace(b"\n", b"")
        data = part[:-1] if broken == "short" and part else part
        out += size + b"\r\n" + data + b"\r\n"
    if broken != "unterminated":
        out += b"0\r\n\r\n"
    return out, broken in ("ok", "size", "nul", "ext")


def _mostly(draw: st.DrawFn, usual: st.SearchStrategy, odd: st.SearchStrategy, odds: int = 5) -> object:
    """One draw of ``odd`` in ``odds``, else ``usual``: most requests get past the parser to the handlers.
    (The odd case is the largest integer: hypothesis favours and shrinks towards the smallest.)"""
    return draw(odd if _one_in(draw, odds) else usual)


def _one_in(draw: st.DrawFn, odds: int) -> bool:
    return draw(st.integers(1, odds)) == odds


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(raw request, whether an answer is certain: False when the request may be left unfinished)."""
    method = _mostly(draw, st.sampled_from(("POST", "POST", "GET")), st.sampled_from(METHODS) | _token, odds=10)
    if method in ("CONNECT", "HEAD"):  # a tunnel: whatever follows is not HTTP; HEAD: see METHODS
        method = "GET"
    target = _mostly(draw, st.sampled_from(ROUTES[:3]), st.sampled_from(ROUTES) | _line_text.map(lambda t: "/" + t))
    if _one_in(draw, 4):
        target += ("&" if "?" in target else "?") + "pan=" + draw(st.sampled_from(PANS))
    version = _mostly(draw, st.sampled_from(("HTTP/1.1", "HTTP/1.0")), _line_text, odds=10)
    line = draw(_line_text) if _one_in(draw, 20) else f"{method} {target} {version}"
    headers = [] if _one_in(draw, 10) else [("Host", "127.0.0.1")]
    headers += draw(st.lists(st.tuples(_header_names, _header_values), max_size=3))
    if _one_in(draw, 10):
        headers.append((draw(_odd_names), draw(_line_text)))
    if draw(st.booleans()):
        headers.append(("X-Card", draw(st.sampled_from(PANS))))
    body = draw(_bodies())
    framing = draw(st.sampled_from(("exact", "exact", "short", "long", "none", "chunked", "close")))
    certain = True
    if framing in ("exact", "close"):
        headers.append(("Content-Length", str(len(body))))
    elif framing == "short":
        headers.append(("Content-Length", str(draw(st.integers(0, max(len(body) - 1, 0))))))
    elif framing == "long":
        headers.append(("Content-Length", str(len(body) + draw(st.integers(1, 10**6)))))
        certain = False
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body, certain = _chunks(draw, body)
    else:
        body = b""
    if framing == "close":
        headers.append(("Connection", "close"))
    head = line + "\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("utf-8", "surrogatepass") + body, certain


def _check(answers: list[HttpAnswer]) -> None:
    for answer in answers:
        assert answer.status < 500, f"{answer.status}: {answer.body[:300]!r}"
        if answer.body:  # HEAD answers carry no body
            assert answer.headers["content-type"].startswith("application/json"), answer.headers
            body = answer.json()
            assert answer.status < 400 or isinstance(body["error"]["code"], str), body
        assert not leaks(answer.body.decode("utf-8", "replace")), answer.body[:300]


def _tokenize(stack: Stack) -> dict:
    data = json.dumps({"pan": PANS[0]}).encode()
    head = f"POST /v1/tokenize HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: {len(data)}\r\n\r\n"
    answer = parse_answers(raw_exchange(stack.gateway_port, head.encode() + data))[0]
    assert answer.status == 200, answer.body
    return answer.json()


def test_gateway_raw_socket_fuzz(stack: Stack) -> None:
    before = _tokenize(stack)
    counts: dict[str, int] = {}
    counts.update(tried=0, answered=0, clean=0, unfinished=0, past_the_parser=0, answers_2xx=0, answers_4xx=0)
    rss: list[int] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests())
    def one(request: tuple[bytes, bool]) -> None:
        data, certain = request
        counts["tried"] += 1
        fuzz_counts.tried(SURFACE)
        if counts["tried"] in (EXAMPLES // 5, EXAMPLES):
            rss.append(stack.gateway_rss_kib())
        stream = raw_exchange(stack.gateway_port, data, timeout=5.0 if certain else 0.2, idle=0.05)
        answers = parse_answers(stream)
        if not answers:
            assert not certain, f"no answer to {data[:300]!r}"
            counts["unfinished"] += 1
            fuzz_counts.clean(SURFACE)  # an unfinished request left unanswered is what HTTP promises
            return
        counts["answered"] += 1
        _check(answers)
        counts["clean"] += 1
        fuzz_counts.clean(SURFACE)
        for answer in answers:
            counts["answers_2xx" if answer.status < 300 else "answers_4xx"] += 1
            if answer.status < 300 or answer.json()["error"]["code"] != "bad_http":
                counts["past_the_parser"] += 1

    one()
    after = _tokenize(stack)
    assert (after["token"], after["last_four"]) == (before["token"], before["last_four"])
    assert counts["clean"] == counts["answered"] and counts["answered"] >= EXAMPLES // 2, counts
    print(f"gateway fuzz: {counts}")  # the breakdown (-s, or the captured output of a failure)
    assert counts["past_the_parser"] >= EXAMPLES // 5, f"the fuzz hardly reached the handlers: {counts}"
    assert stack.leaked() == {}
    assert stack.tracebacks() == {}
    # Memory: what the gateway holds after the first fifth of the run is its working set; the rest of
    # the run may not add more than a few MiB to it.
    if len(rss) == 2:
        growth_mib = (rss[1] - rss[0]) / 1024
        counts["rss_growth_kib"] = rss[1] - rss[0]
        assert growth_mib < 16, f"gateway RSS grew by {growth_mib:.1f} MiB during the fuzz run"
