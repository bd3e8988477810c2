"""The local endpoint's durable state: KMS keys (material, policy, aliases, tags) and SSM parameters.

AWS keeps keys forever; moto keeps them in memory, so a restart of the endpoint (or of the controller)
used to lose every key and with it every emulated token. After each request that changes KMS or SSM
state the endpoint writes one JSON file, atomically (temporary file + rename) and readable by its owner
only (0600, directory 0700); at start it loads it. Key material is in that file: it is the local
stand-in for KMS's HSMs and must stay root's.

Default path: /var/lib/nitro-local-aws/state.json (not under any checkout, so every controller run on
the host sees the same keys); `--state-file PATH` or env NITRO_LOCAL_AWS_STATE overrides it, and
`--state-file ''` keeps everything in memory. Not kept: grants, key rotations history, SSM parameter
policies' timers.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.atomic_file import write_atomic

DEFAULT_STATE_FILE = "/var/lib/nitro-local-aws/state.json"
STATE_ENV = "NITRO_LOCAL_AWS_STATE"
FORMAT = 1
_MUTATING = ("Create", "Put", "Delete", "Update", "Schedule", "Cancel", "Enable", "Disable", "Tag", "Untag")
_MUTATING += ("Import", "Rotate", "Replicate", "Label", "Unlabel", "AddTags", "RemoveTags")
_KEY_FIELDS = (
    "id", "creation_date", "account_id", "region", "policy", "key_usage", "key_state", "description",
    "enabled", "multi_region", "key_rotation_status", "deletion_date", "origin", "key_manager", "key_spec", "arn",
)  # fmt: skip
_PARAMETER_FIELDS = (
    "account_id", "name", "parameter_type", "description", "allowed_pattern", "keyid", "version",
    "data_type", "labels", "tier", "policies", "value",
)  # fmt: skip

_state: dict[str, Path | None] = {"path": None}
_lock = threading.Lock()


def default_path() -> str:
    return os.environ.get(STATE_ENV, DEFAULT_STATE_FILE)


def is_mutating(action: str) -> bool:
    return action.startswith(_MUTATING)


def _dump_keys() -> list[dict[str, Any]]:
    from cryptography.hazmat.primitives import serialization
    from moto.kms.models import kms_backends

    out = []
    for account, regions in list(kms_backends.items()):
        for region, backend in list(regions.items()):
            for key in list(backend.keys.values()):
                record = {name: getattr(key, name, None) for name in _KEY_FIELDS}
                if isinstance(record["deletion_date"], dt.datetime):  # set by ScheduleKeyDeletion
                    record["deletion_date"] = record["deletion_date"].isoformat()
                record["key_material"] = base64.b64encode(key.key_material).decode()
                record["private_key"] = base64.b64encode(
                    key.private_key.private_key.private_bytes(  # moto's wrapper around cryptography's key
                        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                    )
                ).decode()
                record["aliases"] = sorted(key.aliases)
                record["tags"] = backend.tagger.list_tags_for_resource(key.id)["Tags"]
                out.append({"account": account, "region": region, "key": record})
    return out


def _dump_parameters() -> list[dict[str, Any]]:
    from moto.ssm.models import ssm_backends

    out = []
    for account, regions in list(ssm_backends.items()):
        for region, backend in list(regions.items()):
            for name, versions in list(backend._parameters.items()):
                kept = []
                for version in versions:
                    record = {field: getattr(version, field, None) for field in _PARAMETER_FIELDS}
                    record["last_modified_date"] = version.last_modified_date.isoformat()
                    kept.append(record)
                if kept:
                    out.append({"account": account, "region": region, "name": name, "versions": kept})
    return out


def _load_keys(records: list[dict[str, Any]]) -> None:
    from cryptography.hazmat.primitives import serialization
    from moto.kms.models import Key, kms_backends
    from moto.kms.utils import generate_private_key

    for item in records:
        backend = kms_backends[item["account"]][item["region"]]
        data = item["key"]
        key = Key.__new__(Key)
        for name in _KEY_FIELDS:
            setattr(key, name, data.get(name))
        if isinstance(key.deletion_date, str):
            key.deletion_date = dt.datetime.fromisoformat(key.deletion_date)
        key.key_material = base64.b64decode(data["key_material"])
        # moto wraps the asymmetric key in its own class: make one for the spec, then put ours inside.
        key.private_key = generate_private_key(key.key_spec)
        key.private_key.private_key = serialization.load_der_private_key(base64.b64decode(data["private_key"]), None)
        key.grants, key.rotations, key.aliases = {}, [], {}
        backend.keys[key.id] = key
        for alias in data.get("aliases", []):
            backend.create_alias(key.id, alias)
        if data.get("tags"):
            backend.tagger.tag_resource(key.id, data["tags"])


def _load_parameters(records: list[dict[str, Any]]) -> None:
    from moto.ssm.models import Parameter, ssm_backends

    for item in records:
        backend = ssm_backends[item["account"]][item["region"]]
        versions = []
        for data in item["versions"]:
            parameter = Parameter.__new__(Parameter)
            for name in _PARAMETER_FIELDS:
                setattr(parameter, name, data.get(name))
            parameter.source_result = None
            parameter.last_modified_date = dt.datetime.fromisoformat(data["last_modified_date"])
            versions.append(parameter)
        backend._parameters[item["name"]] = versions


def load(path: Path) -> None:
    """Restore what `save` wrote; a missing file is an empty endpoint. Refuses files others can read."""
    if not path.exists():
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SystemExit(f"nitro-local-aws: {path} has mode {mode:04o}; it holds key material: chmod 600 it")
    try:
        state = json.loads(path.read_bytes())
        if state.get("format") != FORMAT:
            raise ValueError(f"format {state.get('format')!r}, expected {FORMAT}")
        _load_keys(state.get("kms_keys", []))
        _load_parameters(state.get("ssm_parameters", []))
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"nitro-local-aws: cannot load the state file {path}: {exc}") from exc


def save() -> None:
    """Write the whole state atomically (0600). No-op without a state file."""
    path = _state["path"]
    if path is None:
        return
    with _lock:
        state = {"format": FORMAT, "kms_keys": _dump_keys(), "ssm_parameters": _dump_parameters()}
        write_atomic(path, json.dumps(state), 0o600, dir_mode=0o700)


def _saving(original: Any) -> Any:
    def call_action(self: Any) -> Any:
        result = original(self)
        if is_mutating(self._get_action()) and isinstance(result, tuple) and result and result[0] == 200:
            save()
        return result

    return call_action


def install(state_file: str | None = None, **_: object) -> None:
    """Load the state file and save after every successful state-changing KMS/SSM request."""
    from moto.kms.responses import KmsResponse
    from moto.ssm.responses import SimpleSystemManagerResponse

    spec = default_path() if state_file is None else state_file
    _state["path"] = Path(spec) if spec else None
    if _state["path"] is not None:
        directory = _state["path"].parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"nitro-local-aws: cannot create {directory} for the state file: {exc}") from exc
        if not os.access(directory, os.W_OK):
            # Found now, not at the first CreateKey (which would otherwise answer HTTP 500).
            raise SystemExit(f"nitro-local-aws: {directory} is not writable; pass --state-file or run as its owner")
        load(_state["path"])
    for cls in (KmsResponse, SimpleSystemManagerResponse):
        if not getattr(cls, "_nitro_saving", False):
            cls.call_action = _saving(cls.call_action)  # type: ignore[method-assign]
            cls._nitro_saving = True  # type: ignore[attr-defined]
