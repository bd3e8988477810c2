"""playbooks/rotate_pcrs.yml end to end on localhost against a real nitro-local-aws process."""

from __future__ import annotations

from pathlib import Path

import botocore.exceptions
import pytest
import yaml
from enclave_tokenizer.cms import decrypt_enveloped_data

from tests.conftest import REPO_ROOT

from .conftest import NEW_PCR0, OLD_PCR0, REGION, document, get_policy, put_attested_statement, recipient, run_playbook

PLAYBOOK = REPO_ROOT / "playbooks" / "rotate_pcrs.yml"
HOSTS = ["enclave-1", "enclave-2", "enclave-3"]
P0 = "kms:RecipientAttestation:PCR0"
SECRET = b"tokenizer data key"


def pcr0_values(kms, key_id: str) -> list[str]:
    (stmt,) = [s for s in get_policy(kms, key_id)["Statement"] if s.get("Sid") == "EnclaveUse"]
    return stmt["Condition"]["StringEqualsIgnoreCase"][P0]


def inventory(tmp_path: Path, health: dict[str, dict] | None = None) -> Path:
    hosts = {name: ({"enclave_health": health[name]} if health and name in health else {}) for name in HOSTS}
    data = {
        "all": {
            "hosts": {
                "localhost": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                }
            },
            "children": {"enclave_hosts": {"hosts": hosts}},
        }
    }
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def hook(tmp_path: Path, reports: dict[str, dict], fail: bool = False) -> Path:
    """Stands in for the fleet rollout: records each host's health report as that host's fact."""
    tasks: list[dict] = [
        {
            "name": "Record health reported by each host",
            "ansible.builtin.set_fact": {"enclave_health": "{{ reports[item] }}"},
            "delegate_to": "{{ item }}",
            "delegate_facts": True,
            "loop": list(reports),
            "vars": {"reports": reports},
        }
    ]
    if fail:
        tasks.append({"name": "Rollout batch fails", "ansible.builtin.fail": {"msg": "batch 2 did not come up"}})
    path = tmp_path / "hook.yml"
    path.write_text(yaml.safe_dump(tasks))
    return path


def rotate(tmp_path: Path, endpoint_url: str, key_id: str, inv: Path, **extra) -> object:
    variables = {
        "kms_key_id": key_id,
        "kms_endpoint_url": endpoint_url,
        "kms_region": REGION,
        "kms_statement_sid": "EnclaveUse",
        "old_pcr0": OLD_PCR0,
        "new_pcr0": NEW_PCR0.upper(),  # nitro-cli output may be any case
        **extra,
    }
    return run_playbook(PLAYBOOK, inventory=inv, extra_vars=variables)


def healthy(pcr0: str = NEW_PCR0) -> dict:
    return {"pcr0": pcr0, "healthy": True}


def test_full_rotation_with_hook_then_idempotent(parent_kms, tmp_path, kms_endpoint, kms, key_id, enclave) -> None:
    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:Decrypt"])
    blob = kms.encrypt(KeyId=key_id, Plaintext=SECRET)["CiphertextBlob"]
    inv = inventory(tmp_path)
    run = rotate(
        tmp_path, kms_endpoint.url, key_id, inv, rotation_health_hook=str(hook(tmp_path, {h: healthy() for h in HOSTS}))
    )
    assert run.rc == 0, run.stdout + run.stderr
    assert pcr0_values(kms, key_id) == [NEW_PCR0]
    changed = {r["task"]: r.get("changed") for r in run.results}
    assert changed["Phase 1 - accept the new image next to the old one"] is True
    assert changed["Phase 2 - drop the old image"] is True
    # The new image gets the key, the old one no longer does.
    new_doc = document(kms_endpoint.emulator_home, NEW_PCR0, enclave.public_der)
    answer = parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(new_doc))
    assert decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key) == SECRET
    with pytest.raises(botocore.exceptions.ClientError):
        parent_kms.decrypt(
            CiphertextBlob=blob, Recipient=recipient(document(kms_endpoint.emulator_home, OLD_PCR0, None))
        )
    # Re-run: nothing to change.
    health = {h: healthy() for h in HOSTS}
    run = rotate(tmp_path, kms_endpoint.url, key_id, inventory(tmp_path, health))
    assert run.rc == 0
    assert not any(r.get("changed") for r in run.results if r["task"].startswith("Phase"))


GATE_FAILS = {  # one host per way of not being ready; the gate names each of them
    "enclave-1": healthy(OLD_PCR0),  # still on the old image
    "enclave-2": {"pcr0": NEW_PCR0, "healthy": False},  # new image, not answering
}  # enclave-3 never reported


@pytest.mark.parametrize(
    ("health", "hook_fails"),
    [(GATE_FAILS, False), ({h: healthy() for h in HOSTS}, True)],
    ids=["gate-refuses", "rollout-failed"],
)
def test_failure_mid_way_keeps_both_values(
    parent_kms, tmp_path, kms_endpoint, kms, key_id, enclave, health, hook_fails
) -> None:
    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:Decrypt"])
    blob = kms.encrypt(KeyId=key_id, Plaintext=SECRET)["CiphertextBlob"]
    run = rotate(
        tmp_path,
        kms_endpoint.url,
        key_id,
        inventory(tmp_path),
        rotation_health_hook=str(hook(tmp_path, health, fail=hook_fails)),
    )
    assert run.rc != 0
    assert sorted(pcr0_values(kms, key_id)) == sorted([OLD_PCR0, NEW_PCR0])
    assert not any(r["task"].startswith("Phase 2") and not r.get("skipped") for r in run.results)
    if not hook_fails:
        (gate,) = [r for r in run.results if r["task"] == "Gate - every host reports the new measurements healthy"]
        failed = {item["item"] for item in gate["results"] if item.get("failed")}
        assert failed == set(HOSTS), gate
    # No outage: old and new images both still get the key.
    for pcr0 in (OLD_PCR0, NEW_PCR0):
        doc = document(kms_endpoint.emulator_home, pcr0, enclave.public_der)
        parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))


def test_split_phases_and_input_checks(tmp_path, kms_endpoint, kms, key_id) -> None:
    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:Decrypt"])
    inv = inventory(tmp_path, {h: healthy() for h in HOSTS})
    assert rotate(tmp_path, kms_endpoint.url, key_id, inv, rotation_phase="add").rc == 0
    assert pcr0_values(kms, key_id) == [OLD_PCR0, NEW_PCR0]
    assert rotate(tmp_path, kms_endpoint.url, key_id, inv, rotation_phase="remove").rc == 0
    assert pcr0_values(kms, key_id) == [NEW_PCR0]
    for bad in ({"new_pcr0": "abc"}, {"kms_key_id": ""}, {"rotation_hosts": []}):
        run = rotate(tmp_path, kms_endpoint.url, key_id, inv, **bad)
        assert run.rc != 0, bad
        assert pcr0_values(kms, key_id) == [NEW_PCR0]
    # Same image again (re-run of a rollout): nothing to rotate, nothing removed, no failure.
    run = rotate(tmp_path, kms_endpoint.url, key_id, inv, old_pcr0=NEW_PCR0)
    assert run.rc == 0, run.stdout
    assert not any(r["task"].startswith("Phase") for r in run.results)
    assert pcr0_values(kms, key_id) == [NEW_PCR0]
