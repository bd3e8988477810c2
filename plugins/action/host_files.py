"""Controller side of nitro_enclaves.fleet.host_files: files copied from the controller (``files[].src``).

Each ``src`` is found like copy finds its source; the module gets its SHA-1, not its content. The module
compares and reports the files that differ (``transfers``); only those are sent, into the task's remote
temporary directory, and the module runs once more to check each copy against its SHA-1 and move it into
place. An unchanged file is one module run and no transfer; copy into a directory is three module runs.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.plugins.action import ActionBase
from ansible.utils.hashing import checksum

MODULE = "nitro_enclaves.fleet.host_files"
INTERNAL_OPTIONS = ("_checksum", "_staged")


class ActionModule(ActionBase):
    # The remote temporary directory is made only when a file has to be sent.
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_diff = True

    def _controller_files(self, files: list[Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The module's ``files`` (each ``src`` with its SHA-1) and the controller file of each path."""
        entries: list[dict[str, Any]] = []
        sources: dict[str, str] = {}
        for index, entry in enumerate(files):
            if not isinstance(entry, dict):
                raise AnsibleActionFail(f"files[{index}] must be a dictionary, got {type(entry).__name__}")
            if any(entry.get(name) is not None for name in INTERNAL_OPTIONS):
                raise AnsibleActionFail(
                    f"files[{index}]: {', '.join(INTERNAL_OPTIONS)} are set by the action, not by tasks"
                )
            if entry.get("src") is None:
                entries.append(entry)
                continue
            if entry.get("content") is not None:
                raise AnsibleActionFail(f"files[{index}] ({entry.get('path')}): give content or src, not both")
            try:
                source = self._find_needle("files", entry["src"])
            except AnsibleError as exc:
                raise AnsibleActionFail(f"files[{index}]: {exc.message}") from exc
            digest = checksum(source)
            if digest is None:
                raise AnsibleActionFail(f"files[{index}]: {source} is not a readable file on the controller")
            sources[str(entry.get("path"))] = source
            entries.append(entry | {"_checksum": digest})  # src stays: the module refuses one without a checksum
        return entries, sources

    def _send(self, entries: list[dict[str, Any]], sources: dict[str, str], paths: list[str]) -> list[dict[str, Any]]:
        """Send the controller files of ``paths``: their entries, each with its staged copy."""
        if self._connection._shell.tmpdir is None:
            self._make_tmp_path()
        tmpdir = self._connection._shell.tmpdir
        staged_entries = []
        for number, entry in enumerate(entry for entry in entries if entry["path"] in paths):
            staged = self._connection._shell.join_path(tmpdir, f"host_files.{number}")
            self._transfer_file(sources[entry["path"]], staged)
            staged_entries.append(entry | {"_staged": staged})
        self._fixup_perms2([tmpdir, *(entry["_staged"] for entry in staged_entries)])
        return staged_entries

    def run(self, tmp: str | None = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        result = super().run(tmp, task_vars)
        del tmp
        args = dict(self._task.args)
        files = args.get("files") or []
        if not isinstance(files, list):
            raise AnsibleActionFail(f"files must be a list, got {type(files).__name__}")
        entries, sources = self._controller_files(files)
        try:
            first = self._execute_module(MODULE, module_args=args | {"files": entries}, task_vars=task_vars)
            transfers = first.get("transfers") or []
            if first.get("failed") or not transfers:
                return result | first
            unknown = [path for path in transfers if path not in sources]
            if unknown:
                raise AnsibleActionFail(f"the module asked for files the task does not send: {unknown}")
            # The directories exist now: the second run handles only the files sent.
            staged = self._send(entries, sources, transfers)
            second = self._execute_module(
                MODULE, module_args=args | {"directories": [], "files": staged}, task_vars=task_vars
            )
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        if second.get("failed"):
            return result | second
        merged = first | second
        merged["changed"] = bool(first.get("changed") or second.get("changed"))
        merged["changed_paths"] = first.get("changed_paths", []) + second.get("changed_paths", [])
        merged["backup_files"] = first.get("backup_files", {}) | second.get("backup_files", {})
        merged["transfers"] = transfers
        if "diff" in first or "diff" in second:
            merged["diff"] = first.get("diff", []) + second.get("diff", [])
        return result | merged
