"""host_files with files from the controller (plugins/action/host_files.py + the module), through ansible-playbook
on localhost: one module run and no transfer when the host's file is the controller's, a transfer checked against
the controller's SHA-1 when it differs, check mode that sends and writes nothing, and bad input refused first."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nitro_fakes import load_module, run_module

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Files from the controller
      nitro_enclaves.fleet.host_files:
        directories:
          - {path: "{{ dest }}", mode: "0755"}
        files: "{{ files }}"
      register: result
    - name: Keep the result for the test
      ansible.builtin.copy:
        content: "{{ result | to_json }}"
        dest: "{{ out }}"
        mode: "0600"
      check_mode: false
      diff: false
"""


def play(tmp_path: Path, files: list[dict[str, Any]], *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAYBOOK)
    variables = tmp_path / "vars.json"
    out = tmp_path / "result.json"
    out.unlink(missing_ok=True)
    variables.write_text(json.dumps({"dest": str(tmp_path / "host"), "files": files, "out": str(out)}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(playbook)]
    command += ["-e", f"@{variables}", "-e", f"ansible_python_interpreter={sys.executable}", "-vvv", *extra]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    return run, json.loads(out.read_text()) if out.exists() else {}


def module_runs(run: subprocess.CompletedProcess[str]) -> int:
    """host_files module runs (-vvv names each module file it sends)."""
    return sum("Using module file" in line and "host_files.py" in line for line in run.stdout.splitlines())


def test_an_unchanged_file_is_one_module_run_and_no_transfer(tmp_path: Path) -> None:
    eif = tmp_path / "tokenizer.eif"
    eif.write_bytes(os.urandom(3 << 20))
    target = tmp_path / "host" / "tokenizer.eif"
    files = [{"src": str(eif), "path": str(target), "mode": "0644"}]

    first, result = play(tmp_path, files)
    assert first.returncode == 0, first.stdout[-3000:]
    assert result["changed"] and result["transfers"] == [str(target)]
    assert result["changed_paths"] == [str(tmp_path / "host"), str(target)]
    assert target.read_bytes() == eif.read_bytes() and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert module_runs(first) == 2  # compare, then install the copy sent

    again, result = play(tmp_path, files)
    assert again.returncode == 0, again.stdout[-3000:]
    assert not result["changed"] and result["transfers"] == []
    assert module_runs(again) == 1
    assert f"PUT {eif} " not in again.stdout and f"PUT {eif} " in first.stdout  # nothing sent

    eif.write_bytes(os.urandom(1 << 20))
    dry, result = play(tmp_path, files, "--check", "--diff")
    assert dry.returncode == 0 and result["changed"] and result["transfers"] == []
    assert target.stat().st_size == 3 << 20  # check mode wrote nothing
    assert f"PUT {eif} " not in dry.stdout

    changed, result = play(tmp_path, files)
    assert (
        changed.returncode == 0 and result["changed_paths"] == [str(target)] and target.read_bytes() == eif.read_bytes()
    )
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"src": "missing.eif"}, "missing.eif"),
        ({"src": "SRC", "content": "x"}, "give content or src, not both"),
        ({"content": "x", "_checksum": "0" * 40}, "set by the action"),
    ],
)
def test_bad_entries_are_refused_before_anything_changes(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    source = tmp_path / "real.eif"
    source.write_bytes(b"eif")
    entry = {k: (str(source) if v == "SRC" else v) for k, v in entry.items()}
    run, _ = play(tmp_path, [{"path": str(tmp_path / "host" / "x"), **entry}])
    assert run.returncode == 2 and message in run.stdout
    assert not (tmp_path / "host").exists()


def test_a_copy_that_does_not_match_the_controllers_checksum_replaces_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "tokenizer.eif"
    target.write_bytes(b"old EIF")
    staged = tmp_path / "staged"
    staged.write_bytes(b"cut sho")
    good = "5f2a1b0f8a4f7c6a3a3e0a2f1d4c5b6a7e8f9d0c"
    entry = {
        "path": str(target),
        "src": "/controller/tokenizer.eif",
        "_checksum": good,
        "_staged": str(staged),
        "mode": "0644",
    }
    result = run_module(load_module("host_files"), {"files": [entry]}, capsys)
    assert result.get("failed") and "SHA-1" in result["msg"] and good in result["msg"]
    assert target.read_bytes() == b"old EIF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staged", "tokenizer.eif"]
    unsent = run_module(
        load_module("host_files"), {"files": [{"path": str(target), "src": "/controller/x.eif"}]}, capsys
    )
    assert unsent.get("failed") and "action plugin host_files, which did not run" in unsent["msg"]
