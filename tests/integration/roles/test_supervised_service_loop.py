"""The supervised_service role's restart-loop manager (hosts without systemd as PID 1) on localhost.

Runs the role through `ansible-playbook` with a private service name: check mode changes nothing,
start, idempotent re-run, a changed definition restarts, a killed loop is started again, stop, and
absent removes the launcher; the same command keeps the log's logrotate configuration. The molecule
scenarios cover the systemd manager.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"

pytestmark = [pytest.mark.root]


class LoopService:
    def __init__(self, name: str, log_dir: Path, workdir: Path) -> None:
        self.name = name
        self.log_dir = log_dir
        self.workdir = workdir
        self.launcher = Path(f"/usr/local/sbin/supervise-{name}")
        self.pidfile = Path(f"/run/nitro-enclaves-{name}.pid")
        self.logrotate = Path(f"/etc/logrotate.d/{name}")
        self.config = workdir / "ansible.cfg"
        self.config.write_text(f"[defaults]\ncollections_path = {REPO / 'collections'}\n")

    def apply(self, state: str = "started", marker: str = "one", check: bool = False) -> dict[str, Any]:
        """Run the role; return the role's task result and the supervised_service_started fact."""
        play = [
            {
                "hosts": "localhost",
                "gather_facts": False,
                "tasks": [
                    {
                        "name": "Supervise",
                        "ansible.builtin.include_role": {"name": "nitro_enclaves.fleet.supervised_service"},
                        "vars": {
                            "supervised_service_name": self.name,
                            "supervised_service_command": ["sleep", "600"],
                            "supervised_service_environment": {"MARKER": marker},
                            "supervised_service_manager": "loop",
                            "supervised_service_state": state,
                            "supervised_service_log_dir": str(self.log_dir),
                            "supervised_service_restart_sec": 1,
                        },
                    },
                    {"name": "Report", "ansible.builtin.debug": {"var": "supervised_service_started"}},
                ],
            }
        ]
        path = self.workdir / "play.yml"
        path.write_text(yaml.safe_dump(play))
        env = dict(
            os.environ,
            # Not the project's ansible.cfg: its profile_tasks callback would print after the JSON.
            ANSIBLE_CONFIG=str(self.config),
            ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        )
        args = [str(PLAYBOOK_BIN), "-i", "localhost,", "-c", "local", str(path)]
        args += ["-e", f"ansible_python_interpreter={sys.executable}", *(["--check"] if check else [])]
        proc = subprocess.run(args, cwd=self.workdir, env=env, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        tasks = [task for play in json.loads(proc.stdout)["plays"] for task in play["tasks"]]
        run = next(t["hosts"]["localhost"] for t in tasks if "Run in a restart loop" in t["task"]["name"])
        report = next(t["hosts"]["localhost"] for t in tasks if t["task"]["name"] == "Report")
        # raw (the role's call) keeps the script's line end (CR LF over SSH, where it runs on a terminal).
        stdout = run["stdout"].strip()
        return {"changed": run["changed"], "stdout": stdout, "started": report["supervised_service_started"]}

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LoopService]:
    svc = LoopService(f"test-loop-{uuid.uuid4().hex[:8]}", tmp_path / "log", tmp_path)
    try:
        yield svc
    finally:
        stop = ["start-stop-daemon", "--stop", "--pidfile", str(svc.pidfile), "--retry", "TERM/5/KILL/2"]
        subprocess.run(stop, capture_output=True, check=False)
        svc.launcher.unlink(missing_ok=True)
        svc.pidfile.unlink(missing_ok=True)
        svc.logrotate.unlink(missing_ok=True)


def test_restart_loop_lifecycle(service: LoopService) -> None:
    planned = service.apply(check=True)
    assert planned["changed"] and planned["stdout"] == "launcher=changed service=started logrotate=changed"
    assert not service.launcher.exists() and service.pid() is None, "check mode must change nothing"
    assert not service.logrotate.exists()

    first = service.apply()
    assert first["changed"] and first["started"]
    pid = service.pid()
    assert pid is not None
    assert "MARKER=one" in service.launcher.read_text()
    assert oct(service.launcher.stat().st_mode & 0o777) == "0o755"
    assert f"{service.log_dir}/{service.name}.log {{" in service.logrotate.read_text()
    assert oct(service.logrotate.stat().st_mode & 0o777) == "0o644"

    again = service.apply()
    assert (
        not again["changed"]
        and not again["started"]
        and again["stdout"] == ("launcher=unchanged service=unchanged logrotate=unchanged")
    )
    assert service.pid() == pid

    redefined = service.apply(marker="two")
    assert redefined["changed"] and redefined["started"]
    assert service.pid() not in (None, pid), "a changed launcher restarts the service"
    assert "MARKER=two" in service.launcher.read_text()

    # The loop itself killed (not just its child, which the loop would restart): the next run starts it.
    loop_pid = service.pid()
    children = Path(f"/proc/{loop_pid}/task/{loop_pid}/children").read_text().split()
    os.kill(loop_pid, signal.SIGKILL)
    for child in children:
        os.kill(int(child), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{loop_pid}").exists() and time.monotonic() < deadline:  # until init reaps it
        time.sleep(0.1)
    revived = service.apply(marker="two")
    assert (
        revived["changed"]
        and revived["started"]
        and revived["stdout"] == ("launcher=unchanged service=started logrotate=unchanged")
    )
    assert service.pid() is not None

    # The restart loop writes its child's exit to the log directory it created.
    assert (service.log_dir / f"{service.name}.log").exists()

    stopped = service.apply(state="stopped", marker="two")
    assert stopped["changed"] and not stopped["started"] and service.pid() is None
    assert not service.apply(state="stopped", marker="two")["changed"]

    removed = service.apply(state="absent")
    assert removed["changed"] and not service.launcher.exists() and not service.logrotate.exists()
    assert not service.apply(state="absent")["changed"]
