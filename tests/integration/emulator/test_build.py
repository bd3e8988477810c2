"""`nitro-cli-emulator build-enclave / describe-eif / pcr` against the real local Docker engine.

Images and EIFs are built once per session. PCRs are re-derived here with plain struct + hashlib over
the sections, independently of ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EMULATOR = str(Path(sys.executable).parent / "nitro-cli-emulator")
APP = 'import os\nprint("hello from the enclave", os.environ.get("GREETING"))\n'


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def cli(*args: str, env: dict[str, str] | None = None) -> Run:
    proc = subprocess.run([EMULATOR, *args], capture_output=True, text=True, env=env, check=False, timeout=600)
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def build_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env["NITRO_CLI_ARTIFACTS"] = str(tmp_path_factory.mktemp("artifacts"))
    env.pop("NITRO_CLI_BLOBS", None)
    env.pop("SOURCE_DATE_EPOCH", None)
    return env


@pytest.fixture(scope="session")
def app_dir(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ctx = tmp_path_factory.mktemp("app")
    (ctx / "Dockerfile").write_text(
        f"FROM {docker_engine}\n"
        "COPY hello.py /app/hello.py\n"
        "RUN ln /app/hello.py /app/hardlink.py && ln -s hello.py /app/symlink.py\n"
        "ENV GREETING=hi\n"
        'ENTRYPOINT ["/bin/false"]\n'
        'CMD ["python3", "/app/hello.py"]\n'
    )
    (ctx / "hello.py").write_text(APP)
    return ctx


@pytest.fixture(scope="session")
def image_uri(app_dir: Path) -> Iterator[str]:
    uri = f"nitro-eif-test/app:{uuid.uuid4().hex[:12]}"
    yield uri
    subprocess.run(["docker", "image", "rm", "--no-prune", uri], capture_output=True, check=False)


@dataclass
class Built:
    first: Path
    second: Path
    first_run: Run
    second_run: Run


@pytest.fixture(scope="session")
def built(build_env: dict[str, str], app_dir: Path, image_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("eifs")
    first = cli(
        "build-enclave",
        "--docker-uri",
        image_uri,
        "--docker-dir",
        str(app_dir),
        "--output-file",
        str(out / "a.eif"),
        env=build_env,
    )
    assert first.code == 0, first.stderr
    # Second build: the image is found locally (no --docker-dir, no pull).
    second = build(image_uri, out / "b.eif", env=build_env)
    assert second.code == 0, second.stderr
    return Built(out / "a.eif", out / "b.eif", first, second)


# ------------------------------------------------------------------------------ independent EIF parsing


def sections(path: Path) -> list[tuple[int, bytes]]:
    data = path.read_bytes()
    assert data[:4] == b".eif"
    version, _flags, _mem, _cpus, _res, count = struct.unpack(">HHQQHH", data[4:28])
    assert version == 4
    offsets = struct.unpack(">32Q", data[28:284])
    sizes = struct.unpack(">32Q", data[284:540])
    crc = zlib.crc32(data[:544])
    out = []
    pos = 548
    for i in range(count):
        assert offsets[i] == pos
        kind, _, size = struct.unpack(">HHQ", data[pos : pos + 12])
        assert size == sizes[i]
        out.append((kind, data[pos + 12 : pos + 12 + size]))
        crc = zlib.crc32(data[pos : pos + 12 + size], crc)
        pos += 12 + size
    assert pos == len(data)
    assert struct.unpack(">I", data[544:548])[0] == crc
    return out


def extend(content: bytes) -> str:
    return hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).hexdigest()


def independent_pcrs(path: Path) -> dict[str, str]:
    secs = sections(path)
    kernel = b"".join(d for k, d in secs if k == 1)
    cmdline = b"".join(d for k, d in secs if k == 2)
    ramdisks = [d for k, d in secs if k == 3]
    return {
        "PCR0": extend(kernel + cmdline + b"".join(ramdisks)),
        "PCR1": extend(kernel + cmdline + ramdisks[0]),
        "PCR2": extend(b"".join(ramdisks[1:])),
    }


def cpio_members(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, content) of a newc archive."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) // 4 * 4
        body = data[pos : pos + filesize]
        pos = (pos + filesize + 3) // 4 * 4
        if name == "TRAILER!!!":
            return out
        out[name] = (fields[1], body)


# ------------------------------------------------------------------------------ tests


def test_build_prints_measurements_like_nitro_cli(built: Built) -> None:
    result = built.first_run.json()
    assert list(result) == ["Measurements"]
    measurements = result["Measurements"]
    assert list(measurements) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert measurements["HashAlgorithm"] == "Sha384 { ... }"
    assert "Start building the Enclave Image..." in built.first_run.stderr
    assert built.first_run.stderr.rstrip().endswith("Enclave Image successfully created.")
    assert "Using the locally available Docker image..." in built.second_run.stderr
    # stdout is exactly the pretty JSON (json.dumps indent=2), nothing else
    assert built.first_run.stdout == json.dumps(result, indent=2) + "\n"


def test_rebuild_is_byte_identical(built: Built) -> None:
    assert built.first.read_bytes() == built.second.read_bytes()
    assert built.first_run.stdout == built.second_run.stdout


def test_pcrs_match_independent_computation(built: Built) -> None:
    measurements = built.first_run.json()["Measurements"]
    expected = independent_pcrs(built.first)
    assert {k: measurements[k] for k in expected} == expected
    assert len({expected["PCR0"], expected["PCR1"], expected["PCR2"]}) == 3


def test_eif_layout_and_ramdisk_content(built: Built, image_uri: str) -> None:
    secs = sections(built.first)
    assert [k for k, _ in secs] == [1, 2, 5, 3, 3]
    kernel, cmdline, metadata, bootstrap, app = (d for _, d in secs)
    blobs = Path(__import__("nitro_emulator").__file__).parent / "blobs"
    assert kernel == (blobs / "bzImage").read_bytes()
    assert cmdline == (blobs / "cmdline").read_bytes().strip()
    meta = json.loads(metadata)
    assert list(meta) == ["ImageName", "ImageVersion", "BuildMetadata", "DockerInfo", "CustomMetadata"]
    assert meta["ImageName"] == image_uri.split(":", maxsplit=1)[0]
    boot = cpio_members(bootstrap)
    assert sorted(boot) == ["dev", "init", "nsm.ko"]
    assert boot["init"] == (0o100755, (blobs / "init").read_bytes())
    assert app[:2] == b"\x1f\x8b"
    members = cpio_members(gzip.decompress(app))
    assert members["cmd"][1] == b"python3\n/app/hello.py\n"  # Cmd wins over Entrypoint
    env = members["env"][1].decode().splitlines()
    assert "GREETING=hi" in env and any(line.startswith("PATH=") for line in env)
    assert members["rootfs/app/hello.py"][1] == APP.encode()
    assert members["rootfs/app/hardlink.py"][1] == APP.encode()
    assert members["rootfs/app/symlink.py"] == (0o120777, b"hello.py")
    assert "rootfs/usr/bin/python3" in members or "rootfs/usr/bin/python3.11" in members
    for directory in ("dev", "run", "sys", "var", "proc", "tmp"):
        assert members[f"rootfs/{directory}"][0] & 0o170000 == 0o040000
    assert ".dockerenv" not in {n.removeprefix("rootfs/") for n in members}
    assert "rootfs/etc/hostname" not in members
    names = [n.encode() for n in members]
    assert names == sorted(names)


def test_describe_eif_shape(built: Built, image_uri: str, build_env: dict[str, str]) -> None:
    run = cli("describe-eif", "--eif-path", str(built.first), env=build_env)
    assert run.code == 0, run.stderr
    described = run.json()
    assert list(described) == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "CheckCRC",
        "ImageName",
        "ImageVersion",
        "Metadata",
    ]
    assert described["EifVersion"] == 4
    assert described["IsSigned"] is False and described["CheckCRC"] is True
    assert described["Measurements"] == built.first_run.json()["Measurements"]
    inspect = json.loads(
        subprocess.run(["docker", "image", "inspect", image_uri], capture_output=True, check=True).stdout
    )
    assert described["ImageVersion"] == inspect[0]["Id"].removeprefix("sha256:")
    assert described["ImageName"] == image_uri.split(":", maxsplit=1)[0]
    metadata = described["Metadata"]
    assert list(metadata) == [
        "BuildTime",
        "BuildTool",
        "BuildToolVersion",
        "OperatingSystem",
        "KernelVersion",
        "DockerInfo",
    ]
    assert (metadata["OperatingSystem"], metadata["KernelVersion"]) == ("Linux", "4.14.256")
    assert metadata["DockerInfo"]["Config"]["Cmd"] == ["python3", "/app/hello.py"]
    assert metadata["DockerInfo"]["Id"] == inspect[0]["Id"]
    assert list(metadata["DockerInfo"]) == sorted(metadata["DockerInfo"])
    assert "Metadata" not in metadata["DockerInfo"]


def test_describe_eif_reports_bad_crc_and_rejects_garbage(built: Built, tmp_path: Path, build_env: dict) -> None:
    data = bytearray(built.first.read_bytes())
    data[548 + 12] ^= 0xFF  # a kernel byte
    (tmp_path / "bad.eif").write_bytes(bytes(data))
    run = cli("describe-eif", "--eif-path", str(tmp_path / "bad.eif"), env=build_env)
    assert run.code == 0 and run.json()["CheckCRC"] is False
    (tmp_path / "junk.eif").write_bytes(b"junk" * 300)
    run = cli("describe-eif", "--eif-path", str(tmp_path / "junk.eif"), env=build_env)
    assert run.code == 35 and run.stderr.startswith("[ E35 ] ") and "magic" in run.stderr
    run = cli("describe-eif", "--eif-path", str(tmp_path / "missing.eif"), env=build_env)
    assert run.code == 35


def _signing_pair(tmp_path: Path) -> tuple[Path, Path, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EIF Test"),
            x509.NameAttribute(NameOID.COMMON_NAME, "signer"),
        ]
    )
    now = datetime.datetime(2025, 1, 5, 12, 0, 0, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA384())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "cert.pem", tmp_path / "key.pem", cert.public_bytes(serialization.Encoding.DER)


def test_signed_build_with_metadata(built: Built, image_uri: str, build_env: dict, tmp_path: Path) -> None:
    import cbor2
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from pycose.keys import EC2Key
    from pycose.messages import Sign1Message

    cert, key, der = _signing_pair(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"team": "payments", "build": {"n": 1}}))
    env = dict(build_env, SOURCE_DATE_EPOCH="0")
    run = cli(
        "build-enclave",
        "--docker-uri",
        image_uri,
        "--output-file",
        str(tmp_path / "s.eif"),
        "--signing-certificate",
        str(cert),
        "--private-key",
        str(key),
        "--name",
        "tokenizer",
        "--version",
        "2.0",
        "--metadata",
        str(tmp_path / "meta.json"),
        env=env,
    )
    assert run.code == 0, run.stderr
    measurements = run.json()["Measurements"]
    unsigned = built.first_run.json()["Measurements"]
    assert list(measurements) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert {k: measurements[k] for k in ("PCR0", "PCR1", "PCR2")} == {k: unsigned[k] for k in ("PCR0", "PCR1", "PCR2")}
    assert measurements["PCR8"] == extend(der)
    pcr8 = cli("pcr", "--signing-certificate", str(cert), env=env)
    assert pcr8.code == 0 and pcr8.json() == {"PCR8": measurements["PCR8"]}

    # The signature section, checked with cbor2 + pycose (not the emulator's code).
    secs = sections(tmp_path / "s.eif")
    assert [k for k, _ in secs] == [1, 2, 5, 3, 3, 4]
    (entry,) = cbor2.loads(secs[-1][1])
    assert bytes(entry["signing_certificate"]) == cert.read_bytes()
    cose = cbor2.loads(bytes(entry["signature"]))  # untagged COSE_Sign1 array
    assert cbor2.loads(cose[0]) == {1: -35}  # ES384 for a P-384 key
    message = Sign1Message.from_cose_obj(list(cose), True)
    public_pem = (
        x509.load_pem_x509_certificate(cert.read_bytes())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    message.key = EC2Key.from_pem_public_key(public_pem.decode())
    assert message.verify_signature()
    payload = cbor2.loads(message.payload)
    assert payload == {"register_index": 0, "register_value": list(bytes.fromhex(measurements["PCR0"]))}

    described = cli("describe-eif", "--eif-path", str(tmp_path / "s.eif"), env=env).json()
    assert list(described)[:6] == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "SigningCertificate",
        "CheckCRC",
        "SignatureCheck",
    ]
    assert described["IsSigned"] is True and described["SignatureCheck"] is True
    assert described["SigningCertificate"]["IssuerName"] == {
        "commonName": "signer",
        "countryName": "US",
        "organizationName": "EIF Test",
    }
    assert described["SigningCertificate"]["Algorithm"] == "ecdsa-with-SHA384"
    assert described["SigningCertificate"]["NotBefore"] == "Jan  5 12:00:00 2025 GMT"
    assert (described["ImageName"], described["ImageVersion"]) == ("tokenizer", "2.0")
    assert described["Metadata"]["BuildTime"] == "1970-01-01T00:00:00+00:00"
    assert list(described["Metadata"])[-2:] == ["build", "team"]
    assert described["Metadata"]["team"] == "payments"


def test_signed_build_with_a_kms_key(built: Built, image_uri: str, build_env: dict, tmp_path: Path) -> None:
    """build-enclave --private-key <KMS key ARN>: the Docker build, then KMS Sign (ECC_NIST_P384) through
    boto3 against a local endpoint this test starts; describe-eif checks the signature, PCR8 is the
    certificate's."""
    import boto3

    from nitro_emulator.local_aws.identities import OPERATOR_KEY
    from tests.conftest import running_local_aws
    from tests.integration.ec2.conftest import DUMMY_ENV, REGION
    from tests.integration.kms.conftest import kms_key_certificate

    workdir = tmp_path / "local-aws"
    workdir.mkdir()
    with running_local_aws(workdir, dict(os.environ)) as url:
        creds = {"aws_access_key_id": OPERATOR_KEY, "aws_secret_access_key": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"]}
        kms = boto3.client("kms", region_name=REGION, endpoint_url=url, **creds)
        key = kms.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
        cert = kms_key_certificate(kms, key, tmp_path / "kms.crt")
        env = {
            **build_env,
            "AWS_ACCESS_KEY_ID": OPERATOR_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_KMS": url,
        }
        out = tmp_path / "kms.eif"
        run = build(image_uri, out, "--signing-certificate", str(cert), "--private-key", key["Arn"], env=env)
        assert run.code == 0, run.stderr
        # Without the endpoint's KMS nothing signs: the ARN really goes through KMS.
        unreachable = dict(env, AWS_ENDPOINT_URL_KMS="http://127.0.0.1:9")
        failed = build(
            image_uri,
            tmp_path / "no-kms.eif",
            "--signing-certificate",
            str(cert),
            "--private-key",
            key["Arn"],
            env=unreachable,
        )
    # E60 before the Docker build; the output is only the empty file nitro-cli creates first.
    assert failed.code == 60 and "[ E60 ] Signing error" in failed.stderr, failed.stderr
    assert (tmp_path / "no-kms.eif").stat().st_size == 0
    measurements = run.json()["Measurements"]
    unsigned = built.first_run.json()["Measurements"]
    assert {k: measurements[k] for k in ("PCR0", "PCR1", "PCR2")} == {k: unsigned[k] for k in ("PCR0", "PCR1", "PCR2")}
    der = x509_der(cert)
    assert measurements["PCR8"] == extend(der)  # computed here, not by the emulator
    pcr8 = cli("pcr", "--signing-certificate", str(cert), env=build_env)
    assert pcr8.code == 0 and pcr8.json() == {"PCR8": measurements["PCR8"]}
    described = cli("describe-eif", "--eif-path", str(out), env=build_env)
    assert described.code == 0, described.stderr
    info = described.json()
    assert info["IsSigned"] is True and info["SignatureCheck"] is True
    assert info["Measurements"]["PCR8"] == measurements["PCR8"]
    assert info["SigningCertificate"]["IssuerName"] == {"commonName": "test-ca"}


def x509_der(pem: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_pcr_input(build_env: dict, tmp_path: Path) -> None:
    blob = os.urandom(100_000)
    (tmp_path / "f").write_bytes(blob)
    run = cli("pcr", "--input", str(tmp_path / "f"), env=build_env)
    assert run.code == 0 and run.json() == {"PCR": extend(blob)}
    run = cli("pcr", "--input", str(tmp_path / "nope"), env=build_env)
    assert run.code == 19 and run.stderr.startswith("[ E19 ]")
    (tmp_path / "bad.pem").write_text("not a cert")
    run = cli("pcr", "--signing-certificate", str(tmp_path / "bad.pem"), env=build_env)
    assert run.code == 57 and run.stderr.startswith("[ E57 ]")


def build(uri: str, output: Path | str, *extra: str, env: dict[str, str]) -> Run:
    return cli("build-enclave", "--docker-uri", uri, "--output-file", str(output), *extra, env=env)


@pytest.mark.parametrize(
    ("extra", "code", "text"),
    [
        (("--metadata", "{tmp}/big.json"), 48, "exceeded limit of 4096B"),
        (("--metadata", "{tmp}"), 48, "Specified path is not a file"),
        (("--private-key", "{tmp}/k.pem"), 2, "--signing-certificate"),
        (("--private-key", "{tmp}/k.pem", "--signing-certificate", "{tmp}/k.pem"), 60, "Could not read signing info"),
    ],
)
def test_build_argument_errors(
    image_uri: str, built: Built, build_env: dict, tmp_path: Path, extra: tuple[str, ...], code: int, text: str
) -> None:
    (tmp_path / "big.json").write_text(json.dumps({"k": "v" * 5000}))
    (tmp_path / "k.pem").write_text("junk")
    run = build(image_uri, tmp_path / "x.eif", *(e.format(tmp=tmp_path) for e in extra), env=build_env)
    assert run.code == code and text in run.stderr
    if code != 2:
        assert run.stderr.splitlines()[-3].startswith(f"[ E{code} ] ")


def test_build_environment_errors(
    docker_engine: str, image_uri: str, built: Built, build_env: dict, tmp_path: Path
) -> None:
    out = tmp_path / "x.eif"
    empty = tmp_path / "blobs"
    empty.mkdir()
    run = build(image_uri, out, env=dict(build_env, NITRO_CLI_BLOBS=str(empty)))
    assert run.code == 48 and "[ E48 ]" in run.stderr and "cmdline" in run.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "Dockerfile").write_text(f"FROM {docker_engine}\nRUN false\n")
    run = build("nitro-eif-test/broken:1", out, "--docker-dir", str(bad), env=build_env)
    assert run.code == 49 and "[ E49 ]" in run.stderr
    # A registry on a closed loopback port: the pull fails without leaving the host.
    run = build("127.0.0.1:9/none/such:1", out, env=build_env)
    assert run.code == 50 and "[ E50 ]" in run.stderr
    run = build(image_uri, tmp_path / "no/such/dir/x.eif", env=build_env)
    assert run.code == 19 and "failing operation: 'Open'" in run.stderr
