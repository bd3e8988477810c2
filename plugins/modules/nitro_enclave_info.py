#!/usr/bin/python
# Copyright: the nitro-enclaves-ansible authors
# Apache License 2.0 (see pyproject.toml)
"""Ansible module: what a Nitro host runs and holds (enclaves, an EIF, the allocator), read-only."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nitro_enclave_info
short_description: Describe a Nitro host's enclaves, an enclave image and the allocator
description:
  - Reads, never changes, what a Nitro Enclaves host has. C(nitro-cli describe-enclaves) for the running enclaves,
    C(nitro-cli describe-eif) for the image at O(path), and the allocator's configured settings
    (C(/etc/nitro_enclaves/allocator.yaml)), the pool it applied and the host's CPU/memory topology.
  - Returns the same data as results and as the C(nitro_enclaves) fact.
  - An image that does not exist yet (not built) is reported as RV(eif_exists=false), not as a failure; one that
    exists but nitro-cli cannot read fails the task.
version_added: "0.1.0"
author:
  - nitro-enclaves-ansible authors (@nitro-enclaves-ansible)
options:
  path:
    description:
      - The enclave image (EIF) to describe. Without it RV(eif) is V(null).
    type: path
  allocator_config:
    description:
      - The allocator's config file, as M(nitro_enclaves.fleet.nitro_allocator) O(nitro_enclaves.fleet.nitro_allocator#module:path).
      - Defaults to E(NITRO_ALLOCATOR_CONFIG) when set.
    type: path
    default: /etc/nitro_enclaves/allocator.yaml
notes:
  - Without nitro-cli (and not an emulated host) RV(enclaves) is empty and RV(nitro_cli) is V(null), since nothing
    can have launched an enclave; asking for O(path) then fails, as nothing can describe it.
seealso:
  - module: nitro_enclaves.fleet.nitro_enclave
  - module: nitro_enclaves.fleet.nitro_eif
  - module: nitro_enclaves.fleet.nitro_allocator
attributes:
  check_mode:
    support: full
    details: The module only reads, so check mode runs it the same way.
  diff_mode:
    support: N/A
  facts:
    support: full
  platform:
    platforms: posix
extends_documentation_fragment:
  - nitro_enclaves.fleet.nitro_host
  - nitro_enclaves.fleet.nitro_host.sysfs
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.facts
"""

EXAMPLES = r"""
- name: What runs here, what the image measures, what the allocator holds
  nitro_enclave_info:
    path: /opt/enclaves/tokenizer.eif
  register: nitro

- name: Fail when the running enclave is not the image on disk
  ansible.builtin.assert:
    that:
      - nitro.enclaves | selectattr('EnclaveName', 'eq', 'tokenizer')
        | map(attribute='Measurements.PCR0') | list == [nitro.eif.Measurements.PCR0]

- name: Only the running enclaves (facts for later plays)
  nitro_enclave_info:
- name: Show them
  ansible.builtin.debug:
    var: ansible_facts.nitro_enclaves.enclaves
"""

RETURN = r"""
enclaves:
  description: C(nitro-cli describe-enclaves), one record per enclave.
  returned: always
  type: list
  elements: dict
  sample:
    - EnclaveName: tokenizer
      EnclaveID: i-0123456789abcdef0-enc18c5f4e02bb1a3
      EnclaveCID: 16
      NumberOfCPUs: 2
      CPUIDs: [1, 5]
      MemoryMiB: 1024
      State: RUNNING
      Flags: NONE
nitro_cli:
  description: The nitro-cli binary that was run, V(null) when none was found.
  returned: always
  type: str
  sample: /usr/bin/nitro-cli
eif_exists:
  description: Whether O(path) exists. V(null) without O(path).
  returned: always
  type: bool
eif:
  description: C(nitro-cli describe-eif) of O(path); V(null) without O(path) or when the file does not exist.
  returned: always
  type: dict
  sample:
    EifVersion: 4
    Measurements:
      HashAlgorithm: Sha384 { ... }
      PCR0: 7fb5c55bc2ecbb68ed99a13d7122abfc0666b926a79d5379bc58b9445c84217f59cfdd36c08b2c79552928702efe23e4
allocator:
  description: The allocator's side of the host.
  returned: always
  type: dict
  contains:
    config_path:
      description: The config file read.
      type: str
      returned: always
    config:
      description: Its effective settings (C(memory_mib) and C(cpu_count) or C(cpu_pool)); V(null) when absent.
      type: dict
      returned: always
      sample: {memory_mib: 1024, cpu_count: 2}
    config_error:
      description: Why the file is not a valid allocator config, V(null) when it is (or is absent).
      type: str
      returned: always
    applied:
      description:
        - The pool enclaves launch from now (C(cpu_pool) cpu-list, C(memory_mib), C(source) it was read from);
          V(null) when none is applied.
      type: dict
      returned: always
      sample: {cpu_pool: "1,5", memory_mib: 1024, source: /sys/module/nitro_enclaves/parameters/ne_cpus}
    topology:
      description: The host's online CPUs, the CPUs the parent keeps, threads per core, NUMA nodes, memory.
      type: dict
      returned: always
ansible_facts:
  description: The same data under C(nitro_enclaves) (keys enclaves, nitro_cli, eif_exists, eif, allocator).
  returned: always
  type: dict
"""

import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule, env_fallback
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.allocator import (
    AllocatorConfigError,
    HostTopology,
    format_cpu_list,
    parse_allocator_yaml,
    read_config_text,
    topology_facts,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_pool import read_applied_pool
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.nitro_cli import (
    NitroCli,
    NitroCliError,
    NitroCliNotFound,
    is_emulated,
)


def allocator_facts(config_path: str, sysfs_root: str) -> dict[str, Any]:
    config: dict[str, Any] | None = None
    error: str | None = None
    try:
        text = read_config_text(config_path)
        if text is not None:
            config = dict(parse_allocator_yaml(text, config_path).as_dict())
    except AllocatorConfigError as exc:
        error = str(exc)
    pool = read_applied_pool(is_emulated(), sysfs_root)
    applied = (
        None
        if pool is None
        else {"cpu_pool": format_cpu_list(list(pool.cpus)), "memory_mib": pool.memory_mib, "source": pool.source}
    )
    try:
        topology: dict[str, Any] | None = topology_facts(HostTopology.from_sysfs(sysfs_root))
    except (OSError, ValueError):
        topology = None  # a chroot or container without sysfs: the rest is still worth reporting
    return {
        "config_path": config_path,
        "config": config,
        "config_error": error,
        "applied": applied,
        "topology": topology,
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path"),
            allocator_config=dict(
                type="path",
                default="/etc/nitro_enclaves/allocator.yaml",
                fallback=(env_fallback, ["NITRO_ALLOCATOR_CONFIG"]),
            ),
            nitro_cli_path=dict(type="path"),
            sysfs_root=dict(type="path", default="/", fallback=(env_fallback, ["NITRO_EMULATOR_SYSFS_ROOT"])),
        ),
        supports_check_mode=True,
    )
    params = module.params
    path = params["path"]
    try:
        cli: NitroCli | None = NitroCli(params["nitro_cli_path"])
    except NitroCliNotFound as exc:
        if params["nitro_cli_path"] or path:
            module.fail_json(msg=str(exc))
        cli = None
    facts: dict[str, Any] = {
        "nitro_cli": cli.binary if cli else None,
        "enclaves": [],
        "eif_exists": None if path is None else os.path.exists(path),
        "eif": None,
    }
    try:
        if cli is not None:
            facts["enclaves"] = cli.describe_enclaves()
        if cli is not None and facts["eif_exists"]:
            facts["eif"] = cli.describe_eif(path)
    except NitroCliError as exc:
        module.fail_json(msg=f"nitro-cli failed: {exc}", **exc.as_dict())
    facts["allocator"] = allocator_facts(params["allocator_config"], params["sysfs_root"])
    module.exit_json(changed=False, ansible_facts={"nitro_enclaves": facts}, **facts)


if __name__ == "__main__":
    main()
