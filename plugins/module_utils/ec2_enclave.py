"""Enclave-enabled EC2 instances: validation rules, planning and the EC2 calls behind `ec2_enclave_instance`.

Pure logic (rules, planning, result shapes) is separate from `EnclaveFleet`, which drives an EC2 client.
The client is either a plain boto3 client or amazon.aws's retrying wrapper (then every call passes
`aws_retry=True`, so throttling is retried with backoff). Errors from botocore propagate unchanged;
rule violations raise `EnclaveInstanceError` before any state-changing call.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .diff import diff_result

# States an instance can leave again; shutting-down/terminated instances are gone for our purposes.
LIVE_STATES = ("pending", "running", "stopping", "stopped")
RUNNING_STATES = ("pending", "running")
STOPPED_STATES = ("stopping", "stopped")
DEFAULT_MIN_VCPUS = 4  # x86 with SMT: one core for the parent (CPU 0 + sibling), one or more for the enclave

RULE_SUPPORT = "instance type must support Nitro Enclaves (DescribeInstanceTypes NitroEnclavesSupport == 'supported')"
RULE_METAL = "bare metal instance types cannot run Nitro Enclaves (only virtualized Nitro instances can)"
RULE_VCPUS = "instance type must have at least {min_vcpus} vCPUs (the enclave needs dedicated cores)"


class EnclaveInstanceError(Exception):
    """A rule or precondition the module refuses to break; raised before any state-changing call."""


# --- validation rules -----------------------------------------------------------------------------


def instance_type_violations(info: Mapping[str, Any], min_vcpus: int = DEFAULT_MIN_VCPUS) -> list[str]:
    """The enclave rules an instance type (a DescribeInstanceTypes entry) breaks, by name; empty if none."""
    violations = []
    support = info.get("NitroEnclavesSupport", "unsupported")
    if support != "supported":
        violations.append(f"{RULE_SUPPORT}; it is {support!r}")
    if info.get("BareMetal"):
        violations.append(RULE_METAL)
    vcpus = info.get("VCpuInfo", {}).get("DefaultVCpus")
    if vcpus is None or vcpus < min_vcpus:
        violations.append(f"{RULE_VCPUS.format(min_vcpus=min_vcpus)}; it has {vcpus}")
    return violations


def check_instance_types(
    infos: Mapping[str, Mapping[str, Any]],
    wanted: Iterable[str],
    min_vcpus: int = DEFAULT_MIN_VCPUS,
) -> None:
    """Raise EnclaveInstanceError naming every broken rule of every wanted type."""
    problems = []
    for name in sorted(set(wanted)):
        info = infos.get(name)
        if info is None:
            problems.append(f"{name}: unknown instance type (DescribeInstanceTypes does not list it)")
            continue
        problems.extend(f"{name}: {violation}" for violation in instance_type_violations(info, min_vcpus))
    if problems:
        raise EnclaveInstanceError("refusing: " + "; ".join(problems))


def validate_params(params: Mapping[str, Any]) -> None:
    """Argument rules AnsibleModule's spec cannot express."""
    if params.get("name") is None and not params.get("instance_ids"):
        raise EnclaveInstanceError("one of name or instance_ids is required")
    if params.get("instance_ids") and params.get("exact_count") is not None:
        raise EnclaveInstanceError("exact_count applies to name; with instance_ids the listed instances are the set")
    if params.get("exact_count") is not None and params["exact_count"] < 1:
        raise EnclaveInstanceError("exact_count must be at least 1 (this module never terminates instances)")
    if params.get("min_vcpus") is not None and params["min_vcpus"] < 2:
        raise EnclaveInstanceError("min_vcpus must be at least 2: the parent keeps one core, the enclave needs one")
    if params.get("wait_timeout") is not None and params["wait_timeout"] < 1:
        raise EnclaveInstanceError("wait_timeout must be a positive number of seconds")


# --- shapes ---------------------------------------------------------------------------------------


def tags_of(instance: Mapping[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}


def enclave_enabled(instance: Mapping[str, Any]) -> bool:
    return bool(instance.get("EnclaveOptions", {}).get("Enabled"))


def state_of(instance: Mapping[str, Any]) -> str:
    return instance["State"]["Name"]


def summarize(instance: Mapping[str, Any]) -> dict[str, Any]:
    """The module's return shape for one instance (snake_case like amazon.aws)."""
    launch_time = instance.get("LaunchTime")
    profile = instance.get("IamInstanceProfile") or {}
    return {
        "instance_id": instance["InstanceId"],
        "instance_type": instance.get("InstanceType"),
        "image_id": instance.get("ImageId"),
        "state": state_of(instance),
        "private_ip_address": instance.get("PrivateIpAddress"),
        "public_ip_address": instance.get("PublicIpAddress"),
        "private_dns_name": instance.get("PrivateDnsName"),
        "subnet_id": instance.get("SubnetId"),
        "vpc_id": instance.get("VpcId"),
        "availability_zone": instance.get("Placement", {}).get("AvailabilityZone"),
        "key_name": instance.get("KeyName"),
        "iam_instance_profile_arn": profile.get("Arn"),
        "launch_time": launch_time.isoformat() if hasattr(launch_time, "isoformat") else launch_time,
        "tags": tags_of(instance),
        "enclave_options": {"enabled": enclave_enabled(instance)},
    }


def diff_view(instances: Mapping[str, Mapping[str, Any]], launches: int = 0) -> dict[str, Any]:
    """What diff mode shows: per instance its state, enclave flag and tags; planned launches by placeholder."""
    view: dict[str, Any] = {
        iid: {"state": inst["state"], "enclave_options": dict(inst["enclave_options"]), "tags": dict(inst["tags"])}
        for iid, inst in sorted(instances.items())
    }
    for number in range(1, launches + 1):
        view[f"(new instance {number})"] = {"state": "running", "enclave_options": {"enabled": True}}
    return {"instances": view}


# --- planning -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What it takes to turn the current instances into the desired ones."""

    launch: int = 0
    enable_with_restart: list[str] = field(default_factory=list)  # running without enclaves: stop, modify, start
    enable_stopped: list[str] = field(default_factory=list)  # stopped without enclaves: modify, start
    start: list[str] = field(default_factory=list)  # stopped with enclaves: start
    tag: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> tags to add or correct
    surplus: list[str] = field(default_factory=list)  # more live instances than exact_count

    @property
    def changed(self) -> bool:
        return bool(self.launch or self.enable_with_restart or self.enable_stopped or self.start or self.tag)

    def actions(self) -> dict[str, Any]:
        return {
            "launch": self.launch,
            "enable_with_restart": list(self.enable_with_restart),
            "enable_stopped": list(self.enable_stopped),
            "start": list(self.start),
            "tag": sorted(self.tag),
        }


def plan(
    existing: Sequence[Mapping[str, Any]],
    desired_tags: Mapping[str, str],
    exact_count: int | None = None,
) -> Plan:
    """Plan for live instances `existing` (already filtered to the fleet). Never plans a termination."""
    result = Plan()
    for instance in existing:
        iid, state = instance["InstanceId"], state_of(instance)
        if not enclave_enabled(instance):
            (result.enable_with_restart if state in RUNNING_STATES else result.enable_stopped).append(iid)
        elif state in STOPPED_STATES:
            result.start.append(iid)
        current = tags_of(instance)
        missing = {key: value for key, value in desired_tags.items() if current.get(key) != value}
        if missing:
            result.tag[iid] = missing
    if exact_count is not None:
        if len(existing) > exact_count:
            # Oldest instances are kept; the newest are reported as surplus.
            ordered = sorted(existing, key=lambda inst: (str(inst.get("LaunchTime", "")), inst["InstanceId"]))
            result.surplus = [inst["InstanceId"] for inst in ordered[exact_count:]]
        result.launch = max(0, exact_count - len(existing))
    return result


def check_plan(plan_: Plan, allow_restart: bool, launch_ready: bool) -> None:
    """Refuse plans that need what the caller did not allow or provide."""
    if plan_.surplus:
        raise EnclaveInstanceError(
            f"found more instances than exact_count; surplus (newest): {', '.join(plan_.surplus)}. "
            "This module never terminates instances: terminate them (amazon.aws.ec2_instance state=absent) "
            "or raise exact_count"
        )
    if plan_.enable_with_restart and not allow_restart:
        raise EnclaveInstanceError(
            "instance(s) " + ", ".join(plan_.enable_with_restart) + " are running without Nitro Enclaves "
            "enabled; enabling needs a stop -> modify EnclaveOptions -> start cycle, which restarts them. "
            "Set allow_restart: true to allow the restart, or stop them first"
        )
    if plan_.launch and not launch_ready:
        raise EnclaveInstanceError(
            f"{plan_.launch} instance(s) must be launched to reach exact_count, which needs image_id and instance_type"
        )


def launch_request(
    count: int,
    *,
    image_id: str,
    instance_type: str,
    tags: Mapping[str, str],
    subnet_id: str | None = None,
    security_group_ids: Sequence[str] | None = None,
    key_name: str | None = None,
    iam_instance_profile: str | None = None,
    client_token: str | None = None,
) -> dict[str, Any]:
    """RunInstances parameters: the seed's `run-instances ... --enclave-options Enabled=true`."""
    request: dict[str, Any] = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "MinCount": count,
        "MaxCount": count,
        "EnclaveOptions": {"Enabled": True},
        "ClientToken": client_token or str(uuid.uuid4()),
    }
    if subnet_id:
        request["SubnetId"] = subnet_id
    if security_group_ids:
        request["SecurityGroupIds"] = list(security_group_ids)
    if key_name:
        request["KeyName"] = key_name
    if iam_instance_profile:
        kind = "Arn" if iam_instance_profile.startswith("arn:") else "Name"
        request["IamInstanceProfile"] = {kind: iam_instance_profile}
    if tags:
        tag_list = [{"Key": key, "Value": value} for key, value in sorted(tags.items())]
        request["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ]
    return request


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError (duck-typed: module_utils does not import botocore)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


# --- EC2 driver -----------------------------------------------------------------------------------


class EnclaveFleet:
    """Reads and changes EC2 for `ec2_enclave_instance`. Only `apply` changes state."""

    def __init__(
        self,
        client: Any,
        *,
        retrying: bool = True,
        waiter_delay: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        profile_retries: int = 6,
    ) -> None:
        self.client = client
        self.retrying = retrying
        self.waiter_delay = waiter_delay
        self.sleep = sleep
        self.profile_retries = profile_retries

    def _call(self, operation: str, **params: Any) -> Any:
        if self.retrying:
            params["aws_retry"] = True
        return getattr(self.client, operation)(**params)

    # reads

    def describe(self, *, name: str | None = None, instance_ids: Sequence[str] | None = None) -> list[dict]:
        params: dict[str, Any] = {}
        if instance_ids:
            params["InstanceIds"] = list(instance_ids)
        if name is not None:
            params["Filters"] = [
                {"Name": "tag:Name", "Values": [name]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ]
        instances: list[dict] = []
        while True:
            page = self._call("describe_instances", **params)
            for reservation in page.get("Reservations", []):
                instances.extend(reservation.get("Instances", []))
            token = page.get("NextToken")
            if not token:
                break
            params["NextToken"] = token
        return sorted(instances, key=lambda inst: inst["InstanceId"])

    def instance_types(self, names: Iterable[str]) -> dict[str, dict]:
        wanted = sorted(set(names))
        if not wanted:
            return {}
        try:
            answer = self._call("describe_instance_types", InstanceTypes=wanted)
        except Exception as exc:
            if error_code(exc) == "InvalidInstanceType":
                raise EnclaveInstanceError(f"refusing: unknown instance type among {', '.join(wanted)}: {exc}") from exc
            raise
        return {info["InstanceType"]: info for info in answer.get("InstanceTypes", [])}

    # the whole job

    def ensure(self, params: Mapping[str, Any], check_mode: bool) -> dict[str, Any]:
        """Validate, plan, and (unless check_mode) apply. Returns the module result (without changed/diff keys)."""
        validate_params(params)
        name, ids = params.get("name"), params.get("instance_ids") or []
        desired_tags = dict(params.get("tags") or {})
        exact_count = None
        warnings: list[str] = []
        if name is not None:
            desired_tags["Name"] = name
            exact_count = params.get("exact_count") or 1
            existing = self.describe(name=name)
        else:
            existing = self._adopt(ids)
        fleet_plan = plan(existing, desired_tags, exact_count)
        launch_ready = bool(params.get("image_id") and params.get("instance_type"))

        # The type rules come first: no restart or launch can help a type that cannot run enclaves.
        min_vcpus = params.get("min_vcpus") or DEFAULT_MIN_VCPUS
        wanted_types = {inst["InstanceType"] for inst in existing}
        if fleet_plan.launch and params.get("instance_type"):
            wanted_types.add(params["instance_type"])
        check_instance_types(self.instance_types(wanted_types), wanted_types, min_vcpus)
        check_plan(fleet_plan, bool(params.get("allow_restart")), launch_ready)
        if params.get("instance_type"):
            differing = [i["InstanceId"] for i in existing if i["InstanceType"] != params["instance_type"]]
            if differing:
                warnings.append(
                    f"instance(s) {', '.join(differing)} are not {params['instance_type']}; this module does not "
                    "change instance types (their own type passed the enclave rules)"
                )

        before = {inst["InstanceId"]: summarize(inst) for inst in existing}
        result: dict[str, Any] = {"actions": fleet_plan.actions(), "warnings": warnings, "launched_ids": []}
        if check_mode or not fleet_plan.changed:
            predicted = {iid: _predict(summary, fleet_plan) for iid, summary in before.items()}
            result.update(
                instances=list(predicted.values()),
                instance_ids=sorted(predicted),
                diff=diff_result(diff_view(before), diff_view(predicted, fleet_plan.launch)),
            )
            return result

        launched = self.apply(fleet_plan, params, desired_tags)
        touched = fleet_plan.enable_with_restart + fleet_plan.enable_stopped + fleet_plan.start + launched
        if params.get("wait", True) and touched:
            self.wait("instance_running", touched, params.get("wait_timeout", 600))
        final_ids = sorted(set(before) | set(launched))
        final = {inst["InstanceId"]: summarize(inst) for inst in self._describe_ids(final_ids)}
        result.update(
            instances=[final[iid] for iid in final_ids if iid in final],
            instance_ids=final_ids,
            launched_ids=launched,
            diff=diff_result(diff_view(before), diff_view(final)),
        )
        return result

    def _adopt(self, ids: Sequence[str]) -> list[dict]:
        try:
            found = self.describe(instance_ids=ids)
        except Exception as exc:
            if error_code(exc) in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
                raise EnclaveInstanceError(f"cannot adopt: {exc}") from exc
            raise
        missing = sorted(set(ids) - {inst["InstanceId"] for inst in found})
        gone = [inst["InstanceId"] for inst in found if state_of(inst) not in LIVE_STATES]
        if missing or gone:
            raise EnclaveInstanceError(
                "cannot adopt instance(s) that do not exist or are terminated: " + ", ".join(missing + gone)
            )
        return found

    def apply(self, fleet_plan: Plan, params: Mapping[str, Any], desired_tags: Mapping[str, str]) -> list[str]:
        """Execute a checked plan. Returns the ids of launched instances."""
        timeout = params.get("wait_timeout", 600)
        if fleet_plan.enable_with_restart:
            self._call("stop_instances", InstanceIds=fleet_plan.enable_with_restart)
        to_modify = fleet_plan.enable_with_restart + fleet_plan.enable_stopped
        if to_modify:
            # ModifyInstanceAttribute(EnclaveOptions) is refused unless the instance is fully stopped.
            self.wait("instance_stopped", to_modify, timeout)
            for iid in to_modify:
                self._call("modify_instance_attribute", InstanceId=iid, EnclaveOptions={"Enabled": True})
        to_start = to_modify + fleet_plan.start
        if fleet_plan.start:
            self.wait("instance_stopped", fleet_plan.start, timeout)  # a 'stopping' instance cannot start yet
        if to_start:
            self._call("start_instances", InstanceIds=to_start)
        for iid, tags in sorted(fleet_plan.tag.items()):
            self._call("create_tags", Resources=[iid], Tags=[{"Key": k, "Value": v} for k, v in sorted(tags.items())])
        if not fleet_plan.launch:
            return []
        request = launch_request(
            fleet_plan.launch,
            image_id=params["image_id"],
            instance_type=params["instance_type"],
            tags=desired_tags,
            subnet_id=params.get("subnet_id"),
            security_group_ids=params.get("security_group_ids"),
            key_name=params.get("key_name"),
            iam_instance_profile=params.get("iam_instance_profile"),
        )
        answer = self._run_instances(request)
        return sorted(inst["InstanceId"] for inst in answer.get("Instances", []))

    def _run_instances(self, request: Mapping[str, Any]) -> Any:
        # A freshly created instance profile takes seconds to become usable by EC2 (IAM is eventually
        # consistent); only that error is retried, with the same ClientToken so no duplicate launch.
        for attempt in range(self.profile_retries + 1):
            try:
                return self._call("run_instances", **request)
            except Exception as exc:
                message = str(exc).lower()
                profile_not_ready = error_code(exc) == "InvalidParameterValue" and "iam instance profile" in message
                if not profile_not_ready or attempt == self.profile_retries:
                    raise
                self.sleep(min(5 * (attempt + 1), 20))
        raise AssertionError("unreachable")

    def _describe_ids(self, ids: Sequence[str]) -> list[dict]:
        if not ids:
            return []
        for attempt in range(5):
            try:
                return self.describe(instance_ids=ids)
            except Exception as exc:
                # New instance ids can be briefly unknown to DescribeInstances (eventual consistency).
                if error_code(exc) != "InvalidInstanceID.NotFound" or attempt == 4:
                    raise
                self.sleep(2)
        raise AssertionError("unreachable")

    def wait(self, waiter_name: str, ids: Sequence[str], timeout: int) -> None:
        """Wait with boto3's waiter; timeout in seconds, polled every `waiter_delay`."""
        delay = max(1, min(self.waiter_delay, timeout))
        waiter = self.client.get_waiter(waiter_name)
        try:
            waiter.wait(
                InstanceIds=list(ids),
                WaiterConfig={"Delay": delay, "MaxAttempts": max(1, math.ceil(timeout / delay))},
            )
        except Exception as exc:
            if type(exc).__name__ == "WaiterError":
                state = waiter_name.removeprefix("instance_")
                raise EnclaveInstanceError(
                    f"timed out after {timeout} s waiting for {', '.join(ids)} to be {state}: {exc}"
                ) from exc
            raise


def _predict(summary: Mapping[str, Any], fleet_plan: Plan) -> dict[str, Any]:
    """The instance as it will be once the plan is applied (check mode's answer)."""
    predicted = dict(summary)
    iid = summary["instance_id"]
    if iid in fleet_plan.enable_with_restart or iid in fleet_plan.enable_stopped:
        predicted["enclave_options"] = {"enabled": True}
    if iid in fleet_plan.enable_with_restart or iid in fleet_plan.enable_stopped or iid in fleet_plan.start:
        predicted["state"] = "running"
    if iid in fleet_plan.tag:
        predicted["tags"] = {**summary["tags"], **fleet_plan.tag[iid]}
    return predicted
