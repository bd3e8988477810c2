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

import contextlib

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    import botocore.exceptions

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import data_key_record as records
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.kms_calls import KMS_RETRY
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.kms_data_key import (
    DATA_KEY_OPTIONS,
    DataKeyError,
    ensure,
)


def main() -> None:
    argument_spec = dict(
        alias=dict(type="str", required=True),
        create_key=dict(type="bool", default=True),
        description=dict(type="str", default="Nitro Enclaves data key wrapping key (managed by Ansible)"),
        tags=dict(type="dict", aliases=["resource_tags"]),
        dest=dict(type="path"),
        **DATA_KEY_OPTIONS,
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
