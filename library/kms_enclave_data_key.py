#!/usr/bin/python
"""Ansible module kms_enclave_data_key: a symmetric KMS key by alias and an encrypted data key for the enclave."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: kms_enclave_data_key
short_description: Create or adopt a KMS key and produce an encrypted data key for a Nitro Enclave
description:
  - Ensures a symmetric encryption KMS key exists under O(alias) (created with KMS's default key policy when
    missing and O(create_key=true); an existing key is adopted and must be an enabled symmetric
    C(ENCRYPT_DECRYPT) key).
  - Produces a data key with C(GenerateDataKeyWithoutPlaintext) and writes its C(CiphertextBlob), base64 on one
    line, to O(dest) atomically. The plaintext never exists outside KMS and the enclave - not on the controller,
    not on the parent hosts. The enclave obtains it with C(Decrypt) and an attestation document (the key policy
    written by M(kms_enclave_policy) decides which enclave images may).
  - Idempotent. When O(dest) exists, the module checks with C(ReEncrypt) (which never returns plaintext) that
    KMS can decrypt the stored blob with O(encryption_context) and that it belongs to the key; then nothing changes.
    A blob that belongs to another key or does not decrypt makes the module fail instead of replacing it,
    because a new data key changes every token and makes data encrypted under the old one unreadable. Use
    O(force=true) to replace it deliberately.
version_added: "0.1.0"
author:
  - nitro-enclaves-ansible project
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
      - Tags of a key the module creates (not changed on an adopted key).
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
      - Encryption context bound to the data key. The enclave must pass the same context to C(Decrypt).
    type: dict
    default: {}
  dest:
    description:
      - File that receives the base64 C(CiphertextBlob). A missing directory is created with mode C(0700).
    type: path
    required: true
  force:
    description:
      - Generate a new data key even when O(dest) holds a valid one. Data protected by the old key becomes
        unreadable unless the old blob is kept elsewhere.
    type: bool
    default: false
  verify_existing:
    description:
      - Check an existing O(dest) with C(ReEncrypt) (needs C(kms:ReEncryptFrom) and C(kms:ReEncryptTo) on the key).
        With C(false) an existing, well-formed O(dest) is trusted as is.
    type: bool
    default: true
notes:
  - Check mode makes only read calls; it reports whether the key would be created and the data key generated.
  - Throttling errors are retried with jittered backoff (amazon.aws C(AWSRetry)).
  - The module never handles plaintext key material, so it has no C(no_log) options; O(encryption_context)
    values are not secret in KMS's model (they appear in CloudTrail).
seealso:
  - module: kms_enclave_policy
  - module: amazon.aws.kms_key
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
  - ansible.builtin.files
"""

EXAMPLES = r"""
- name: Wrapping key and the tokenizer's data key (ciphertext only)
  kms_enclave_data_key:
    alias: alias/tokenizer
    dest: /etc/enclave-tokenizer/data-key.b64
    encryption_context:
      app: enclave-tokenizer
    mode: "0640"

- name: Against the project's local AWS endpoint
  kms_enclave_data_key:
    endpoint_url: http://127.0.0.1:4566
    region: us-east-1
    alias: tokenizer
    dest: "{{ playbook_dir }}/../.cache/data-key.b64"
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
  description: Whether a new data key was generated and written to O(dest).
  returned: always
  type: bool
dest:
  description: Path of the ciphertext file.
  returned: always
  type: str
"""

import base64
import binascii
import contextlib
import os
import tempfile

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    import botocore.exceptions

from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry


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
        raise DataKeyError(
            f"{path} exists but is not base64 ({exc}); refusing to overwrite it without force=true"
        ) from exc


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
    except is_boto3_error_code(["InvalidCiphertextException", "IncorrectKeyException", "NotFoundException"]) as exc:
        return False, exc.response["Error"]["Code"]
    source = answer.get("SourceKeyId", "")
    return source == key_arn, f"it belongs to {source}"


def write_atomic(module, path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".data-key.", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)  # until the requested mode is applied below
        module.atomic_move(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure(module, client) -> dict:
    params = module.params
    alias = params["alias"] if params["alias"].startswith("alias/") else f"alias/{params['alias']}"
    dest = params["dest"]
    context = {str(k): str(v) for k, v in (params["encryption_context"] or {}).items()}
    result = dict(changed=False, key_created=False, data_key_generated=False, dest=dest)
    meta = find_key(client, alias)
    if meta is None:
        if not params["create_key"]:
            raise DataKeyError(f"{alias} does not exist and create_key is false")
        result.update(changed=True, key_created=True)
        if module.check_mode:
            result["data_key_generated"] = True
            return result
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

    if os.path.exists(dest) and not params["force"]:
        blob = read_blob(dest)
        if params["verify_existing"]:
            matches, why = blob_matches(client, blob, meta["Arn"], context)
            if not matches:
                raise DataKeyError(
                    f"{dest} holds a data key that does not decrypt under {alias} ({meta['Arn']}) with the given "
                    f"encryption context: {why}. Replacing it would change the enclave's key; set force=true to do so"
                )
    else:
        result.update(changed=True, data_key_generated=True)
        if not module.check_mode:
            answer = client.generate_data_key_without_plaintext(
                KeyId=meta["Arn"], KeySpec=params["key_spec"], EncryptionContext=context, aws_retry=True
            )
            write_atomic(module, dest, base64.b64encode(answer["CiphertextBlob"]).decode() + "\n")
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
        dest=dict(type="path", required=True),
        force=dict(type="bool", default=False),
        verify_existing=dict(type="bool", default=True),
    )
    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True, add_file_common_args=True)
    client = module.client("kms", retry_decorator=KMS_RETRY)
    try:
        result = ensure(module, client)
    except DataKeyError as exc:
        module.fail_json(msg=str(exc))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        module.fail_json_aws(exc, msg=f"KMS call failed for {module.params['alias']}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
