"""The emulated vsock-proxy: allowlist rules and messages of the real one, and real forwarding."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nitro_emulator.vsock_proxy import ProxyError, check_allowlist, run

EMULATOR = str(Path(sys.executable).parent / "nitro-cli-emulator")


def allowlist(tmp_path: Path, text: str) -> str:
    path = tmp_path / "vsock-proxy.yaml"
    path.write_text(text)
    return str(path)


def test_allowlist_matches_by_name_or_resolved_ip(tmp_path: Path) -> None:
    config = allowlist(
        tmp_path, "allowlist:\n- {address: kms.example, port: 443}\n- {address: localhost, port: 8443}\n"
    )
    assert check_allowlist("localhost", 8443, config) in ("127.0.0.1", "::1")
    # 127.0.0.1 is one of the addresses `localhost` resolves to.
    assert check_allowlist("127.0.0.1", 8443, config, "ipv4") == "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "host", "port", "message"),
    [
        ("allowlist:\n- {address: localhost, port: 8443}\n", "localhost", 443, "not allowed"),
        ("allowlist:\n- {address: 10.0.0.1, port: 443}\n", "127.0.0.1", 443, "not allowed"),
        ("allowlist: []\n", "127.0.0.1", 443, "not allowed"),
        ("other: 1\n", "127.0.0.1", 443, "No allowlist field"),
        ("allowlist: [\n", "127.0.0.1", 443, "Bad yaml format"),
        ("allowlist:\n- {port: 443}\n", "127.0.0.1", 443, "No address field"),
        ("allowlist:\n- {address: localhost, port: x}\n", "127.0.0.1", 443, "No port field or invalid type"),
    ],
)
def test_allowlist_refusals(tmp_path: Path, text: str, host: str, port: int, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        check_allowlist(host, port, allowlist(tmp_path, text))


def test_missing_allowlist(tmp_path: Path) -> None:
    with pytest.raises(ProxyError, match="Could not open the file"):
        check_allowlist("127.0.0.1", 443, str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("x", "127.0.0.1", "443"), "Local port is not valid"),
        (("8000", "127.0.0.1", "70000"), "Remote port is not valid"),
        (("8000", "127.0.0.1", "443", "0"), "Number of workers must not be 0"),
    ],
)
def test_argument_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    config = allowlist(tmp_path, "allowlist: []\n")
    workers = args[3] if len(args) > 3 else "4"
    with pytest.raises(ProxyError, match=message):
        run(args[0], args[1], args[2], config, workers=workers)


def test_cli_refusal_output(tmp_path: Path) -> None:
    config = allowlist(tmp_path, "allowlist:\n- {address: localhost, port: 1}\n")
    proc = subprocess.run(
        [EMULATOR, "vsock-proxy", "8000", "127.0.0.1", "443", "--config", config],
        capture_output=True,
        text=True,
        check=False,
        env={"NITRO_VSOCK_DIR": str(tmp_path / "vs"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert proc.stderr == 'Error: "Error at checking the allowlist: The given address and port are not allowed"\n'
    assert not (tmp_path / "vs" / "3" / "8000").exists()


def test_forwards_vsock_to_tcp(tmp_path: Path) -> None:
    vsock_dir = tmp_path / "vs"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def echo() -> None:
            for _ in range(2):
                conn, _ = server.accept()
                with conn:
                    data = b"".join(iter(lambda c=conn: c.recv(65536), b""))
                    conn.sendall(b"tcp:" + data)

        threading.Thread(target=echo, daemon=True).start()
        config = allowlist(tmp_path, f"allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n")
        proxy = subprocess.Popen(
            [EMULATOR, "vsock-proxy", "8000", "127.0.0.1", str(port), "--config", config, "-w", "1"],
            env={"NITRO_VSOCK_DIR": str(vsock_dir), "PATH": "/usr/bin:/bin"},
            stderr=subprocess.PIPE,
        )
        try:
            listener = vsock_dir / "3" / "8000"
            deadline = time.monotonic() + 20
            while not listener.exists():
                assert proxy.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for payload in (b"one", b"x" * 200_000):
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(str(listener))
                    client.sendall(payload)
                    client.shutdown(socket.SHUT_WR)
                    assert b"".join(iter(lambda c=client: c.recv(65536), b"")) == b"tcp:" + payload
        finally:
            proxy.terminate()
            assert proxy.wait(timeout=10) == 0
    assert not listener.exists()
