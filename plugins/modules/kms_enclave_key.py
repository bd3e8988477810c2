#!/usr/bin/python
"""Ansible module kms_enclave_key: the fleet's KMS key, its attested policy statements and its data key, in one
run (logic in plugins/module_utils/kms_calls.py, kms_policy.py and kms_data_key.py)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: kms_enclave_key
short_description: Create or adopt a KMS key, bind it to Nitro Enclaves measurements and keep its data key, in one run
description:
  - What M(nitro_enclaves.fleet.kms_enclave_data_key) (key by alias, data key record in SSM) and
    M(nitro_enclaves.fleet.kms_enclave_policy) (attested policy statements) do, plus the account role names
    resolve in (STS), for one key in one module run. A playbook that ran C(amazon.aws.aws_caller_info),
    C(amazon.aws.kms_key), M(nitro_enclaves.fleet.kms_enclave_policy) and M(nitro_enclaves.fleet.kms_enclave_data_key)
    one after another starts Python and boto3 once instead of four times.
  - In order - the key under O(alias) is created (KMS's default key policy) when missing and O(create_key=true), or
    adopted (it must be an enabled symmetric C(ENCRYPT_DECRYPT) key); the attested statements O(statements) are
    merged into its policy by C(Sid), every other statement kept exactly as it is; then, with O(data_key), the
    fleet's data key record is kept in SSM exactly as M(nitro_enclaves.fleet.kms_enclave_data_key) does.
  - Idempotent; refuses unsafe policies before writing as M(nitro_enclaves.fleet.kms_enclave_policy) does (see its notes).
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
      - Description of a key the module creates (an adopted key keeps its own).
    type: str
    default: Nitro Enclaves data key wrapping key (managed by Ansible)
  tags:
    description:
      - Tags of a key and a data key parameter the module creates (not changed on adopted ones).
    type: dict
    aliases: ['resource_tags']
  account_id:
    description:
      - Account of O(statements[].principal_role_names). Empty - the credentials' own account (STS), returned as
        RV(account).
    type: str
    default: ""
  statements:
    description:
      - The attested statements to manage, each identified by O(statements[].sid).
    type: list
    elements: dict
    required: true
    suboptions:
      sid:
        description:
          - Statement id. If the policy already has a statement with this C(Sid) that is not an attested Allow
            statement (for example the key administrators' statement), the module refuses to touch it.
        type: str
        required: true
      principals:
        description:
          - IAM role ARNs allowed to use the key from an attested enclave, usually the parent instances' role
            (the enclave has no credentials of its own and uses the parent's).
          - Required when the statement is created (here or as O(statements[].principal_role_names)); when both are
            omitted for an existing statement its principals are kept.
        type: list
        elements: str
      principal_role_names:
        description:
          - IAM role names (or C(path/name)) in the account O(account_id), added to O(statements[].principals) as role
            ARNs. With O(account_id) empty, the account and partition are the credentials' own (STS
            C(GetCallerIdentity), in the same module run).
        type: list
        elements: str
      actions:
        description:
          - Operations the statement allows. Only operations KMS supports with an attestation document are accepted
            (C(kms:Decrypt), C(kms:GenerateDataKey), C(kms:GenerateDataKeyPair), C(kms:GenerateRandom),
            C(kms:DeriveSharedSecret)); the C(kms:) prefix may be omitted.
          - Defaults to C(kms:Decrypt) for a new statement; when omitted for an existing statement its actions are kept.
        type: list
        elements: str
      image_sha384:
        description:
          - Values for C(kms:RecipientAttestation:ImageSha384), which is the enclave image's PCR0.
          - Each value is 96 hexadecimal characters; upper case is accepted and stored lower case.
        type: list
        elements: str
      pcr0:
        description: Values for C(kms:RecipientAttestation:PCR0) (enclave image file). 96 hex characters each.
        type: list
        elements: str
      pcr1:
        description: Values for C(kms:RecipientAttestation:PCR1) (kernel and bootstrap).
        type: list
        elements: str
      pcr2:
        description: Values for C(kms:RecipientAttestation:PCR2) (application).
        type: list
        elements: str
      pcr3:
        description: Values for C(kms:RecipientAttestation:PCR3) (IAM role of the parent instance). See O(statements[].pcr3_role_arn).
        type: list
        elements: str
      pcr4:
        description: Values for C(kms:RecipientAttestation:PCR4) (parent instance id). See O(statements[].pcr4_instance_id).
        type: list
        elements: str
      pcr5:
        description: Values for C(kms:RecipientAttestation:PCR5).
        type: list
        elements: str
      pcr6:
        description: Values for C(kms:RecipientAttestation:PCR6).
        type: list
        elements: str
      pcr7:
        description: Values for C(kms:RecipientAttestation:PCR7).
        type: list
        elements: str
      pcr8:
        description: Values for C(kms:RecipientAttestation:PCR8) (EIF signing certificate).
        type: list
        elements: str
      pcr3_role_arn:
        description:
          - IAM role ARNs converted to PCR3 values (C(SHA384(48 zero bytes || role ARN))) and added to O(statements[].pcr3).
        type: list
        elements: str
      pcr4_instance_id:
        description:
          - EC2 instance ids converted to PCR4 values (C(SHA384(48 zero bytes || instance id))) and added to
            O(statements[].pcr4). Pins the key to those parent instances.
        type: list
        elements: str
  pcr_values_mode:
    description:
      - How the given measurement values combine with those already in an existing statement (see
        M(nitro_enclaves.fleet.kms_enclave_policy)) - C(replace) (exactly the given ones), C(add) (phase 1 of a
        rotation), C(remove) (phase 2; removing the last value of a key is refused).
    type: str
    choices: ['replace', 'add', 'remove']
    default: replace
  allow_debug_pcrs:
    description:
      - Accept all-zero measurement values (debug-mode enclaves, whose memory the parent can read). Development only.
    type: bool
    default: false
  data_key:
    description:
      - Keep the fleet's one data key (ciphertext only) in SSM next to the key, as
        M(nitro_enclaves.fleet.kms_enclave_data_key) does with the same options. Omitted - no data key is managed.
    type: dict
    suboptions:
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
            hosts. With no parameter and no adoptable O(data_key.migrate_from) file, the first one KMS verifies is uploaded, so
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
  - Check mode makes only read calls and reports what would change; a key that would be created has no policy to
    merge yet, so only RV(key_created) and the data key that would be generated are reported. Diff mode shows the
    key policy JSON before and after.
  - Throttling errors are retried with jittered backoff (amazon.aws C(AWSRetry)).
  - The module never handles plaintext key material.
seealso:
  - module: nitro_enclaves.fleet.kms_enclave_policy
  - module: nitro_enclaves.fleet.kms_enclave_data_key
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
requirements:
  - python >= 3.11
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: The tokenizer's key, bound to the enclave image, and the fleet's data key
  nitro_enclaves.fleet.kms_enclave_key:
    alias: alias/tokenizer
    statements:
      - sid: TokenizerEnclaveDecrypt
        principal_role_names: [enclave-parent]
        actions: [kms:Decrypt]
        pcr0: ["{{ measurements.PCR0 }}"]
    data_key:
      encryption_context:
        app: enclave-tokenizer
  register: tokenizer_key

- name: Deliver the data key record to the hosts
  ansible.builtin.copy:
    content: "{{ tokenizer_key.record }}\n"
    dest: /etc/nitro-enclaves/tokenizer/datakey.json
    mode: "0600"
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
account:
  description: The account O(statements[].principal_role_names) resolved in.
  returned: when a statement has principal_role_names
  type: str
  sample: "123456789012"
policy:
  description: The resulting key policy (what would be written in check mode).
  returned: when the key exists
  type: dict
statements_changed:
  description: Sids of the statements created, changed or deleted (empty when nothing changed).
  returned: always
  type: list
  elements: str
data_key_generated:
  description: Whether a new data key was generated (first one, or a rotation).
  returned: with O(data_key)
  type: bool
rotated:
  description: Whether this run rotated the data key.
  returned: with O(data_key)
  type: bool
found_in:
  description: Where the data key came from, e.g. C(ssm:/nitro-enclaves/tokenizer/data-key), C(migrated:<file>),
    C(generated).
  returned: with O(data_key)
  type: str
parameter_name:
  description: The SSM parameter holding the record.
  returned: with O(data_key)
  type: str
generation:
  description: Generation of the current data key (0 for one adopted from before generations).
  returned: with O(data_key), when a data key exists or would be generated
  type: int
ciphertext:
  description: The current data key's base64 C(CiphertextBlob).
  returned: with O(data_key), when a data key exists (not in check mode when it would be generated)
  type: str
record:
  description: The JSON record as stored in SSM (ciphertext only); hosts receive it as their data key file.
  returned: with O(data_key), when a data key exists (not in check mode when it would be generated)
  type: str
"""

import contextlib

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import data_key_record as records
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.diff import diff_result
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.kms_calls import (
    KMS_RETRY,
    STATEMENT_OPTIONS,
    caller_account,
    key_account,
    role_arns,
    sync_key_policy,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.kms_data_key import (
    DATA_KEY_OPTIONS,
    DataKeyError,
    ensure,
    ensure_key,
    find_key,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.kms_policy import (
    PolicyError,
    dump_policy,
    parse_statement_spec,
)

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    import botocore.exceptions

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule


def statement_specs(module, params: dict, result: dict, meta: dict | None) -> list:
    """The statements with principal_role_names turned into role ARNs, in account_id or else the credentials'
    account: the existing key's (``meta``), STS only for a key still to be created."""
    raws = [dict(raw) for raw in params["statements"]]
    if any(raw.get("principal_role_names") for raw in raws):
        account, partition = params["account_id"], "aws"
        if not account and meta is not None:
            account, partition = key_account(meta)
        elif not account:
            account, partition = caller_account(module.client("sts", retry_decorator=KMS_RETRY))
        result["account"] = account
        for raw in raws:
            names = raw.pop("principal_role_names") or []
            if names:
                raw["principals"] = list(raw.get("principals") or []) + role_arns(names, account, partition)
    for raw in raws:
        raw.pop("principal_role_names", None)
    return [parse_statement_spec(raw, allow_debug=params["allow_debug_pcrs"]) for raw in raws]


def run(module, kms, ssm) -> dict:
    params = module.params
    alias = params["alias"] if params["alias"].startswith("alias/") else f"alias/{params['alias']}"
    result: dict = dict(changed=False, key_created=False, statements_changed=[])
    found = find_key(kms, alias)
    specs = statement_specs(module, params, result, found)  # bad statements fail before a key is created
    meta = ensure_key(module, params, kms, alias, result, found=found)
    if meta is not None:  # None: check mode, the key would be created (its policy is KMS's default)
        sync = sync_key_policy(
            kms, meta["KeyId"], specs, state="present", mode=params["pcr_values_mode"],
            check_mode=module.check_mode, meta=meta,
        )  # fmt: skip
        for warning in sync.result.warnings:
            module.warn(warning)
        result.update(policy=sync.result.policy, statements_changed=sync.result.changed_sids)
        result["changed"] |= sync.result.changed
        if module._diff:
            result["diff"] = diff_result(
                dump_policy(sync.before) + "\n", dump_policy(sync.result.policy) + "\n", f"{sync.key_arn} policy"
            )
    if params["data_key"] is not None:
        data_params = dict(params["data_key"], alias=alias, tags=params["tags"])
        data = ensure(module, kms, ssm, params=data_params, meta=meta, key_known=True)
        data["changed"] |= result["changed"]
        data["key_created"] |= result["key_created"]
        result.update(data)
    return result


def main() -> None:
    statement_options = dict(STATEMENT_OPTIONS, principal_role_names=dict(type="list", elements="str"))
    argument_spec = dict(
        alias=dict(type="str", required=True),
        create_key=dict(type="bool", default=True),
        description=dict(type="str", default="Nitro Enclaves data key wrapping key (managed by Ansible)"),
        tags=dict(type="dict", aliases=["resource_tags"]),
        account_id=dict(type="str", default=""),
        statements=dict(type="list", elements="dict", required=True, options=statement_options),
        pcr_values_mode=dict(type="str", choices=["replace", "add", "remove"], default="replace"),
        allow_debug_pcrs=dict(type="bool", default=False),
        # Options about the data key (spec, context, parameter name), never key material.
        data_key=dict(type="dict", options=DATA_KEY_OPTIONS, no_log=False),
    )
    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)
    kms = module.client("kms", retry_decorator=KMS_RETRY)
    ssm = module.client("ssm", retry_decorator=KMS_RETRY) if module.params["data_key"] is not None else None
    try:
        result = run(module, kms, ssm)
    except (PolicyError, DataKeyError, records.RecordError) as exc:
        module.fail_json(msg=str(exc))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        module.fail_json_aws(exc, msg=f"KMS/STS/SSM call failed for {module.params['alias']}")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
