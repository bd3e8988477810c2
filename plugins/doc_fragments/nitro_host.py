# Copyright: the nitro-enclaves-ansible authors
# Apache License 2.0 (see pyproject.toml)
"""Requirements and options the modules that talk to a Nitro host share (documented once, here)."""

from __future__ import annotations


class ModuleDocFragment:
    # nitro_cli_path: resolved by plugins/module_utils/nitro_cli.py find_nitro_cli().
    DOCUMENTATION = r"""
requirements:
  - python >= 3.11 on the host
  - nitro-cli (L(aws-nitro-enclaves-cli,https://github.com/aws/aws-nitro-enclaves-cli)), or on hosts without
    C(/dev/nitro_enclaves) the project's C(nitro-cli-emulator)
options:
  nitro_cli_path:
    description:
      - The nitro-cli binary. Default E(NITRO_CLI_BIN), then C(nitro-cli) on PATH, then C(/usr/bin/nitro-cli), then
        (hosts without C(/dev/nitro_enclaves) only) C(nitro-cli-emulator).
    type: path
"""

    # sysfs_root: read by plugins/module_utils/allocator.py and enclave_pool.py, like the emulator's allocator.
    SYSFS = r"""
options:
  sysfs_root:
    description:
      - Root under which the host's C(sys/...) (CPU topology, C(sys/module/nitro_enclaves/parameters/ne_cpus),
        hugepages) and C(proc/meminfo) are read. For tests and chroots.
      - Defaults to E(NITRO_EMULATOR_SYSFS_ROOT) when set, the same variable the emulator's allocator reads.
    type: path
    default: /
"""
