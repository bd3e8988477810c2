"""run-enclave rules of the emulator that need no enclave: flag parsing, --config, CPU/CID/memory/name choice."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from nitro_emulator import enclave_process as ep
from nitro_emulator import runtime
from nitro_emulator.errors import NitroCliError


def code_of(call, *args) -> int:
    with pytest.raises(NitroCliError) as error:
        call(*args)
    return error.value.code


@pytest.mark.parametrize(("text", "mib"), [("512", 512), ("512M", 512), ("2g", 2048), ("1T", 1 << 20), ("0", 0)])
def test_parse_memory(text: str, mib: int) -> None:
    assert runtime.parse_memory(text) == mib


@pytest.mark.parametrize("text", ["256_mb", "", "1.5G", "12K", "M", " 5"])
def test_parse_memory_rejects(text: str) -> None:
    assert code_of(runtime.parse_memory, text) == 3


def test_parse_enclave_cid(capsys: pytest.CaptureFixture[str]) -> None:
    assert runtime.parse_enclave_cid("4") == 4
    assert runtime.parse_enclave_cid("4294967294") == 4294967294
    assert runtime.parse_enclave_cid("0") is None
    assert "auto-generated" in capsys.readouterr().err
    for bad in ("1", "2", "3", "4294967295", "18446744073709551615", "x", "-1"):
        assert code_of(runtime.parse_enclave_cid, bad) == 3


def namespace(**kwargs: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "cpu_ids": None,
        "cpu_count": None,
        "memory": None,
        "eif_path": None,
        "enclave_cid": None,
        "debug_mode": False,
        "attach_console": False,
        "enclave_name": None,
        "config": None,
    }
    base.update(kwargs)
    return argparse.Namespace(**base)


def test_run_request_from_flags() -> None:
    request = runtime.run_request(
        namespace(eif_path="a.eif", memory="1G", cpu_ids=["1", "5"], attach_console=True, enclave_cid="20")
    )
    assert request == {
        "eif_path": "a.eif",
        "memory_mib": 1024,
        "cpu_ids": [1, 5],
        "cpu_count": None,
        "enclave_cid": 20,
        "debug_mode": True,  # attach-console implies debug mode
        "attach_console": True,
        "enclave_name": None,
    }
    with pytest.raises(runtime.UsageError):
        runtime.run_request(namespace(eif_path="a.eif", cpu_count="1"))
    assert code_of(runtime.run_request, namespace(eif_path="a", memory="1", cpu_count="x")) == 3


def test_run_request_from_config(tmp_path: Path) -> None:
    path = tmp_path / "c.json"

    def request(data: object, **flags: object) -> dict:
        path.write_text(json.dumps(data))
        return runtime.run_request(namespace(config=str(path), **flags))

    out = request({"eif_path": "x.eif", "memory_mib": 64, "cpu_count": 2, "enclave_cid": 3, "unknown": 1})
    assert out["enclave_cid"] == 3  # not checked by the CLI
    assert out["debug_mode"] is False
    assert request({"eif_path": "x", "memory_mib": 64, "cpu_ids": [1], "attach_console": True})["debug_mode"]
    assert request({"eif_path": "x", "memory_mib": 64, "cpu_ids": [1]}, attach_console=True)["attach_console"]
    with pytest.raises(runtime.UsageError):
        request({"eif_path": "x", "memory_mib": 64, "cpu_count": 1}, memory="64")
    for data, code in [
        ({"eif_path": "x", "memory_mib": 64}, 1),
        ({"eif_path": "x", "memory_mib": 64, "cpu_count": 1, "cpu_ids": [1]}, 2),
        ({"eif_path": "x", "memory_mib": "64", "cpu_count": 1}, 17),
        ({"memory_mib": 64, "cpu_count": 1}, 17),
        ([1], 17),
    ]:
        path.write_text(json.dumps(data))
        assert code_of(runtime.run_request, namespace(config=str(path))) == code
    assert code_of(runtime.run_request, namespace(config=str(tmp_path / "missing"))) == 19


def req(**kwargs: object) -> ep.RunRequest:
    base = {"eif_path": "x.eif", "memory_mib": 128, "cpu_ids": None, "cpu_count": None}
    base.update(kwargs)
    return ep.RunRequest.from_dict(base)


def test_check_cpu_request() -> None:
    pool = [1, 2, 5, 6]
    ep.check_cpu_request(req(cpu_ids=[1, 5]), pool)
    ep.check_cpu_request(req(cpu_count=4), pool)
    with pytest.raises(NitroCliError) as error:
        ep.check_cpu_request(req(cpu_ids=[1, 3, 1, 3, 5]), pool)
    assert (error.value.code, error.value.info) == (20, ("cpu-ids", "13"))
    with pytest.raises(NitroCliError) as error:
        ep.check_cpu_request(req(cpu_ids=[1, 3]), pool)
    assert (error.value.code, error.value.info) == (21, ("cpu-ids", "3"))
    with pytest.raises(NitroCliError) as error:
        ep.check_cpu_request(req(cpu_count=5), pool)
    assert (error.value.code, error.value.info) == (22, ("cpu-count", "5"))


def test_check_memory_request() -> None:
    size = 128164543  # a real probe EIF: nitro-cli asks for at least 492 MiB
    ep.check_memory_request(489, size)  # 4 x size fits in 489 MiB even though the printed minimum is 492
    with pytest.raises(NitroCliError) as error:
        ep.check_memory_request(488, size)
    assert (error.value.code, error.value.info) == (26, ("memory", "488", "492"))
    assert code_of(ep.check_memory_request, 0, 10) == 26


def test_pick_cpus_like_the_driver() -> None:
    cores = [[1, 5], [2, 6], [3, 7]]
    pool = [1, 2, 3, 5, 6, 7]
    assert ep.pick_cpus(req(cpu_count=2), cores, pool, set()) == [1, 5]
    assert ep.pick_cpus(req(cpu_count=4), cores, pool, set()) == [1, 5, 2, 6]
    assert ep.pick_cpus(req(cpu_count=2), cores, pool, {1, 5}) == [2, 6]
    assert ep.pick_cpus(req(cpu_ids=[7, 3]), cores, pool, set()) == [7, 3]
    for request, used, message in [
        (req(cpu_count=2), {1, 2, 3}, ep.NO_CPUS_AVAILABLE),
        (req(cpu_count=1), set(), ep.FULL_CORES),
        (req(cpu_ids=[1]), set(), ep.FULL_CORES),
        (req(cpu_ids=[2, 6]), {6}, ep.VCPU_ALREADY_USED),
        (req(cpu_count=0), set(), ep.NO_VCPUS_ADDED),
    ]:
        with pytest.raises(NitroCliError) as error:
            ep.pick_cpus(request, cores, pool, used)
        assert (error.value.code, error.value.info) == (29, (message,))
    # Without SMT every CPU is a core of its own.
    assert ep.pick_cpus(req(cpu_count=1), [[1]], [1], set()) == [1]


def test_pick_cid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_VSOCK_DIR", str(tmp_path))
    assert ep.pick_cid(None, set()) == 16
    assert ep.pick_cid(None, {16, 17}) == 18
    (tmp_path / "18").mkdir()  # something else owns that vsock directory
    assert ep.pick_cid(None, {16, 17}) == 19
    assert ep.pick_cid(4, {16}) == 4
    for cid, used, message in [
        (16, {16}, ep.CID_IN_USE),
        (3, set(), ep.INVALID_CID),
        (2**32 - 1, set(), ep.INVALID_CID),
    ]:
        with pytest.raises(NitroCliError) as error:
            ep.pick_cid(cid, used)
        assert (error.value.code, error.value.info) == (29, (message,))


def test_names() -> None:
    assert ep.default_name("/x/y/app.eif.eif") == "app"
    assert ep.default_name("noext") == "noext"
    assert ep.unique_name("app", {"app", "app_1", "other"}) == "app_2"
    assert ep.unique_name("new", {"app"}) == "new"


def test_frames_round_trip() -> None:
    import socket

    left, right = socket.socketpair()
    with left, right:
        ep.send_frame(left, {"cmd": "describe", "n": [1, 2]})
        left.shutdown(socket.SHUT_WR)
        assert ep.recv_frame(right) == {"cmd": "describe", "n": [1, 2]}
        assert ep.recv_frame(right) is None
    left, right = socket.socketpair()
    with left, right:
        left.sendall((1 << 40).to_bytes(8, "little"))
        with pytest.raises(ValueError, match="too large"):
            ep.recv_frame(right)
