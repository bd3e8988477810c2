"""The fleet's KMS key by alias and its one data key record in SSM: the logic of the kms_enclave_data_key
module, which kms_enclave_key runs too (one module run for key, policy and data key).

Functions take the module (check mode, warnings, atomic moves) and its data key options as ``params``
(kms_enclave_data_key's options; kms_enclave_key passes its ``data_key`` suboptions, which are the same).
The plaintext data key never exists here: only GenerateDataKeyWithoutPlaintext and ReEncrypt are called.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import os

from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code

from . import data_key_record as records
from .atomic_file import write_atomic

# The data key's options (kms_enclave_data_key's, kms_enclave_key's data_key suboptions); documented by the
# doc fragment nitro_enclaves.fleet.kms_data_key.
DATA_KEY_OPTIONS: dict[str, dict] = dict(
    key_spec=dict(type="str", choices=["AES_256", "AES_128"], default="AES_256"),
    encryption_context=dict(type="dict", default={}),
    parameter_name=dict(type="str"),
    migrate_from=dict(type="list", elements="path", default=[]),
    migrate_ciphertext=dict(type="list", elements="str", default=[]),
    migrate_strict=dict(type="bool", default=True),
    rotate=dict(type="bool", default=False, aliases=["force"]),
    verify_existing=dict(type="bool", default=True),
)


class DataKeyError(Exception):
    pass


def find_key(client, alias: str) -> dict | None:
    try:
        return client.describe_key(KeyId=alias, aws_retry=True)["KeyMetadata"]
    except is_boto3_error_code("NotFoundException"):
        return None


def check_key(meta: dict, alias: str) -> None:
    spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec")
    if spec != "SYMMETRIC_DEFAULT" or meta.get("KeyUsage") != "ENCRYPT_DECRYPT":
        raise DataKeyError(
            f"{alias} is a {spec}/{meta.get('KeyUsage')} key; a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key is needed"
        )
    if not meta.get("Enabled", True) or meta.get("KeyState", "Enabled") != "Enabled":
        raise DataKeyError(f"{alias} ({meta['KeyId']}) is {meta.get('KeyState', 'disabled')}")


def read_blob(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return base64.b64decode(handle.read().strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataKeyError(f"{path} exists but is not base64 ({exc}); refusing to adopt it") from exc


def blob_matches(client, blob: bytes, key_arn: str, context: dict) -> tuple[bool, str]:
    """ReEncrypt to the same key: proves KMS can decrypt the blob and names its key, without plaintext."""
    try:
        answer = client.re_encrypt(
            CiphertextBlob=blob,
            SourceEncryptionContext=context,
            DestinationKeyId=key_arn,
            DestinationEncryptionContext=context,
            aws_retry=True,
        )
    except is_boto3_error_code(
        # AccessDenied: a blob of a key this caller may not use (another account's, or one that no longer exists).
        ["InvalidCiphertextException", "IncorrectKeyException", "NotFoundException", "AccessDeniedException"]
    ) as exc:
        return False, exc.response["Error"]["Code"]
    source = answer.get("SourceKeyId", "")
    return source == key_arn, f"it belongs to {source}"


def write_if_changed(module, path: str, text: str) -> bool:
    """Write ``text`` to ``path`` unless it already holds it; True when written."""
    with contextlib.suppress(FileNotFoundError), open(path, encoding="ascii", errors="replace") as handle:
        if handle.read() == text:
            return False
    if module.check_mode:
        return True
    # 0600 until the requested mode is applied below.
    write_atomic(os.path.abspath(path), text, 0o600, move=module.atomic_move, dir_mode=0o700)
    return True


def read_record(ssm, name: str) -> dict | None:
    try:
        value = ssm.get_parameter(Name=name, aws_retry=True)["Parameter"]["Value"]
    except is_boto3_error_code("ParameterNotFound"):
        return None
    try:
        return records.loads(value, f"SSM parameter {name}")
    except records.RecordError as exc:
        raise DataKeyError(f"{exc}; fix or delete it (it is the fleet's data key)") from None


def put_record(params: dict, ssm, name: str, record: dict, overwrite: bool) -> dict:
    """Store the record; on a create race (another controller was first) return the winner's record."""
    args = dict(
        Name=name,
        Value=records.dumps(record),
        Type="String",
        Description=f"Nitro Enclaves data key (ciphertext only) under {record['key_arn']}",
        Overwrite=overwrite,
    )
    if not overwrite:  # SSM refuses Tags together with Overwrite
        tags = {"managed-by": "ansible", "kms-key-arn": record["key_arn"], **(params["tags"] or {})}
        args["Tags"] = [{"Key": str(k), "Value": str(v)} for k, v in tags.items()]
    try:
        ssm.put_parameter(aws_retry=True, **args)
    except is_boto3_error_code("ParameterAlreadyExists"):
        winner = read_record(ssm, name)
        if winner is None:
            raise
        return winner
    return record


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ensure_key(module, params: dict, client, alias: str, result: dict, *, found: dict | None) -> dict | None:
    """The key under ``alias`` (created when missing and asked to; None in check mode then); ``found``: what
    find_key returned for it."""
    meta = found
    if meta is None:
        if not params["create_key"]:
            raise DataKeyError(f"{alias} does not exist and create_key is false")
        result.update(changed=True, key_created=True)
        if module.check_mode:
            return None
        tags = [{"TagKey": str(k), "TagValue": str(v)} for k, v in (params["tags"] or {}).items()]
        meta = client.create_key(
            Description=params["description"],
            KeySpec="SYMMETRIC_DEFAULT",
            KeyUsage="ENCRYPT_DECRYPT",
            Tags=tags,
            aws_retry=True,
        )["KeyMetadata"]
        client.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"], aws_retry=True)
    check_key(meta, alias)
    result.update(key_id=meta["KeyId"], key_arn=meta["Arn"])
    return meta


def check_stored(params: dict, client, record: dict, meta: dict, *, name: str, context: dict) -> None:
    if record["key_arn"] != meta["Arn"]:
        raise DataKeyError(
            f"SSM parameter {name} holds a data key under {record['key_arn']}, not {meta['Arn']}; "
            "refusing to replace the fleet's data key (delete the parameter or point alias/parameter_name at it)"
        )
    stored = records.generation_context(record["encryption_context"], 0)
    if stored != context:
        raise DataKeyError(
            f"the data key in {name} was made with encryption context {stored}, not {context}; changing it "
            "needs rotate=true"
        )
    if params["verify_existing"]:
        for entry in (record, record.get("previous")):
            if entry is None:
                continue
            matches, why = blob_matches(client, entry["blob"], meta["Arn"], entry["encryption_context"])
            if not matches:
                raise DataKeyError(
                    f"the generation {entry['generation']} data key in {name} does not decrypt under "
                    f"{meta['Arn']}: {why}; refusing to replace it"
                )


def _candidates(params: dict, context: dict):
    """(source, blob, context) of every data key that may be adopted, files first, then hosts' copies."""
    for path in [*params["migrate_from"], *([params["dest"]] if params.get("dest") else [])]:
        if os.path.isfile(path):
            yield path, read_blob(path), context
    for index, text in enumerate(params["migrate_ciphertext"]):
        source = f"migrate_ciphertext[{index}]"
        if records.looks_like_record(text.encode()):
            record = records.loads(text, source)
            yield source, record["blob"], record["encryption_context"]
            continue
        try:
            yield source, base64.b64decode(text.strip(), validate=True), context
        except (binascii.Error, ValueError):
            raise DataKeyError(f"{source} is neither base64 ciphertext nor a data key record") from None


def migrate(module, params: dict, client, meta: dict, context: dict) -> tuple[dict, str] | None:
    """The first legacy data key KMS verifies (generation 0, or the generation its record says)."""
    for source, blob, entry_context in _candidates(params, context):
        matches, why = blob_matches(client, blob, meta["Arn"], entry_context)
        if matches:
            return records.entry(blob, entry_context, now()), source
        message = f"{source} holds a data key that does not decrypt under {meta['Arn']} with its context: {why}"
        if params["migrate_strict"]:
            raise DataKeyError(f"{message}; refusing to adopt or replace it (migrate_strict=false ignores it)")
        module.warn(f"{message}; not adopted")
    return None


def generate(params: dict, client, meta: dict, context: dict, generation: int) -> dict:
    full = records.generation_context(context, generation)
    answer = client.generate_data_key_without_plaintext(
        KeyId=meta["Arn"], KeySpec=params["key_spec"], EncryptionContext=full, aws_retry=True
    )
    return records.entry(answer["CiphertextBlob"], full, now())


def ensure(
    module, client, ssm, params: dict | None = None, *, meta: dict | None = None, key_known: bool = False
) -> dict:
    """Key and data key record, as the kms_enclave_data_key module documents them. ``params``: its options
    (default ``module.params``). ``key_known``: the caller already ran ensure_key, whose answer is ``meta``
    (None: check mode, the key would be created)."""
    params = module.params if params is None else params
    alias = params["alias"] if params["alias"].startswith("alias/") else f"alias/{params['alias']}"
    name = params["parameter_name"] or f"/nitro-enclaves/{alias[len('alias/') :]}/data-key"
    context = {str(k): str(v) for k, v in (params["encryption_context"] or {}).items()}
    if records.GENERATION_CONTEXT_KEY in context:
        raise DataKeyError(f"encryption_context must not set {records.GENERATION_CONTEXT_KEY}: the module does")
    result = dict(
        changed=False, key_created=False, data_key_generated=False, rotated=False, parameter_name=name, found_in=""
    )
    if not key_known:
        meta = ensure_key(module, params, client, alias, result, found=find_key(client, alias))
    elif meta is not None:
        result.update(key_id=meta["KeyId"], key_arn=meta["Arn"])
    record = read_record(ssm, name) if meta is not None else None
    if record is not None:
        result["found_in"] = f"ssm:{name}"
        if params["rotate"]:
            if meta["Arn"] != record["key_arn"]:
                check_stored(params, client, record, meta, name=name, context=context)  # fails naming both keys
            generation = record["generation"] + 1
            module.warn(
                f"rotating the fleet's data key in {name}: generation {record['generation']} -> {generation}. "
                "New tokens differ from the old ones for the same card number; enclaves keep the previous key "
                "for detokenize and lookups of old tokens until the next rotation."
            )
            result.update(changed=True, data_key_generated=True, rotated=True, generation=generation)
            if module.check_mode:
                return result
            current = {k: v for k, v in record.items() if k not in ("blob", "previous", "format", "key_arn")}
            new = records.build(meta["Arn"], generate(params, client, meta, context, generation), current)
            record = records.loads(records.dumps(put_record(params, ssm, name, new, overwrite=True)))
        else:
            check_stored(params, client, record, meta, name=name, context=context)
    elif meta is not None:
        # A rotation asked for before any record exists replaces what is there: nothing is adopted.
        adopted = None if params["rotate"] else migrate(module, params, client, meta, context)
        if adopted is not None:
            entry, path = adopted
            result.update(changed=True, found_in=f"migrated:{path}", generation=entry["generation"])
        else:
            result.update(changed=True, data_key_generated=True, found_in="generated", generation=1)
        if module.check_mode:
            return result
        if adopted is None:
            entry = generate(params, client, meta, context, 1)
        stored = put_record(params, ssm, name, records.build(meta["Arn"], entry), overwrite=False)
        if stored["ciphertext"] != entry["ciphertext"]:  # another controller was first: theirs is the fleet's
            result.update(data_key_generated=False, found_in=f"ssm:{name}")
        record = records.loads(records.dumps({k: v for k, v in stored.items() if k != "blob"}))
    else:  # check mode, the key would be created
        result.update(data_key_generated=True, found_in="generated", generation=1)
        return result
    clean = {k: v for k, v in record.items() if k != "blob"}
    if "previous" in clean:
        clean["previous"] = {k: v for k, v in clean["previous"].items() if k != "blob"}
    result.update(generation=record["generation"], ciphertext=record["ciphertext"], record=records.dumps(clean))
    if params.get("dest"):
        dest = params["dest"]
        result["dest"] = dest
        result["changed"] |= write_if_changed(module, dest, record["ciphertext"] + "\n")
        if os.path.exists(dest):
            file_args = module.load_file_common_arguments(params, path=dest)
            result["changed"] = module.set_fs_attributes_if_different(file_args, result["changed"])
    return result
