"""kms_enclave_data_key: key by alias + GenerateDataKeyWithoutPlaintext to a file, against nitro-local-aws."""

from __future__ import annotations

import base64
import stat
import uuid

from enclave_tokenizer.cms import decrypt_enveloped_data

from .conftest import OLD_PCR0, document, put_attested_statement, recipient, run_module_tasks

CONTEXT = {"app": "enclave-tokenizer"}


def task(name: str, **args) -> dict:
    return {"name": name, "kms_enclave_data_key": args}


def alias() -> str:
    return f"alias/tokenizer-{uuid.uuid4().hex[:8]}"


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
    # Nothing but ciphertext went through Ansible: no result carries key material.
    assert all("Plaintext" not in str(r) for r in run.results)
    # The enclave path: attested Decrypt with the same context yields the data key inside the envelope.
    put_attested_statement(kms, meta["KeyId"], [OLD_PCR0], ["kms:Decrypt"])
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    answer = parent_kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT, Recipient=recipient(doc))
    data_key = decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key)
    assert len(data_key) == 32
    assert data_key == kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"]


def test_check_mode_creates_nothing(tmp_path, kms_endpoint, kms) -> None:
    name, dest = alias(), tmp_path / "data-key.b64"
    run = run_module_tasks(tmp_path, kms_endpoint, [task("plan", alias=name, dest=str(dest))], check=True)
    (result,) = run.results
    assert result["changed"] and result["key_created"] and result["data_key_generated"], result
    assert not dest.exists()
    assert name not in {a["AliasName"] for a in kms.list_aliases()["Aliases"]}


def test_refuses_to_replace_a_foreign_or_broken_blob_unless_forced(tmp_path, kms_endpoint, kms) -> None:
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
    assert results["foreign blob"]["failed"] and "force=true" in results["foreign blob"]["msg"]
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
            task("forced", alias=name, dest=str(dest), force=True, encryption_context=CONTEXT),
            task("other context", alias=name, dest=str(dest), encryption_context={"app": "other"}),
            task("same context", alias=name, dest=str(dest), encryption_context=CONTEXT),
        ],
    )
    forced, other, same = run.results
    assert forced["changed"] and forced["data_key_generated"], forced
    assert dest.read_text() != foreign + "\n"
    assert other["failed"] and "does not decrypt" in other["msg"], other
    assert not same["changed"] and not same.get("failed"), same
