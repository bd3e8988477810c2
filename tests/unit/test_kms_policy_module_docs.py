"""The KMS modules' DOCUMENTATION matches their argument_spec, and ansible-doc renders them."""

from __future__ import annotations

import importlib.util
import subprocess
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT, VENV_BIN

MODULES = ["kms_enclave_policy", "kms_enclave_data_key", "kms_enclave_key"]


class Captured(Exception):
    pass


def argument_spec(name: str) -> dict[str, Any]:
    """Run the module's main() up to AnsibleAWSModule(...) and capture the spec it passes."""
    spec = importlib.util.spec_from_file_location(
        f"_plugins_modules_{name}", REPO_ROOT / "plugins" / "modules" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def fake(argument_spec: dict[str, Any], **_: Any) -> None:
        raise Captured(argument_spec)

    module.AnsibleAWSModule = fake
    with pytest.raises(Captured) as info:
        module.main()
    return info.value.args[0], module


def compare(doc_options: dict[str, Any], spec: dict[str, Any], where: str) -> None:
    assert set(doc_options) == set(spec), where
    for name, arg in spec.items():
        doc = doc_options[name]
        here = f"{where}.{name}"
        assert doc.get("type", "str") == arg.get("type", "str"), here
        assert bool(doc.get("required", False)) == bool(arg.get("required", False)), here
        assert doc.get("default") == arg.get("default"), here
        assert doc.get("choices") == arg.get("choices"), here
        assert doc.get("elements") == arg.get("elements"), here
        assert sorted(doc.get("aliases", [])) == sorted(arg.get("aliases", [])), here
        assert doc.get("description"), here
        if "options" in arg:
            compare(doc["suboptions"], arg["options"], here)


@pytest.mark.parametrize("name", MODULES)
def test_documentation_matches_argument_spec(name) -> None:
    spec, module = argument_spec(name)
    documentation = yaml.safe_load(module.DOCUMENTATION)
    assert documentation["module"] == name
    compare(documentation["options"], spec, name)
    yaml.safe_load(module.EXAMPLES)
    returned = yaml.safe_load(module.RETURN)
    assert all("description" in v and "returned" in v for v in returned.values())


def test_compare_catches_drift() -> None:
    spec, module = argument_spec("kms_enclave_policy")
    documentation = yaml.safe_load(module.DOCUMENTATION)
    documentation["options"]["statements"]["suboptions"]["pcr8"]["type"] = "str"
    with pytest.raises(AssertionError, match=r"statements\.pcr8"):
        compare(documentation["options"], spec, "kms_enclave_policy")
    del spec["state"]
    with pytest.raises(AssertionError):
        compare(yaml.safe_load(module.DOCUMENTATION)["options"], spec, "kms_enclave_policy")


@pytest.mark.parametrize("name", MODULES)
def test_ansible_doc_renders(name) -> None:
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-doc"), f"nitro_enclaves.fleet.{name}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"), "PATH": str(VENV_BIN), "ANSIBLE_NOCOLOR": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    assert "EXAMPLES" in proc.stdout and "RETURN VALUES" in proc.stdout
    assert "endpoint_url" in proc.stdout  # amazon.aws common parameters documented
