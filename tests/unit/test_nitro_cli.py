"""plugins/module_utils/nitro_cli.py against fake nitro-cli executables: JSON, `[ Exx ]` errors, timeouts,
binary lookup, the launch lock and the vsock wait."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import nitro_cli
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.nitro_cli import (
    NitroCli,
    NitroCliError,
    NitroCliNotFound,
    find_nitro_cli,
    is_emulated,
    launch_lock,
    parse_error,
    wait_for_vsock,
)
from nitro_fakes import write_script

URL = "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html"


def fake(tmp_path: Path, body: str, name: str = "nitro-cli") -> str:
    return str(write_script(tmp_path / name, body))


def test_parse_error_block() -> None:
    stderr = (
        "[ E26 ] Insufficient memory requested. User provided `memory` is 64 MB, but based on the EIF file size, "
        f"the minimum memory should be 512 MB\n\nFor more details, please visit {URL}#E26\n\n"
        'If you open a support ticket, please provide the error log found at "/var/log/x.log"\n'
    )
    code, message = parse_error(stderr)
    assert code == 26
    assert message.startswith("Insufficient memory requested.")
    assert message.endswith("the minimum memory should be 512 MB")
    assert parse_error("error: unexpected argument '--foo'") is None


def test_json_output(tmp_path: Path) -> None:
    cli = NitroCli(
        fake(tmp_path, 'import json; print(json.dumps([{"EnclaveName": "a", "State": "RUNNING"}], indent=2))')
    )
    assert cli.describe_enclaves() == [{"EnclaveName": "a", "State": "RUNNING"}]


def test_describe_must_be_an_array(tmp_path: Path) -> None:
    cli = NitroCli(fake(tmp_path, 'print("{}")'))
    with pytest.raises(NitroCliError, match="expected a JSON array"):
        cli.describe_enclaves()


def test_e_code_error(tmp_path: Path) -> None:
    body = f"""
import sys
sys.stderr.write("[ E21 ] No such CPU available in the pool. User provided `cpu-ids` contains CPU 7, which is not "
                 "available in the pool.\\n\\nFor more details, please visit {URL}#E21\\n")
sys.exit(21)
"""
    cli = NitroCli(fake(tmp_path, body))
    with pytest.raises(NitroCliError) as exc:
        cli.run_enclave("/x.eif", 512, cpu_ids=[7])
    assert exc.value.code == 21
    assert exc.value.rc == 21
    assert "contains CPU 7" in exc.value.message
    assert str(exc.value).startswith("[ E21 ] No such CPU available")
    assert exc.value.cmd[1:] == ["run-enclave", "--eif-path", "/x.eif", "--memory", "512", "--cpu-ids", "7"]
    assert exc.value.as_dict()["code"] == 21


def test_enclave_process_error_then_e39(tmp_path: Path) -> None:
    body = f"""
import sys
more = "\\n\\nFor more details, please visit {URL}"
sys.stderr.write("Start allocating memory...\\n[ E27 ] Insufficient memory available. x" + more + "#E27\\n")
sys.stderr.write("Failed connections: 1\\n[ E39 ] Enclave process connection failure. y" + more + "#E39\\n")
sys.exit(39)
"""
    with pytest.raises(NitroCliError) as exc:
        NitroCli(fake(tmp_path, body)).run(["run-enclave"])
    assert exc.value.code == 27  # the cause, not the CLI's wrapper
    assert exc.value.rc == 39
    assert "then [ E39 ] Enclave process connection failure" in exc.value.message


def test_usage_error_without_code(tmp_path: Path) -> None:
    body = "import sys; sys.stderr.write(\"error: unexpected argument '--bogus' found\\n\"); sys.exit(2)"
    with pytest.raises(NitroCliError) as exc:
        NitroCli(fake(tmp_path, body)).run(["run-enclave", "--bogus"])
    assert exc.value.code is None
    assert exc.value.rc == 2
    assert "unexpected argument '--bogus'" in str(exc.value)


def test_timeout(tmp_path: Path) -> None:
    cli = NitroCli(fake(tmp_path, "import time; time.sleep(30)"), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(NitroCliError, match=r"did not finish within 0\.5 s"):
        cli.describe_enclaves()
    assert time.monotonic() - started < 10


def test_bad_json(tmp_path: Path) -> None:
    with pytest.raises(NitroCliError, match="could not parse the JSON"):
        NitroCli(fake(tmp_path, 'print("[{not json")')).describe_enclaves()


def test_terminate_all_formats(tmp_path: Path) -> None:
    # Before nitro-cli 1.4.3: one pretty object after another.
    old = "import json\nfor i in 'ab':\n    print(json.dumps({'EnclaveID': i, 'Terminated': True}, indent=2))"
    assert [r["EnclaveID"] for r in NitroCli(fake(tmp_path, old, "old")).terminate_all()] == ["a", "b"]
    new = 'import json; print(json.dumps([{"EnclaveID": "a", "Terminated": True}], indent=2))'
    assert NitroCli(fake(tmp_path, new, "new")).terminate_all() == [{"EnclaveID": "a", "Terminated": True}]
    one = 'import json; print(json.dumps({"EnclaveID": "a", "Terminated": True}, indent=2))'
    assert NitroCli(fake(tmp_path, one, "one")).terminate_all() == [{"EnclaveID": "a", "Terminated": True}]
    empty = "print('[]')"
    assert NitroCli(fake(tmp_path, empty, "empty")).terminate_all() == []


def test_arguments_passed(tmp_path: Path) -> None:
    body = "import json, sys; print(json.dumps({'argv': sys.argv[1:]}))"
    cli = NitroCli(fake(tmp_path, body))
    run = cli.run_enclave("/e.eif", 256, cpu_count=2, enclave_cid=16, enclave_name="tok", debug_mode=True)
    assert run["argv"] == [
        "run-enclave", "--eif-path", "/e.eif", "--memory", "256", "--cpu-count", "2",
        "--enclave-cid", "16", "--enclave-name", "tok", "--debug-mode",
    ]  # fmt: skip
    assert cli.terminate_enclave(name="tok")["argv"] == ["terminate-enclave", "--enclave-name", "tok"]
    assert cli.terminate_enclave(enclave_id="i-1-enc2")["argv"] == ["terminate-enclave", "--enclave-id", "i-1-enc2"]
    built = cli.build_enclave("img:1", "/o.eif", docker_dir="/d", name="n", version="v", metadata_file="/m.json")
    assert built["argv"] == [
        "build-enclave", "--docker-uri", "img:1", "--output-file", "/o.eif", "--docker-dir", "/d",
        "--name", "n", "--version", "v", "--metadata", "/m.json",
    ]  # fmt: skip
    assert cli.describe_eif("/o.eif")["argv"] == ["describe-eif", "--eif-path", "/o.eif"]
    with pytest.raises(ValueError):
        cli.run_enclave("/e.eif", 256)
    with pytest.raises(ValueError):
        cli.terminate_enclave()


def test_version(tmp_path: Path) -> None:
    assert NitroCli(fake(tmp_path, 'print("Nitro CLI 1.4.2")')).version() == "1.4.2"


def test_env_is_added(tmp_path: Path) -> None:
    body = "import json, os; print(json.dumps(os.environ.get('NITRO_CLI_BLOBS')))"
    assert NitroCli(fake(tmp_path, body), env={"NITRO_CLI_BLOBS": "/b"}).run(["x"]) == "/b"


# ---------------------------------------------------------------------------------------------
# locating the binary


@pytest.fixture
def clean_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("NITRO_CLI_BIN", raising=False)
    monkeypatch.delenv("NITRO_EMULATED", raising=False)
    # /usr/bin/nitro-cli may not exist here; make sure of it for the test's assumptions.
    assert not os.path.exists("/usr/bin/nitro-cli")
    return empty


def test_find_explicit_and_env(tmp_path: Path, clean_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = fake(tmp_path, "pass", "my-nitro-cli")
    assert find_nitro_cli(mine) == mine
    monkeypatch.setenv("NITRO_CLI_BIN", mine)
    assert find_nitro_cli() == mine
    with pytest.raises(NitroCliNotFound, match="not found or not executable: /nope"):
        find_nitro_cli("/nope")


def test_find_on_path(clean_path: Path) -> None:
    on_path = write_script(clean_path / "nitro-cli", "pass")
    assert find_nitro_cli() == str(on_path)


def test_emulated_host_falls_back_to_the_emulator(clean_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_EMULATED", "1")
    beside = Path(sys.executable).parent / "nitro-cli-emulator"
    assert beside.exists(), "the project's .venv provides nitro-cli-emulator"
    assert find_nitro_cli() == str(beside)
    # A real Nitro host never gets the emulator.
    monkeypatch.setenv("NITRO_EMULATED", "0")
    with pytest.raises(NitroCliNotFound, match="nitro-cli not found"):
        find_nitro_cli()


def test_is_emulated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NITRO_EMULATED", raising=False)
    assert is_emulated(str(tmp_path / "no-device")) is True
    (tmp_path / "dev").write_text("")
    assert is_emulated(str(tmp_path / "dev")) is False
    monkeypatch.setenv("NITRO_EMULATED", "true")
    assert is_emulated(str(tmp_path / "dev")) is True


# ---------------------------------------------------------------------------------------------
# launch lock


def test_launch_lock_serializes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_CLI_SOCKETS_PATH", str(tmp_path / "sockets"))
    with launch_lock(timeout=1) as path:
        assert path == str(tmp_path / "sockets" / ".ansible-launch.lock")
        assert os.path.isdir(tmp_path / "sockets")
        with pytest.raises(TimeoutError, match="another enclave launch"), launch_lock(timeout=0.3):
            pass
    # Released on exit: a second holder gets it at once.
    with launch_lock(timeout=0.3):
        pass


def test_launch_lock_waits_for_release(tmp_path: Path) -> None:
    lock = str(tmp_path / "l.lock")
    order: list[str] = []
    held = threading.Event()

    def holder() -> None:
        with launch_lock(lock):
            held.set()
            time.sleep(0.5)
            order.append("first released")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    with launch_lock(lock, timeout=10):
        order.append("second acquired")
    thread.join()
    assert order == ["first released", "second acquired"]


# ---------------------------------------------------------------------------------------------
# vsock wait


def test_wait_for_emulated_vsock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path))
    assert nitro_cli.host_vsock_dir() == str(tmp_path)
    (tmp_path / "16").mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen_later() -> None:
        time.sleep(0.4)
        server.bind(str(tmp_path / "16" / "5000"))
        server.listen(1)

    thread = threading.Thread(target=listen_later)
    thread.start()
    try:
        waited = wait_for_vsock(16, 5000, timeout=10, interval=0.05)
        assert 0.3 < waited < 10
    finally:
        thread.join()
        server.close()


def test_wait_for_vsock_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path))
    with pytest.raises(TimeoutError, match=r"nothing accepted on vsock 16:5000 \(.*/16/5000\)"):
        wait_for_vsock(16, 5000, timeout=0.3, interval=0.05)


def test_emulated_host_defaults_to_the_emulator_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NITRO_VSOCK_DIR", raising=False)
    monkeypatch.setenv("NITRO_EMULATED", "1")
    assert nitro_cli.host_vsock_dir() == "/run/nitro_enclaves/vsock"


def test_real_vsock_used_on_nitro_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NITRO_VSOCK_DIR", raising=False)
    monkeypatch.setenv("NITRO_EMULATED", "0")
    assert nitro_cli.host_vsock_dir() is None
    # AF_VSOCK sockets can be created here but nothing answers: the wait must time out, not crash.
    with pytest.raises(TimeoutError, match=r"nothing accepted on vsock 16:5000 \(vsock\(16:5000\)\)"):
        wait_for_vsock(16, 5000, timeout=0.3, interval=0.05)
