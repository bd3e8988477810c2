"""kms_enclave_data_key: key by alias + the fleet's one data key in SSM (GenerateDataKeyWithoutPlaintext),
adoption of a checkout's old ciphertext file, explicit rotation; against nitro-local-aws."""

from __future__ import annotations

import base64
import json
import stat
import uuid

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import data_key_record
from enclave_tokenizer.cms import decrypt_enveloped_data

from .conftest import (
    OLD_PCR0,
    KmsEndpoint,
    document,
    endpoint_client,
    put_attested_statement,
    recipient,
    run_module_tasks,
)

CONTEXT = {"app": "enclave-tokenizer"}


def task(name: str, **args) -> dict:
    return {"name": name, "nitro_enclaves.fleet.kms_enclave_data_key": args}


def alias() -> str:
    return f"alias/tokenizer-{uuid.uuid4().hex[:8]}"


def ssm(endpoint: KmsEndpoint):
    return endpoint_client(endpoint.url, "ssm")


def stored(endpoint: KmsEndpoint, name: str) -> dict:
    parameter = f"/nitro-enclaves/{name.removeprefix('alias/')}/data-key"
    return data_key_record.loads(ssm(endpoint).get_parameter(Name=parameter)["Parameter"]["Value"])


def test_create_idempotent_and_usable_only_by_the_attested_enclave(
    parent_kms, tmp_path, kms_endpoint, kms, enclave
) -> None:
    name, dest = alias(), tmp_path / "data-key.b64"
    args = {"alias": name, "dest": str(dest), "encryption_context": CONTEXT, "tags": {"team": "payments"}}
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [task("create", **args), task("again", **args), task("mode", **args, mode="0640")],
    )
    create, again, mode = run.results
    assert create["changed"] and create["key_created"] and create["data_key_generated"], create
    assert not again["changed"] and not again["key_created"] and not again["data_key_generated"], again
    assert mode["changed"] and not mode["data_key_generated"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    meta = kms.describe_key(KeyId=name)["KeyMetadata"]
    assert meta["KeyId"] == create["key_id"] and meta["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert {"TagKey": "team", "TagValue": "payments"} in kms.list_resource_tags(KeyId=meta["KeyId"])["Tags"]
    text = dest.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    blob = base64.b64decode(text.strip(), validate=True)
    # The fleet's copy is the SSM parameter next to the key; the file is a cache of it.
    record = stored(kms_endpoint, name)
    assert record["blob"] == blob and record["key_arn"] == meta["Arn"] and record["generation"] == 1
    assert create["found_in"] == "generated" and again["found_in"] == create["parameter_name"].join(["ssm:", ""])
    assert json.loads(again["record"])["ciphertext"] == text.strip() == again["ciphertext"]
    tags = ssm(kms_endpoint).list_tags_for_resource(ResourceType="Parameter", ResourceId=create["parameter_name"])
    assert {"Key": "kms-key-arn", "Value": meta["Arn"]} in tags["TagList"]
    context = {**CONTEXT, data_key_record.GENERATION_CONTEXT_KEY: "1"}
    assert record["encryption_context"] == context
    # Nothing but ciphertext went through Ansible: no result carries key material.
    assert all("Plaintext" not in str(r) for r in run.results)
    # The enclave path: attested Decrypt with the same context yields the data key inside the envelope.
    put_attested_statement(kms, meta["KeyId"], [OLD_PCR0], ["kms:Decrypt"])
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    answer = parent_kms.decrypt(CiphertextBlob=blob, EncryptionContext=context, Recipient=recipient(doc))
    data_key = decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key)
    assert len(data_key) == 32
    assert data_key == kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"]


def test_check_mode_creates_nothing(tmp_path, kms_endpoint, kms) -> None:
    name, dest = alias(), tmp_path / "data-key.b64"
    run = run_module_tasks(tmp_path, kms_endpoint, [task("plan", alias=name, dest=str(dest))], check=True)
    (result,) = run.results
    assert result["changed"] and result["key_created"] and result["data_key_generated"], result
    assert not dest.exists()
    assert name not in {a["AliasName"] for a in kms.list_aliases()["Aliases"]}
    assert not ssm(kms_endpoint).get_parameters(Names=[result["parameter_name"]])["Parameters"]


def test_refuses_to_adopt_a_foreign_or_broken_blob_unless_rotating(tmp_path, kms_endpoint, kms) -> None:
    name, dest = alias(), tmp_path / "data-key.b64"
    other_key = kms.create_key()["KeyMetadata"]["KeyId"]
    foreign = base64.b64encode(
        kms.generate_data_key_without_plaintext(KeyId=other_key, KeySpec="AES_256")["CiphertextBlob"]
    ).decode()
    garbage = tmp_path / "garbage.b64"
    garbage.write_text("not base64 at all!\n")
    asymmetric = alias()
    kms.create_alias(
        AliasName=asymmetric,
        TargetKeyId=kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"],
    )
    dest.write_text(foreign + "\n")
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [
            task("foreign blob", alias=name, dest=str(dest)),
            task("garbage", alias=name, dest=str(garbage)),
            task("missing alias, no create", alias=alias(), dest=str(tmp_path / "x.b64"), create_key=False),
            task("asymmetric key", alias=asymmetric, dest=str(tmp_path / "y.b64")),
        ],
    )
    results = {r["task"]: r for r in run.results}
    assert results["foreign blob"]["failed"] and "refusing to adopt" in results["foreign blob"]["msg"]
    assert results["garbage"]["failed"] and "not base64" in results["garbage"]["msg"]
    assert (
        results["missing alias, no create"]["failed"]
        and "create_key is false" in results["missing alias, no create"]["msg"]
    )
    assert results["asymmetric key"]["failed"] and "SYMMETRIC_DEFAULT" in results["asymmetric key"]["msg"]
    assert dest.read_text() == foreign + "\n"  # untouched
    assert garbage.read_text() == "not base64 at all!\n"
    # A blob of the right key but another encryption context does not decrypt: refused too.
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [
            task("rotate", alias=name, dest=str(dest), rotate=True, encryption_context=CONTEXT),
            task("other context", alias=name, dest=str(dest), encryption_context={"app": "other"}),
            task("same context", alias=name, dest=str(dest), encryption_context=CONTEXT),
        ],
    )
    forced, other, same = run.results
    assert forced["changed"] and forced["data_key_generated"], forced
    assert dest.read_text() != foreign + "\n"
    assert other["failed"] and "needs rotate=true" in other["msg"], other
    assert not same["changed"] and not same.get("failed"), same


def test_one_data_key_for_every_checkout_and_old_files_are_adopted(tmp_path, kms_endpoint, kms) -> None:
    """Two controller checkouts (two cache dirs) get the same data key; a checkout's old file is uploaded."""
    name = alias()
    first, second = tmp_path / "checkout-a" / "key.b64", tmp_path / "checkout-b" / "key.b64"
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [task("a", alias=name, dest=str(first)), task("b", alias=name, dest=str(second))],
    )
    a, b = run.results
    assert a["data_key_generated"] and not b["data_key_generated"] and not b.get("failed"), b
    assert b["found_in"] == f"ssm:{a['parameter_name']}" and b["changed"]  # only its cache file was new
    assert first.read_text() == second.read_text() and a["record"] == b["record"]

    # Migration: a checkout from before the parameter existed kept the fleet's ciphertext in .cache/kms.
    legacy_alias = alias()
    key_id = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=legacy_alias, TargetKeyId=key_id)
    legacy = tmp_path / ".cache" / "kms" / "tokenizer.datakey"
    legacy.parent.mkdir(parents=True)
    blob = kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")["CiphertextBlob"]
    legacy.write_text(base64.b64encode(blob).decode() + "\n")
    args = {"alias": legacy_alias, "migrate_from": [str(legacy)], "create_key": False}
    run = run_module_tasks(tmp_path, kms_endpoint, [task("plan", **args)], check=True)
    assert not run.results[0].get("failed"), run.results[0].get("msg")
    assert run.results[0]["found_in"] == f"migrated:{legacy}" and not run.results[0]["data_key_generated"]
    assert not ssm(kms_endpoint).get_parameters(Names=[run.results[0]["parameter_name"]])["Parameters"]
    run = run_module_tasks(tmp_path, kms_endpoint, [task("adopt", **args), task("again", **args)])
    adopt, again = run.results
    assert adopt["changed"] and adopt["found_in"] == f"migrated:{legacy}" and not adopt["data_key_generated"]
    assert adopt["generation"] == 0 and stored(kms_endpoint, legacy_alias)["blob"] == blob
    assert not again["changed"] and again["found_in"].startswith("ssm:")


def test_rotation_is_explicit_keeps_the_previous_key_and_says_so(tmp_path, kms_endpoint, kms) -> None:
    name = alias()
    (create,) = run_module_tasks(tmp_path, kms_endpoint, [task("create", alias=name)]).results
    (plan,) = run_module_tasks(tmp_path, kms_endpoint, [task("plan", alias=name, rotate=True)], check=True).results
    assert plan["changed"] and plan["rotated"] and plan["generation"] == 2
    assert stored(kms_endpoint, name)["blob"] == base64.b64decode(create["ciphertext"])  # check mode: unchanged
    run = run_module_tasks(tmp_path, kms_endpoint, [task("rotate", alias=name, rotate=True), task("after", alias=name)])
    rotate, after = run.results
    assert rotate["rotated"] and rotate["data_key_generated"] and rotate["generation"] == 2
    assert any("New tokens differ" in w for w in rotate.get("warnings", [])), rotate
    assert not after["changed"] and after["generation"] == 2 and after["found_in"].startswith("ssm:")
    record = stored(kms_endpoint, name)
    assert record["generation"] == 2 and record["previous"]["generation"] == 1
    assert record["previous"]["blob"] == base64.b64decode(create["ciphertext"])
    context = record["encryption_context"]
    assert context == {data_key_record.GENERATION_CONTEXT_KEY: "2"}
    # Both data keys decrypt under the key with their own (generation-bound) contexts.
    kms.decrypt(CiphertextBlob=record["blob"], EncryptionContext=context)
    kms.decrypt(CiphertextBlob=record["previous"]["blob"], EncryptionContext=record["previous"]["encryption_context"])


def test_a_data_key_the_hosts_hold_is_adopted(tmp_path, kms_endpoint, kms) -> None:
    """The checkout that converged the fleet is gone: the hosts' copy (base64 or a record) is adopted."""
    key_id = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    names = [alias(), alias()]
    for name in names:
        kms.create_alias(AliasName=name, TargetKeyId=key_id)
    context = {data_key_record.GENERATION_CONTEXT_KEY: "4"}
    blob = kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")["CiphertextBlob"]
    newer = kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)
    arn = kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
    record = data_key_record.build(arn, data_key_record.entry(newer["CiphertextBlob"], context, "2026-01-01T00:00:00Z"))
    hosts = [base64.b64encode(blob).decode() + "\n", data_key_record.dumps(record)]
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [
            task("base64 copy", alias=names[0], create_key=False, migrate_ciphertext=hosts),
            task("record copy", alias=names[1], create_key=False, migrate_ciphertext=hosts[1:]),
        ],
    )
    plain, from_record = run.results
    assert plain["found_in"] == "migrated:migrate_ciphertext[0]" and not plain["data_key_generated"], plain
    assert stored(kms_endpoint, names[0])["blob"] == blob and plain["generation"] == 0
    assert from_record["generation"] == 4 and stored(kms_endpoint, names[1])["blob"] == newer["CiphertextBlob"]
