"""EnclaveFleet behaviours a real moto server cannot provoke: IAM propagation retry, waiter timeout, retry flag.

The end-to-end behaviour (launch, adopt, restart, check mode) is tested against a real local endpoint in
tests/integration/ec2/.
"""

from __future__ import annotations

from typing import Any

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.ec2_enclave import EnclaveFleet, EnclaveInstanceError
from botocore.exceptions import ClientError, WaiterError


def client_error(code: str, message: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "RunInstances")


class ScriptedClient:
    """Answers each operation from a queue of results or exceptions; records calls and their kwargs."""

    def __init__(self, script: dict[str, list[Any]]) -> None:
        self.script = script
        self.calls: list[tuple[str, dict]] = []

    def __getattr__(self, operation: str) -> Any:
        def call(**kwargs: Any) -> Any:
            self.calls.append((operation, kwargs))
            answer = self.script[operation].pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        return call

    def get_waiter(self, name: str) -> Any:
        client = self

        class Waiter:
            def wait(self, **kwargs: Any) -> None:
                client.calls.append((f"wait:{name}", kwargs))
                answer = client.script.get(f"wait:{name}", [None]).pop(0)
                if isinstance(answer, Exception):
                    raise answer

        return Waiter()


def test_run_instances_retries_only_while_the_profile_propagates() -> None:
    not_ready = client_error(
        "InvalidParameterValue",
        "Value (enclave-parent) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name",
    )
    client = ScriptedClient({"run_instances": [not_ready, not_ready, {"Instances": [{"InstanceId": "i-1"}]}]})
    sleeps: list[float] = []
    fleet = EnclaveFleet(client, retrying=False, sleep=sleeps.append)
    answer = fleet._run_instances({"ImageId": "ami-1", "ClientToken": "tok"})
    assert answer == {"Instances": [{"InstanceId": "i-1"}]}
    assert [kwargs["ClientToken"] for _, kwargs in client.calls] == ["tok", "tok", "tok"]  # no duplicate launch
    assert sleeps == [5, 10]


def test_run_instances_does_not_retry_other_errors() -> None:
    client = ScriptedClient({"run_instances": [client_error("InvalidParameterValue", "bad subnet")]})
    with pytest.raises(ClientError):
        EnclaveFleet(client, retrying=False, sleep=lambda _: None)._run_instances({"ImageId": "ami-1"})
    assert len(client.calls) == 1


def test_waiter_timeout_is_a_clear_failure() -> None:
    timeout = WaiterError("InstanceRunning", "Max attempts exceeded", {})
    client = ScriptedClient({"wait:instance_running": [timeout]})
    fleet = EnclaveFleet(client, retrying=False, waiter_delay=5)
    with pytest.raises(EnclaveInstanceError, match=r"timed out after 12 s waiting for i-1, i-2 to be running"):
        fleet.wait("instance_running", ["i-1", "i-2"], 12)
    assert client.calls == [
        ("wait:instance_running", {"InstanceIds": ["i-1", "i-2"], "WaiterConfig": {"Delay": 5, "MaxAttempts": 3}})
    ]


def test_calls_carry_aws_retry_for_the_amazon_aws_wrapper() -> None:
    client = ScriptedClient({"describe_instances": [{"Reservations": [], "NextToken": "t"}, {"Reservations": []}]})
    EnclaveFleet(client, retrying=True).describe(name="h")
    assert all(kwargs.get("aws_retry") is True for _, kwargs in client.calls)
    assert client.calls[1][1]["NextToken"] == "t"  # pages through
    assert {"Name": "tag:Name", "Values": ["h"]} in client.calls[0][1]["Filters"]


def test_unknown_instance_type_is_refused_not_raised() -> None:
    unknown = client_error("InvalidInstanceType", "The following supplied instance types do not exist: [zz.big]")
    client = ScriptedClient({"describe_instance_types": [unknown]})
    with pytest.raises(EnclaveInstanceError, match=r"refusing: .*zz\.big"):
        EnclaveFleet(client, retrying=False).instance_types(["zz.big"])
