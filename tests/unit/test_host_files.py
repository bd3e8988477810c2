"""plugins/modules/host_files.py under ansible-core's patch_module_args harness: directories then files, written
only when different, owner/group/mode, check mode, diff, backup, the paths reported for restarts."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from nitro_fakes import load_module, run_module

MODULE = load_module("host_files")


def run(capsys: pytest.CaptureFixture[str], check: bool = False, diff: bool = False, **args: Any) -> dict[str, Any]:
    return run_module(MODULE, {**args, "_ansible_check_mode": check, "_ansible_diff": diff}, capsys)


def layout(tmp_path: Path, gateway: str = "listen: 8080\n") -> dict[str, Any]:
    conf = tmp_path / "etc" / "tokenizer"
    return {
        "directories": [{"path": str(conf), "mode": "0700"}],
        "files": [
            {"path": str(conf / "proxy.yaml"), "content": "allow: kms\n", "mode": "0644", "backup": True},
            {"path": str(conf / "gateway.yaml"), "content": gateway, "mode": "0600"},
        ],
    }


def test_check_mode_then_write_then_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = layout(tmp_path)
    conf = tmp_path / "etc" / "tokenizer"
    dry = run(capsys, check=True, diff=True, **args)
    assert dry["changed"] and dry["changed_paths"] == [str(conf), str(conf / "proxy.yaml"), str(conf / "gateway.yaml")]
    assert not conf.exists()
    assert [d.get("after") for d in dry["diff"][1:]] == ["allow: kms\n", "listen: 8080\n"]
    done = run(capsys, **args)
    assert done["changed_paths"] == dry["changed_paths"] and done["backup_files"] == {}
    assert (conf / "gateway.yaml").read_text() == "listen: 8080\n"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o700
    assert stat.S_IMODE((conf / "gateway.yaml").stat().st_mode) == 0o600
    assert stat.S_IMODE((conf / "proxy.yaml").stat().st_mode) == 0o644
    again = run(capsys, check=True, diff=True, **args)
    assert not again["changed"] and again["changed_paths"] == [] and again["diff"] == []
    assert not run(capsys, **args)["changed"]


def test_only_what_differs_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, **layout(tmp_path))
    conf = tmp_path / "etc" / "tokenizer"
    (conf / "proxy.yaml").chmod(0o666)
    changed = run(capsys, diff=True, **layout(tmp_path, gateway="listen: 9090\n"))
    assert changed["changed_paths"] == [str(conf / "proxy.yaml"), str(conf / "gateway.yaml")]
    assert stat.S_IMODE((conf / "proxy.yaml").stat().st_mode) == 0o644
    assert (conf / "proxy.yaml").read_text() == "allow: kms\n"  # mode fixed, content kept, no backup
    assert changed["backup_files"] == {}
    gateway_diff = next(d for d in changed["diff"] if d.get("after_header") == str(conf / "gateway.yaml"))
    assert (gateway_diff["before"], gateway_diff["after"]) == ("listen: 8080\n", "listen: 9090\n")
    proxy_diff = next(d for d in changed["diff"] if d["before"] == {"path": str(conf / "proxy.yaml"), "mode": "0666"})
    assert proxy_diff["after"]["mode"] == "0644"
    args = layout(tmp_path)
    args["files"][0]["content"] = "allow: kms, sts\n"
    backed = run(capsys, **args)
    backup = Path(backed["backup_files"][str(conf / "proxy.yaml")])
    assert backup.read_text() == "allow: kms\n" and (conf / "proxy.yaml").read_text() == "allow: kms, sts\n"


def test_a_file_where_a_directory_should_be_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "etc").write_text("not a directory")
    result = run(capsys, directories=[{"path": str(tmp_path / "etc")}])
    assert result["failed"] and "is not a directory" in result["msg"]
