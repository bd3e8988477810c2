"""nitro_eif, nitro_allocator, nitro_enclave and nitro_enclave_info run through `ansible-playbook` on localhost
against the real emulator (`.venv/bin/nitro-cli-emulator`), with private emulator locations in temp dirs.

Flow: allocate, build the EIF from a Docker build dir (and not again), describe it, run the enclave
(check mode first), wait for its vsock port, re-run (no change), describe the host
(nitro_enclave_info), change memory (relaunch), absent,
absent again; then an allocator change with an enclave running (refused) and with terminate_running.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.nitro_fakes import make_sysfs

REPO = Path(__file__).resolve().parents[3]
VENV_BIN = Path(sys.executable).parent
EMULATOR = VENV_BIN / "nitro-cli-emulator"
APP_PORT = 5005

# The enclave app: answers "pong" on vsock port 5005 (emulated: $NITRO_VSOCK_DIR/<own cid>/5005).
APP = r"""
import os, socket
path = f"{os.environ['NITRO_VSOCK_DIR']}/{os.environ['NITRO_ENCLAVE_CID']}/5005"
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(8)
while True:
    conn, _ = server.accept()
    with conn:
        try:
            conn.sendall(b"pong")
        except OSError:  # port probes (wait_for) connect and close at once
            pass
"""

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]


class Host:
    """localhost as an emulated Nitro host with its own sockets/vsock/home/allocator/sysfs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.allocator_yaml = root / "etc" / "allocator.yaml"
        self.allocator_yaml.parent.mkdir(parents=True)
        (root / "sock").mkdir()
        # An 8-vCPU SMT instance (siblings i, i+4): cpu_count 2 and 4 both fit next to CPU 0's core.
        make_sysfs(root / "sysfs", cpus=8, threads=2, mem_available_mib=16384)
        self.env = dict(os.environ)
        self.env.update(
            ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            NITRO_CLI_BIN=str(EMULATOR),
            NITRO_EMULATED="1",
            NITRO_CLI_SOCKETS_PATH=str(root / "sock"),
            NITRO_VSOCK_DIR=str(root / "vs"),
            NITRO_EMULATOR_HOME=str(root / "home"),
            NITRO_ALLOCATOR_CONFIG=str(self.allocator_yaml),
            NITRO_EMULATOR_SYSFS_ROOT=str(root / "sysfs"),
            NITRO_CLI_ARTIFACTS=str(root / "artifacts"),
        )
        self.env.pop("NITRO_EMULATOR_INSTANCE_ID", None)

    def play(self, tasks: list[dict[str, Any]], *flags: str) -> dict[str, Any]:
        """Run `tasks` (each {"name", "<module>": args, ...}) in one play; return {name: registered result}."""
        out = self.root / f"results-{uuid.uuid4().hex[:8]}.json"
        body: list[dict[str, Any]] = []
        names = []
        for index, task in enumerate(tasks):
            var = f"r{index}"
            names.append((task["name"], var))
            body.append({**task, "register": var, "ignore_errors": True})
        collected = "{" + ", ".join(f"{json.dumps(name)}: {var}" for name, var in names) + "}"
        body.append(
            {
                "name": "Save the results",
                "ansible.builtin.copy": {"content": "{{ " + collected + " | to_json }}", "dest": str(out)},
                "check_mode": False,
            }
        )
        playbook = self.root / f"play-{uuid.uuid4().hex[:8]}.yml"
        playbook.write_text(
            yaml.safe_dump([{"name": "Modules", "hosts": "localhost", "gather_facts": False, "tasks": body}])
        )
        proc = subprocess.run(
            [str(VENV_BIN / "ansible-playbook"), str(playbook), *flags],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return json.loads(out.read_text())

    def emulator(self, *args: str) -> Any:
        proc = subprocess.run(
            [str(EMULATOR), *args], env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def ask(self, cid: int) -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.root / "vs" / str(cid) / str(APP_PORT)))
            return sock.recv(16)


@pytest.fixture
def host() -> Iterator[Host]:
    # Short root: emulated vsock and NSM UNIX socket paths must stay under 108 bytes.
    root = Path(f"/tmp/nmod-{uuid.uuid4().hex[:10]}")
    root.mkdir()
    h = Host(root)
    try:
        yield h
    finally:
        subprocess.run([str(EMULATOR), "terminate-enclave", "--all"], env=h.env, capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def app_dir(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ctx = tmp_path_factory.mktemp("modules-app")
    (ctx / "Dockerfile").write_text(f'FROM {docker_engine}\nCOPY app.py /app.py\nCMD ["python3", "/app.py"]\n')
    (ctx / "app.py").write_text(APP)
    return ctx


def enclave_task(name: str, eif: Path, memory: int, **extra: Any) -> dict[str, Any]:
    args = {"name": "it-app", "eif_path": str(eif), "cpu_count": 2, "memory_mib": memory, "enclave_cid": 31, **extra}
    return {"name": name, "nitro_enclaves.fleet.nitro_enclave": args}


def test_modules_against_the_emulator(host: Host, app_dir: Path) -> None:
    uri = f"nitro-modules-it:{uuid.uuid4().hex[:12]}"
    eif = host.root / "app.eif"
    eif_args = {"path": str(eif), "docker_uri": uri, "docker_dir": str(app_dir), "name": "it-app", "version": "1"}
    try:
        setup = host.play(
            [
                {"name": "allocate", "nitro_enclaves.fleet.nitro_allocator": {"memory_mib": 4096, "cpu_count": 4}},
                {"name": "build", "nitro_enclaves.fleet.nitro_eif": eif_args},
                {"name": "build again", "nitro_enclaves.fleet.nitro_eif": eif_args},
                {"name": "describe", "nitro_enclaves.fleet.nitro_eif": {"path": str(eif), "state": "described"}},
            ],
            "--diff",
        )
    finally:
        subprocess.run(["docker", "image", "rm", "--no-prune", uri], capture_output=True, check=False)

    allocate = setup["allocate"]
    assert allocate.get("failed") is not True, allocate
    assert allocate["changed"] and allocate["restarted"] and allocate["service_manager"] == "command"
    assert "Successfully allocated Nitro Enclaves resources: 4096 MiB" in allocate["allocator_output"]
    assert host.emulator("allocator", "show")["cpu_ids"] == [1, 2, 5, 6]

    build, again, described = setup["build"], setup["build again"], setup["describe"]
    assert build.get("failed") is not True, build
    assert build["changed"] and build["built"]
    assert again["changed"] is False and again["built"] is False
    assert described["measurements"] == build["measurements"]
    assert described["describe"]["ImageName"] == "it-app"
    artifact = json.loads(Path(str(eif) + ".measurements.json").read_text())
    assert artifact["Measurements"]["PCR0"] == build["measurements"]["PCR0"]
    assert artifact["ImageDigest"] == build["image_digest"] and artifact["ImageDigest"].startswith("sha256:")
    # The emulator's own describe-eif agrees with the module's local measurement.
    assert host.emulator("describe-eif", "--eif-path", str(eif))["Measurements"] == build["measurements"]

    memory = max(64, math.ceil(eif.stat().st_size / (1 << 20)) * 4 + 16)
    memory += memory % 2
    wait = {"port": APP_PORT, "timeout": 60}
    runs = host.play(
        [
            {**enclave_task("check", eif, memory), "check_mode": True},
            enclave_task("run", eif, memory, wait_for=wait),
            enclave_task("rerun", eif, memory, wait_for=wait),
            # Read-only, so check mode gives the real answer.
            {"name": "info", "nitro_enclaves.fleet.nitro_enclave_info": {"path": str(eif)}, "check_mode": True},
        ],
        "--diff",
    )
    check, run, rerun = runs["check"], runs["run"], runs["rerun"]
    assert check.get("failed") is not True, check
    assert check["changed"] is True and check["actions"] == ["run it-app"]
    assert run.get("failed") is not True, run
    assert run["changed"] is True
    record = run["enclave"]
    assert record["EnclaveName"] == "it-app" and record["State"] == "RUNNING" and record["EnclaveCID"] == 31
    assert record["NumberOfCPUs"] == 2 and record["Measurements"]["PCR0"] == build["measurements"]["PCR0"]
    assert run["waited"] >= 0
    assert host.ask(31) == b"pong"
    assert rerun["changed"] is False and rerun["enclave"]["EnclaveID"] == record["EnclaveID"]
    info = runs["info"]
    assert info.get("failed") is not True, info
    assert info["changed"] is False
    assert [e["EnclaveID"] for e in info["enclaves"]] == [record["EnclaveID"]]
    assert info["eif_exists"] is True and info["eif"]["Measurements"] == build["measurements"]
    assert info["allocator"]["config"] == {"memory_mib": 4096, "cpu_count": 4}
    assert info["allocator"]["applied"]["cpu_pool"] == "1-2,5-6"
    assert info["ansible_facts"]["nitro_enclaves"]["enclaves"] == info["enclaves"]

    changes = host.play(
        [
            enclave_task("bigger", eif, memory + 64, wait_for=wait),
            {"name": "absent", "nitro_enclaves.fleet.nitro_enclave": {"name": "it-app", "state": "absent"}},
            {"name": "absent again", "nitro_enclaves.fleet.nitro_enclave": {"name": "it-app", "state": "absent"}},
        ],
        "--diff",
    )
    bigger = changes["bigger"]
    assert bigger.get("failed") is not True, bigger
    assert bigger["changed"] is True and bigger["terminated"] == [record["EnclaveID"]]
    assert bigger["diff"]["before"]["memory_mib"] == memory and bigger["diff"]["after"]["memory_mib"] == memory + 64
    assert bigger["enclave"]["MemoryMiB"] == memory + 64
    assert changes["absent"]["changed"] is True
    assert changes["absent"]["terminated"] == [bigger["enclave"]["EnclaveID"]]
    assert changes["absent again"]["changed"] is False
    assert host.emulator("describe-enclaves") == []

    before_yaml = host.allocator_yaml.read_text()
    realloc = host.play(
        [
            enclave_task("start", eif, memory),
            {"name": "refused", "nitro_enclaves.fleet.nitro_allocator": {"memory_mib": 2048, "cpu_count": 2}},
            {
                "name": "forced",
                "nitro_enclaves.fleet.nitro_allocator": {
                    "memory_mib": 2048,
                    "cpu_count": 2,
                    "terminate_running": True,
                    "backup": True,
                },
            },
        ],
        "--diff",
    )
    assert realloc["start"]["changed"] is True
    refused = realloc["refused"]
    assert refused["failed"] is True
    assert "1 enclave(s) running (it-app (" in refused["msg"] and "terminate_running: true" in refused["msg"]
    forced = realloc["forced"]
    assert forced.get("failed") is not True, forced
    assert forced["changed"] and forced["restarted"]
    assert forced["terminated"] == [realloc["start"]["enclave"]["EnclaveID"]]
    assert "memory_mib: 4096" in forced["diff"]["before"] and "memory_mib: 2048" in forced["diff"]["after"]
    assert Path(forced["backup_file"]).read_text() == before_yaml
    assert host.emulator("describe-enclaves") == []
    shown = host.emulator("allocator", "show")
    assert shown["requested_memory_mib"] == 2048 and shown["cpu_ids"] == [1, 5]


def test_enclave_change_the_pool_cannot_hold_changes_nothing(host: Host) -> None:
    """Issue 15 through ansible-playbook: a too-large cpu_count or memory_mib fails naming the value and the
    allocator's applied pool, and the run configuration the supervisor applies stays byte-identical."""
    from tests.unit.nitro_fakes import make_eif

    eif = host.root / "small.eif"
    make_eif(eif, b"APP")  # only measured and sized here: state=configured never boots it
    config = host.root / "enclaves" / "it-app.json"
    config.parent.mkdir()

    def configured(name: str, **extra: Any) -> dict[str, Any]:
        args = {"name": "it-app", "state": "configured", "config_path": str(config), "eif_path": str(eif),
                "cpu_count": 2, "memory_mib": 256, **extra}  # fmt: skip
        return {"name": name, "nitro_enclaves.fleet.nitro_enclave": args}

    first = host.play(
        [
            {"name": "allocate", "nitro_enclaves.fleet.nitro_allocator": {"memory_mib": 512, "cpu_count": 2}},
            configured("configure"),
        ]
    )
    assert first["allocate"].get("failed") is not True, first["allocate"]
    assert first["configure"]["changed"] is True, first["configure"]
    before = config.read_bytes()
    record = host.root / "home" / "allocator.json"

    refused = host.play(
        [
            configured("cpus", cpu_count=4),
            {**configured("cpus in check mode", cpu_count=4), "check_mode": True},
            configured("memory", memory_mib=1024),
            {
                "name": "running, check mode",
                "nitro_enclaves.fleet.nitro_enclave": {
                    "name": "it-app",
                    "eif_path": str(eif),
                    "cpu_count": 4,
                    "memory_mib": 256,
                },
                "check_mode": True,
            },
        ],
        "--diff",
    )
    pool = f"(cpu_pool 1,5, 512 MiB, from {record})"
    for name in ("cpus", "cpus in check mode", "running, check mode"):
        result = refused[name]
        assert result.get("failed") is True, (name, result)
        assert result["msg"].startswith(f"cpu_count 4: the allocator's pool has 2 CPUs {pool}; raise "), result["msg"]
    assert refused["memory"]["msg"].startswith(f"memory_mib 1024: the allocator's pool has 512 MiB {pool}; raise ")
    assert config.read_bytes() == before
    assert sorted(p.name for p in config.parent.iterdir()) == ["it-app.json"]  # no backup, no temp file
