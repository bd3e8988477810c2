"""The ``diff`` result Ansible prints with --diff, built one way by every module.

Ansible's callback shows ``before``/``after`` (text, or data it renders as YAML) and names the two sides
with ``before_header``/``after_header``; a thing that does not exist yet is the empty string.
"""

from __future__ import annotations

from typing import Any


def diff_result(before: Any, after: Any, header: str | None = None) -> dict[str, Any]:
    """``before``/``after`` (None -> ""), both headed ``header`` when given (a path, a name, a key ARN)."""
    result: dict[str, Any] = {"before": "" if before is None else before, "after": "" if after is None else after}
    if header is not None:
        result["before_header"] = result["after_header"] = header
    return result
