"""EC2 Nitro Enclaves options for the local endpoint: what moto 5.2 lacks.

moto 5.2.5 accepts `EnclaveOptions` on RunInstances and drops it (DescribeInstances never returns it),
rejects `DescribeInstanceAttribute(Attribute=enclaveOptions)` as an unknown attribute, has no handler
for `ModifyInstanceAttribute(EnclaveOptions=...)` and answers the `enclave-options.enabled`
DescribeInstances filter with a 500. This module patches moto's EC2 instance model and response
handlers (a thin layer; moto still does everything else) so clients see AWS's behaviour:

- RunInstances stores `EnclaveOptions.Enabled` (or the launch template's value) per instance; enabling it
  on an instance type whose `NitroEnclavesSupport` is not `supported`, or together with hibernation, is
  refused like AWS refuses it.
- DescribeInstances returns `EnclaveOptions: {Enabled: bool}` for every instance and honours the
  `enclave-options.enabled` filter.
- DescribeInstanceAttribute(Attribute=enclaveOptions) returns `{InstanceId, EnclaveOptions: {Enabled}}`.
- ModifyInstanceAttribute with `EnclaveOptions.Enabled` (or `Attribute=enclaveOptions` + `Value`) changes it
  only on a stopped instance, else `IncorrectInstanceState`, as for other stop-only attributes.

Response shapes come from botocore's ec2 model (moto serializes ActionResult objects through it):
`Instance.EnclaveOptions` (xml `enclaveOptions/enabled`), `InstanceAttribute.EnclaveOptions`.
"""

from __future__ import annotations

from typing import Any

from moto.core.responses import ActionResult, EmptyResult
from moto.ec2 import utils as ec2_utils
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto.ec2.models.instances import Instance
from moto.ec2.responses.instances import InstanceResponse

_ATTRIBUTE = "enclaveOptions"
_FILTER = "enclave-options.enabled"
_STORE = "_nitro_enclave_enabled"  # per-instance flag; absent on instances created before install()


class IncorrectInstanceState(EC2ClientError):
    def __init__(self, instance_id: str) -> None:
        # AWS's wording for stop-only attribute changes on a running instance.
        super().__init__("IncorrectInstanceState", f"The instance '{instance_id}' is not in the 'stopped' state.")


class UnsupportedEnclaveInstanceType(EC2ClientError):
    def __init__(self, instance_type: str) -> None:
        # AWS refuses this; the exact code/wording here is ours (not captured from AWS).
        super().__init__(
            "UnsupportedOperation",
            f"The instance type '{instance_type}' does not support Nitro Enclaves.",
        )


def _enclave_enabled(instance: Instance) -> bool:
    return bool(getattr(instance, _STORE, False))


def _enclave_options(instance: Instance) -> dict[str, bool]:
    return {"Enabled": _enclave_enabled(instance)}


def _as_bool(value: Any) -> bool | None:
    """Query values arrive as bools (model-parsed) or strings ('true'/'false')."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise EC2ClientError("InvalidParameterValue", f"Value ({value}) for parameter EnclaveOptions.Enabled is invalid.")


def _requested(response: InstanceResponse) -> bool | None:
    options = response._get_param("EnclaveOptions")
    if isinstance(options, dict):
        return _as_bool(options.get("Enabled"))
    return _as_bool(response._get_param("EnclaveOptions.Enabled"))


def _check_type_supports_enclaves(instance_type: str) -> None:
    info = INSTANCE_TYPES.get(instance_type)
    # Types moto does not know are let through: moto itself accepts any type unless validation is on.
    if info is not None and info.get("NitroEnclavesSupport") != "supported":
        raise UnsupportedEnclaveInstanceType(instance_type)


def _template_data(response: InstanceResponse) -> dict[str, Any]:
    template_arg = response._get_param("LaunchTemplate", {})
    if not template_arg:
        return {}
    template = response.ec2_backend._get_template_from_args(template_arg)
    return getattr(template, "data", None) or {}


def _associate_profile_with_all(response: InstanceResponse, instances: list[Instance]) -> None:
    """moto 5.2 attaches IamInstanceProfile to the first instance of a launch only; AWS to every one.

    Not enclave-specific, but every parent of a fleet needs the role KMS names, so fleets launched with
    MinCount > 1 must all carry it here too.
    """
    name = response._get_param("IamInstanceProfile.Name")
    arn = response._get_param("IamInstanceProfile.Arn")
    if not (name or arn):
        return
    backend = response.ec2_backend
    for instance in instances:
        if instance.id not in backend.iam_instance_profile_associations:
            backend.associate_iam_instance_profile(
                instance_id=instance.id, iam_instance_profile_name=name, iam_instance_profile_arn=arn
            )


def _run_instances(original: Any) -> Any:
    def run_instances(self: InstanceResponse) -> ActionResult:
        template = _template_data(self)
        enabled = _requested(self)
        if enabled is None:
            enabled = _as_bool((template.get("EnclaveOptions") or {}).get("Enabled"))
        if enabled:
            # moto's own default type when neither the request nor the template names one.
            _check_type_supports_enclaves(self._get_param("InstanceType") or template.get("InstanceType") or "m1.small")
            hibernation = self._get_param("HibernationOptions", {}) or {}
            if _as_bool(hibernation.get("Configured")):
                raise EC2ClientError(
                    "InvalidParameterCombination",
                    "You can't enable Nitro Enclaves and hibernation on the same instance.",
                )
        result = original(self)
        instances = result.result.instances
        for instance in instances:
            setattr(instance, _STORE, bool(enabled))
        _associate_profile_with_all(self, instances)
        return result

    return run_instances


def _describe_instance_attribute(original: Any) -> Any:
    def describe_instance_attribute(self: InstanceResponse) -> ActionResult:
        if self._get_param("Attribute") != _ATTRIBUTE:
            return original(self)
        self.error_on_dryrun()
        instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        return ActionResult({"InstanceId": instance.id, "EnclaveOptions": _enclave_options(instance)})

    return describe_instance_attribute


def _modify_instance_attribute(original: Any) -> Any:
    def modify_instance_attribute(self: InstanceResponse) -> Any:
        enabled = _requested(self)
        if enabled is None and self._get_param("Attribute") == _ATTRIBUTE:
            enabled = _as_bool(self._get_param("Value"))
            if enabled is None:
                raise EC2ClientError("MissingParameter", "The request must contain the parameter value")
        if enabled is None:
            return original(self)
        instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        self.error_on_dryrun()
        if instance.state != "stopped":
            raise IncorrectInstanceState(instance.id)
        if enabled:
            _check_type_supports_enclaves(instance.instance_type)
        setattr(instance, _STORE, enabled)
        return EmptyResult()

    return modify_instance_attribute


def install(**_: object) -> None:
    """Patch moto's EC2 so EnclaveOptions behave as on AWS. Idempotent."""
    if getattr(InstanceResponse, "_nitro_enclaves_installed", False):
        return
    # The serializer picks `EnclaveOptions` from the object as `enclave_options`.
    Instance.enclave_options = property(_enclave_options)  # type: ignore[attr-defined]
    Instance.enclave_options_enabled = property(_enclave_enabled)  # type: ignore[attr-defined]
    ec2_utils.filter_dict_attribute_mapping[_FILTER] = "enclave_options_enabled"
    InstanceResponse.run_instances = _run_instances(InstanceResponse.run_instances)  # type: ignore[method-assign]
    InstanceResponse.describe_instance_attribute = _describe_instance_attribute(  # type: ignore[method-assign]
        InstanceResponse.describe_instance_attribute
    )
    InstanceResponse.modify_instance_attribute = _modify_instance_attribute(  # type: ignore[method-assign]
        InstanceResponse.modify_instance_attribute
    )
    InstanceResponse._nitro_enclaves_installed = True  # type: ignore[attr-defined]
