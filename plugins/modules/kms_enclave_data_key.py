#!/usr/bin/python
"""Ansible module kms_enclave_data_key: a symmetric KMS key by alias and the fleet's one data key (SSM)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: kms_enclave_data_key
short_description: Create or adopt a KMS key and keep the fleet's one encrypted data key in SSM
description:
  - Ensures a symmetric encryption KMS key exists under O(alias) (created with KMS's default key policy when
    missing and O(create_key=true); an existing key is adopted and must be an enabled symmetric
    C(ENCRYPT_DECRYPT) key).
  - Keeps the fleet's data key in one place every controller and CI runner finds, the SSM parameter
    O(parameter_name) next to the key. Its value is a JSON record with the data key's C(CiphertextBlob)
    (from C(GenerateDataKeyWithoutPlaintext); not secret, only an attested enclave can use it), the key ARN, the
    key generation and the encryption context. The plaintext never exists outside KMS and the enclave.
  - A run that finds the parameter never makes another data key; it reports where it found it (RV(found_in)).
    With no parameter, a ciphertext file from before (O(migrate_from), O(dest)) that KMS verifies is adopted
    (uploaded) instead of generating a new key; only when there is none is a data key generated.
  - Rotation is explicit (O(rotate=true)) - a new data key of the next generation replaces the current one, which
    is kept in the record as C(previous) so enclaves can still detokenize and look up tokens made before. New
    tokens differ from the old ones for the same card number.
  - Idempotent. The stored data key is checked with C(ReEncrypt) (which never returns plaintext); a record that
    belongs to another key, or does not decrypt, makes the module fail instead of replacing it.
version_added: "0.1.0"
author:
  - nitro-enclaves-ansible authors (@nitro-enclaves-ansible)
options:
  alias:
    description:
      - Alias of the KMS key, with or without the C(alias/) prefix.
    type: str
    required: true
  create_key:
    description:
      - Create the key (and the alias) when the alias does not exist. With C(false) a missing alias is an error.
    type: bool
    default: true
  description:
    description:
      - Description of a key the module creates.
    type: str
    default: Nitro Enclaves data key wrapping key (managed by Ansible)
  tags:
    description:
      - Tags of a key and a parameter the module creates (not changed on adopted ones).
    type: dict
    aliases: ['resource_tags']
  key_spec:
    description:
      - Data key length.
    type: str
    choices: ['AES_256', 'AES_128']
    default: AES_256
  encryption_context:
    description:
      - Encryption context bound to a data key the module generates or adopts. Generated keys also get
        C(enclave-tokenizer:key-generation). A stored data key made with another context is an error.
    type: dict
    default: {}
  parameter_name:
    description:
      - SSM parameter that holds the data key record. Default C(/nitro-enclaves/<alias without alias/>/data-key).
    type: str
  dest:
    description:
      - Optional file that receives the current data key's base64 C(CiphertextBlob) (a cache; the parameter is the
        source of truth). With no parameter yet, an existing O(dest) is adopted like O(migrate_from).
        A missing directory is created with mode C(0700).
    type: path
  migrate_from:
    description:
      - Ciphertext files from before the parameter existed (for example a checkout's C(.cache/kms/)). With no
        parameter, the first one that KMS verifies is uploaded instead of generating a data key.
    type: list
    elements: path
    default: []
  migrate_ciphertext:
    description:
      - Data key files as hosts hold them (base64 ciphertext, or a record), for example slurped from the fleet's
        hosts. With no parameter and no adoptable O(migrate_from) file, the first one KMS verifies is uploaded, so
        a fleet converged from a checkout that is gone keeps its data key.
    type: list
    elements: str
    default: []
  migrate_strict:
    description:
      - A migration file that does not decrypt under the key fails the module (default). With C(false) it is
        ignored with a warning (for an emulated endpoint whose keys were lost with it).
    type: bool
    default: true
  rotate:
    description:
      - Replace the data key with a new one of the next generation; the current one becomes C(previous).
        Tokens made after the rotation differ from those made before for the same card number.
    type: bool
    default: false
    aliases: ['force']
  verify_existing:
    description:
      - Check the stored data key with C(ReEncrypt) (needs C(kms:ReEncryptFrom) and C(kms:ReEncryptTo) on the key).
        With C(false) a well-formed record is trusted as is.
    type: bool
    default: true
notes:
  - Check mode makes only read calls; it reports what would be created, adopted or rotated.
  - Throttling errors are retried with jittered backoff (amazon.aws C(AWSRetry)).
  - Two controllers racing to create the parameter converge on one record (C(Overwrite=false)); the loser adopts
    the winner's.
  - The module never handles plaintext key material, so it has no C(no_log) options; O(encryption_context)
    values are not secret in KMS's model (they appear in CloudTrail).
seealso:
  - module: nitro_enclaves.fleet.kms_enclave_policy
  - module: amazon.aws.kms_key
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
requirements:
  - python >= 3.11
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
  - ansible.builtin.files
"""

EXAMPLES = r"""
- name: The tokenizer fleet's data key (ciphertext only), stored in SSM
  kms_enclave_data_key:
    alias: alias/tokenizer
    encryption_context:
      app: enclave-tokenizer
  register: data_key

- name: Deliver it to the hosts
  ansible.builtin.copy:
    content: "{{ data_key.record }}\n"
    dest: /etc/nitro-enclaves/tokenizer/datakey.json
    mode: "0600"

- name: Adopt the ciphertext an older checkout kept, against the project's local endpoint
  kms_enclave_data_key:
    endpoint_url: http://127.0.0.1:4566
    region: us-east-1
    alias: tokenizer
    migrate_from: ["{{ playbook_dir }}/../.cache/kms/tokenizer.datakey"]

- name: Rotate (new tokens differ; the previous key stays for detokenize and lookups)
  kms_enclave_data_key:
    alias: alias/tokenizer
    rotate: true
"""

RETURN = r"""
key_id:
  description: Id of the KMS key.
  returned: always (except in check mode when the key would be created)
  type: str
  sample: 1234abcd-12ab-34cd-56ef-1234567890ab
key_arn:
  description: ARN of the KMS key.
  returned: always (except in check mode when the key would be created)
  type: str
  sample: arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab
key_created:
  description: Whether the key (and alias) was created by this run.
  returned: always
  type: bool
data_key_generated:
  description: Whether a new data key was generated (first one, or a rotation).
  returned: always
  type: bool
rotated:
  description: Whether this run rotated the data key.
  returned: always
  type: bool
found_in:
  description: Where the data key came from, e.g. C(ssm:/nitro-enclaves/tokenizer/data-key), C(migrated:<file>),
    C(generated).
  returned: always
  type: str
parameter_name:
  description: The SSM parameter holding the record.
  returned: always
  type: str
generation:
  description: Generation of the current data key (0 for one adopted from before generations).
  returned: when a data key exists or would be generated
  type: int
ciphertext:
  description: The current data key's base64 C(CiphertextBlob).
  returned: when a data key exists (not in check mode when it would be generated)
  type: str
record:
  description: The JSON record as stored in SSM (ciphertext only); hosts receive it as their data key file.
  returned: when a data key exists (not in check mode when it would be generated)
  type: str
dest:
  description: Path of the ciphertext cache file, when O(dest) is set.
  returned: when O(dest) is set
  type: str
"""

import base64
import binascii
import contextlib
import datetime
import os

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    import botocore.exceptions

from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import data_key_record as records
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.atomic_file import write_atomic


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


def put_record(module, ssm, name: str, record: dict, overwrite: bool) -> dict:
    """Store the record; on a create race (another controller was first) return the winner's record."""
    args = dict(
        Name=name,
        Value=records.dumps(record),
        Type="String",
        Description=f"Nitro Enclaves data key (ciphertext only) under {record['key_arn']}",
        Overwrite=overwrite,
    )
    if not overwrite:  # SSM refuses Tags together with Overwrite
        tags = {"managed-by": "ansible", "kms-key-arn": record["key_arn"], **(module.params["tags"] or {})}
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


def ensure_key(module, client, alias: str, result: dict) -> dict | None:
    params = module.params
    meta = find_key(client, alias)
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


def check_stored(module, client, record: dict, meta: dict, *, name: str, context: dict) -> None:
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
    if module.params["verify_existing"]:
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
    for path in [*params["migrate_from"], *([params["dest"]] if params["dest"] else [])]:
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


def migrate(module, client, meta: dict, context: dict) -> tuple[dict, str] | None:
    """The first legacy data key KMS verifies (generation 0, or the generation its record says)."""
    params = module.params
    for source, blob, entry_context in _candidates(params, context):
        matches, why = blob_matches(client, blob, meta["Arn"], entry_context)
        if matches:
            return records.entry(blob, entry_context, now()), source
        message = f"{source} holds a data key that does not decrypt under {meta['Arn']} with its context: {why}"
        if params["migrate_strict"]:
            raise DataKeyError(f"{message}; refusing to adopt or replace it (migrate_strict=false ignores it)")
        module.warn(f"{message}; not adopted")
    return None


def generate(module, client, meta: dict, context: dict, generation: int) -> dict:
    full = records.generation_context(context, generation)
    answer = client.generate_data_key_without_plaintext(
        KeyId=meta["Arn"], KeySpec=module.params["key_spec"], EncryptionContext=full, aws_retry=True
    )
    return records.entry(answer["CiphertextBlob"], full, now())


def ensure(module, client, ssm) -> dict:
    params = module.params
    alias = params["alias"] if params["alias"].startswith("alias/") else f"alias/{params['alias']}"
    name = params["parameter_name"] or f"/nitro-enclaves/{alias[len('alias/') :]}/data-key"
    context = {str(k): str(v) for k, v in (params["encryption_context"] or {}).items()}
    if records.GENERATION_CONTEXT_KEY in context:
        raise DataKeyError(f"encryption_context must not set {records.GENERATION_CONTEXT_KEY}: the module does")
    result = dict(
        changed=False, key_created=False, data_key_generated=False, rotated=False, parameter_name=name, found_in=""
    )
    meta = ensure_key(module, client, alias, result)
    record = read_record(ssm, name) if meta is not None else None
    if record is not None:
        result["found_in"] = f"ssm:{name}"
        if params["rotate"]:
            if meta["Arn"] != record["key_arn"]:
                check_stored(module, client, record, meta, name=name, context=context)  # fails naming both keys
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
            new = records.build(meta["Arn"], generate(module, client, meta, context, generation), current)
            record = records.loads(records.dumps(put_record(module, ssm, name, new, overwrite=True)))
        else:
            check_stored(module, client, record, meta, name=name, context=context)
    elif meta is not None:
        # A rotation asked for before any record exists replaces what is there: nothing is adopted.
        adopted = None if params["rotate"] else migrate(module, client, meta, context)
        if adopted is not None:
            entry, path = adopted
            result.update(changed=True, found_in=f"migrated:{path}", generation=entry["generation"])
        else:
            result.update(changed=True, data_key_generated=True, found_in="generated", generation=1)
        if module.check_mode:
            return result
        if adopted is None:
            entry = generate(module, client, meta, context, 1)
        stored = put_record(module, ssm, name, records.build(meta["Arn"], entry), overwrite=False)
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
    if params["dest"]:
        dest = params["dest"]
        result["dest"] = dest
        result["changed"] |= write_if_changed(module, dest, record["ciphertext"] + "\n")
        if os.path.exists(dest):
            file_args = module.load_file_common_arguments(params, path=dest)
            result["changed"] = module.set_fs_attributes_if_different(file_args, result["changed"])
    return result


# KMS reports quota throttling as "ThrottlingException", which AWSRetry does not retry by default.
KMS_RETRY = AWSRetry.jittered_backoff(retries=8, delay=1, max_delay=20, catch_extra_error_codes=["ThrottlingException"])


def main() -> None:
    argument_spec = dict(
        alias=dict(type="str", required=True),
        create_key=dict(type="bool", default=True),
        description=dict(type="str", default="Nitro Enclaves data key wrapping key (managed by Ansible)"),
        tags=dict(type="dict", aliases=["resource_tags"]),
        key_spec=dict(type="str", choices=["AES_256", "AES_128"], default="AES_256"),
        encryption_context=dict(type="dict", default={}),
        parameter_name=dict(type="str"),
        dest=dict(type="path"),
        migrate_from=dict(type="list", elements="path", default=[]),
        migrate_ciphertext=dict(type="list", elements="str", default=[]),
        migrate_strict=dict(type="bool", default=True),
        rotate=dict(type="bool", default=False, aliases=["force"]),
        verify_existing=dict(type="bool", default=True),
    )
    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True, add_file_common_args=True)
    client = module.client("kms", retry_decorator=KMS_RETRY)
    ssm = module.client("ssm", retry_decorator=KMS_RETRY)
    try:
        result = ensure(module, client, ssm)
    except (DataKeyError, records.RecordError) as exc:
        module.fail_json(msg=str(exc))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        module.fail_json_aws(exc, msg=f"KMS/SSM call failed for {module.params['alias']}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
