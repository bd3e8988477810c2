#!/usr/bin/python
"""Ansible module ec2_enclave_instance: EC2 instances with Nitro Enclaves enabled (logic in plugins/module_utils/ec2_enclave.py)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ec2_enclave_instance
short_description: Launch or adopt EC2 instances with Nitro Enclaves enabled
description:
  - Ensures EC2 instances exist with C(EnclaveOptions.Enabled=true), the Ansible form of the seed's
    C(aws ec2 run-instances ... --enclave-options Enabled=true) and of Terraform's
    C(aws_instance { enclave_options { enabled = true } }).
  - Selects the fleet either by O(name) (the C(Name) tag) with O(exact_count), launching the missing instances,
    or by O(instance_ids), adopting existing instances.
  - Instances found without enclaves are enabled with C(ModifyInstanceAttribute(EnclaveOptions)), which AWS accepts
    only on a stopped instance. A running instance is therefore stopped, modified and started again, and only when
    O(allow_restart=true); otherwise the module fails and says so. Stopped instances are modified and started.
  - Before any state-changing call it checks every instance type involved with C(DescribeInstanceTypes)
    and refuses, naming the rule, a type whose C(NitroEnclavesSupport) is not C(supported), a bare metal type,
    or a type with fewer than O(min_vcpus) vCPUs.
  - The module never terminates instances. If more instances carry the O(name) than O(exact_count), it fails
    and lists the surplus.
  - Tags in O(tags) (and C(Name)) are set at launch and added to existing instances that lack them or carry
    another value; other tags are left alone.
version_added: "0.1.0"
author:
  - nitro-enclaves-ansible authors (@nitro-enclaves-ansible)
options:
  name:
    description:
      - Value of the C(Name) tag that identifies the fleet. Live instances (pending, running, stopping, stopped)
        with this tag are the fleet.
      - Mutually exclusive with O(instance_ids).
    type: str
  exact_count:
    description:
      - How many instances named O(name) should exist. Missing ones are launched; a surplus is refused.
      - Only with O(name). Defaults to 1 when O(name) is given.
    type: int
  instance_ids:
    description:
      - Existing instances to adopt (enable enclaves on, start, tag). Every id must exist and not be terminated.
      - Mutually exclusive with O(name).
    type: list
    elements: str
  image_id:
    description:
      - AMI to launch. Required when instances must be launched.
    type: str
  instance_type:
    description:
      - Instance type to launch, for example C(m5.xlarge) or C(c6i.2xlarge). Required when instances must be launched.
      - Adopted instances keep their own type; it must pass the same rules.
    type: str
  subnet_id:
    description:
      - Subnet to launch into.
    type: str
  security_group_ids:
    description:
      - Security group ids for launched instances.
    type: list
    elements: str
  key_name:
    description:
      - EC2 key pair name for launched instances.
    type: str
  iam_instance_profile:
    description:
      - Instance profile name or ARN for launched instances; its role is the principal the KMS key policy names
        (and what PCR3 measures).
    type: str
  tags:
    description:
      - Tags for launched instances, also added to existing instances of the fleet. C(Name) comes from O(name).
    type: dict
    aliases: ['resource_tags']
  allow_restart:
    description:
      - Allow stopping and starting running instances to enable Nitro Enclaves on them.
    type: bool
    default: false
  min_vcpus:
    description:
      - Smallest vCPU count accepted. The parent keeps CPU 0 and its sibling thread; the enclave needs at least one
        full core of its own, hence 4 on x86 instances with two threads per core.
      - Graviton instances (one thread per core) can run an enclave with 2 vCPUs; set 2 for them deliberately.
    type: int
    default: 4
  wait:
    description:
      - Wait until launched, started or restarted instances are C(running).
      - Stopping before C(ModifyInstanceAttribute) is always waited for.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait for each state change (stopped, running).
    type: int
    default: 600
notes:
  - Check mode makes only read calls (C(DescribeInstances), C(DescribeInstanceTypes)) and reports what would change.
  - Diff mode shows each instance's state, enclave flag and tags before and after; planned launches appear as
    placeholders.
  - You cannot enable Nitro Enclaves and hibernation on the same instance; this module launches without hibernation.
  - Throttling errors are retried with jittered backoff (amazon.aws C(AWSRetry)).
seealso:
  - module: amazon.aws.ec2_instance
  - module: amazon.aws.ec2_instance_type_info
  - name: Nitro Enclaves requirements
    description: Supported instance types and vCPU rules.
    link: https://docs.aws.amazon.com/enclaves/latest/user/nitro-enclave.html#nitro-enclave-reqs
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
requirements:
  - python >= 3.11
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Three enclave hosts, launched if missing (seed step 1)
  ec2_enclave_instance:
    name: tokenizer-enclave-host
    exact_count: 3
    image_id: ami-0abcdef1234567890
    instance_type: m5.xlarge
    subnet_id: subnet-0123456789abcdef0
    security_group_ids: [sg-0123456789abcdef0]
    key_name: ops
    iam_instance_profile: enclave-parent
    tags:
      Role: enclave-host
      Environment: prod
  register: fleet

- name: Enable enclaves on existing instances, restarting them if they run
  ec2_enclave_instance:
    instance_ids: [i-0123456789abcdef0]
    allow_restart: true

- name: What would change (no state-changing calls)
  ec2_enclave_instance:
    name: tokenizer-enclave-host
    exact_count: 3
    image_id: ami-0abcdef1234567890
    instance_type: m5.xlarge
  check_mode: true
  diff: true

- name: Against the project's local AWS endpoint
  ec2_enclave_instance:
    name: test-host
    image_id: ami-12c6146b
    instance_type: m5.xlarge
    region: us-east-1
    endpoint_url: http://127.0.0.1:4566
"""

RETURN = r"""
instances:
  description: The fleet after the run (predicted in check mode; instances still to be launched are not listed).
  returned: always
  type: list
  elements: dict
  contains:
    instance_id:
      description: Instance id.
      type: str
      sample: i-0123456789abcdef0
    instance_type:
      description: Instance type.
      type: str
      sample: m5.xlarge
    image_id:
      description: AMI id.
      type: str
    state:
      description: Instance state name.
      type: str
      sample: running
    private_ip_address:
      description: Primary private IPv4 address.
      type: str
      sample: 10.0.1.23
    public_ip_address:
      description: Public IPv4 address, if any.
      type: str
    private_dns_name:
      description: Private DNS name.
      type: str
    subnet_id:
      description: Subnet id.
      type: str
    vpc_id:
      description: VPC id.
      type: str
    availability_zone:
      description: Availability zone.
      type: str
    key_name:
      description: Key pair name.
      type: str
    iam_instance_profile_arn:
      description: ARN of the attached instance profile, if any.
      type: str
    launch_time:
      description: Launch time (ISO 8601).
      type: str
    tags:
      description: All tags of the instance.
      type: dict
    enclave_options:
      description: Nitro Enclaves state of the instance.
      type: dict
      contains:
        enabled:
          description: Whether Nitro Enclaves are enabled.
          type: bool
          sample: true
instance_ids:
  description: Ids of the fleet's instances, sorted.
  returned: always
  type: list
  elements: str
launched_ids:
  description: Ids of instances launched by this run (empty in check mode).
  returned: always
  type: list
  elements: str
actions:
  description: What the run did (or, in check mode, would do).
  returned: always
  type: dict
  contains:
    launch:
      description: Number of instances launched.
      type: int
    enable_with_restart:
      description: Running instances stopped, enabled and started.
      type: list
      elements: str
    enable_stopped:
      description: Stopped instances enabled and started.
      type: list
      elements: str
    start:
      description: Stopped instances (already enabled) started.
      type: list
      elements: str
    tag:
      description: Instances whose tags were added or corrected.
      type: list
      elements: str
"""

import contextlib

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.ec2_enclave import EnclaveFleet, EnclaveInstanceError

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    import botocore

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry


def main() -> None:
    argument_spec = dict(
        name=dict(type="str"),
        exact_count=dict(type="int"),
        instance_ids=dict(type="list", elements="str"),
        image_id=dict(type="str"),
        instance_type=dict(type="str"),
        subnet_id=dict(type="str"),
        security_group_ids=dict(type="list", elements="str"),
        key_name=dict(type="str", no_log=False),
        iam_instance_profile=dict(type="str"),
        tags=dict(type="dict", aliases=["resource_tags"]),
        allow_restart=dict(type="bool", default=False),
        min_vcpus=dict(type="int", default=4),
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=600),
    )
    module = AnsibleAWSModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
        mutually_exclusive=[("name", "instance_ids")],
        required_one_of=[("name", "instance_ids")],
    )
    client = module.client("ec2", retry_decorator=AWSRetry.jittered_backoff(retries=10))
    try:
        result = EnclaveFleet(client).ensure(module.params, module.check_mode)
    except EnclaveInstanceError as exc:
        module.fail_json(msg=str(exc))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        module.fail_json_aws(exc, msg="EC2 call failed")
    diff = result.pop("diff")
    for warning in result.pop("warnings"):
        module.warn(warning)
    changed = any(result["actions"][key] for key in result["actions"])
    if module._diff:
        module.exit_json(changed=changed, diff=diff, **result)
    module.exit_json(changed=changed, **result)


if __name__ == "__main__":
    main()
