#!/usr/bin/python
"""Ansible module host_files: directories and files in one run (logic in plugins/module_utils/host_files.py; the
controller side of O(files[].src) in plugins/action/host_files.py)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: host_files
short_description: Directories and files on a host, several in one module run
description:
  - Ensures directories exist and files hold the given content or a copy of a controller file, each with its
    owner, group and mode, in one module run. A role that wrote a configuration directory and two templates with
    M(ansible.builtin.file) and M(ansible.builtin.template) started five module runs (a template is a C(stat) and
    then a C(file) or C(copy)); an unchanged file from M(ansible.builtin.copy) into a directory is three.
  - A controller file (O(files[].src)) is compared by its SHA-1 first and sent only when it differs, then checked
    again on the host before it replaces the old one; unchanged, it costs no transfer and no second module run.
  - Directories are handled first, so files may go into them. A file is written atomically (a temporary file beside
    it, renamed over it) only when its content differs; owner, group and mode are set when they differ.
  - Content is given as text, for example from P(ansible.builtin.template#lookup).
version_added: "0.1.0"
author:
  - nitro-enclaves-ansible authors (@nitro-enclaves-ansible)
options:
  directories:
    description:
      - Directories to create when missing (with missing parents) and whose owner, group and mode to set.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: The directory.
        type: path
        required: true
      owner:
        description: Owner (name or uid); unset - left as it is.
        type: str
      group:
        description: Group (name or gid); unset - left as it is.
        type: str
      mode:
        description: Mode, as for M(ansible.builtin.file) (quote octal numbers, for example C("0755")).
        type: raw
  files:
    description:
      - Files and their content. The directory a file goes into must exist (or be listed in O(directories)).
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: The file.
        type: path
        required: true
      content:
        description:
          - The file's whole content, as text. Exactly one of O(files[].content) and O(files[].src).
        type: str
      src:
        description:
          - A file on the controller to copy, of any size and content (an EIF, an archive), found like
            M(ansible.builtin.copy) finds its C(src) (a role's C(files/) directory, or an absolute path).
          - Exactly one of O(files[].content) and O(files[].src).
        type: path
      owner:
        description: Owner (name or uid); unset - left as it is.
        type: str
      group:
        description: Group (name or gid); unset - left as it is.
        type: str
      mode:
        description: Mode, as for M(ansible.builtin.file) (quote octal numbers, for example C("0644")).
        type: raw
      backup:
        description: Keep the old content in a timestamped backup file beside it when the file changes.
        type: bool
        default: false
notes:
  - Check mode reports what would change and writes nothing (and sends nothing). Diff mode shows each changed
    file's text (up to 100 KiB), a copied file's SHA-1 before and after, and each changed owner, group or mode.
  - Content is shown in diff mode like M(ansible.builtin.template) shows it; do not put secrets in such files'
    content with O(files[].content) unless the task has C(no_log) and diff mode is off.
seealso:
  - module: ansible.builtin.template
  - module: ansible.builtin.copy
  - module: ansible.builtin.file
attributes:
  action:
    support: full
  async:
    support: none
  bypass_host_loop:
    support: none
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
"""

EXAMPLES = r"""
- name: The tokenizer's configuration directory and its two files
  nitro_enclaves.fleet.host_files:
    directories:
      - {path: /etc/nitro-enclaves/tokenizer, owner: root, group: root, mode: "0700"}
    files:
      - path: /etc/nitro-enclaves/tokenizer/vsock-proxy.yaml
        content: "{{ lookup('ansible.builtin.template', 'vsock-proxy.yaml.j2') }}"
        mode: "0644"
        backup: true
      - path: /etc/nitro-enclaves/tokenizer/gateway.yaml
        content: "{{ lookup('ansible.builtin.template', 'gateway.yaml.j2') }}"
        mode: "0600"
  register: tokenizer_files

- name: Restart the proxy only when its file changed
  ansible.builtin.debug:
    msg: restart
  when: "'/etc/nitro-enclaves/tokenizer/vsock-proxy.yaml' in tokenizer_files.changed_paths"
"""

RETURN = r"""
transfers:
  description: The files sent from the controller in this run (O(files[].src) that differed).
  returned: always
  type: list
  elements: str
  sample: [/opt/nitro-enclaves/tokenizer.eif]
changed_paths:
  description: The directories and files created or changed (or that would be, in check mode), in the order handled.
  returned: always
  type: list
  elements: str
  sample: [/etc/nitro-enclaves/tokenizer/gateway.yaml]
backup_files:
  description: Backup file of each file that changed with O(files[].backup=true) and existed before.
  returned: always
  type: dict
  sample: {/etc/nitro-enclaves/tokenizer/gateway.yaml: /etc/nitro-enclaves/tokenizer/gateway.yaml.1234.2026-12-02@18:00:00~}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.host_files import ensure_all

ATTRIBUTES = dict(owner=dict(type="str"), group=dict(type="str"), mode=dict(type="raw"))


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            directories=dict(
                type="list",
                elements="dict",
                default=[],
                options=dict(path=dict(type="path", required=True), **ATTRIBUTES),
            ),
            files=dict(
                type="list",
                elements="dict",
                default=[],
                options=dict(
                    path=dict(type="path", required=True),
                    content=dict(type="str"),
                    # Read on the controller by the action plugin, which sends _checksum (and _staged) instead.
                    src=dict(type="path"),
                    backup=dict(type="bool", default=False),
                    # Set by the action plugin for a controller file (src): its SHA-1 and, once sent, the copy.
                    _checksum=dict(type="str"),
                    _staged=dict(type="path"),
                    **ATTRIBUTES,
                ),
                required_one_of=[("content", "src")],
                mutually_exclusive=[("content", "src")],
            ),
        ),
        supports_check_mode=True,
    )
    unsent = [entry["path"] for entry in module.params["files"] if entry.get("src") and not entry.get("_checksum")]
    if unsent:
        module.fail_json(
            msg=f"files[].src of {unsent} is read on the controller by the action plugin host_files, which did not run"
        )
    module.exit_json(**ensure_all(module, module.params["directories"], module.params["files"]))


if __name__ == "__main__":
    main()
