#!/usr/bin/env python3
"""Re-runnable rewrite of the pre-collection layout's names (idempotent). Run from the repo root:
    python3 scripts/collection_rewrite.py [FILE ...]   (default: every tracked .py .yml .yaml .md .j2 .cfg .toml .sh)
- Python imports: ansible.module_utils.<ours> and nitro_module_utils -> the collection's name
- YAML: task keys naming our modules, `role:`/`name:` of include_role/import_role/roles naming our roles -> FQCN
- paths: library/ -> plugins/modules/, module_utils/ -> plugins/module_utils/
"""

import re
import subprocess
import sys
from pathlib import Path

NEW = "ansible_collections.nitro_enclaves.fleet.plugins.module_utils"
FQ = "nitro_enclaves.fleet."
UTILS = [
    "allocator",
    "data_key_record",
    "ec2_enclave",
    "eif",
    "eif_provenance",
    "enclave_pool",
    "enclave_spec",
    "kms_policy",
    "kms_policy_document",
    "nitro_cli",
    "vsock",
]
UTILS += [p.stem for p in Path("plugins/module_utils").glob("*.py") if p.stem != "__init__" and p.stem not in UTILS]
MODULES = [
    "ec2_enclave_instance",
    "kms_enclave_data_key",
    "kms_enclave_policy",
    "nitro_allocator",
    "nitro_eif",
    "nitro_enclave",
] + [p.stem for p in Path("plugins/modules").glob("*.py")]
ROLES = [p.name for p in Path("roles").iterdir() if (p / "tasks").is_dir()]
U = "|".join(sorted(set(UTILS), key=len, reverse=True))
M = "|".join(sorted(set(MODULES), key=len, reverse=True))
R = "|".join(sorted(set(ROLES), key=len, reverse=True))


def py(text: str) -> str:
    # playbooks written as Python dicts in tests: {"nitro_eif": {...}} task keys, include_role names
    text = re.sub(rf'"({M})": (?=[{{\w])', rf'"{FQ}\1": ', text)
    text = re.sub(rf'("(?:ansible\.builtin\.)?(?:include|import)_role": \{{"name": ")({R})"', r"\1" + FQ + r'\2"', text)
    text = re.sub(rf'(\.get\("action"\) == ")({M})"', r"\1" + FQ + r'\2"', text)
    text = re.sub(r'"ansible-doc"\), "-M", "library", ', '"ansible-doc"), ', text)
    text = re.sub(r"\bansible\.module_utils\.({U})\b".replace("{U}", U), rf"{NEW}.\1", text)
    text = re.sub(rf"from ansible\.module_utils import ({U})\b", rf"from {NEW} import \1", text)
    text = re.sub(r"(?<![\w.])nitro_module_utils\b", NEW, text)
    return text


def yml(text: str) -> str:
    # a task key naming one of our modules: "  nitro_eif:" / "- nitro_eif:"
    text = re.sub(rf"^(\s*(?:- )?)({M}):(\s*(?:#.*)?)$", rf"\1{FQ}\2:\3", text, flags=re.M)
    # roles: "- role: x", "- x" under roles: is rare here; include_role/import_role "name: x"
    text = re.sub(rf"^(\s*(?:- )?role:\s*)({R})\b(?!\.)", rf"\1{FQ}\2", text, flags=re.M)
    text = re.sub(rf"((?:include_role|import_role):\s*\n(?:\s+\w+:.*\n)*?\s+name:\s*)({R})\b(?!\.)", rf"\1{FQ}\2", text)
    return text


def paths(text: str) -> str:
    text = re.sub(r"(?<![\w/.-])library/", "plugins/modules/", text)
    text = re.sub(r"(?<![\w/.-])module_utils/", "plugins/module_utils/", text)
    return text


def main() -> None:
    files = (
        sys.argv[1:] or subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    )
    for name in files:
        path = Path(name)
        if (
            name.startswith(("changelogs/", "CHANGELOG"))
            or path.is_symlink()
            or not path.is_file()
            or path.suffix not in {".py", ".yml", ".yaml", ".md", ".j2", ".cfg", ".toml", ".sh"}
        ):
            continue
        old = path.read_text()
        new = paths(py(old))
        if path.suffix in {".yml", ".yaml"}:
            new = yml(new)
        if new != old:
            path.write_text(new)
            print("rewrote", name)


main()
