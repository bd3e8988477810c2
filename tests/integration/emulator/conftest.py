"""Fixtures for the emulator's integration tests (build: test_build.py; runtime: test_runtime*.py).

Runtime tests get private emulator locations through the environment overrides (sockets, vsock,
emulator home, allocator config, optionally a fake sysfs topology), so they never touch /run or /etc
and can run in parallel. The probe image (python3 base + a small vsock server) is built once per
session with `nitro-cli-emulator build-enclave`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

EMULATOR = str(Path(sys.executable).parent / "nitro-cli-emulator")
REPO = Path(__file__).resolve().parents[3]
PROBE_PORT = 5005

# The enclave side of the runtime tests: a vsock server answering one command per connection.
PROBE_APP = r"""
import base64, json, os, socket, struct, sys

VSOCK = os.environ["NITRO_VSOCK_DIR"]
CID = os.environ["NITRO_ENCLAVE_CID"]


def cbor_text(s):
    b = s.encode()
    return bytes([0x60 + len(b)]) + b


def attestation_request(nonce):
    # {"Attestation": {"nonce": h'..', "public_key": null, "user_data": null}} in CBOR, by hand:
    # the probe image has no cbor2.
    body = b"\xa3" + cbor_text("nonce") + b"\x58" + bytes([len(nonce)]) + nonce
    body += cbor_text("public_key") + b"\xf6" + cbor_text("user_data") + b"\xf6"
    return b"\xa1" + cbor_text("Attestation") + body


def nsm_call(request):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.environ["NITRO_NSM_SOCKET"])
        s.sendall(struct.pack(">I", len(request)) + request)
        size = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
        return s.recv(size, socket.MSG_WAITALL)


def facts():
    out = {"pid": os.getpid(), "uid": os.getuid(), "hostname": socket.gethostname()}
    out["interfaces"] = sorted(os.listdir("/sys/class/net"))
    out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    out["cpus"] = sorted(os.sched_getaffinity(0))
    out["env"] = {k: v for k, v in os.environ.items() if k.startswith(("NITRO_", "HELLO"))}
    out["mounts"] = open("/proc/self/mountinfo").read().splitlines()
    out["run_vsock"] = sorted(os.listdir("/run/vsock"))
    try:
        os.mkdir("/mnt-test")
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.mount(b"tmpfs", b"/mnt-test", b"tmpfs", 0, None)
        out["mount_errno"] = 0 if rc == 0 else ctypes.get_errno()
    except OSError as exc:
        out["mount_errno"] = exc.errno
    return out


def handle(conn):
    line = conn.makefile("rb").readline().decode().strip()
    cmd, _, arg = line.partition(" ")
    if cmd == "echo":
        return arg.encode()
    if cmd == "facts":
        return json.dumps(facts()).encode()
    if cmd == "exists":
        return b"yes" if os.path.exists(arg) else b"no"
    if cmd == "attest":
        return base64.b64encode(nsm_call(attestation_request(bytes.fromhex(arg))))
    if cmd == "tcp":
        host, port = arg.split(":")
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return b"connected"
        except OSError as exc:
            return f"error {exc.errno}".encode()
    if cmd == "parent":
        port, payload = arg.split(" ", 1)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(f"{VSOCK}/3/{port}")
            s.sendall(payload.encode())
            s.shutdown(socket.SHUT_WR)
            return b"".join(iter(lambda: s.recv(65536), b""))
    if cmd == "exit":
        print("probe: exiting on request", flush=True)
        os._exit(int(arg or 0))
    return b"unknown"


server = socket.socket(socket.AF_UNIX)
server.bind(f"{VSOCK}/{CID}/5005")
server.listen(16)
print(f"probe listening on vsock {CID}:5005", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        try:
            conn.sendall(handle(conn))
        except Exception as exc:
            conn.sendall(f"failed {exc!r}".encode())
"""


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def emulator(*args: str, env: dict[str, str], timeout: float = 180) -> Run:
    proc = subprocess.run([EMULATOR, *args], capture_output=True, text=True, env=env, check=False, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def load_nitro_fakes() -> Any:
    """tests/unit/nitro_fakes.py (fake sysfs trees, tiny EIFs) without relying on sys.path tricks."""
    spec = importlib.util.spec_from_file_location("nitro_fakes_emulator", REPO / "tests/unit/nitro_fakes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EmulatorHost:
    """One emulated host: its own sockets/vsock/home/allocator config."""

    def __init__(self, root: Path, fake_topology: bool = False, cache: Path | None = None) -> None:
        self.root = root
        self.env = dict(os.environ)
        self.env.update(
            NITRO_CLI_SOCKETS_PATH=str(root / "sock"),
            NITRO_VSOCK_DIR=str(root / "vs"),
            NITRO_EMULATOR_HOME=str(root / "home"),
            NITRO_ALLOCATOR_CONFIG=str(root / "allocator.yaml"),
        )
        if cache is not None:
            self.env["NITRO_EMULATOR_CACHE"] = str(cache)  # unpack the probe image once per session
        self.env.pop("NITRO_EMULATOR_SYSFS_ROOT", None)
        self.env.pop("NITRO_EMULATOR_INSTANCE_ID", None)
        (root / "sock").mkdir(parents=True, exist_ok=True)
        if fake_topology:
            # An 8-vCPU instance with SMT (siblings i and i+4): room for several enclaves on 2 real cores.
            load_nitro_fakes().make_sysfs(root / "sysfs", cpus=8, threads=2, mem_available_mib=16384)
            self.env["NITRO_EMULATOR_SYSFS_ROOT"] = str(root / "sysfs")

    @property
    def sockets(self) -> Path:
        return self.root / "sock"

    @property
    def vsock(self) -> Path:
        return self.root / "vs"

    def run(self, *args: str, timeout: float = 180) -> Run:
        return emulator(*args, env=self.env, timeout=timeout)

    def allocate(self, memory_mib: int, cpu_count: int | None = None, cpu_pool: str | None = None) -> Run:
        lines = ["---", f"memory_mib: {memory_mib}"]
        lines.append(f"cpu_count: {cpu_count}" if cpu_count is not None else f"cpu_pool: {cpu_pool}")
        (self.root / "allocator.yaml").write_text("\n".join(lines) + "\n")
        return self.run("allocator", "apply")

    def ask(self, cid: int, command: str, timeout: float = 10) -> bytes:
        """One request to the probe app inside enclave `cid`, over emulated vsock."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.vsock / str(cid) / str(PROBE_PORT)))
            sock.sendall(command.encode() + b"\n")
            return b"".join(iter(lambda: sock.recv(65536), b""))

    def wait_probe(self, cid: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.ask(cid, "echo ping", timeout=2) == b"ping":
                    return
            time.sleep(0.1)
        raise TimeoutError(f"the probe in enclave {cid} did not answer within {timeout} s")

    def cleanup(self) -> None:
        if (self.sockets).is_dir():
            self.run("terminate-enclave", "--all", timeout=120)


@pytest.fixture(scope="session")
def rootfs_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rootfs-cache")


@pytest.fixture
def emu_host(rootfs_cache: Path) -> Iterator[EmulatorHost]:
    # Short path: UNIX socket paths (NSM, vsock) must stay under 108 bytes.
    root = Path(f"/tmp/nemu-{uuid.uuid4().hex[:10]}")
    host = EmulatorHost(root, cache=rootfs_cache)
    try:
        yield host
    finally:
        host.cleanup()
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def emu_fake_host(rootfs_cache: Path) -> Iterator[EmulatorHost]:
    root = Path(f"/tmp/nemu-{uuid.uuid4().hex[:10]}")
    host = EmulatorHost(root, fake_topology=True, cache=rootfs_cache)
    try:
        yield host
    finally:
        host.cleanup()
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture(scope="session")
def probe_eif(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe app built into an EIF by `nitro-cli-emulator build-enclave --docker-dir` (once)."""
    ctx = tmp_path_factory.mktemp("probe-image")
    (ctx / "Dockerfile").write_text(
        f'FROM {docker_engine}\nCOPY probe.py /probe.py\nENV HELLO=enclave\nCMD ["python3", "/probe.py"]\n'
    )
    (ctx / "probe.py").write_text(PROBE_APP)
    out = tmp_path_factory.mktemp("probe-eif") / "probe.eif"
    env = dict(os.environ, NITRO_CLI_ARTIFACTS=str(tmp_path_factory.mktemp("probe-artifacts")))
    uri = f"nitro-emulator-probe:{uuid.uuid4().hex[:12]}"
    try:
        result = emulator(
            "build-enclave",
            "--docker-uri",
            uri,
            "--docker-dir",
            str(ctx),
            "--output-file",
            str(out),
            env=env,
            timeout=600,
        )
    finally:
        subprocess.run(["docker", "image", "rm", "--no-prune", uri], capture_output=True, check=False)
    assert result.code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def tiny_eif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid EIF (not bootable: no rootfs) for argument and resource checks that fail early."""
    path = tmp_path_factory.mktemp("tiny-eif") / "tiny.eif"
    load_nitro_fakes().make_eif(path, size_pad=1 << 20)
    return path
