"""Test helpers for the nitro modules: fake sysfs trees, a fake stateful nitro-cli, a fake docker,
small EIFs, and running a module's main() under ansible-core's patch_module_args harness."""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Fake sysfs


def make_sysfs(
    root: Path,
    *,
    cpus: int = 8,
    threads: int = 2,
    nodes: int = 1,
    offline: tuple[int, ...] = (),
    mem_available_mib: int = 16384,
    hugepages: int = 0,
    hugepage_kib: int = 2048,
    node_dirs: bool = True,
) -> Path:
    """A sysfs/procfs tree shaped like an EC2 instance: SMT siblings are CPU i and i + cpus/threads
    (8 vCPUs: 0&4, 1&5, ...); cores are split evenly across NUMA nodes in order."""
    cores = cpus // threads
    online = [c for c in range(cpus) if c not in offline]
    cpu_dir = root / "sys/devices/system/cpu"
    cpu_dir.mkdir(parents=True, exist_ok=True)
    (cpu_dir / "online").write_text(_fmt(online) + "\n")
    per_node = max(1, cores // nodes)
    node_cpus: dict[int, list[int]] = {n: [] for n in range(nodes)}
    for cpu in range(cpus):
        core = cpu % cores
        siblings = [core + t * cores for t in range(threads)]
        topo = cpu_dir / f"cpu{cpu}/topology"
        topo.mkdir(parents=True, exist_ok=True)
        (topo / "thread_siblings_list").write_text(",".join(map(str, siblings)) + "\n")
        node_cpus[min(core // per_node, nodes - 1)].append(cpu)
    if node_dirs:
        for node, members in node_cpus.items():
            node_dir = root / f"sys/devices/system/node/node{node}"
            node_dir.mkdir(parents=True, exist_ok=True)
            (node_dir / "cpulist").write_text(_fmt([c for c in members if c in online]) + "\n")
    proc = root / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       {(mem_available_mib + 1024) * 1024} kB\n"
        f"MemFree:        {mem_available_mib * 512} kB\n"
        f"MemAvailable:   {mem_available_mib * 1024} kB\n"
        f"HugePages_Total:    {hugepages}\n"
        f"HugePages_Free:     {hugepages}\n"
        f"Hugepagesize:       {hugepage_kib} kB\n"
    )
    return root


def _fmt(cpus: list[int]) -> str:
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.allocator import format_cpu_list

    return format_cpu_list(cpus)


# ---------------------------------------------------------------------------------------------
# Executable fakes


def write_script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# A stateful nitro-cli stand-in: enclaves live in $FAKE_NITRO_STATE (JSON); every call is appended
# to $FAKE_NITRO_STATE.log so tests can assert what ran (e.g. nothing in check mode).
FAKE_NITRO_CLI = r"""
import json, os, sys
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import read_eif

state_path = os.environ["FAKE_NITRO_STATE"]
argv = sys.argv[1:]
with open(state_path + ".log", "a") as log:
    log.write(json.dumps(argv) + "\n")
try:
    with open(state_path) as f:
        state = json.load(f)
except FileNotFoundError:
    state = {"enclaves": [], "next": 1}

def save():
    with open(state_path, "w") as f:
        json.dump(state, f)

def fail(code, text):
    sys.stderr.write(f"[ E{code:02d} ] {text}\n\nFor more details, please visit "
                     f"https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#E{code:02d}\n")
    sys.exit(code)

def opt(name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default

forced = os.environ.get("FAKE_NITRO_FAIL", "")
if forced and argv and forced.split(":")[0] == argv[0]:
    fail(int(forced.split(":")[1]), forced.split(":", 2)[2])

cmd = argv[0] if argv else ""
if cmd == "--version":
    print("Nitro CLI " + os.environ.get("FAKE_NITRO_VERSION", "1.4.2"))
elif cmd == "describe-enclaves":
    print(json.dumps(state["enclaves"], indent=2))
elif cmd == "run-enclave":
    eif = opt("--eif-path")
    image = read_eif(eif)
    name = opt("--enclave-name") or os.path.basename(eif).removesuffix(".eif")
    if any(e["EnclaveName"] == name for e in state["enclaves"]):
        name = name + "_1"
    if "--cpu-ids" in argv:
        i = argv.index("--cpu-ids") + 1
        ids = []
        while i < len(argv) and not argv[i].startswith("--"):
            ids.append(int(argv[i])); i += 1
    else:
        ids = list(range(1, 1 + int(opt("--cpu-count"))))
    pool = os.environ.get("FAKE_NITRO_CPU_POOL")  # the allocator's pool size, as nitro-cli checks it
    if pool and len(ids) > int(pool):
        fail(22, f"Insufficient CPUs available in the pool. User provided `cpu-count` is {len(ids)}, which is "
                 "more than the configured CPU pool size.\nYou can increase the CPU pool size by editing the "
                 "`cpu_count` value from '/etc/nitro_enclaves/allocator.yaml'")
    memory = int(opt("--memory"))
    memory += memory % 2
    slot = state["next"]; state["next"] += 1
    pid = int(os.environ.get("FAKE_NITRO_PID", 1000 + slot))  # a test's stand-in enclave process, if any
    record = {"EnclaveName": name, "EnclaveID": f"i-0000000000000000-enc{slot:x}", "ProcessID": pid,
              "EnclaveCID": int(opt("--enclave-cid", 16 + slot)), "NumberOfCPUs": len(ids), "CPUIDs": ids,
              "MemoryMiB": memory}
    print(json.dumps(record, indent=2))
    record["State"] = "RUNNING"
    record["Flags"] = "DEBUG_MODE" if "--debug-mode" in argv else "NONE"
    record["Measurements"] = image.measurements
    state["enclaves"].append(record)
    save()
elif cmd == "terminate-enclave":
    if "--all" in argv:
        gone, state["enclaves"] = state["enclaves"], []
        save()
        print(json.dumps([{"EnclaveName": e["EnclaveName"], "EnclaveID": e["EnclaveID"], "Terminated": True}
                          for e in gone], indent=2))
    else:
        eid = opt("--enclave-id")
        match = [e for e in state["enclaves"] if e["EnclaveID"] == eid]
        if not match:
            fail(11, "Socket error. no such enclave")
        state["enclaves"] = [e for e in state["enclaves"] if e["EnclaveID"] != eid]
        save()
        print(json.dumps({"EnclaveName": match[0]["EnclaveName"], "EnclaveID": eid, "Terminated": True}, indent=2))
elif cmd == "describe-eif":
    eif = opt("--eif-path")
    if not os.path.exists(eif):
        fail(35, f"Failed to open the EIF file {eif}")
    image = read_eif(eif)
    print(json.dumps({"EifVersion": image.header.version, "Measurements": image.measurements,
                      "IsSigned": image.is_signed}, indent=2))
elif cmd == "build-enclave":
    from nitro_emulator.eif_writer import write_eif
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import make_metadata
    uri = opt("--docker-uri")
    images = json.load(open(os.environ["FAKE_DOCKER_IMAGES"]))
    if opt("--docker-dir"):
        content = open(os.path.join(opt("--docker-dir"), "Dockerfile"), "rb").read()
        images[uri] = "sha256:" + __import__("hashlib").sha256(content).hexdigest()
        json.dump(images, open(os.environ["FAKE_DOCKER_IMAGES"], "w"))
    if uri not in images:
        fail(50, "Docker image pull error. not found")
    custom = json.load(open(opt("--metadata"))) if opt("--metadata") else None
    info = {"BuildTime": "1970-01-01T00:00:00+00:00", "BuildTool": "fake", "BuildToolVersion": "0",
            "OperatingSystem": "Linux", "KernelVersion": "4.14"}
    meta = make_metadata(opt("--name", "img"), opt("--version", "1.0"), info, None, custom)
    # FAKE_NITRO_KERNEL: e.g. the emulator's stand-in kernel (a placeholder EIF).
    kernel = open(os.environ["FAKE_NITRO_KERNEL"], "rb").read() if os.environ.get("FAKE_NITRO_KERNEL") else b"KERNEL"
    pcrs = write_eif(opt("--output-file"), kernel=kernel, cmdline="console=ttyS0",
                     ramdisks=[b"BOOT", images[uri].encode()], metadata=meta)
    sys.stderr.write("Enclave Image successfully created.\n")
    print(json.dumps({"Measurements": pcrs}, indent=2))
else:
    sys.stderr.write("error: unrecognized subcommand\n")
    sys.exit(2)
"""

FAKE_DOCKER = r"""
import json, os, sys
images = json.load(open(os.environ["FAKE_DOCKER_IMAGES"]))
args = sys.argv[1:]
if args[:2] == ["image", "inspect"]:
    uri = args[-1]
    if uri in images:
        print(images[uri]); sys.exit(0)
    sys.stderr.write(f"Error: No such image: {uri}\n"); sys.exit(1)
sys.exit(2)
"""


class FakeHost:
    """A fake nitro-cli + docker on PATH, with state files under tmp_path."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.state = tmp_path / "nitro-state.json"
        self.images = tmp_path / "docker-images.json"
        self.images.write_text("{}")
        self.sockets = tmp_path / "sockets"
        self.cli = write_script(self.bin / "nitro-cli", FAKE_NITRO_CLI)
        write_script(self.bin / "docker", FAKE_DOCKER)
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.setenv("FAKE_NITRO_STATE", str(self.state))
        monkeypatch.setenv("FAKE_DOCKER_IMAGES", str(self.images))
        monkeypatch.setenv("NITRO_CLI_SOCKETS_PATH", str(self.sockets))
        monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path / "vsock"))
        # The emulated allocator's pool record (none until a test writes one): never the machine's own.
        self.emulator_home = tmp_path / "emulator-home"
        monkeypatch.setenv("NITRO_EMULATOR_HOME", str(self.emulator_home))
        monkeypatch.delenv("NITRO_CLI_BIN", raising=False)
        monkeypatch.delenv("FAKE_NITRO_FAIL", raising=False)
        monkeypatch.delenv("FAKE_NITRO_KERNEL", raising=False)
        monkeypatch.delenv("FAKE_NITRO_CPU_POOL", raising=False)

    def enclaves(self) -> list[dict[str, Any]]:
        if not self.state.exists():
            return []
        return json.loads(self.state.read_text())["enclaves"]

    def calls(self) -> list[list[str]]:
        log = Path(str(self.state) + ".log")
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def subcommands(self) -> list[str]:
        return [call[0] for call in self.calls() if call]

    def set_image(self, uri: str, image_id: str) -> None:
        images = json.loads(self.images.read_text())
        images[uri] = image_id
        self.images.write_text(json.dumps(images))


def make_eif(path: Path, payload: bytes = b"APP", size_pad: int = 0) -> dict[str, str]:
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import make_metadata

    from nitro_emulator.eif_writer import write_eif

    info = {
        "BuildTime": "1970-01-01T00:00:00+00:00",
        "BuildTool": "test",
        "BuildToolVersion": "0",
        "OperatingSystem": "Linux",
        "KernelVersion": "4.14",
    }
    return write_eif(
        path,
        kernel=b"KERNEL",
        cmdline="console=ttyS0",
        ramdisks=[b"BOOT", payload + b"\0" * size_pad],
        metadata=make_metadata("t", "1.0", info),
    )


# ---------------------------------------------------------------------------------------------
# Module harness (ansible-core 2.19 patch_module_args)


def load_module(name: str) -> Any:
    """Import plugins/modules/<name>.py; its shared code comes from the project's package under the
    collection's import name (the same files Ansible ships with the module)."""
    spec = importlib.util.spec_from_file_location(
        f"plugins_modules_{name}", REPO / "plugins" / "modules" / f"{name}.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def collection_tree() -> Path:
    """The collection tree scripts/sanity.sh builds (modules + doc fragments under one collection root), once
    per session: module docs extend `nitro_enclaves.fleet.*` fragments, which only resolve in a collection."""
    base = Path(tempfile.mkdtemp(prefix="nitro-doc-tree-"))
    atexit.register(shutil.rmtree, base, True)
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "sanity.sh"), "tree", str(base)],
        env=dict(os.environ, NITRO_SANITY_BIN=os.path.dirname(sys.executable)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    collection = Path(out.strip().splitlines()[-1])
    return collection.parents[2]  # the directory holding ansible_collections/


def ansible_doc(name: str) -> tuple[dict[str, Any], str]:
    """`ansible-doc --json nitro_enclaves.fleet.<name>` rendered from the collection tree: (doc, stderr)."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collection_tree()))
    env.pop(
        "ANSIBLE_CONFIG", None
    )  # the repository's (library = plugins/modules/) would shadow the collection's module
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ansible-doc"), "--json", f"nitro_enclaves.fleet.{name}"],
        cwd=collection_tree(),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[f"nitro_enclaves.fleet.{name}"], proc.stderr


def run_module(module: Any, args: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Run module.main() with `args` (plus _ansible_* keys); return the JSON result with `rc` = exit code."""
    from ansible.module_utils.testing import patch_module_args

    capsys.readouterr()
    with patch_module_args(args), pytest.raises(SystemExit) as exc:
        module.main()
    out = capsys.readouterr().out
    result = json.loads(out)
    result["rc_exit"] = exc.value.code
    return result


def make_cert(
    tmp_path: Path,
    name: str = "publisher",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    curve: Any = None,
) -> tuple[Path, Path]:
    """A self-signed EIF signing certificate and its PEM key, as `openssl req -x509` with a secp384r1 key
    makes them (the AWS docs' recipe for PCR8); returns (certificate path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(curve or ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"), x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
