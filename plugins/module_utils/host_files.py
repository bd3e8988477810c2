"""Directories and files on a host, several in one module run (the host_files module and its action).

A role that wrote a directory and two templates paid five module runs for it (file, then stat + file or
copy per template); this is one. Each entry is compared first and written only when its content or its
owner, group or mode differ: atomically (atomic_file), with a backup of the old file when asked.

A file copied from the controller (``src`` in the task) reaches the module as its SHA-1 (``_checksum``):
one run compares it and reports in ``transfers`` the files that differ; the action plugin sends those and
runs the module again with each one's staged copy (``_staged``), which is checked against the checksum
before it replaces the file. An unchanged EIF is one module run, not copy's three (stat of the directory,
stat of the file, file for the attributes).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

from .atomic_file import atomic_path, write_atomic
from .diff import diff_result

# Text we diff; a larger file is reported as changed without its text (as Ansible's copy does past 100 KiB).
MAX_DIFF_BYTES = 104448


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _attributes(module: Any, entry: Mapping[str, Any], path: str, changed: bool, diff: dict | None) -> bool:
    """Owner, group and mode as asked (Ansible's own helper: it honours check mode and fills ``diff``)."""
    file_args = module.load_file_common_arguments(
        {"path": path, "owner": entry.get("owner"), "group": entry.get("group"), "mode": entry.get("mode")}
    )
    return module.set_fs_attributes_if_different(file_args, changed, diff=diff)


def _settle(module: Any, entry: Mapping[str, Any], written: bool, existed: bool, diff: dict) -> tuple[bool, list[dict]]:
    """After the content: owner, group and mode. (changed, diffs: the content's when written, the attributes')."""
    path = entry["path"]
    diffs = [diff] if written else []
    if module.check_mode and not existed:
        return True, diffs  # nothing on disk to compare attributes with
    attributes: dict = {"before": {"path": path}, "after": {"path": path}}
    changed = _attributes(module, entry, path, written, attributes)
    if len(attributes["after"]) > 1:
        diffs.append(attributes)
    return changed, diffs


def ensure_directory(module: Any, entry: Mapping[str, Any]) -> tuple[bool, dict]:
    path = entry["path"]
    diff: dict = {"before": {"path": path}, "after": {"path": path}}
    created = not os.path.isdir(path)
    if created:
        if os.path.lexists(path):
            module.fail_json(msg=f"{path} exists and is not a directory")
        diff["before"]["state"], diff["after"]["state"] = "absent", "directory"
        if module.check_mode:
            return True, diff
        os.makedirs(path, mode=0o700, exist_ok=True)  # the asked mode follows
    return _attributes(module, entry, path, created, diff), diff


def ensure_file(module: Any, entry: Mapping[str, Any]) -> tuple[bool, list[dict], str | None]:
    """(changed, diffs: of the text when it changes, of owner/group/mode when they do, backup file)."""
    path, content = entry["path"], entry["content"]
    before = _read(path)
    diff = diff_result(before, content, path)
    if max(len(before or ""), len(content)) > MAX_DIFF_BYTES:
        diff = diff_result("", "", path) | {"prepared": "text too large to show"}
    backup = None
    written = before != content
    if written and not module.check_mode:
        if entry.get("backup") and before is not None:
            backup = module.backup_local(path)
        # 0600 until the asked mode is applied below; atomic_move keeps an existing file's SELinux context.
        write_atomic(os.path.abspath(path), content, 0o600, move=module.atomic_move)
    changed, diffs = _settle(module, entry, written, before is not None, diff)
    return changed, diffs, backup


def _sha1(module: Any, path: str) -> str | None:
    return module.sha1(path) if os.path.isfile(path) else None


def ensure_copied(module: Any, entry: Mapping[str, Any]) -> tuple[bool, list[dict], str | None, bool]:
    """A file sent from the controller: (changed, diffs, backup file, transfer needed). Unstaged and different,
    it is left as it is for the action plugin to send (check mode: reported as a change)."""
    path, checksum, staged = entry["path"], entry["_checksum"], entry.get("_staged")
    before = _sha1(module, path)
    written = before != checksum
    diff = diff_result({"path": path, "sha1": before or "absent"}, {"path": path, "sha1": checksum}, path)
    backup = None
    if written and not module.check_mode:
        if not staged:
            return False, [], None, True
        if entry.get("backup") and before is not None:
            backup = module.backup_local(path)
        with atomic_path(os.path.abspath(path), 0o600, move=module.atomic_move) as tmp:
            shutil.copyfile(staged, tmp)
            received = module.sha1(tmp)
            if received != checksum:  # a transfer cut short or altered: the old file stays
                module.fail_json(
                    msg=f"{path}: the copy received has SHA-1 {received}, the controller's file {checksum}"
                )
    changed, diffs = _settle(module, entry, written, before is not None, diff)
    return changed, diffs, backup, False


def ensure_all(module: Any, directories: list[Mapping[str, Any]], files: list[Mapping[str, Any]]) -> dict:
    """Directories first (files may go into them), then files; each reported by path."""
    result: dict[str, Any] = {"changed": False, "changed_paths": [], "backup_files": {}, "transfers": []}
    diffs: list[dict] = []
    for entry in directories:
        changed, diff = ensure_directory(module, entry)
        if changed:
            result["changed_paths"].append(entry["path"])
            diffs.append(diff)
    for entry in files:
        if entry.get("_checksum"):
            changed, file_diffs, backup, transfer = ensure_copied(module, entry)
            if transfer:
                result["transfers"].append(entry["path"])
        else:
            changed, file_diffs, backup = ensure_file(module, entry)
        if changed:
            result["changed_paths"].append(entry["path"])
            diffs.extend(file_diffs)
        if backup:
            result["backup_files"][entry["path"]] = backup
    result["changed"] = bool(result["changed_paths"])
    if module._diff:
        result["diff"] = diffs
    return result
