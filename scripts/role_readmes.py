"""Writes each role's README.md from its meta/argument_specs.yml, so the variable list cannot drift.

python scripts/role_readmes.py          # rewrite the READMEs
python scripts/role_readmes.py --check  # exit 1 if one is out of date (run by the test suite)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"


def _text(value: Any) -> str:
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    text = " ".join(str(value or "").split()).replace("|", "\\|")
    return re.sub(r"C\(([^)]*)\)", r"`\1`", text)  # ansible-doc markup to Markdown


def _default(option: dict[str, Any], defaults: dict[str, Any], name: str) -> str:
    value = option["default"] if "default" in option else defaults.get(name)
    if value is None:
        return ""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
    return "`" + text.replace("|", "\\|") + "`"


def _defaults(role: Path) -> dict[str, Any]:
    defaults_file = role / "defaults" / "main.yml"
    return (yaml.safe_load(defaults_file.read_text()) or {}) if defaults_file.exists() else {}


def render(role: Path) -> str:
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]
    # A shared default is valued in the common role, and shown by the role that documents it.
    defaults = {**_defaults(role.parent / "nitro_enclaves_common"), **_defaults(role)}
    lines = [
        f"# Role `{role.name}`",
        "",
        "<!-- Generated from meta/argument_specs.yml by scripts/role_readmes.py; edit that file instead. -->",
        "",
        _text(spec.get("short_description")),
        "",
    ]
    lines += [f"- {_text(paragraph)}" for paragraph in spec.get("description", [])]
    lines += ["", "## Variables", "", "| variable | type | default | description |", "|---|---|---|---|"]
    for name, option in spec.get("options", {}).items():
        kind = option.get("type", "str")
        if kind == "list" and "elements" in option:
            kind = f"list of {option['elements']}"
        if option.get("required"):
            kind += ", required"
        choices = f" Choices: {', '.join(f'`{c}`' for c in option['choices'])}." if "choices" in option else ""
        lines.append(
            f"| `{name}` | {kind} | {_default(option, defaults, name)} | {_text(option.get('description'))}{choices} |"
        )
    lines += [
        "",
        "## Use",
        "",
        "```yaml",
        "- hosts: enclave_hosts",
        "  become: true",
        "  roles:",
        f"    - role: {role.name}",
        "```",
        "",
        f"Tested by `roles/{role.name}/molecule/default` (converge, idempotence, verify)."
        if (role / "molecule" / "default").is_dir()
        else "Exercised by the molecule scenarios of the roles that use it.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report READMEs that are out of date")
    args = parser.parse_args(argv)
    stale = []
    for role in sorted(p for p in ROLES.iterdir() if (p / "meta" / "argument_specs.yml").exists()):
        text = render(role)
        readme = role / "README.md"
        if not readme.exists() or readme.read_text() != text:
            stale.append(readme)
            if not args.check:
                readme.write_text(text)
    if args.check and stale:
        print("out of date (run `python scripts/role_readmes.py`):", *map(str, stale), sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
