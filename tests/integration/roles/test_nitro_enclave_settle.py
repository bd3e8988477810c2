"""roles/nitro_enclave waits for the supervisor's report on the configuration (tasks/settle.yml, a raw call
of `enclave-supervisor --wait`): a configuration it runs passes, one it rejected fails the play with the
supervisor's reason, and check mode waits for nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from enclave_tokenizer.supervisor_state import StatusFile, status_path_for

from tests.conftest import VENV_BIN
from tests.integration.kms.conftest import run_playbook

REASON = "E22: the enclave needs 4096 MiB, the pool has 2048; running the previous configuration"


def _settle(tmp_path: Path, state: str, *, check: bool = False):
    config = tmp_path / "tok.json"
    config.write_text(json.dumps({"eif_path": "/nonexistent.eif", "memory_mib": 4096}))
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    StatusFile(status_path_for(config), config).report(state, digest, REASON if state == "fallback" else "")
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "ansible.builtin.include_role": {
                        "name": "nitro_enclaves.fleet.nitro_enclave",
                        "tasks_from": "settle",
                    },
                    "vars": {
                        "nitro_enclave_name": "tok",
                        "nitro_enclave_config_dir": str(tmp_path),
                        "nitro_enclave_venv": str(VENV_BIN.parent),
                        "nitro_enclave_start_timeout": 5,
                    },
                }
            ],
        }
    ]
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(play))
    return run_playbook(path, check=check)


def test_a_configuration_the_supervisor_runs_passes(tmp_path: Path) -> None:
    run = _settle(tmp_path, "running")
    assert run.rc == 0, run.stdout[-3000:]
    (waited,) = [r for r in run.results if "Wait until the supervisor" in r["task"]]
    assert waited["rc"] == 0 and not waited["changed"]


def test_a_rejected_configuration_fails_with_the_supervisors_reason(tmp_path: Path) -> None:
    run = _settle(tmp_path, "fallback")
    assert run.rc != 0
    (report,) = [r for r in run.results if "Report why" in r["task"]]
    assert report["failed"] and report["msg"] == f"{tmp_path / 'tok.json'}: {REASON}", report


def test_check_mode_waits_for_nothing(tmp_path: Path) -> None:
    run = _settle(tmp_path, "fallback", check=True)
    assert run.rc == 0, run.stdout[-3000:]
    settle = [r for r in run.results if "Wait until" in r["task"] or "Report why" in r["task"]]
    assert len(settle) == 2 and all(r.get("skipped") for r in settle), run.results
