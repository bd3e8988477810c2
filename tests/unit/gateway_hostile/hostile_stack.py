"""The deployed parent/enclave chain as processes, each logging where the service would (its own file):
nitro-local-aws (moto + attested KMS), the emulator's vsock-proxy, the enclave server
(``python -m enclave_tokenizer.server``) and the gateway (``enclave-tokenizer gateway``), provisioned
through the real attested KMS path with credential-shaped AWS credentials. The test process's own log
records (the NSM server thread, boto3) go to a file too. Tests here attack the gateway over raw sockets
and then search every one of those logs for the card numbers and credentials they used.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROLE = "arn:aws:iam::123456789012:role/enclave-host"
PCRS = {0: hashlib.sha384(b"image").digest(), 1: hashlib.sha384(b"kernel").digest(), 2: hashlib.sha384(b"app").digest()}
ENCLAVE_CID = 16
# Test card numbers of the card networks (never real cards), in the shapes apps send them.
PANS = ("4111111111111111", "5500 0000 0000 0004", "4000-0566-5566-5556", "378282246310005", "6011000990139424")
# Credential-shaped values: the gateway's AWS credentials (sent on to the enclave, which signs KMS calls
# with them) and the detokenize capability.
ACCESS_KEY_ID = "AKIATESTREDACTION123"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzzREDACT1x"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjE" + base64.b64encode(secrets.token_bytes(240)).decode()
CAPABILITY = "detok-capability-" + secrets.token_hex(16)
SECRETS = (ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN, CAPABILITY)


def pan_pattern(pan: str) -> re.Pattern[str]:
    """Any rendering of ``pan``'s digits: with or without spaces, dashes or other single separators."""
    digits = re.sub(r"\D", "", pan)
    return re.compile(r"[^0-9A-Za-z]?".join(digits))


def leaks(text: str) -> list[str]:
    """Which test card numbers or credentials (or a 24-character piece of one) appear in ``text``."""
    found = [pan for pan in PANS if pan_pattern(pan).search(text)]
    for value in SECRETS:
        pieces = {value[i : i + 24] for i in range(0, max(len(value) - 23, 1), 8)}
        if value in text or any(piece in text for piece in pieces):
            found.append(value[:8] + "...")
    return found


@dataclass
class Stack:
    root: Path
    gateway_url: str
    gateway_port: int
    gateway: subprocess.Popen[bytes]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def logs(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") for p in sorted(self.root.glob("*.log"))}

    def leaked(self) -> dict[str, list[str]]:
        return {name: found for name, text in self.logs().items() if (found := leaks(text))}

    def tracebacks(self) -> dict[str, int]:
        return {name: n for name, text in self.logs().items() if (n := text.count("Traceback (most recent"))}

    def gateway_rss_kib(self) -> int:
        status = Path(f"/proc/{self.gateway.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def _spawn(root: Path, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (root / f"{name}.log").open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_path(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.05)


def _wait_provisioned(stack: Stack) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(stack.gateway_url + "/healthz", timeout=10) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as err:
            report = err.read()
            assert time.monotonic() < deadline, f"gateway never healthy: {report[:500]!r}\n{stack.logs()}"
        except OSError:
            assert stack.gateway.poll() is None, stack.logs().get("gateway.log")
        time.sleep(0.2)


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, idle: float = 0.3) -> bytes:
    """Send ``data`` on a fresh connection and read until the gateway closes it, or, once a complete
    answer came, until nothing more comes for ``idle`` seconds (a keep-alive connection stays open).
    No half-close: aiohttp takes a client's FIN as the end of the connection and answers nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the gateway may answer and close before all was sent
            sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(idle if _complete(received) else max(deadline - time.monotonic(), 0.01))
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        return received


def _complete(stream: bytes) -> bool:
    try:
        return bool(parse_answers(stream))
    except (AssertionError, KeyError, ValueError):
        return False


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def parse_answers(stream: bytes, head_request: bool = False) -> list[HttpAnswer]:
    """Every HTTP/1.x response in ``stream``; AssertionError if any is not well formed (with a length).
    ``head_request``: the first request was a HEAD (its answer has a Content-Length but no body; requests
    pipelined behind it are not HEADs)."""
    answers: list[HttpAnswer] = []
    rest = stream
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.[01] (\d{3}) .*", lines[0])
        assert match, f"not an HTTP/1.x status line: {lines[0][:100]!r}"
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon, f"bad response header {line!r}"
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_request and not answers else int(headers["content-length"])
        assert len(rest) >= length, "response body shorter than its Content-Length"
        answers.append(HttpAnswer(int(match.group(1)), headers, rest[:length]))
        rest = rest[length:]
    return answers
