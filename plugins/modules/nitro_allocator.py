#!/usr/bin/python
# Copyright: the nitro-enclaves-ansible authors
# Apache License 2.0 (see pyproject.toml)
"""Ansible module: manage /etc/nitro_enclaves/allocator.yaml and apply it."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nitro_allocator
short_description: Size the Nitro Enclaves allocator (CPU pool and hugepage memory)
description:
  - Manages C(/etc/nitro_enclaves/allocator.yaml), the file the C(nitro-enclaves-allocator) service reads to
    take CPUs and hugepage memory away from the parent instance for enclaves.
  - Writes only what the service's line parser accepts (a C(---) line first, C(memory_mib) and exactly one of
    C(cpu_count) or C(cpu_pool)), atomically, optionally keeping a backup.
  - Validates the request against the host before writing, reading the topology from sysfs and
    C(/proc/meminfo). CPU count greater than 0, not above the online CPUs minus CPU 0 and its siblings (the
    parent instance keeps them), a multiple of the threads per core, full cores only, never CPU 0 or its
    siblings, all CPUs on one NUMA node; memory at least 64 MiB and not above what the host can give
    (available memory plus the hugepages the allocator already holds). Each failure names the rule.
  - Compares the effective settings, not the text, so a packaged file with the same values and other comments is
    left alone.
  - When the settings changed (or the allocator has not applied them yet), re-runs the allocator. The service
    fails while enclaves run, so the module refuses up front unless O(terminate_running=true).
  - How the allocator is re-run is chosen by O(service_manager). With C(auto), hosts booted with systemd
    (C(/run/systemd/system) exists) restart and enable O(service_name) with C(systemctl); elsewhere (containers,
    CI) the module runs the allocator command directly, which on an emulated host (no C(/dev/nitro_enclaves))
    is C(nitro-cli-emulator allocator apply) and on a real host C(/usr/bin/nitro-enclaves-allocator).
version_added: "0.1.0"
author:
  - nitro-enclaves-ansible authors (@nitro-enclaves-ansible)
options:
  path:
    description:
      - Path of the allocator config file.
      - Defaults to the value of the E(NITRO_ALLOCATOR_CONFIG) environment variable when set (the emulator reads the
        same variable).
    type: path
    default: /etc/nitro_enclaves/allocator.yaml
  memory_mib:
    description:
      - Hugepage memory to reserve for enclaves, in MiB. At least 64.
      - Every enclave's C(memory_mib) must fit in it, and an enclave needs at least 4 times its EIF size.
      - Exactly one of O(memory_mib) and O(min_memory_mib) is required.
    type: int
  min_memory_mib:
    description:
      - Reserve at least this much memory, in MiB, keeping a larger C(memory_mib) the file already has.
      - Meant for a size derived from an EIF. A new, smaller EIF then needs no re-sizing (which fails while
        enclaves run), and a larger one grows the reservation.
    type: int
  cpu_count:
    description:
      - Number of CPUs to reserve; the allocator picks full cores on one NUMA node, never CPU 0's core.
      - Mutually exclusive with O(cpu_pool).
    type: int
  cpu_pool:
    description:
      - Exactly which CPUs to reserve, as a cpu-list string (V(2,3,6-9)) or a list of CPU numbers.
      - Mutually exclusive with O(cpu_count).
    type: raw
  backup:
    description: Keep a timestamped copy of the previous file next to it when the file changes.
    type: bool
    default: false
  restart:
    description:
      - Re-run the allocator (restart the service) when the settings changed or were never applied.
      - With V(false) the module only writes the file; the new settings apply at the next service start.
    type: bool
    default: true
  enabled:
    description: With systemd, also enable O(service_name) so the pool is reserved at boot.
    type: bool
    default: true
  terminate_running:
    description:
      - The allocator cannot re-online CPUs while any enclave runs, so a restart with enclaves running fails.
      - With V(false) (default) the module refuses and lists the running enclaves. With V(true) it terminates all
        enclaves first (C(nitro-cli terminate-enclave --all)).
    type: bool
    default: false
  service_manager:
    description:
      - How to re-run the allocator. V(auto) picks V(systemd) when the host was booted with systemd, else V(command).
    type: str
    choices: [auto, systemd, command]
    default: auto
  service_name:
    description: The allocator's systemd unit.
    type: str
    default: nitro-enclaves-allocator.service
  allocator_command:
    description:
      - The command V(command) mode runs. Default C(nitro-cli-emulator allocator apply) on emulated hosts,
        C(/usr/bin/nitro-enclaves-allocator) on real ones.
    type: list
    elements: str
notes:
  - Supports check mode and diff mode (the diff is the file's text before and after).
  - With O(restart=true) and enclaves running, check mode fails the same way a real run would.
seealso:
  - name: Nitro Enclaves CLI installation (allocator)
    description: The allocator service, its configuration file and what it reserves.
    link: https://docs.aws.amazon.com/enclaves/latest/user/nitro-enclave-cli-install.html
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
- name: Reserve 2 CPUs and 1 GiB for enclaves
  nitro_allocator:
    memory_mib: 1024
    cpu_count: 2

- name: Pin the pool to explicit cores, keep a backup, terminate enclaves if the restart needs it
  nitro_allocator:
    memory_mib: 4096
    cpu_pool: "2,3,6-7"
    backup: true
    terminate_running: true

- name: Reserve what an EIF needs, never shrinking an existing reservation
  nitro_allocator:
    min_memory_mib: "{{ eif.min_memory_mib }}"
    cpu_count: 2

- name: Only write the file (the service applies it at next boot)
  nitro_allocator:
    memory_mib: 512
    cpu_pool: [2, 3]
    restart: false
"""

RETURN = r"""
config:
  description: The effective settings after the module ran.
  returned: always
  type: dict
  sample: {"memory_mib": 1024, "cpu_count": 2}
path:
  description: The config file.
  returned: always
  type: str
  sample: /etc/nitro_enclaves/allocator.yaml
file_changed:
  description: Whether the file was (or in check mode would be) rewritten.
  returned: always
  type: bool
restarted:
  description: Whether the allocator was (or in check mode would be) re-run.
  returned: always
  type: bool
terminated:
  description: Enclave IDs terminated before the restart (O(terminate_running=true)).
  returned: always
  type: list
  elements: str
service_manager:
  description: How the allocator was re-run, V(systemd) or V(command).
  returned: always
  type: str
allocator_output:
  description: Output of the allocator run (command mode) when it ran.
  returned: when restarted in command mode
  type: str
backup_file:
  description: The backup copy of the previous file.
  returned: when O(backup=true) and the file changed
  type: str
topology:
  description: The host facts the validation used.
  returned: always
  type: dict
  sample: {"online": "0-3", "parent_cpus": "0,2", "threads_per_core": 2, "numa_nodes": {"0": "0-3"},
           "memory_capacity_mib": 14000}
"""

import json
import os
import traceback
from typing import Any

from ansible.module_utils.basic import AnsibleModule, env_fallback
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.allocator import (
    AllocatorConfig,
    AllocatorConfigError,
    CpuListError,
    HostTopology,
    format_cpu_list,
    parse_allocator_yaml,
    parse_cpu_list,
    read_config_text,
    render_allocator_yaml,
    topology_facts,
    validate,
)
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.atomic_file import write_atomic
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.diff import diff_result
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_pool import read_ne_cpus
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.nitro_cli import (
    NitroCli,
    NitroCliError,
    NitroCliNotFound,
    find_emulator,
    is_emulated,
)

HEADER = "Managed by Ansible (nitro_allocator). Read by the nitro-enclaves-allocator service."
REAL_ALLOCATOR = "/usr/bin/nitro-enclaves-allocator"


def desired_memory(params: dict[str, Any], current: AllocatorConfig | None) -> int:
    if params["memory_mib"] is not None:
        return params["memory_mib"]
    return max(params["min_memory_mib"], current.memory_mib if current else 0)


def desired_config(module: AnsibleModule, current: AllocatorConfig | None, topology: HostTopology) -> AllocatorConfig:
    params = module.params
    memory_mib = desired_memory(params, current)
    pool = params["cpu_pool"]
    if pool is None:
        return AllocatorConfig(memory_mib=memory_mib, cpu_count=params["cpu_count"])
    try:
        if isinstance(pool, list):
            cpus = [int(str(item).strip()) for item in pool]
            if any(cpu < 0 for cpu in cpus) or not cpus:
                raise ValueError
        elif isinstance(pool, int) and not isinstance(pool, bool):
            cpus = [pool]
        else:
            # Bounded by the host before any range is expanded (validate() names the offline ones).
            highest = max(topology.online)
            cpus = parse_cpu_list(str(pool), highest, f" this host has (online: {format_cpu_list(topology.online)})")
    except (CpuListError, ValueError, TypeError) as exc:
        detail = f": {exc}" if str(exc) else ""
        shown = pool if len(str(pool)) <= 200 else str(pool)[:200] + "..."
        module.fail_json(
            msg=f"cpu_pool {shown!r} is not a CPU list{detail}; "
            "allowed: a cpu-list string like '2,3,6-9' or a list of CPU numbers like [2, 3]"
        )
    return AllocatorConfig(memory_mib=memory_mib, cpu_pool=tuple(sorted(set(cpus))))


def read_current(path: str) -> tuple[str | None, AllocatorConfig | None, str | None]:
    """(text, parsed config or None, parse error or None); AllocatorConfigError when it is not text."""
    text = read_config_text(path)
    if text is None:
        return None, None, None
    try:
        return text, parse_allocator_yaml(text, path), None
    except AllocatorConfigError as exc:
        return text, None, str(exc)


def choose_manager(requested: str) -> str:
    if requested != "auto":
        return requested
    # sd_booted(): systemd is PID 1 exactly when this directory exists.
    return "systemd" if os.path.isdir("/run/systemd/system") else "command"


def allocator_command(module: AnsibleModule, cli: NitroCli | None) -> list[str]:
    if module.params["allocator_command"]:
        return module.params["allocator_command"]
    if not is_emulated():
        return [REAL_ALLOCATOR]
    emulator = find_emulator()
    if (
        emulator is None
        and cli is not None
        and os.path.basename(os.path.realpath(cli.binary)).startswith("nitro-cli-emulator")
    ):
        emulator = cli.binary
    if emulator is None:
        module.fail_json(
            msg="emulated host (no /dev/nitro_enclaves) but nitro-cli-emulator was not found on PATH or next to "
            "the module's Python; install it (role nitro_cli) or set allocator_command"
        )
    return [emulator, "allocator", "apply"]


def systemd_state(module: AnsibleModule, unit: str) -> tuple[bool, bool]:
    systemctl = module.get_bin_path("systemctl", required=True)
    rc_active, _out, _err = module.run_command([systemctl, "is-active", "--quiet", unit])
    rc_enabled, _out, _err = module.run_command([systemctl, "is-enabled", "--quiet", unit])
    return rc_active == 0, rc_enabled == 0


def emulator_applied(module: AnsibleModule, cmd: list[str], config: AllocatorConfig) -> bool:
    """Whether the emulated allocator already holds `config` (``nitro-cli-emulator allocator show``)."""
    if not cmd or cmd[-1] != "apply":
        return False
    rc, out, _err = module.run_command([*cmd[:-1], "show"])
    if rc != 0:
        return False
    try:
        state = json.loads(out)
        cpu_ids = sorted(int(cpu) for cpu in state.get("cpu_ids") or [])
    except (ValueError, TypeError, AttributeError):
        return False
    if state.get("requested_memory_mib") != config.memory_mib:
        return False
    if config.cpu_count is not None:
        return state.get("mode") == "cpu_count" and len(cpu_ids) == config.cpu_count
    return state.get("mode") == "cpu_pool" and cpu_ids == sorted(config.cpu_pool or ())


def real_pool_applied(sysfs_root: str) -> bool:
    """On a Nitro host the driver's ne_cpus parameter is empty until the allocator ran."""
    return bool(read_ne_cpus(sysfs_root))


def write_atomically(module: AnsibleModule, path: str, text: str) -> None:
    # A new file gets 0644; atomic_move gives a replaced one the mode it had.
    write_atomic(path, text, 0o644, move=module.atomic_move, dir_mode=0o755)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(
                type="path",
                default="/etc/nitro_enclaves/allocator.yaml",
                fallback=(env_fallback, ["NITRO_ALLOCATOR_CONFIG"]),
            ),
            memory_mib=dict(type="int"),
            min_memory_mib=dict(type="int"),
            cpu_count=dict(type="int"),
            cpu_pool=dict(type="raw"),
            backup=dict(type="bool", default=False),
            restart=dict(type="bool", default=True),
            enabled=dict(type="bool", default=True),
            terminate_running=dict(type="bool", default=False),
            service_manager=dict(type="str", default="auto", choices=["auto", "systemd", "command"]),
            service_name=dict(type="str", default="nitro-enclaves-allocator.service"),
            allocator_command=dict(type="list", elements="str"),
            nitro_cli_path=dict(type="path"),
            sysfs_root=dict(type="path", default="/", fallback=(env_fallback, ["NITRO_EMULATOR_SYSFS_ROOT"])),
        ),
        required_one_of=[("cpu_count", "cpu_pool"), ("memory_mib", "min_memory_mib")],
        mutually_exclusive=[("cpu_count", "cpu_pool"), ("memory_mib", "min_memory_mib")],
        supports_check_mode=True,
    )
    params = module.params
    path = params["path"]
    try:
        before_text, current, parse_error = read_current(path)
    except AllocatorConfigError as exc:
        module.fail_json(msg=str(exc))
    try:
        topology = HostTopology.from_sysfs(params["sysfs_root"])
    except (OSError, CpuListError) as exc:
        module.fail_json(msg=f"cannot read the host CPU topology under {params['sysfs_root']}: {exc}")
    desired = desired_config(module, current, topology)
    pool = params["cpu_pool"]
    pool_text = ",".join(str(cpu) for cpu in pool) if isinstance(pool, list) else (None if pool is None else str(pool))
    problems = validate(desired, topology, pool_text)
    if problems:
        module.fail_json(
            msg="allocator settings rejected for this host: " + "; ".join(problems),
            problems=problems,
            topology=topology_facts(topology),
        )

    after_text = render_allocator_yaml(desired, header=HEADER)
    file_changed = current != desired
    result: dict[str, Any] = {
        "changed": False,
        "path": path,
        "config": desired.as_dict(),
        "file_changed": file_changed,
        "restarted": False,
        "terminated": [],
        "topology": topology_facts(topology),
    }
    if parse_error:
        module.warn(f"the current {path} is not valid for the allocator ({parse_error}); replacing it")
    if file_changed and module._diff:
        result["diff"] = diff_result(before_text, after_text, path)

    manager = choose_manager(params["service_manager"])
    result["service_manager"] = manager
    cli: NitroCli | None = None
    try:
        cli = NitroCli(params["nitro_cli_path"])
    except NitroCliNotFound as exc:
        if params["nitro_cli_path"]:
            module.fail_json(msg=str(exc))
        # Without nitro-cli nothing can have launched an enclave, so there is nothing to stop.
        cli = None

    needs_restart = False
    needs_enable = False
    cmd: list[str] = []
    if params["restart"]:
        if manager == "systemd":
            active, is_enabled = systemd_state(module, params["service_name"])
            needs_restart = file_changed or not active
            needs_enable = params["enabled"] and not is_enabled
        else:
            cmd = allocator_command(module, cli)
            if file_changed:
                needs_restart = True
            elif is_emulated():
                needs_restart = not emulator_applied(module, cmd, desired)
            else:
                needs_restart = not real_pool_applied(params["sysfs_root"])

    running: list[dict[str, Any]] = []
    if needs_restart and cli is not None:
        try:
            running = [e for e in cli.describe_enclaves() if e.get("State") != "EMPTY"]
        except NitroCliError as exc:
            module.fail_json(msg=f"cannot list enclaves before restarting the allocator: {exc}", **exc.as_dict())
    if running and not params["terminate_running"]:
        names = ", ".join(f"{e.get('EnclaveName')} ({e.get('EnclaveID')})" for e in running)
        module.fail_json(
            msg=(
                f"refusing to re-run the allocator for {path}: {len(running)} enclave(s) running ({names}). "
                "The allocator cannot re-online CPUs while enclaves run and would fail. Stop them first or set "
                "terminate_running: true"
            ),
            running=[e.get("EnclaveID") for e in running],
            **{k: v for k, v in result.items() if k not in ("changed", "diff")},
        )

    result["changed"] = file_changed or needs_restart or needs_enable
    result["restarted"] = needs_restart
    result["terminated"] = [e.get("EnclaveID") for e in running]
    if module.check_mode:
        module.exit_json(**result)

    if running and cli is not None:
        try:
            cli.terminate_all()
        except NitroCliError as exc:
            module.fail_json(msg=f"terminate_running: could not terminate the running enclaves: {exc}", **exc.as_dict())

    if file_changed:
        if params["backup"] and before_text is not None:
            result["backup_file"] = module.backup_local(path)
        try:
            write_atomically(module, path, after_text)
        except OSError as exc:
            module.fail_json(msg=f"cannot write {path}: {exc}", exception=traceback.format_exc())

    if manager == "systemd":
        systemctl = module.get_bin_path("systemctl", required=True)
        if needs_restart:
            rc, out, err = module.run_command([systemctl, "restart", params["service_name"]])
            if rc != 0:
                module.fail_json(
                    msg=f"{params['service_name']} failed to apply {path} (journalctl -u {params['service_name']}): "
                    + (err or out).strip(),
                    **result,
                )
        if needs_enable:
            rc, out, err = module.run_command([systemctl, "enable", params["service_name"]])
            if rc != 0:
                module.fail_json(msg=f"cannot enable {params['service_name']}: {(err or out).strip()}", **result)
    elif needs_restart:
        rc, out, err = module.run_command(cmd)
        result["allocator_output"] = (out + err).strip()
        if rc != 0:
            module.fail_json(
                msg=f"the allocator ({' '.join(cmd)}) rejected {path}: {(err or out).strip()}", rc=rc, **result
            )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
