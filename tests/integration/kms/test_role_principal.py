"""roles/kms_enclave_policy against the local KMS: the default principal is the role provision.yml creates,
in the account STS says the credentials belong to, and only that role's attested enclave gets the key."""

from __future__ import annotations

import base64
import json
import uuid

import yaml
from enclave_tokenizer.cms import decrypt_enveloped_data

from .conftest import OLD_PCR0, REGION, document, get_policy, recipient, run_playbook
from .test_data_key import stored


def test_default_principal_is_provisions_role_in_the_callers_account(tmp_path, kms_endpoint, kms, parent_kms, enclave):
    alias = f"alias/role-test-{uuid.uuid4().hex[:8]}"
    play = [
        {
            "name": "controller part of kms_enclave_policy",
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {
                "kms_enclave_policy_key_alias": alias,
                "kms_enclave_policy_local_endpoint": False,
                "kms_enclave_policy_endpoint_url": kms_endpoint.url,
                "kms_enclave_policy_region": REGION,
                "enclave_image_measurements": {"PCR0": OLD_PCR0, "PCR1": "11" * 48, "PCR2": "22" * 48},
            },
            "tasks": [
                {
                    "ansible.builtin.include_role": {
                        "name": "nitro_enclaves.fleet.kms_enclave_policy",
                        "tasks_from": "controller.yml",
                    }
                }
            ],
        }
    ]
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    run = run_playbook(path)
    assert run.rc == 0, run.stdout[-3000:]
    key_id = kms.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"]
    (attested,) = [s for s in get_policy(kms, key_id)["Statement"] if s.get("Sid") == "EnclaveDecrypt"]
    account = kms_endpoint.client(service="sts").get_caller_identity()["Account"]
    assert attested["Principal"] == {"AWS": [f"arn:aws:iam::{account}:role/enclave-parent"]}
    assert "123456789012:role/nitro-enclave-host" not in json.dumps(get_policy(kms, key_id))
    # The instance role's enclave (and only with the right PCR0) can use the data key the role made.
    record = stored(kms_endpoint, alias)  # the fleet's data key record, in its SSM parameter
    blob = base64.b64decode(record["ciphertext"])
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    answer = parent_kms.decrypt(
        CiphertextBlob=blob, EncryptionContext=record["encryption_context"], Recipient=recipient(doc)
    )
    assert len(decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key)) == 32
