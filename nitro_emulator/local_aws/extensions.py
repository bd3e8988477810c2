"""Installs the project's extensions into moto before its server starts.

Each extension module exposes `install(**config)`; adding one means adding it to EXTENSIONS.
"""

from __future__ import annotations

import importlib

EXTENSIONS = ("identities", "kms", "ec2", "state")  # state last: it wraps kms


def install(**config: object) -> None:
    for name in EXTENSIONS:
        importlib.import_module(f"{__package__}.{name}").install(**config)
