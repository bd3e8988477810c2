#!/usr/bin/python
# Copyright: the nitro-enclaves-ansible authors
# Apache License 2.0 (see pyproject.toml)
"""Ansible module: build an EIF with nitro-cli when its inputs changed, or describe any EIF."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nitro_eif
short_description: Build an enclave image file (EIF) only when its inputs change, or read its measurements
description:
  - With O(state=present), builds O(path) from a Docker image with C(nitro-cli build-enclave) (real or emulated),
    but only when something that goes into the image changed. The module keeps a small record of the build inputs
    next to the EIF (C(<path>.inputs.json)) with the Docker image ID (C(docker image inspect)), or a digest of
    O(docker_dir) when the image is built from a directory, the name, version, metadata, signing certificate and
    key, the nitro-cli version and E(NITRO_CLI_BLOBS), and the SHA-384 of the EIF it produced. A missing EIF, a
    changed input or an EIF whose bytes no longer match the record triggers a build.
  - The build writes a temporary file next to O(path) and moves it into place, so a failed build never leaves a
    broken EIF behind.
  - Writes the measurements artifact O(measurements_file) (default C(<path>.measurements.json)) atomically, with
    PCR0, PCR1, PCR2 (and PCR8 when signed), the image digest, the EIF's SHA-384 and its path, so teams can commit
    the PCRs they pin in KMS key policies.
  - With O(state=signed), signs an existing EIF (C(nitro-cli sign-eif)) with O(signing_certificate) and
    O(private_key) unless it is already signed by that certificate with a signature covering its PCR0; PCR0-2 do
    not change, PCR8 becomes the certificate's. The inputs record and the measurements artifact next to it are
    updated, so a later O(state=present) does not rebuild the signed EIF. A controller signs this way with a
    key that never leaves it (or KMS).
  - With O(state=described), reads any EIF with the project's EIF library, without nitro-cli or Docker, and
    returns its measurements and metadata (a controller can compute the PCRs to pin).
  - An EIF built from nitro-cli-emulator's placeholder kernel and init (no E(NITRO_CLI_BLOBS)) boots only under
    the emulator; RV(placeholder_blobs) says so. With O(state=present) on a host that has C(/dev/nitro_enclaves)
    such an EIF is refused (and a fresh one is not moved into place).
version_added: "0.1.0"
author:
  - nitro-enclaves-ansible authors (@nitro-enclaves-ansible)
options:
  path:
    description: The EIF file (C(--output-file) when building).
    type: path
    required: true
    aliases: [eif_path, output_file]
  state:
    description: V(present) builds when needed; V(signed) signs O(path) when needed; V(described) only reads O(path).
    type: str
    choices: [present, signed, described]
    default: present
  docker_uri:
    description:
      - The Docker image to build from (C(--docker-uri)); C(:latest) is assumed when untagged. Required with
        O(state=present).
    type: str
  docker_dir:
    description: Build the Docker image from this directory's Dockerfile first and tag it O(docker_uri).
    type: path
  name:
    description: Image name stored in the EIF metadata (C(--name)).
    type: str
  version:
    description: Image version stored in the EIF metadata (C(--version)).
    type: str
  metadata:
    description: Custom metadata (a JSON object) stored in the EIF (C(--metadata), written to a temporary file).
    type: dict
  signing_certificate:
    description: PEM certificate to sign the EIF with (adds PCR8). Requires O(private_key).
    type: path
  private_key:
    description: EC private key PEM file or KMS key ARN used to sign. Requires O(signing_certificate).
    type: str
  src:
    description:
      - With O(state=signed), the EIF to sign; O(path) becomes a signed copy of it (moved into place), and stays
        as it is when it is already signed by O(signing_certificate) and measures what O(src) measures (PCR0-2;
        the signature does not enter them). So an unsigned EIF fetched from a build host keeps its own bytes and
        a second run signs nothing.
      - The measurements artifact of O(path) is that of O(src) (C(<src>.measurements.json)), updated.
      - Default O(path) itself, signed in place.
    type: path
  measurements_file:
    description: Where to write the measurements artifact. Default C(<path>.measurements.json).
    type: path
  force:
    description: Build even when nothing changed.
    type: bool
    default: false
  timeout:
    description: Seconds the build may take.
    type: int
    default: 1800
notes:
  - Supports check mode and diff mode (the diff is the inputs record before and after).
  - O(state=described) reports the signing certificate's PCR8 but not its X.509 details.
  - PCR0 and PCR2 depend on the Docker image's file contents and timestamps; rebuilding the Docker image usually
    changes them even when nothing else did.
seealso:
  - module: nitro_enclaves.fleet.nitro_enclave
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
extends_documentation_fragment:
  - nitro_enclaves.fleet.nitro_host
  - ansible.builtin.action_common_attributes
"""

EXAMPLES = r"""
- name: Build the tokenizer EIF from a Dockerfile (only when inputs changed)
  nitro_eif:
    path: /opt/enclaves/tokenizer.eif
    docker_uri: tokenizer:1.4.0
    docker_dir: /opt/src/enclave_src
    name: tokenizer
    version: 1.4.0
    metadata:
      team: payments
  register: eif

- name: Show PCR0
  ansible.builtin.debug:
    msg: "{{ eif.measurements.PCR0 }}"

- name: Read the measurements of an EIF on the controller (no nitro-cli)
  nitro_eif:
    path: artifacts/tokenizer.eif
    state: described
  delegate_to: localhost
"""

RETURN = r"""
measurements:
  description: The EIF's measurements (HashAlgorithm, PCR0, PCR1, PCR2, PCR8 when signed).
  returned: when the EIF exists (always with O(state=described))
  type: dict
  sample: {"HashAlgorithm": "Sha384 { ... }", "PCR0": "61fd...", "PCR1": "...", "PCR2": "..."}
eif_sha384:
  description: SHA-384 of the whole EIF file.
  returned: when the EIF exists
  type: str
size:
  description: Size of the EIF file in bytes.
  returned: when the EIF exists
  type: int
min_memory_mib:
  description: The smallest enclave memory for this EIF (4 times its size, at least 64 MiB), as nitro-cli enforces.
  returned: when the EIF exists
  type: int
image_digest:
  description: The Docker image ID the EIF was built from.
  returned: with O(state=present)
  type: str
  sample: sha256:4d3c...
built:
  description: Whether the EIF was (or in check mode would be) built.
  returned: with O(state=present)
  type: bool
reasons:
  description: Why a build was needed.
  returned: with O(state=present)
  type: list
  elements: str
measurements_file:
  description: The measurements artifact.
  returned: with O(state=present)
  type: str
inputs:
  description: The build inputs record.
  returned: with O(state=present)
  type: dict
placeholder_blobs:
  description: Whether the EIF was built from nitro-cli-emulator's placeholder blobs (it boots only under the emulator).
  returned: when the EIF exists
  type: bool
signature:
  description:
    - "The EIF's signature: C(signed) (false when unsigned, and then nothing else); C(pcr8); C(certificate_sha384)
      (SHA-384 of the certificate's DER); C(covers_pcr0) (the signed payload is this image's PCR0, describe-eif's
      C(SignatureCheck)); C(signature_verified) (ECDSA checked with the certificate's key; null where the
      C(cryptography) package is not importable)."
  returned: when the EIF exists
  type: dict
  sample: {"signed": true, "pcr8": "1e4f...", "certificate_sha384": "9a0c...", "covers_pcr0": true,
           "signature_verified": true}
signer_pcr8:
  description:
    - The PCR8 of O(signing_certificate), computed from the certificate (as C(nitro-cli pcr --signing-certificate)),
      whether or not the EIF had to be signed; what a host can require of the EIF (the C(signer_pcr8) option of
      C(nitro_enclave)).
  returned: with O(state=signed)
  type: str
describe:
  description:
    - nitro-cli C(describe-eif)-shaped description (EifVersion, Measurements, IsSigned, CheckCRC, ImageName,
      ImageVersion, Metadata).
  returned: with O(state=described)
  type: dict
"""

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.atomic_file import atomic_path, write_atomic
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.diff import diff_result
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import (
    EifError,
    EifImage,
    metadata_describe,
    pcr8_from_certificate,
    read_eif,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif_provenance import (
    is_placeholder,
    require_runnable_here,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif_signing import signature_info
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_spec import min_memory_mib
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.nitro_cli import NitroCli, NitroCliError

RECORD_SUFFIX = ".inputs.json"
RECORD_FORMAT = 1


def normalize_uri(uri: str) -> str:
    """nitro-cli appends :latest to a URI without a tag (a ':' in the last path part)."""
    last = uri.rsplit("/", 1)[-1]
    return uri if (":" in last or "@" in last) else f"{uri}:latest"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(root: str) -> str:
    """Content digest of a Docker build directory: relative paths, exec bit, bytes, links (sorted walk)."""
    digest = hashlib.sha256()
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                digest.update(f"L {rel} -> {os.readlink(full)}\n".encode())
                continue
            mode = "x" if os.access(full, os.X_OK) else "-"
            digest.update(f"F {rel} {mode} {file_sha256(full)}\n".encode())
        for name in dirs:
            digest.update(f"D {os.path.relpath(os.path.join(directory, name), root)}\n".encode())
    return "sha256:" + digest.hexdigest()


def image_id(module: AnsibleModule, uri: str) -> str | None:
    docker = module.get_bin_path("docker")
    if docker is None:
        module.fail_json(msg="docker not found on PATH: nitro-cli build-enclave needs the Docker engine")
    rc, out, _err = module.run_command([docker, "image", "inspect", "--format", "{{.Id}}", uri])
    return out.strip() if rc == 0 and out.strip() else None


def load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_json_atomically(module: AnsibleModule, path: str, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n", 0o644, move=module.atomic_move)


def image_facts(image: EifImage) -> dict[str, Any]:
    """What both states return about an EIF."""
    return {
        "measurements": image.measurements,
        "eif_sha384": image.file_sha384,
        "size": image.file_size,
        "min_memory_mib": min_memory_mib(image.file_size),
        "placeholder_blobs": is_placeholder(image),
        "signature": signature_info(image),
    }


def described(module: AnsibleModule) -> None:
    path = module.params["path"]
    try:
        image = read_eif(path, check_crc=False, file_digest=True)
        describe: dict[str, Any] = {
            "EifVersion": image.header.version,
            "Measurements": image.measurements,
            "IsSigned": image.is_signed,
            "CheckCRC": image.crc_ok,
        }
        if image.metadata is not None:
            describe["ImageName"] = image.metadata["ImageName"]
            describe["ImageVersion"] = image.metadata["ImageVersion"]
            describe["Metadata"] = metadata_describe(image.metadata)
    except EifError as exc:
        module.fail_json(msg=f"path {path}: {exc}")
    module.exit_json(changed=False, path=path, **image_facts(image), describe=describe)


def build_inputs(module: AnsibleModule, cli: NitroCli) -> dict[str, Any]:
    p = module.params
    uri = normalize_uri(p["docker_uri"])
    inputs: dict[str, Any] = {"format": RECORD_FORMAT, "docker_uri": uri}
    if p["docker_dir"]:
        if not os.path.isfile(os.path.join(p["docker_dir"], "Dockerfile")):
            module.fail_json(msg=f"docker_dir {p['docker_dir']} has no Dockerfile")
        inputs["docker_dir"] = p["docker_dir"]
        inputs["docker_dir_digest"] = tree_digest(p["docker_dir"])
    else:
        inputs["image_id"] = image_id(module, uri)
    inputs["name"] = p["name"]
    inputs["version"] = p["version"]
    inputs["metadata"] = p["metadata"]
    if p["signing_certificate"]:
        try:
            inputs["signing_certificate_sha256"] = file_sha256(p["signing_certificate"])
        except OSError as exc:
            module.fail_json(msg=f"signing_certificate {p['signing_certificate']}: {exc.strerror}")
        key = p["private_key"]
        inputs["private_key"] = key if key.startswith("arn:") else "sha256:" + file_sha256_or_fail(module, key)
    try:
        inputs["nitro_cli_version"] = cli.version()
    except NitroCliError as exc:
        module.fail_json(msg=f"nitro-cli --version failed: {exc}")
    inputs["nitro_cli_blobs"] = os.environ.get("NITRO_CLI_BLOBS")
    return inputs


def file_sha256_or_fail(module: AnsibleModule, path: str) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        module.fail_json(msg=f"private_key {path}: {exc.strerror} (give a PEM file or a KMS key ARN)")
    return ""


def comparable(inputs: dict[str, Any] | None) -> dict[str, Any]:
    """The record minus what the build itself produces."""
    if not isinstance(inputs, dict):
        return {}
    out = {k: v for k, v in inputs.items() if k not in ("eif_sha384", "built_image_id", "signed_by")}
    if "docker_dir" in out:
        out.pop("image_id", None)
    return out


def present(module: AnsibleModule) -> None:
    p = module.params
    path = p["path"]
    record_path = path + RECORD_SUFFIX
    measurements_path = p["measurements_file"] or path + ".measurements.json"
    if not os.path.isdir(os.path.dirname(path) or "."):
        module.fail_json(msg=f"path {path}: directory {os.path.dirname(path)} does not exist")
    try:
        cli = NitroCli(p["nitro_cli_path"], timeout=p["timeout"])
    except NitroCliError as exc:
        module.fail_json(msg=str(exc))

    inputs = build_inputs(module, cli)
    record = load_json(record_path)
    reasons: list[str] = []
    image = None
    if os.path.exists(path):
        try:
            image = read_eif(path, file_digest=True)
        except EifError as exc:
            reasons.append(f"the existing EIF is unreadable ({exc})")
    else:
        reasons.append("the EIF does not exist")
    if p["force"]:
        reasons.append("force: true")
    if record is None:
        reasons.append(f"no inputs record {record_path}")
    else:
        before, after = comparable(record), comparable(inputs)
        if inputs.get("image_id") is None and "docker_dir" not in inputs:
            reasons.append(f"image {inputs['docker_uri']} is not in the local Docker engine (nitro-cli will pull it)")
        changed_keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed_keys:
            reasons.append("inputs changed: " + ", ".join(changed_keys))
        if image is not None and record.get("eif_sha384") != image.file_sha384:
            reasons.append("the EIF's bytes differ from the ones recorded at build time")
    build = bool(reasons)
    result: dict[str, Any] = {
        "changed": build,
        "built": build,
        "reasons": reasons,
        "path": path,
        "measurements_file": measurements_path,
    }
    if module._diff and build:
        result["diff"] = diff_result(comparable(record), comparable(inputs), record_path)
    if build and module.check_mode:
        result["inputs"] = inputs
        result["image_digest"] = inputs.get("image_id")
        if image is not None:
            result["measurements"] = image.measurements
            result["eif_sha384"] = image.file_sha384
            result["min_memory_mib"] = min_memory_mib(image.file_size)
        module.exit_json(**result)

    if not build:
        refuse_placeholder(module, image)
    if build:
        image = run_build(module, cli, inputs)
        if "docker_dir" in inputs or inputs.get("image_id") is None:
            inputs["built_image_id"] = image_id(module, inputs["docker_uri"])
            inputs.setdefault("image_id", None)
            if inputs["image_id"] is None:
                inputs["image_id"] = inputs["built_image_id"]
        inputs["eif_sha384"] = image.file_sha384
        write_json_atomically(module, record_path, inputs)
    else:
        inputs = record

    digest = inputs.get("built_image_id") or inputs.get("image_id")
    artifact = {
        "Measurements": image.measurements,
        "ImageDigest": digest,
        "EifSha384": image.file_sha384,
        "EifPath": os.path.abspath(path),
    }
    if load_json(measurements_path) != artifact:
        result["changed"] = True
        result["measurements_file_changed"] = True
        if not module.check_mode:
            write_json_atomically(module, measurements_path, artifact)
    result.update(image_facts(image), image_digest=digest, inputs=inputs)
    module.exit_json(**result)


def signed(module: AnsibleModule) -> None:
    """state=signed: sign the EIF at `path` (or a copy of `src` into `path`) unless `path` is signed by that
    certificate, covers its PCR0 and, with `src`, measures what `src` measures (PCR0-2)."""
    p = module.params
    path, src = p["path"], p["src"]
    try:
        source = read_eif(src or path, file_digest=True)
        # With src, path is the signed copy of an earlier run, or nothing yet.
        image = source if not src else read_eif(path, file_digest=True) if os.path.exists(path) else None
    except EifError as exc:
        module.fail_json(msg=f"{'src' if src else 'path'} {src or path}: {exc}")
    try:
        with open(p["signing_certificate"], "rb") as handle:
            wanted = pcr8_from_certificate(handle.read())
    except (OSError, EifError) as exc:
        module.fail_json(msg=f"signing_certificate {p['signing_certificate']}: {getattr(exc, 'strerror', None) or exc}")
    info = signature_info(image) if image is not None else {"signed": False}
    same = image is not None and all(image.pcrs[k] == source.pcrs[k] for k in ("PCR0", "PCR1", "PCR2"))
    done = (
        same
        and info["signed"]
        and info["pcr8"] == wanted
        and info["covers_pcr0"]
        and info["signature_verified"] is not False
    )
    result: dict[str, Any] = {
        "changed": not done,
        "path": path,
        "signature": info,
        "measurements": source.measurements,
        "signer_pcr8": wanted,
    }
    if not done:
        result["reasons"] = [
            f"{path} is not a signed copy of {src}"
            if not same
            else "the EIF is not signed"
            if not info["signed"]
            else f"the EIF is signed by PCR8 {info['pcr8']}, not by {p['signing_certificate']} (PCR8 {wanted})"
            if info["pcr8"] != wanted
            else "the EIF's signature does not cover it"
        ]
        if module._diff:
            result["diff"] = {"before": {"PCR8": info.get("pcr8")}, "after": {"PCR8": wanted}, "before_header": path}
    if done or module.check_mode:
        size = image.file_size if done else source.file_size
        result.update(
            measurements={**source.measurements, "PCR8": wanted},
            eif_sha384=image.file_sha384 if done else source.file_sha384,
            size=size,
            min_memory_mib=min_memory_mib(size),
        )
        module.exit_json(**result)
    image = sign_copy(module, src, path) if src else sign_in_place(module, path, source.file_sha384)
    result.update(image_facts(image))
    module.exit_json(**result)


def run_sign_eif(module: AnsibleModule, eif_path: str) -> None:
    p = module.params
    try:
        argv = ["sign-eif", "--eif-path", eif_path]
        NitroCli(p["nitro_cli_path"], timeout=p["timeout"]).run(
            [*argv, "--signing-certificate", p["signing_certificate"], "--private-key", p["private_key"]],
            parse_json=False,
        )
    except NitroCliError as exc:
        module.fail_json(msg=f"sign-eif failed: {exc}", nitro_cli_error=exc.as_dict())


def sign_copy(module: AnsibleModule, src: str, path: str) -> Any:
    """Sign a copy of `src` beside `path`, then move it into place (a failure leaves `path` as it was);
    the measurements artifact of `path` is `src`'s, updated to the signed bytes."""
    with atomic_path(path) as tmp:
        shutil.copyfile(src, tmp)
        run_sign_eif(module, tmp)
        try:
            read_eif(tmp)  # an unreadable result never replaces path
        except EifError as exc:
            module.fail_json(msg=f"nitro-cli sign-eif left an unreadable EIF: {exc}")
    # Read where it now is: the image's facts read its file again (the temporary name is gone).
    image = read_eif(path, file_digest=True)
    artifact = load_json(src + ".measurements.json")
    artifact = artifact if isinstance(artifact, dict) else {}
    artifact.update(Measurements=image.measurements, EifSha384=image.file_sha384, EifPath=path)
    write_json_atomically(module, module.params["measurements_file"] or path + ".measurements.json", artifact)
    return image


def sign_in_place(module: AnsibleModule, path: str, before_sha384: str) -> Any:
    run_sign_eif(module, path)
    try:
        image = read_eif(path, file_digest=True)
    except EifError as exc:
        module.fail_json(msg=f"nitro-cli sign-eif left an unreadable EIF at {path}: {exc}")
    record_path = path + RECORD_SUFFIX
    record = load_json(record_path)
    if isinstance(record, dict) and record.get("eif_sha384") == before_sha384:
        # The built EIF, now signed: O(state=present) must see these bytes as the ones it built.
        record.update(eif_sha384=image.file_sha384, signed_by=signature_info(image)["pcr8"])
        write_json_atomically(module, record_path, record)
    measurements_path = module.params["measurements_file"] or path + ".measurements.json"
    artifact = load_json(measurements_path)
    if isinstance(artifact, dict) and artifact.get("EifSha384") == before_sha384:
        artifact.update(Measurements=image.measurements, EifSha384=image.file_sha384)
        write_json_atomically(module, measurements_path, artifact)
    return image


def refuse_placeholder(module: AnsibleModule, image: Any) -> None:
    """On a Nitro host an EIF from the emulator's placeholder blobs is useless: fail, saying what to do."""
    try:
        require_runnable_here(image)
    except EifError as exc:
        module.fail_json(msg=f"path {module.params['path']}: {exc}", placeholder_blobs=True)


def run_build(module: AnsibleModule, cli: NitroCli, inputs: dict[str, Any]) -> Any:
    p = module.params
    path = p["path"]
    directory = os.path.dirname(path) or "."
    metadata_file = None
    try:
        if p["metadata"] is not None:
            fd, metadata_file = tempfile.mkstemp(prefix=".nitro_eif.metadata.", suffix=".json", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(p["metadata"], handle)
        # nitro-cli writes the EIF beside its final name; it replaces the old one only once it reads back.
        with atomic_path(path, 0o644, move=module.atomic_move, suffix=".eif") as tmp_eif:
            try:
                cli.build_enclave(
                    inputs["docker_uri"],
                    tmp_eif,
                    docker_dir=p["docker_dir"],
                    name=p["name"],
                    version=p["version"],
                    metadata_file=metadata_file,
                    signing_certificate=p["signing_certificate"],
                    private_key=p["private_key"],
                    timeout=p["timeout"],
                )
            except NitroCliError as exc:
                module.fail_json(msg=f"build-enclave failed: {exc}", nitro_cli_error=exc.as_dict())
            try:
                image = read_eif(tmp_eif, file_digest=True)
            except EifError as exc:
                module.fail_json(msg=f"nitro-cli build-enclave produced an unreadable EIF: {exc}")
            refuse_placeholder(module, image)
        image.path = path
        return image
    finally:
        if metadata_file and os.path.exists(metadata_file):
            os.unlink(metadata_file)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True, aliases=["eif_path", "output_file"]),
            state=dict(type="str", default="present", choices=["present", "signed", "described"]),
            src=dict(type="path"),
            docker_uri=dict(type="str"),
            docker_dir=dict(type="path"),
            name=dict(type="str"),
            version=dict(type="str"),
            metadata=dict(type="dict"),
            signing_certificate=dict(type="path"),
            private_key=dict(type="str", no_log=False),
            measurements_file=dict(type="path"),
            force=dict(type="bool", default=False),
            timeout=dict(type="int", default=1800),
            nitro_cli_path=dict(type="path"),
        ),
        required_if=[
            ("state", "present", ("docker_uri",)),
            ("state", "signed", ("signing_certificate", "private_key")),
        ],
        required_together=[("signing_certificate", "private_key")],
        supports_check_mode=True,
    )
    if module.params["state"] == "described":
        described(module)
    if module.params["state"] == "signed":
        signed(module)
    present(module)


if __name__ == "__main__":
    main()
