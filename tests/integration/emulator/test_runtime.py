"""The emulator's enclave runtime end to end: real EIF, real namespaces, real enclave processes.

Every test gets its own emulated host (temp sockets/vsock/home/allocator config). On this kind of
machine (2 CPUs) the real topology leaves one CPU for enclaves; tests that need several enclaves use a
fake 8-vCPU sysfs tree (NITRO_EMULATOR_SYSFS_ROOT).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import cbor2
import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import read_eif
from enclave_tokenizer.attestation import AttestationError, verify_attestation_document

from nitro_emulator.state import process_start_time

from .conftest import EMULATOR, EmulatorHost, Run

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]

ENCLAVE_ID = re.compile(r"^i-[0-9a-f]+-enc[0-9a-f]+$")
RUN_KEYS = ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs", "MemoryMiB"]
MEMORY = "1024"


def run_probe(host: EmulatorHost, eif: Path, *extra: str, memory: str = MEMORY) -> dict:
    result = host.run("run-enclave", "--eif-path", str(eif), "--memory", memory, *extra)
    assert result.code == 0, result.stderr
    info = result.json()
    host.wait_probe(info["EnclaveCID"])
    return info


def describe(host: EmulatorHost, *extra: str) -> list[dict]:
    result = host.run("describe-enclaves", *extra)
    assert result.code == 0, result.stderr
    return result.json()


def descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below `pid`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                start = process_start_time(child)
                if start is not None:
                    found[child] = start
                    frontier.append(child)
    return found


def wait_gone(host: EmulatorHost, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while describe(host):
        assert time.monotonic() < deadline, "enclave still listed"
        time.sleep(0.2)


def test_run_describe_echo_terminate(emu_host: EmulatorHost, probe_eif: Path) -> None:
    assert emu_host.allocate(2048, cpu_count=1).code == 0
    result = emu_host.run("run-enclave", "--eif-path", str(probe_eif), "--cpu-count", "1", "--memory", MEMORY)
    assert result.code == 0, result.stderr
    assert "Start allocating memory..." in result.stderr
    info = result.json()
    assert list(info) == RUN_KEYS
    assert result.stdout == json.dumps(info, indent=2) + "\n"
    assert ENCLAVE_ID.match(info["EnclaveID"])
    assert info["EnclaveName"] == "probe"
    assert info["EnclaveCID"] >= 4
    assert (info["NumberOfCPUs"], info["CPUIDs"], info["MemoryMiB"]) == (1, [1], 1024)
    assert f"Started enclave with enclave-cid: {info['EnclaveCID']}, memory: 1024 MiB, cpu-ids: [1]" in result.stderr
    os.kill(info["ProcessID"], 0)  # the detached enclave process is alive

    cid = info["EnclaveCID"]
    emu_host.wait_probe(cid)
    [slot] = json.loads((emu_host.sockets / ".driver.json").read_text()).values()
    if slot["extra"].get("cgroup"):  # the whole enclave (tmpfs rootfs included) is held to its memory
        cgroup = Path(slot["extra"]["cgroup"])
        limit = cgroup / "memory.limit_in_bytes"  # cgroup v1; v2 calls it memory.max
        assert int((limit if limit.exists() else cgroup / "memory.max").read_text()) == 1024 << 20
    assert emu_host.ask(cid, "echo hello enclave") == b"hello enclave"

    [described] = describe(emu_host)
    assert list(described) == [*RUN_KEYS, "State", "Flags", "Measurements"]
    assert {k: described[k] for k in RUN_KEYS} == info
    assert described["State"] == "RUNNING"
    assert described["Flags"] == "NONE"
    assert described["Measurements"] == read_eif(probe_eif).measurements
    [with_meta] = describe(emu_host, "--metadata")
    assert with_meta["ImageName"] and "Metadata" in with_meta and "BuildTime" in with_meta["Metadata"]

    # A production enclave has no console.
    refused = emu_host.run("console", "--enclave-id", info["EnclaveID"])
    assert refused.code == 44
    assert "[ E44 ]" in refused.stderr

    done = emu_host.run("terminate-enclave", "--enclave-id", info["EnclaveID"])
    assert done.code == 0, done.stderr
    assert done.json() == {"EnclaveName": "probe", "EnclaveID": info["EnclaveID"], "Terminated": True}
    assert f"Successfully terminated enclave {info['EnclaveID']}." in done.stderr
    assert describe(emu_host) == []
    assert not (emu_host.vsock / str(cid)).exists()
    assert [p.name for p in emu_host.sockets.iterdir() if not p.name.startswith(".")] == []
    assert json.loads((emu_host.sockets / ".driver.json").read_text()) == {}
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(info["ProcessID"], 0)
            time.sleep(0.1)


def test_isolation(emu_host: EmulatorHost, probe_eif: Path, tmp_path: Path) -> None:
    assert emu_host.allocate(2048, cpu_count=1).code == 0
    info = run_probe(emu_host, probe_eif, "--cpu-count", "1", "--enclave-cid", "42")
    assert info["EnclaveCID"] == 42
    facts = json.loads(emu_host.ask(42, "facts"))
    assert facts["interfaces"] == ["lo"]
    # Own PID namespace: init is PID 1 and only the enclave's few processes exist.
    assert 1 in facts["pids"] and max(facts["pids"]) < 50 and facts["pid"] < 50
    assert facts["hostname"] == "enclave"
    assert facts["cpus"] == [1]
    assert facts["env"] == {
        "HELLO": "enclave",
        "NITRO_VSOCK_DIR": "/run/vsock",
        "NITRO_ENCLAVE_CID": "42",
        "NITRO_NSM_SOCKET": "/run/nsm.sock",
    }
    assert facts["run_vsock"] == ["3", "42"]
    assert facts["mount_errno"] == 1  # EPERM: no CAP_SYS_ADMIN inside
    # The root is a tmpfs; no mount shows a host path.
    root_mount = next(line for line in facts["mounts"] if line.split()[4] == "/")
    assert " - tmpfs " in root_mount
    assert not any(str(emu_host.root) in line.split()[4] for line in facts["mounts"])
    # Host files are out of reach, even through PID 1's root.
    marker = tmp_path / f"marker-{uuid.uuid4().hex}"
    marker.write_text("host secret")
    assert marker.exists()
    assert emu_host.ask(42, f"exists {marker}") == b"no"
    assert emu_host.ask(42, "exists /proc/1/root/probe.py") == b"yes"
    assert emu_host.ask(42, f"exists /proc/1/root{marker}") == b"no"
    # No network but loopback: a host TCP listener is unreachable.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        answer = emu_host.ask(42, f"tcp 127.0.0.1:{port}")
    assert answer.startswith(b"error"), answer


def test_attestation_from_inside(emu_host: EmulatorHost, probe_eif: Path) -> None:
    from nitro_emulator.nsm import emulator_root_pem

    assert emu_host.allocate(2048, cpu_count=1).code == 0
    info = run_probe(emu_host, probe_eif, "--cpu-count", "1")
    nonce = os.urandom(16)
    raw = base64.b64decode(emu_host.ask(info["EnclaveCID"], f"attest {nonce.hex()}"))
    document = cbor2.loads(raw)["Attestation"]["document"]
    root = emulator_root_pem(Path(emu_host.env["NITRO_EMULATOR_HOME"]))
    pcrs = read_eif(probe_eif).pcrs
    result = verify_attestation_document(
        document, root_pem=root, nonce=nonce, expected_pcrs={0: pcrs["PCR0"], 1: pcrs["PCR1"], 2: pcrs["PCR2"]}
    )
    assert result.module_id == info["EnclaveID"]
    assert not result.debug
    with pytest.raises(AttestationError):
        verify_attestation_document(document)  # the AWS root does not vouch for the emulator


def test_debug_mode_console_and_zero_pcrs(emu_host: EmulatorHost, probe_eif: Path) -> None:
    from nitro_emulator.nsm import emulator_root_pem

    assert emu_host.allocate(2048, cpu_count=1).code == 0
    info = run_probe(emu_host, probe_eif, "--cpu-count", "1", "--debug-mode", "--enclave-name", "dbg")
    [described] = describe(emu_host)
    assert described["Flags"] == "DEBUG_MODE"
    console = emu_host.run("console", "--enclave-name", "dbg", "--disconnect-timeout", "2")
    assert console.code == 0, console.stderr
    assert console.stdout.startswith(
        f"Connecting to the console for enclave {info['EnclaveCID']}...\nSuccessfully connected to the console.\n"
    )
    assert "Unpacking initramfs" in console.stdout
    assert f"probe listening on vsock {info['EnclaveCID']}:5005" in console.stdout
    raw = base64.b64decode(emu_host.ask(info["EnclaveCID"], f"attest {'00' * 8}"))
    document = cbor2.loads(raw)["Attestation"]["document"]
    root = emulator_root_pem(Path(emu_host.env["NITRO_EMULATOR_HOME"]))
    result = verify_attestation_document(document, root_pem=root, allow_debug=True)
    assert result.debug and result.pcrs[0] == bytes(48)


def test_enclave_exit_and_process_death(emu_host: EmulatorHost, probe_eif: Path) -> None:
    assert emu_host.allocate(2048, cpu_count=1).code == 0
    info = run_probe(emu_host, probe_eif, "--cpu-count", "1")
    # The application exits: the enclave ends and disappears.
    assert emu_host.ask(info["EnclaveCID"], "exit 3") == b""  # no answer: the probe is gone
    wait_gone(emu_host)
    assert not (emu_host.vsock / str(info["EnclaveCID"])).exists()

    # The enclave process is killed outright: its enclave dies with it, leftovers are pruned.
    info = run_probe(emu_host, probe_eif, "--cpu-count", "1")
    enclave_pids = descendants(info["ProcessID"])
    [slot] = json.loads((emu_host.sockets / ".driver.json").read_text()).values()
    cgroup = slot["extra"].get("cgroup")  # None where the host offers no writable memory cgroup
    assert len(enclave_pids) >= 3  # unshare, init (PID 1 inside), the probe
    os.kill(info["ProcessID"], signal.SIGKILL)
    wait_gone(emu_host)
    deadline = time.monotonic() + 10
    while any(process_start_time(pid) == start for pid, start in enclave_pids.items()):
        assert time.monotonic() < deadline, "enclave processes outlived their enclave process"
        time.sleep(0.1)
    assert not (emu_host.vsock / str(info["EnclaveCID"])).exists()
    assert [p.name for p in emu_host.sockets.iterdir() if not p.name.startswith(".")] == []
    assert cgroup is None or not Path(cgroup).exists()
    # Its CPU and memory are free again.
    again = emu_host.run("run-enclave", "--eif-path", str(probe_eif), "--cpu-count", "1", "--memory", MEMORY)
    assert again.code == 0, again.stderr


def test_terminate_by_name_all_and_names(emu_fake_host: EmulatorHost, probe_eif: Path) -> None:
    host = emu_fake_host
    assert host.allocate(4096, cpu_count=6).code == 0
    first = run_probe(host, probe_eif, "--cpu-count", "2", "--memory", "1024")
    second = run_probe(host, probe_eif, "--cpu-count", "2", "--memory", "1024")
    third = run_probe(host, probe_eif, "--cpu-count", "2", "--memory", "1024", "--enclave-name", "other")
    assert [first["EnclaveName"], second["EnclaveName"], third["EnclaveName"]] == ["probe", "probe_1", "other"]
    assert len({first["EnclaveCID"], second["EnclaveCID"], third["EnclaveCID"]}) == 3
    cpus = [first["CPUIDs"], second["CPUIDs"], third["CPUIDs"]]
    assert cpus == [[1, 5], [2, 6], [3, 7]]  # one full core each, lowest free core first

    assert host.run("terminate-enclave", "--enclave-name", "nope").code == 58
    gone = host.run("terminate-enclave", "--enclave-name", "probe_1")
    assert gone.code == 0 and gone.json()["EnclaveID"] == second["EnclaveID"]
    assert sorted(d["EnclaveName"] for d in describe(host)) == ["other", "probe"]
    # The freed core is there, but a CID or CPU another enclave holds is refused by the (emulated) driver.
    taken_cid = host.run(
        "run-enclave",
        "--eif-path",
        str(probe_eif),
        "--cpu-count",
        "2",
        "--memory",
        "1024",
        "--enclave-cid",
        str(first["EnclaveCID"]),
    )
    assert taken_cid.code == 39 and "[ E29 ]" in taken_cid.stderr and "already used" in taken_cid.stderr
    taken_cpu = host.run("run-enclave", "--eif-path", str(probe_eif), "--cpu-ids", "1", "5", "--memory", "1024")
    assert taken_cpu.code == 39 and "The provided vCPU is already used" in taken_cpu.stderr
    half_core = host.run("run-enclave", "--eif-path", str(probe_eif), "--cpu-ids", "2", "--memory", "1024")
    assert half_core.code == 39 and "full CPU cores have not been set" in half_core.stderr
    everything = host.run("terminate-enclave", "--all")
    assert everything.code == 0, everything.stderr
    assert sorted(o["EnclaveName"] for o in everything.json()) == ["other", "probe"]
    assert all(o["Terminated"] is True for o in everything.json())
    assert describe(host) == []
    assert host.run("terminate-enclave", "--all").json() == []


def test_concurrent_runs_share_the_pool_safely(emu_fake_host: EmulatorHost, probe_eif: Path) -> None:
    host = emu_fake_host
    assert host.allocate(4096, cpu_count=4).code == 0  # two cores: room for exactly two 2-CPU enclaves
    results: list[Run] = []

    def launch() -> None:
        results.append(host.run("run-enclave", "--eif-path", str(probe_eif), "--cpu-count", "2", "--memory", "1024"))

    threads = [threading.Thread(target=launch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = [r.json() for r in results if r.code == 0]
    failed = [r for r in results if r.code != 0]
    assert len(ok) == 2 and len(failed) == 1, [r.stderr for r in results]
    assert "[ E29 ]" in failed[0].stderr and failed[0].code == 39
    assert sorted(cpu for info in ok for cpu in info["CPUIDs"]) == [1, 2, 5, 6]
    assert ok[0]["EnclaveCID"] != ok[1]["EnclaveCID"]
    assert ok[0]["EnclaveName"] != ok[1]["EnclaveName"]
    assert {d["EnclaveID"] for d in describe(host)} == {info["EnclaveID"] for info in ok}
    for info in ok:
        host.wait_probe(info["EnclaveCID"])
        assert host.ask(info["EnclaveCID"], f"echo {info['EnclaveCID']}") == str(info["EnclaveCID"]).encode()


def test_allocator_refuses_while_enclaves_run(emu_host: EmulatorHost, probe_eif: Path) -> None:
    assert emu_host.allocate(2048, cpu_count=1).code == 0
    info = run_probe(emu_host, probe_eif, "--cpu-count", "1")
    refused = emu_host.allocate(1024, cpu_count=1)
    assert refused.code == 1
    assert refused.stderr.startswith("Error: Could not re-online CPUs because there is at least one enclave")
    assert emu_host.run("terminate-enclave", "--enclave-id", info["EnclaveID"]).code == 0
    assert emu_host.allocate(1024, cpu_count=1).code == 0


def test_vsock_proxy_from_inside(emu_host: EmulatorHost, probe_eif: Path) -> None:
    assert emu_host.allocate(2048, cpu_count=1).code == 0
    info = run_probe(emu_host, probe_eif, "--cpu-count", "1")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                data = b"".join(iter(lambda: conn.recv(65536), b""))
                conn.sendall(b"tcp says: " + data)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        allowlist = emu_host.root / "vsock-proxy.yaml"
        allowlist.write_text(f"allowlist:\n- {{address: localhost, port: {port}}}\n")
        proxy = subprocess.Popen(
            [EMULATOR, "vsock-proxy", "8000", "127.0.0.1", str(port), "--config", str(allowlist)],
            env=emu_host.env,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 20
            while not (emu_host.vsock / "3" / "8000").exists():
                assert proxy.poll() is None, proxy.stderr.read() if proxy.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
            answer = emu_host.ask(info["EnclaveCID"], "parent 8000 hello parent")
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
    assert answer == b"tcp says: hello parent"
