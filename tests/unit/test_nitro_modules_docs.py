"""The nitro modules' DOCUMENTATION (with its doc fragments) matches their argument_spec, and ansible-doc
renders them from the collection."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from nitro_fakes import ansible_doc, load_module

MODULES = ["nitro_allocator", "nitro_enclave", "nitro_eif", "nitro_enclave_info", "host_files"]
KEYS = ("type", "default", "choices", "required", "elements", "aliases")


class _Captured(Exception):
    pass


def captured_spec(name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    module = load_module(name)
    seen: dict[str, Any] = {}

    def fake(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Captured

    monkeypatch.setattr(module, "AnsibleModule", fake)
    with pytest.raises(_Captured):
        module.main()
    return seen


def normalized(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in options.items():
        if name.startswith("_"):
            continue  # hidden: set by the module's action plugin, never by tasks (host_files' _checksum)
        entry = {key: spec.get(key) for key in KEYS if spec.get(key) not in (None, False, [])}
        entry.setdefault("type", "str")
        if "options" in spec or "suboptions" in spec:
            entry["options"] = normalized(spec.get("options") or spec.get("suboptions"))
        out[name] = entry
    return out


@pytest.mark.parametrize("name", MODULES)
def test_documentation_matches_argument_spec(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = captured_spec(name, monkeypatch)
    module = load_module(name)
    doc, _stderr = ansible_doc(name)
    assert normalized(doc["doc"]["options"]) == normalized(kwargs["argument_spec"])
    assert kwargs["supports_check_mode"] is True
    yaml.safe_load(module.EXAMPLES)
    returns = yaml.safe_load(module.RETURN)
    assert all("description" in value and "returned" in value for value in returns.values())


@pytest.mark.parametrize("name", MODULES)
def test_ansible_doc_renders(name: str) -> None:
    doc, stderr = ansible_doc(name)
    assert doc["doc"]["module"] == name
    assert doc["doc"]["version_added"] == "0.1.0"
    assert {"check_mode", "diff_mode", "platform"} <= set(doc["doc"]["attributes"])
    assert doc["examples"] and doc["return"]
    assert "[WARNING]" not in stderr, stderr
