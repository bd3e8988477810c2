"""Parent services notice a re-installed venv by its install record (enclave_tokenizer.upgrade)."""

from __future__ import annotations

from pathlib import Path

import pytest
from enclave_tokenizer import upgrade
from enclave_tokenizer.upgrade import UpgradeWatch


def test_the_watch_sees_a_new_install_record(tmp_path: Path) -> None:
    record = tmp_path / ".wheelhouse.sha256"
    record.write_text("a\n")
    watch = UpgradeWatch(record)
    assert not watch.changed()
    replacement = tmp_path / "record.tmp"
    replacement.write_text("b\n")
    replacement.replace(record)  # how install-tools.sh writes it
    assert watch.changed()


def test_a_first_install_counts_and_no_path_never_changes(tmp_path: Path) -> None:
    record = tmp_path / ".wheelhouse.sha256"
    watch = UpgradeWatch(record)
    assert not watch.changed()
    record.write_text("a\n")
    assert watch.changed()
    assert not UpgradeWatch(None).changed()


def test_default_stamp_is_the_venvs_install_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upgrade.sys, "prefix", "/opt/venv")
    monkeypatch.setattr(upgrade.sys, "base_prefix", "/usr")
    assert upgrade.default_stamp() == Path("/opt/venv/.wheelhouse.sha256")
    monkeypatch.setattr(upgrade.sys, "base_prefix", "/opt/venv")
    assert upgrade.default_stamp() is None  # not in a venv: nothing installs it from a wheelhouse
