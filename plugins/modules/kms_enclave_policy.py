#!/usr/bin/python
"""Ansible module kms_enclave_policy: attestation-bound statements in a KMS key policy (logic in plugins/module_utils/kms_policy.py)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: kms_enclave_policy
short_description: Bind a KMS key to Nitro Enclaves measurements (attested key policy statements)
description:
  - Manages one or more statements of an existing KMS key's policy, each identified by its C(Sid), that allow
    IAM roles to use the key only from a Nitro Enclave whose attestation document carries the given measurements
    (C(kms:RecipientAttestation:ImageSha384) / C(kms:RecipientAttestation:PCR<n>) conditions with
    C(StringEqualsIgnoreCase)).
  - Every other statement of the policy is left exactly as it is. Unlike M(amazon.aws.kms_key), the module never
    replaces the whole policy; it reads it, merges by C(Sid) and writes it back.
  - Several values for one measurement are OR'ed by IAM; O(pcr_values_mode=add) and O(pcr_values_mode=remove)
    use this to rotate an image without downtime (add the new PCR0, roll the fleet, remove the old one).
  - Comparison is order-insensitive (statements, principals, actions, values; PCR case), so re-running with the
    same input reports no change.
  - Refuses, before calling C(PutKeyPolicy), policies that would be unsafe - see O(statements) and the notes.
version_added: "0.1.0"
author:
  - nitro-enclaves-ansible authors (@nitro-enclaves-ansible)
options:
  key_id:
    description:
      - The KMS key, as a key id, key ARN, alias name (C(alias/...)) or alias ARN. The key must exist.
    type: str
    required: true
    aliases: ['key_arn', 'alias']
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
          - Required when the statement is created; when omitted for an existing statement its principals are kept.
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
  state:
    description:
      - C(present) creates or updates the statements; C(absent) deletes them (only the measurement-related
        options are ignored then).
    type: str
    choices: ['present', 'absent']
    default: present
  pcr_values_mode:
    description:
      - How the given measurement values combine with those already in an existing statement.
      - C(replace) - the statement's attestation conditions become exactly the given keys and values.
      - C(add) - the given values are added to each key (phase 1 of a rotation); keys not given are kept.
      - C(remove) - the given values are removed (phase 2 of a rotation). Removing the last value of a key is
        refused, because dropping the condition would widen the statement; delete the statement with
        O(state=absent) instead.
      - O(statements[].principals) and O(statements[].actions), when given, always replace the existing ones.
    type: str
    choices: ['replace', 'add', 'remove']
    default: replace
  allow_debug_pcrs:
    description:
      - Accept all-zero measurement values. Debug-mode enclaves report PCR0-2 as zeros and their memory can be read
        by the parent, so such a value lets any debug enclave use the key. For development only.
    type: bool
    default: false
notes:
  - Refused (the module fails and writes nothing) - measurement values that are not 96 hex characters; all-zero values
    without O(allow_debug_pcrs); principals that are not IAM role ARNs; other actions; a statement without any
    measurement; a principal of an attested statement that another Allow statement without attestation conditions
    also grants the same action (that statement would bypass attestation); a change that removes kms:PutKeyPolicy
    from a principal that had it or leaves nobody with it (what KMS's lockout safety check protects); a policy
    over 32768 bytes.
  - A statement for the account root (C(arn:aws:iam::<account>:root)) delegates to IAM policies. The module warns
    when one grants the managed actions, since an IAM policy could then grant them without attestation.
  - Check mode reads the policy and reports the change without writing. Diff mode shows the policy JSON before and
    after.
  - Throttling errors are retried with jittered backoff (amazon.aws C(AWSRetry)).
seealso:
  - module: amazon.aws.kms_key
  - name: AWS KMS condition keys for Nitro Enclaves
    description: kms:RecipientAttestation:ImageSha384 and kms:RecipientAttestation:PCR.
    link: https://docs.aws.amazon.com/kms/latest/developerguide/conditions-nitro-enclave.html
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
- name: Only the tokenizer enclave may decrypt with the key
  kms_enclave_policy:
    key_id: alias/tokenizer
    statements:
      - sid: TokenizerEnclaveDecrypt
        principals:
          - arn:aws:iam::123456789012:role/enclave-parent
        actions: [kms:Decrypt]
        pcr0: ["{{ measurements.Measurements.PCR0 }}"]
        pcr8: ["{{ measurements.Measurements.PCR8 }}"]

- name: Rotation phase 1 - accept the new image too
  kms_enclave_policy:
    key_id: alias/tokenizer
    pcr_values_mode: add
    statements:
      - sid: TokenizerEnclaveDecrypt
        pcr0: ["{{ new_pcr0 }}"]

- name: Rotation phase 2 - after every host runs the new image
  kms_enclave_policy:
    key_id: alias/tokenizer
    pcr_values_mode: remove
    statements:
      - sid: TokenizerEnclaveDecrypt
        pcr0: ["{{ old_pcr0 }}"]

- name: Pin the parent role and instances as well (PCR3/PCR4 computed from them)
  kms_enclave_policy:
    key_id: arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab
    statements:
      - sid: TokenizerEnclaveDecrypt
        principals: [arn:aws:iam::123456789012:role/enclave-parent]
        pcr0: ["{{ pcr0 }}"]
        pcr3_role_arn: [arn:aws:iam::123456789012:role/enclave-parent]
        pcr4_instance_id: "{{ groups['enclave_hosts'] | map('extract', hostvars, 'instance_id') | list }}"

- name: Against the project's local AWS endpoint
  kms_enclave_policy:
    endpoint_url: http://127.0.0.1:4566
    region: us-east-1
    key_id: alias/tokenizer
    statements:
      - sid: TokenizerEnclaveDecrypt
        principals: [arn:aws:iam::123456789012:role/enclave-parent]
        image_sha384: ["{{ pcr0 }}"]

- name: Remove the statement
  kms_enclave_policy:
    key_id: alias/tokenizer
    state: absent
    statements:
      - sid: TokenizerEnclaveDecrypt
"""

RETURN = r"""
key_id:
  description: The key's id.
  returned: always
  type: str
  sample: 1234abcd-12ab-34cd-56ef-1234567890ab
key_arn:
  description: The key's ARN.
  returned: always
  type: str
  sample: arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab
policy:
  description: The resulting key policy (what would be written in check mode).
  returned: always
  type: dict
  sample:
    Version: "2012-10-17"
    Statement:
      - Sid: Enable IAM User Permissions
        Effect: Allow
        Principal: {AWS: "arn:aws:iam::123456789012:root"}
        Action: kms:*
        Resource: "*"
      - Sid: TokenizerEnclaveDecrypt
        Effect: Allow
        Principal: {AWS: ["arn:aws:iam::123456789012:role/enclave-parent"]}
        Action: [kms:Decrypt]
        Resource: "*"
        Condition:
          StringEqualsIgnoreCase:
            kms:RecipientAttestation:PCR0: ["<96 hex>"]
statements_changed:
  description: Sids of the statements created, changed or deleted (empty when nothing changed).
  returned: always
  type: list
  elements: str
  sample: [TokenizerEnclaveDecrypt]
"""

import contextlib

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.diff import diff_result
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.kms_calls import (
    KMS_RETRY,
    STATEMENT_OPTIONS,
    sync_key_policy,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.kms_policy import (
    PolicyError,
    dump_policy,
    parse_statement_spec,
)

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    import botocore.exceptions

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule


def main() -> None:
    argument_spec = dict(
        key_id=dict(type="str", required=True, aliases=["key_arn", "alias"]),
        statements=dict(type="list", elements="dict", required=True, options=STATEMENT_OPTIONS),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        pcr_values_mode=dict(type="str", choices=["replace", "add", "remove"], default="replace"),
        allow_debug_pcrs=dict(type="bool", default=False),
    )
    module = AnsibleAWSModule(argument_spec=argument_spec, supports_check_mode=True)
    params = module.params
    client = module.client("kms", retry_decorator=KMS_RETRY)
    try:
        try:
            specs = [parse_statement_spec(raw, allow_debug=params["allow_debug_pcrs"]) for raw in params["statements"]]
            sync = sync_key_policy(
                client,
                params["key_id"],
                specs,
                state=params["state"],
                mode=params["pcr_values_mode"],
                check_mode=module.check_mode,
            )
        except PolicyError as exc:
            module.fail_json(msg=str(exc))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        module.fail_json_aws(exc, msg=f"KMS call failed for key {params['key_id']}")
    result = sync.result
    for warning in result.warnings:
        module.warn(warning)
    output = dict(
        changed=result.changed,
        key_id=sync.key_id,
        key_arn=sync.key_arn,
        policy=result.policy,
        statements_changed=result.changed_sids,
    )
    if module._diff:
        output["diff"] = diff_result(
            dump_policy(sync.before) + "\n", dump_policy(result.policy) + "\n", f"{sync.key_arn} policy"
        )
    module.exit_json(**output)


if __name__ == "__main__":
    main()
