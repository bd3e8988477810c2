"""enclave_src/enclave-files.txt (the enclave distribution's one file list) is exactly what the enclave's
entry points import from this project: an import added without the manifest fails here, before an image
without it would fail to start (or one with too much would move PCR0 on unrelated edits)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

MANIFEST = REPO_ROOT / "enclave_src" / "enclave-files.txt"
# What the enclave runs: the Dockerfile's CMD (server, which spawns the workers) and its import check.
ENTRY_POINTS = (
    "enclave_tokenizer.server",
    "enclave_tokenizer.workers",
    "enclave_tokenizer.cms",
    "enclave_tokenizer.nsm",
)
MODULE_UTILS = "ansible_collections.nitro_enclaves.fleet.plugins.module_utils"
# Import prefix -> source directory (the wheel's package-dir).
PACKAGES = {
    "enclave_tokenizer": "enclave_src/enclave_tokenizer",
    MODULE_UTILS: "plugins/module_utils",
    "nitro_emulator": "nitro_emulator",
}
# Not code, but the distribution's inputs too.
METADATA = {"enclave_src/enclave-pyproject.toml"}


def _file(module: str) -> str | None:
    """The repository file of a project module (package or module), None for anything else."""
    for prefix, directory in PACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            rel = (
                Path(directory, *module[len(prefix) :].lstrip(".").split(".")) if module != prefix else Path(directory)
            )
            for candidate in (rel / "__init__.py", rel.with_suffix(".py")):
                if (REPO_ROOT / candidate).is_file():
                    return candidate.as_posix()
            raise AssertionError(f"{module} is imported but has no file under {directory}")
    return None


def _module_of(path: str) -> str:
    for prefix, directory in PACKAGES.items():
        if path.startswith(directory + "/"):
            parts = Path(path[len(directory) + 1 :]).with_suffix("").parts
            return ".".join((prefix, *parts[: -1 if parts[-1] == "__init__" else None]))
    raise AssertionError(path)


def imports_of(path: str, source: str | None = None) -> set[str]:
    """Project modules one file imports, at top level or inside functions (the enclave imports lazily)."""
    module = _module_of(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    tree = ast.parse(source if source is not None else (REPO_ROOT / path).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            # `from pkg import name`: name may be a submodule.
            found.update(f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}"))
    return {m for m in found if _file(m) is not None}


def _is_module(module: str) -> bool:
    try:
        return _file(module) is not None
    except AssertionError:
        return False


def closure(modules: tuple[str, ...]) -> set[str]:
    """Every project file the modules import, transitively, with their packages' __init__ files."""
    todo = list(modules)
    files: set[str] = set()
    while todo:
        module = todo.pop()
        parts = module.split(".")
        # Importing a.b.c runs a/__init__, a/b/__init__ too (those under the project's packages).
        for i in range(1, len(parts) + 1):
            path = _file(".".join(parts[:i]))
            if path is not None and path not in files:
                files.add(path)
                todo.extend(imports_of(path))
    return files


def _manifest() -> set[str]:
    lines = [line.strip() for line in MANIFEST.read_text().splitlines()]
    return {line for line in lines if line and not line.startswith("#")}


def test_the_manifest_lists_exactly_what_the_enclave_imports() -> None:
    listed = _manifest() - METADATA
    traced = closure(ENTRY_POINTS)
    assert traced - listed == set(), "imported by the enclave but missing from enclave-files.txt"
    assert listed - traced == set(), "listed in enclave-files.txt but not imported by the enclave"
    assert all((REPO_ROOT / path).is_file() for path in _manifest())


def test_the_enclave_imports_nothing_of_the_emulator_or_the_parent_side() -> None:
    assert not any(path.startswith("nitro_emulator/") for path in closure(ENTRY_POINTS))
    assert "plugins/module_utils/allocator.py" not in closure(ENTRY_POINTS)


def test_the_tracer_sees_lazy_relative_and_module_utils_imports() -> None:
    source = (
        "def f():\n    from . import gateway\n    from .kms import x\n"
        f"from {MODULE_UTILS} import allocator\nimport nitro_emulator.cpio\n"
    )
    assert imports_of("enclave_src/enclave_tokenizer/server.py", source) == {
        "enclave_tokenizer",
        "enclave_tokenizer.gateway",
        "enclave_tokenizer.kms",
        MODULE_UTILS,
        f"{MODULE_UTILS}.allocator",
        "nitro_emulator.cpio",
    }
