#!/usr/bin/python
# Copyright: the nitro-enclaves-ansible authors
# Apache License 2.0 (see pyproject.toml)
"""Ansible module: run, relaunch or terminate a named Nitro enclave, or write its run configuration."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nitro_enclave
short_description: Run, relaunch or terminate a named AWS Nitro enclave, or write its run configuration
description:
  - Ensures an enclave identified by O(name) runs a given EIF with given resources, or is gone.
  - With O(state=configured) it only writes the enclave's run configuration to O(config_path), for a supervisor
    (C(enclave-supervisor), role nitro_enclave) to apply. That is nitro-cli's C(run-enclave --config) JSON plus
    the O(measurements) the EIF must have; nitro-cli ignores that key.
  - Idempotence compares what matters. The enclave of that name is left alone when it is C(RUNNING) with the
    same PCR0, PCR1 and PCR2 as O(eif_path) (measured locally, no nitro-cli needed for that), the same CPU count or
    CPU ids, the same memory, the same CID (when O(enclave_cid) is set) and the same debug flag. Anything different
    terminates it and launches it again; the diff shows before and after.
  - Launches and terminations are serialized per host with a lock file, because concurrent C(nitro-cli run-enclave)
    calls fail.
  - Before anything changes (also in check mode), the CPUs, memory and CID are checked against the pool the
    allocator applied (C(ne_cpus) and the hugepages on a Nitro host, the emulated allocator's record on an emulated
    one), minus what other running enclaves hold; a request that cannot fit fails naming the value and the pool,
    so a bad value never takes a healthy enclave down. Without an applied pool there is no such check.
  - Works the same with the real nitro-cli and with the project's emulator (hosts without C(/dev/nitro_enclaves)).
version_added: "0.1.0"
author:
  - nitro-enclaves-ansible authors (@nitro-enclaves-ansible)
options:
  name:
    description:
      - The enclave name (C(--enclave-name)); the identity this module manages.
      - Letters, digits, C(.), C(_) and C(-), starting with a letter or digit, at most 64 characters.
    type: str
    required: true
  state:
    description:
      - V(running) launches the enclave unless an identical one runs. V(restarted) always terminates and launches
        again. V(absent) terminates every enclave with that name.
      - V(configured) writes the run configuration to O(config_path) (atomically, with check and diff mode). The EIF
        is not read, only its size checked against O(memory_mib); the only nitro-cli call is C(describe-enclaves),
        when an allocator pool is applied and the configuration changes, to count what other enclaves hold.
    type: str
    choices: [running, absent, restarted, configured]
    default: running
  eif_path:
    description:
      - The enclave image file. Required unless O(state=absent).
      - Must be a regular file; a directory, device, FIFO or socket is refused before it is read.
    type: path
  measurements:
    description:
      - The PCR0, PCR1 and PCR2 (hex) the EIF must measure, as recorded when it was built (M(nitro_enclaves.fleet.nitro_eif) returns
        them).
      - Keys are case-sensitive. C(HashAlgorithm) and C(PCR8) (the rest of what M(nitro_enclaves.fleet.nitro_eif) returns) are accepted
        and not compared; any other key (for example C(pcr0)) is refused, so a typo never turns pinning off.
      - With O(state=running) or O(state=restarted) an EIF that measures differently is refused before any
        enclave is touched. With O(state=configured) they are written into the configuration.
    type: dict
  signer_pcr8:
    description:
      - Require O(eif_path) to be signed (C(nitro-cli build-enclave --signing-certificate), C(sign-eif)) by a
        certificate whose PCR8 is one of these (96 hex characters, as C(nitro-cli pcr --signing-certificate)
        prints it), with a signature that covers the image's PCR0.
      - An EIF that is unsigned, signed by another certificate, or changed after signing is refused before any
        enclave is touched (also with O(state=configured) and in check mode); the message names the PCR8 found
        and the ones allowed. Where C(cryptography) is importable the ECDSA signature is verified too (nitro-cli
        verifies it at launch anyway).
    type: list
    elements: str
  signer_certificate_sha384:
    description:
      - Like O(signer_pcr8), naming the allowed certificates by their SHA-384 fingerprint (of the DER, as
        C(openssl x509 -noout -fingerprint -sha384) prints it without colons). Both options may be combined.
    type: list
    elements: str
  config_path:
    description: The run configuration file to write. Required with O(state=configured); its directory must exist.
    type: path
  backup:
    description: With O(state=configured), keep a timestamped copy of the previous configuration when it changes.
    type: bool
    default: false
  cpu_count:
    description:
      - Number of vCPUs (full cores; the allocator pool must hold them), 1 to 448 (the largest EC2 instance's
        vCPUs). Mutually exclusive with O(cpu_ids).
    type: int
  cpu_ids:
    description:
      - Exactly which CPUs from the allocator pool to use, each 0 to 447, none twice. Mutually exclusive with
        O(cpu_count).
    type: list
    elements: int
  memory_mib:
    description:
      - Enclave memory in MiB. At least 64 and at least 4 times the EIF file size, at most 25165824 (24 TiB, the
        largest EC2 instance's memory). Required unless O(state=absent).
      - nitro-cli may round the reported memory up to the hugepage size (2 MiB); that rounding is not a change.
    type: int
  enclave_cid:
    description:
      - The enclave's vsock CID, 4 to 4294967294. When unset the CID is assigned at launch and not compared.
    type: int
  debug_mode:
    description:
      - Launch in debug mode (console available).
      - In debug mode the attestation document's PCR0, PCR1 and PCR2 are all zeros, so KMS keys bound to the image
        measurements (C(kms:RecipientAttestation:ImageSha384) / C(PCRn) conditions) refuse the enclave. Refused
        unless O(allow_debug_mode=true).
    type: bool
    default: false
  allow_debug_mode:
    description: Accept O(debug_mode=true) knowing that PCR-bound KMS keys will not work (development only).
    type: bool
    default: false
  wait_for:
    description:
      - After the enclave runs, wait until it accepts connections on a vsock port.
      - Uses emulated vsock (UNIX socket C($NITRO_VSOCK_DIR/<cid>/<port>)) when E(NITRO_VSOCK_DIR) is set or the host
        is emulated, else C(AF_VSOCK).
    type: dict
    suboptions:
      port:
        description: The vsock port the enclave application listens on.
        type: int
        required: true
      timeout:
        description: Seconds to wait, 0 to 86400.
        type: int
        default: 60
  timeout:
    description: Seconds each nitro-cli call may take, 0 to 86400.
    type: int
    default: 300
  lock_file:
    description: The per-host launch lock. Default C($NITRO_CLI_SOCKETS_PATH/.ansible-launch.lock).
    type: path
  lock_timeout:
    description: Seconds to wait for another launch on the same host to finish, 0 to 86400.
    type: int
    default: 300
notes:
  - Supports check mode and diff mode.
seealso:
  - module: nitro_enclaves.fleet.nitro_eif
  - module: nitro_enclaves.fleet.nitro_allocator
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
extends_documentation_fragment:
  - nitro_enclaves.fleet.nitro_host
  - nitro_enclaves.fleet.nitro_host.sysfs
  - ansible.builtin.action_common_attributes
"""

EXAMPLES = r"""
- name: Run the tokenizer enclave and wait for its vsock port
  nitro_enclave:
    name: tokenizer
    eif_path: /opt/enclaves/tokenizer.eif
    cpu_count: 2
    memory_mib: 1024
    enclave_cid: 16
    wait_for:
      port: 5000
      timeout: 120

- name: Pin CPUs
  nitro_enclave:
    name: tokenizer
    eif_path: /opt/enclaves/tokenizer.eif
    cpu_ids: [2, 3]
    memory_mib: 1024

- name: Terminate it
  nitro_enclave:
    name: tokenizer
    state: absent

- name: Configure it for enclave-supervisor, which launches only the EIF with these measurements
  nitro_enclave:
    name: tokenizer
    state: configured
    config_path: /etc/nitro_enclaves/enclaves/tokenizer.json
    eif_path: /opt/enclaves/tokenizer.eif
    cpu_count: 2
    memory_mib: 1024
    enclave_cid: 16
    measurements: "{{ eif.measurements }}"
    backup: true
"""

RETURN = r"""
enclave:
  description:
    - The nitro-cli C(describe-enclaves) record of the enclave (empty when absent). In check mode, the current
      record.
  returned: always
  type: dict
  sample:
    EnclaveName: tokenizer
    EnclaveID: i-0000000000000000-enc18f0c1a2b3c4d5e6
    ProcessID: 4242
    EnclaveCID: 16
    NumberOfCPUs: 2
    CPUIDs: [1, 3]
    MemoryMiB: 1024
    State: RUNNING
    Flags: NONE
    Measurements: {HashAlgorithm: "Sha384 { ... }", PCR0: "...", PCR1: "...", PCR2: "..."}
measurements:
  description: The measurements of O(eif_path) computed locally.
  returned: when O(state=running) or O(state=restarted)
  type: dict
config:
  description: The run configuration written (or that would be written in check mode).
  returned: when O(state=configured)
  type: dict
  sample: {"enclave_name": "tokenizer", "eif_path": "/opt/enclaves/tokenizer.eif", "memory_mib": 1024,
           "cpu_count": 2, "cpu_ids": null, "enclave_cid": 16, "debug_mode": false, "measurements": {"PCR0": "..."}}
backup_file:
  description: The copy of the previous configuration.
  returned: when O(state=configured), O(backup=true) and the file changed
  type: str
actions:
  description: What the module did (or would do in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: ["terminate i-0000000000000000-enc1 (memory_mib 512 -> 1024)", "run tokenizer"]
terminated:
  description: Enclave IDs terminated.
  returned: always
  type: list
  elements: str
waited:
  description: Seconds spent waiting for the vsock port.
  returned: when O(wait_for) is set and the enclave runs
  type: float
"""

import json
import os
import stat
from typing import Any

from ansible.module_utils.basic import AnsibleModule, env_fallback
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.atomic_file import write_atomic
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.diff import diff_result
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import EifError, open_regular, read_eif
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif_provenance import require_runnable_here
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif_signing import normalize_pins, signer_problems
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_pool import (
    enclave_pool_problems,
    read_applied_pool,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_spec import (
    argument_problem,
    differences,
    min_memory_mib,
    render_run_config,
    summary,
    unexpected_measurements,
    wanted,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_spec import (
    expected_measurements as spec_measurements,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.nitro_cli import (
    NitroCli,
    NitroCliError,
    is_emulated,
    launch_lock,
    wait_for_vsock,
)

MAX_RUN_CONFIG_BYTES = 1 << 20  # a run configuration is a few hundred bytes

DEBUG_REFUSAL = (
    "debug_mode: true refused: in debug mode the enclave's attestation documents carry all-zero PCR0, PCR1 and PCR2, "
    "so KMS keys whose policy is bound to the image measurements (kms:RecipientAttestation:ImageSha384 / PCRn) "
    "will refuse it. Set allow_debug_mode: true to launch it anyway (development only)."
)


def check_arguments(module: AnsibleModule) -> None:
    p = module.params
    problem = argument_problem(p)  # a bad value fails here, before any EIF is read
    if problem:
        module.fail_json(msg=problem)
    if p["state"] != "absent" and p["debug_mode"] and not p["allow_debug_mode"]:
        module.fail_json(msg=DEBUG_REFUSAL)
    try:
        for option in ("signer_pcr8", "signer_certificate_sha384"):
            p[option] = normalize_pins(p[option], option)
    except ValueError as exc:
        module.fail_json(msg=str(exc))


def check_signer(module: AnsibleModule, image: Any) -> None:
    """signer_pcr8 / signer_certificate_sha384: refuse an EIF not signed by an allowed certificate."""
    p = module.params
    problems = signer_problems(image, pcr8=p["signer_pcr8"], certificate_sha384=p["signer_certificate_sha384"])
    if problems:
        module.fail_json(
            msg=f"eif_path {p['eif_path']} is refused: {'; '.join(problems)}. Nothing was changed",
            problems=problems,
        )


def expected_measurements(module: AnsibleModule) -> dict[str, str]:
    """The measurements option, PCR0-2 only (check_arguments already refused bad keys and values)."""
    try:
        return spec_measurements(module.params["measurements"])
    except ValueError as exc:
        module.fail_json(msg=str(exc))


def check_memory(module: AnsibleModule, eif_size: int) -> None:
    # nitro-cli's E26 rule, checked here so the message names the option.
    minimum = min_memory_mib(eif_size)
    if module.params["memory_mib"] < minimum:
        module.fail_json(
            msg=f"memory_mib {module.params['memory_mib']} is too small for {module.params['eif_path']}: an enclave "
            f"needs at least 4 times the EIF size, {minimum} MiB"
        )


def measure(module: AnsibleModule) -> dict[str, str]:
    path = module.params["eif_path"]
    try:
        image = read_eif(path)
        require_runnable_here(image)  # a placeholder EIF never runs on a Nitro host
    except EifError as exc:
        module.fail_json(msg=f"eif_path {path}: {exc}")
    check_memory(module, image.file_size)
    check_signer(module, image)
    unexpected = unexpected_measurements(image.measurements, expected_measurements(module))
    if unexpected:
        module.fail_json(msg=f"eif_path {path} is not the expected image: {'; '.join(unexpected)}")
    return image.measurements


def check_pool(module: AnsibleModule, cli: NitroCli | None) -> None:
    """Refuse resources the allocator's applied pool cannot give, before anything changes: a configuration the
    driver would refuse (E22/E26/E27) must never replace one a healthy enclave runs with."""
    params = module.params
    pool = read_applied_pool(is_emulated(), params["sysfs_root"])
    if pool is None:
        return  # no pool applied yet (or unreadable): nitro-cli names the problem at launch
    others: list[dict[str, Any]] = []
    try:
        cli = cli or NitroCli(params["nitro_cli_path"], timeout=params["timeout"])
        others = [r for r in cli.describe_enclaves() if isinstance(r, dict) and r.get("EnclaveName") != params["name"]]
    except NitroCliError as exc:  # without the list the whole pool is assumed free
        module.warn(f"cannot list running enclaves to count what they hold: {exc}")
    problems = enclave_pool_problems(
        pool,
        cpu_count=params["cpu_count"] if params["cpu_ids"] is None else None,
        cpu_ids=params["cpu_ids"],
        memory_mib=params["memory_mib"],
        enclave_cid=params["enclave_cid"],
        others=[r for r in others if r.get("State") != "EMPTY"],
    )
    if problems:
        module.fail_json(
            msg="; ".join(problems) + ". Nothing was changed (the running enclave, if any, keeps its configuration)",
            problems=problems,
            pool={"cpu_ids": list(pool.cpus), "memory_mib": pool.memory_mib, "source": pool.source},
        )


def read_before(module: AnsibleModule, path: str) -> str | None:
    """The current run configuration's text (bytes decoded; a non-UTF-8 file is replaced with a warning)."""
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the run; it is refused below like any non-file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        module.fail_json(msg=f"config_path {path}: cannot read it: {exc.strerror}")
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            module.fail_json(msg=f"config_path {path} is not a regular file; remove it or choose another path")
        data = handle.read(MAX_RUN_CONFIG_BYTES + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        module.warn(f"config_path {path} is not UTF-8 text (byte offset {exc.start}: {exc.reason}); replacing it")
        return data.decode("utf-8", errors="replace")


def configure(module: AnsibleModule) -> None:
    """state=configured: write the run configuration atomically (check/diff mode, backup); no nitro-cli
    except describe-enclaves for the pool check of a changed configuration."""
    params = module.params
    path = params["config_path"]
    try:
        with open_regular(params["eif_path"]) as image:
            check_memory(module, os.fstat(image.fileno()).st_size)
    except EifError as exc:
        module.fail_json(msg=f"eif_path {params['eif_path']}: {exc}")
    if params["signer_pcr8"] or params["signer_certificate_sha384"]:
        try:
            check_signer(module, read_eif(params["eif_path"]))
        except EifError as exc:
            module.fail_json(msg=f"eif_path {params['eif_path']}: {exc}")
    text = render_run_config(params, expected_measurements(module))
    before = read_before(module, path)
    if before != text:
        # Only a configuration that replaces another needs the pool check (a describe-enclaves process):
        # an unchanged one is what the supervisor already runs with.
        check_pool(module, None)
    result: dict[str, Any] = {"changed": before != text, "config": json.loads(text), "path": path}
    if result["changed"] and module._diff:
        result["diff"] = diff_result(before, text, path)
    if result["changed"] and not module.check_mode:
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            module.fail_json(msg=f"config_path {path}: the directory {directory} does not exist")
        if params["backup"] and before is not None:
            result["backup_file"] = module.backup_local(path)
        write_atomic(path, text, 0o644, move=module.atomic_move)
    module.exit_json(**result)


def fail_cli(module: AnsibleModule, what: str, exc: NitroCliError, **extra: Any) -> None:
    module.fail_json(msg=f"{what}: {exc}", nitro_cli_error=exc.as_dict(), **extra)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="running", choices=["running", "absent", "restarted", "configured"]),
            eif_path=dict(type="path"),
            measurements=dict(type="dict"),
            signer_pcr8=dict(type="list", elements="str"),
            signer_certificate_sha384=dict(type="list", elements="str"),
            config_path=dict(type="path"),
            backup=dict(type="bool", default=False),
            cpu_count=dict(type="int"),
            cpu_ids=dict(type="list", elements="int"),
            memory_mib=dict(type="int"),
            enclave_cid=dict(type="int"),
            debug_mode=dict(type="bool", default=False),
            allow_debug_mode=dict(type="bool", default=False),
            wait_for=dict(
                type="dict",
                options=dict(port=dict(type="int", required=True), timeout=dict(type="int", default=60)),
            ),
            timeout=dict(type="int", default=300),
            lock_file=dict(type="path"),
            lock_timeout=dict(type="int", default=300),
            nitro_cli_path=dict(type="path"),
            sysfs_root=dict(type="path", default="/", fallback=(env_fallback, ["NITRO_EMULATOR_SYSFS_ROOT"])),
        ),
        mutually_exclusive=[("cpu_count", "cpu_ids")],
        required_if=[
            ("state", "running", ("eif_path", "memory_mib")),
            ("state", "running", ("cpu_count", "cpu_ids"), True),
            ("state", "restarted", ("eif_path", "memory_mib")),
            ("state", "restarted", ("cpu_count", "cpu_ids"), True),
            ("state", "configured", ("eif_path", "memory_mib", "config_path")),
            ("state", "configured", ("cpu_count", "cpu_ids"), True),
        ],
        supports_check_mode=True,
    )
    check_arguments(module)
    params = module.params
    state = params["state"]
    if state == "configured":
        configure(module)
    result: dict[str, Any] = {"changed": False, "enclave": {}, "actions": [], "terminated": []}
    measurements: dict[str, str] = {}
    if state != "absent":
        measurements = measure(module)
        result["measurements"] = measurements

    try:
        cli = NitroCli(params["nitro_cli_path"], timeout=params["timeout"])
    except NitroCliError as exc:
        module.fail_json(msg=str(exc))
    if state != "absent":
        check_pool(module, cli)

    try:
        if module.check_mode:
            apply(module, cli, measurements, result)
        else:
            with launch_lock(params["lock_file"], timeout=params["lock_timeout"]):
                apply(module, cli, measurements, result)
    except TimeoutError as exc:
        module.fail_json(msg=str(exc), **result)
    except OSError as exc:
        module.fail_json(msg=f"cannot take the launch lock: {exc}", **result)

    wait = params["wait_for"]
    if wait and state != "absent" and not module.check_mode and result["enclave"]:
        cid = int(result["enclave"]["EnclaveCID"])
        try:
            result["waited"] = round(wait_for_vsock(cid, wait["port"], timeout=wait["timeout"]), 3)
        except TimeoutError as exc:
            module.fail_json(msg=f"enclave {params['name']} is running but {exc}", **result)
    module.exit_json(**result)


def apply(module: AnsibleModule, cli: NitroCli, measurements: dict[str, str], result: dict[str, Any]) -> None:
    params = module.params
    state = params["state"]
    name = params["name"]
    try:
        records = cli.enclaves_named(name)
    except NitroCliError as exc:
        fail_cli(module, "describe-enclaves failed", exc)

    stale: list[dict[str, Any]] = []
    if state == "absent":
        stale = records
        for record in stale:
            result["actions"].append(f"terminate {record.get('EnclaveID')}")
    elif state == "restarted":
        stale = records
        for record in stale:
            result["actions"].append(f"terminate {record.get('EnclaveID')} (restart)")
    else:
        # Keep the first identical one; anything else with this name goes.
        keep = next((r for r in records if not differences(r, params, measurements)), None)
        stale = [r for r in records if r is not keep]
        for record in stale:
            why = ", ".join(differences(record, params, measurements)) or "duplicate name"
            result["actions"].append(f"terminate {record.get('EnclaveID')} ({why})")
        if keep is not None:
            result["enclave"] = keep
    launch = state != "absent" and not result["enclave"]
    if launch:
        result["actions"].append(f"run {name}")
    result["changed"] = bool(stale) or launch
    if module._diff and result["changed"]:
        before = summary(records[0]) if records else {}
        after = wanted(params, measurements) if state != "absent" else {}
        result["diff"] = diff_result(before, after, name)
    if module.check_mode:
        if records and not result["enclave"] and state != "absent":
            result["enclave"] = records[0]
        return

    for record in stale:
        try:
            cli.terminate_enclave(enclave_id=record["EnclaveID"])
        except NitroCliError as exc:
            fail_cli(module, f"terminate-enclave {record.get('EnclaveID')} failed", exc, **result)
        result["terminated"].append(record["EnclaveID"])
    if not launch:
        return
    try:
        run = cli.run_enclave(
            params["eif_path"],
            params["memory_mib"],
            cpu_count=params["cpu_count"],
            cpu_ids=params["cpu_ids"],
            enclave_cid=params["enclave_cid"],
            enclave_name=name,
            debug_mode=params["debug_mode"],
        )
    except NitroCliError as exc:
        fail_cli(module, f"run-enclave {name} failed", exc, **result)
    try:
        described = [r for r in cli.describe_enclaves() if r.get("EnclaveID") == run.get("EnclaveID")]
    except NitroCliError as exc:
        fail_cli(module, "describe-enclaves after run-enclave failed", exc, **result)
    record = described[0] if described else run
    result["enclave"] = record
    if record.get("EnclaveName") != name:
        module.fail_json(
            msg=f"nitro-cli named the new enclave {record.get('EnclaveName')!r}, not {name!r} (another enclave took the "
            "name meanwhile)",
            **result,
        )


if __name__ == "__main__":
    main()
