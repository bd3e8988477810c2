"""Installs the project's extensions into moto before its server starts.

Each extension module exposes `install(**config)`; adding one means adding it to EXTENSIONS.
"""

from __future__ import annotations

import importlib

EXTENSIONS = ("kms", "ec2")


def install(**config: object) -> None:
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue  # not written yet: plain moto behaviour for that service
        module.install(**config)
