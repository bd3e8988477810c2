"""Rehearsal of the real-host (Amazon Linux 2023) path, which has no hardware here: roles nitro_cli and
enclave_image run their real branch against a systemd container whose facts say Amazon Linux 2023.

Stand-ins in the container record what they were asked: `dnf` (installs marker files, unit files, the
real-looking blobs and a stand-in `nitro-cli`), `rpm --query`, `docker` (image ids from the build context)
and `nitro-cli build-enclave` (writes an EIF from the -devel package's blobs with the project's EIF
library, as the real one would from /usr/share/nitro_enclaves/blobs). systemd, python3.11, the venv and
the whole role logic are real. Then the placeholder refusal: a placeholder EIF is refused on the host
once it has a stand-in /dev/nitro_enclaves, and accepted without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "nitro-ansible/systemd:bookworm"
VENV_BIN = Path(sys.executable).parent
WHEELHOUSE = Path(os.environ.get("NITRO_ANSIBLE_WHEELHOUSE", REPO_ROOT / ".cache" / "wheelhouse"))
LOG = "/var/log/standin"

# The facts an Amazon Linux 2023 host reports (setup module, gather_subset min); a test-only module sets them.
AMAZON_FACTS_MODULE = """#!/usr/bin/python
import json
print(json.dumps({"changed": False, "ansible_facts": {
    "distribution": "Amazon", "distribution_major_version": "2023", "distribution_version": "2023.6.20250101",
    "os_family": "RedHat", "pkg_mgr": "dnf"}}))
"""

STANDIN_DNF = r"""#!/bin/sh
# Stand-in dnf: records argv, "installs" what the AL2023 packages bring that later tasks rely on.
echo "$*" >> /var/log/standin/dnf.log
[ "$1" = install ] || exit 1
shift
for pkg; do
  case $pkg in
    -*) continue ;;
    aws-nitro-enclaves-cli)
      groupadd -f ne
      install -m 0755 /opt/standin/nitro-cli /usr/bin/nitro-cli
      printf '[Service]\nType=oneshot\nRemainAfterExit=true\nExecStart=/bin/true\n' \
        > /usr/lib/systemd/system/nitro-enclaves-allocator.service
      printf '[Install]\nWantedBy=multi-user.target\n' >> /usr/lib/systemd/system/nitro-enclaves-allocator.service
      printf '[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n' \
        > /usr/lib/systemd/system/nitro-enclaves-vsock-proxy.service ;;
    aws-nitro-enclaves-cli-devel)
      mkdir -p /usr/share/nitro_enclaves/blobs
      for blob in bzImage init nsm.ko; do
        printf 'real-looking %s blob\n' $blob > /usr/share/nitro_enclaves/blobs/$blob
      done
      printf 'reboot=k panic=30 pci=off nomodules console=ttyS0\n' > /usr/share/nitro_enclaves/blobs/cmdline ;;
    docker)
      groupadd -f docker
      install -m 0755 /opt/standin/docker /usr/bin/docker
      printf '[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n' \
        > /usr/lib/systemd/system/docker.service ;;
  esac
  echo "$pkg" >> /var/lib/standin/rpms
done
"""

STANDIN_RPM = r"""#!/bin/sh
# Stand-in rpm --query: exit 1 unless every package was installed by the stand-in dnf.
echo "$*" >> /var/log/standin/rpm.log
shift
missing=0
for pkg; do
  grep -qx "$pkg" /var/lib/standin/rpms 2>/dev/null || { echo "package $pkg is not installed"; missing=1; }
done
exit $missing
"""

STANDIN_DOCKER = r"""#!/bin/sh
# Stand-in docker: `build` tags the build context's digest, `image inspect` answers it.
echo "$*" >> /var/log/standin/docker.log
images=/var/lib/standin/docker-images
touch $images
if [ "$1" = build ]; then
  for last; do :; done
  for arg; do case $arg in --tag) next=tag ;; *) [ "${next:-}" = tag ] && tag=$arg; next= ;; esac; done
  id=sha256:$(cd "$last" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
  grep -v "^$tag " $images > $images.new || true
  echo "$tag $id" >> $images.new && mv $images.new $images
  echo "$id"
elif [ "$1" = image ] && [ "$2" = inspect ]; then
  for last; do :; done
  line=$(grep "^$last " $images) || { echo "Error: No such image: $last" >&2; exit 1; }
  echo "${line#* }"
else
  exit 2
fi
"""

# Runs on the venv the role built (python3.11): the stand-in exists only after role nitro_cli ran.
STANDIN_NITRO_CLI = r"""#!/opt/nitro-enclaves/venv/bin/python
# Stand-in nitro-cli: records argv; build-enclave writes an EIF from the -devel blobs as nitro-cli does
# (kernel, cmdline, bootstrap ramdisk of init + nsm.ko, application ramdisk), printing its measurements.
import json, os, subprocess, sys
from pathlib import Path
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif
from nitro_emulator import cpio, eif_writer
from nitro_emulator.build import bootstrap_entries

argv = sys.argv[1:]
with open("/var/log/standin/nitro-cli.log", "a") as log:
    log.write(json.dumps(argv) + "\n")
opt = lambda name: argv[argv.index(name) + 1] if name in argv else None
if argv == ["--version"]:
    print("Nitro CLI 1.4.2")
elif argv[:1] == ["build-enclave"]:
    blobs = Path(os.environ.get("NITRO_CLI_BLOBS") or "/usr/share/nitro_enclaves/blobs")
    uri = opt("--docker-uri")
    image_id = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", uri],
                              capture_output=True, text=True, check=True).stdout.strip()
    info = {"BuildTime": eif.rfc3339(0), "BuildTool": "nitro-cli", "BuildToolVersion": "1.4.2",
            "OperatingSystem": "Linux", "KernelVersion": "4.14.256"}
    work = Path(opt("--output-file") + ".work")
    work.mkdir()
    boot = cpio.write_ramdisk(bootstrap_entries(blobs), work / "bootstrap", compress=False)
    app = cpio.write_ramdisk([cpio.file_entry("rootfs/image-id", image_id.encode())], work / "app")
    cmdline = (blobs / "cmdline").read_text().strip()
    metadata = eif.make_metadata(opt("--name"), opt("--version"), info)
    pcrs = eif_writer.write_eif(opt("--output-file"), kernel=blobs / "bzImage", cmdline=cmdline, ramdisks=[boot, app],
                         metadata=metadata)
    for part in work.iterdir():
        part.unlink()
    work.rmdir()
    print(json.dumps({"Measurements": eif.measurements_dict(pcrs)}, indent=2))
else:
    sys.stderr.write("stand-in nitro-cli: unsupported " + " ".join(argv) + "\n")
    sys.exit(2)
"""


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def al2023_host(docker_engine: str) -> Iterator[str]:
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"{IMAGE} is missing: run `make setup`")
    name = f"nitro-al2023-rehearsal-{uuid.uuid4().hex[:8]}"
    docker(
        "run", "--detach", "--name", name, "--network", "none", "--cap-add", "SYS_ADMIN",
        "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp:exec",
        "--volume", "/sys/fs/cgroup:/sys/fs/cgroup:ro", "--env", "container=docker", IMAGE, "/sbin/init",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while docker("exec", name, "systemctl", "is-system-running", check=False).stdout.strip() not in (
            "running",
            "degraded",
        ):
            assert time.monotonic() < deadline, "systemd did not come up in the container"
            time.sleep(0.5)
        script = (
            f"mkdir -p {LOG} /var/lib/standin /opt/standin /usr/lib/systemd/system && "
            "cat > /usr/local/bin/dnf && chmod 0755 /usr/local/bin/dnf"
        )
        subprocess.run(["docker", "exec", "-i", name, "sh", "-c", script], input=STANDIN_DNF, text=True, check=True)
        for path, body in (
            ("/usr/local/bin/rpm", STANDIN_RPM),
            ("/opt/standin/docker", STANDIN_DOCKER),
            ("/opt/standin/nitro-cli", STANDIN_NITRO_CLI),
        ):
            subprocess.run(
                ["docker", "exec", "-i", name, "sh", "-c", f"cat > {path} && chmod 0755 {path}"],
                input=body,
                text=True,
                check=True,
            )
        yield name
    finally:
        docker("rm", "--force", name, check=False)


def play(
    tmp_path: Path, container: str, playbook: list[dict], extra: dict | None = None
) -> subprocess.CompletedProcess:
    library = tmp_path / "library"
    library.mkdir(exist_ok=True)
    (library / "amazon_facts.py").write_text(AMAZON_FACTS_MODULE)
    inventory = {
        "all": {
            "children": {
                "enclave_hosts": {
                    "hosts": {
                        "al2023": {
                            "ansible_connection": "community.docker.docker",
                            "ansible_host": container,
                            # AL2023's discovered interpreter at first contact is 3.9; here it is the image's.
                            "ansible_python_interpreter": "/usr/bin/python3",
                        }
                    }
                }
            }
        }
    }
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    path = tmp_path / f"play-{uuid.uuid4().hex[:6]}.yml"
    path.write_text(yaml.safe_dump(playbook, sort_keys=False))
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_LIBRARY=str(library),
        ANSIBLE_NOCOLOR="1",
        NITRO_ANSIBLE_WHEELHOUSE=str(WHEELHOUSE),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("NITRO_CLI_BLOBS", None)
    args = [str(VENV_BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.yml"), str(path)]
    if extra:
        args += ["-e", json.dumps(extra)]
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    path.with_suffix(".log").write_text(result.stdout + result.stderr)  # for a look after a failure
    return result


def in_host(container: str, *argv: str) -> str:
    return docker("exec", container, *argv).stdout


def test_al2023_branch_installs_builds_on_the_host_and_distributes(tmp_path: Path, al2023_host: str) -> None:
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import read_eif

    if not any(WHEELHOUSE.glob("nitro_enclaves_ansible-*.whl")):
        pytest.fail(f"no project wheel in {WHEELHOUSE}: run `make wheelhouse`")
    build_dir = tmp_path / "build"
    site = [
        {
            "name": "AL2023 host, rehearsed",
            "hosts": "enclave_hosts",
            "gather_facts": True,
            "gather_subset": ["min"],
            "vars": {
                "nitro_cli_mode": "real",
                "enclave_image_build_dir": str(build_dir),
                "enclave_image_src": str(REPO_ROOT / "enclave_src"),
            },
            "pre_tasks": [{"name": "Report Amazon Linux 2023 facts", "amazon_facts": {}}],
            "roles": ["nitro_enclaves.fleet.nitro_cli", "nitro_enclaves.fleet.enclave_image"],
        }
    ]
    first = play(tmp_path, al2023_host, site)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]

    packages = "aws-nitro-enclaves-cli aws-nitro-enclaves-cli-devel docker python3.11 python3.11-pip"
    assert in_host(al2023_host, "cat", f"{LOG}/dnf.log").splitlines() == [f"install --assumeyes --quiet {packages}"]
    for unit in ("docker.service", "nitro-enclaves-allocator.service"):
        assert in_host(al2023_host, "systemctl", "is-enabled", unit).strip() == "enabled"
        assert in_host(al2023_host, "systemctl", "is-active", unit).strip() == "active"
    # Role vsock_tokenizer runs its own proxy on port 8000: the packaged one stays off.
    assert (
        docker(
            "exec", al2023_host, "systemctl", "is-enabled", "nitro-enclaves-vsock-proxy.service", check=False
        ).stdout.strip()
        == "disabled"
    )
    # The tools' venv runs on python3.11, not on the platform's /usr/bin/python3.
    assert "home = /usr/bin" in in_host(al2023_host, "cat", "/opt/nitro-enclaves/venv/pyvenv.cfg")
    assert (
        in_host(al2023_host, "readlink", "-f", "/opt/nitro-enclaves/venv/bin/python").strip() == "/usr/bin/python3.11"
    )
    # No emulator is linked as nitro-cli on a real host.
    assert in_host(al2023_host, "readlink", "-f", "/usr/bin/nitro-cli").strip() == "/usr/bin/nitro-cli"

    # The EIF was built once on the host with (stand-in) real nitro-cli, from a copied context.
    calls = [json.loads(line) for line in in_host(al2023_host, "cat", f"{LOG}/nitro-cli.log").splitlines()]
    builds = [c for c in calls if c[:1] == ["build-enclave"]]
    assert len(builds) == 1
    argv = builds[0]
    assert argv[argv.index("--docker-uri") + 1] == "nitro-enclaves/tokenizer:1.0.0"
    assert argv[argv.index("--output-file") + 1].startswith("/var/lib/nitro-enclaves/build/tokenizer/")
    assert argv[argv.index("--name") + 1] == "tokenizer"
    docker_log = in_host(al2023_host, "cat", f"{LOG}/docker.log")
    assert "build --quiet --force-rm --tag nitro-enclaves/tokenizer:1.0.0" in docker_log
    # The controller's local base image is not on a Nitro host: it pulls the public one.
    assert "--build-arg=BASE_IMAGE=public.ecr.aws/docker/library/python:3.11-slim-bookworm" in docker_log

    # Fetched to the controller, measured there, artifact written there; the host runs those bytes.
    fetched = read_eif(build_dir / "tokenizer.eif", file_digest=True)
    artifact = json.loads((build_dir / "tokenizer.eif.measurements.json").read_text())
    assert artifact["Measurements"] == fetched.measurements
    assert artifact["EifSha384"] == fetched.file_sha384
    on_host = in_host(al2023_host, "sha384sum", "/opt/nitro-enclaves/images/tokenizer.eif").split()[0]
    assert on_host == fetched.file_sha384
    assert fetched.metadata["BuildMetadata"]["BuildTool"] == "nitro-cli"

    # Again: nothing installed or built twice.
    second = play(tmp_path, al2023_host, site)
    assert second.returncode == 0, second.stdout[-6000:]
    recap = next(line for line in second.stdout.splitlines() if line.startswith("al2023 "))
    assert " changed=0 " in recap, recap
    assert len(in_host(al2023_host, "cat", f"{LOG}/dnf.log").splitlines()) == 1
    calls = [json.loads(line) for line in in_host(al2023_host, "cat", f"{LOG}/nitro-cli.log").splitlines()]
    assert len([c for c in calls if c[:1] == ["build-enclave"]]) == 1

    check_signed_on_the_controller(tmp_path, al2023_host, site, build_dir)


def check_signed_on_the_controller(tmp_path: Path, al2023_host: str, site: list[dict], build_dir: Path) -> None:
    """The controller signs the EIF the build host built (the key stays on the controller): the host gets the
    signed copy, and a second run with the same image and certificate changes nothing (no fetch, no signing)."""
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import pcr8_from_certificate, read_eif

    keys = tmp_path / "signing"
    keys.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1", "-nodes",
         "-days", "2", "-subj", "/CN=rehearsal-publisher", "-keyout", str(keys / "p.key"), "-out", str(keys / "p.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    signing = {
        "enclave_image_signing_certificate": str(keys / "p.crt"),
        "enclave_image_signing_key": str(keys / "p.key"),
    }
    first = play(tmp_path, al2023_host, site, signing)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    signed = read_eif(build_dir / "tokenizer.eif", file_digest=True)
    unsigned = read_eif(build_dir / "tokenizer.unsigned.eif", file_digest=True)
    assert signed.pcrs["PCR8"] == pcr8_from_certificate((keys / "p.crt").read_bytes())
    image_pcrs = ("PCR0", "PCR1", "PCR2")
    assert {k: signed.pcrs[k] for k in image_pcrs} == {k: unsigned.pcrs[k] for k in image_pcrs}
    assert not unsigned.signatures
    on_host = in_host(al2023_host, "sha384sum", "/opt/nitro-enclaves/images/tokenizer.eif").split()[0]
    assert on_host == signed.file_sha384
    artifact = json.loads((build_dir / "tokenizer.eif.measurements.json").read_text())
    assert artifact["Measurements"] == signed.measurements and artifact["EifSha384"] == signed.file_sha384

    again = play(tmp_path, al2023_host, site, signing)
    assert again.returncode == 0, again.stdout[-6000:]
    recap = next(line for line in again.stdout.splitlines() if line.startswith("al2023 "))
    assert " changed=0 " in recap, (
        recap + "\n" + "\n".join(line for line in again.stdout.splitlines() if line.startswith("changed:"))
    )
    assert read_eif(build_dir / "tokenizer.eif", file_digest=True).file_sha384 == signed.file_sha384
    calls = [json.loads(line) for line in in_host(al2023_host, "cat", f"{LOG}/nitro-cli.log").splitlines()]
    assert len([c for c in calls if c[:1] == ["build-enclave"]]) == 1


def test_placeholder_eif_is_refused_on_a_host_with_the_device(tmp_path: Path, al2023_host: str) -> None:
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import make_metadata, read_eif

    from nitro_emulator.build import DEFAULT_BLOBS
    from nitro_emulator.eif_writer import write_eif

    build_dir = tmp_path / "build"
    build_dir.mkdir()
    info = {
        "BuildTime": "1970-01-01T00:00:00+00:00",
        "BuildTool": "nitro-cli-emulator",
        "BuildToolVersion": "1.4.2",
        "OperatingSystem": "Linux",
        "KernelVersion": "4.14.256",
    }
    metadata = make_metadata("tokenizer", "1", info, placeholder_blobs=True)
    kernel = DEFAULT_BLOBS / "bzImage"
    write_eif(build_dir / "tokenizer.eif", kernel=kernel, cmdline="x", ramdisks=[b"BOOT", b"APP"], metadata=metadata)
    image = read_eif(build_dir / "tokenizer.eif")
    distribute = [
        {
            "name": "Distribute a placeholder EIF",
            "hosts": "enclave_hosts",
            "gather_facts": False,
            "vars": {
                "enclave_image_build_dir": str(build_dir),
                "enclave_image_build": {
                    "measurements": image.measurements,
                    "min_memory_mib": 64,
                    "placeholder_blobs": True,
                },
            },
            "tasks": [
                {
                    "name": "Distribute",
                    "ansible.builtin.include_role": {
                        "name": "nitro_enclaves.fleet.enclave_image",
                        "tasks_from": "distribute",
                    },
                }
            ],
        }
    ]
    docker("exec", al2023_host, "touch", "/dev/nitro_enclaves")  # the stand-in device
    refused = play(tmp_path, al2023_host, distribute)
    assert refused.returncode != 0
    assert "placeholder kernel and init" in refused.stdout
    assert "NITRO_CLI_BLOBS=/usr/share/nitro_enclaves/blobs" in refused.stdout
    assert (
        docker("exec", al2023_host, "test", "-e", "/opt/nitro-enclaves/images/tokenizer.eif", check=False).returncode
        == 1
    )

    docker("exec", al2023_host, "rm", "/dev/nitro_enclaves")  # an emulated host takes it
    accepted = play(tmp_path, al2023_host, distribute)
    assert accepted.returncode == 0, accepted.stdout[-4000:]
    assert (
        docker("exec", al2023_host, "test", "-e", "/opt/nitro-enclaves/images/tokenizer.eif", check=False).returncode
        == 0
    )
