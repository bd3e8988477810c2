"""Issue 15's faults, each under steady load on one emulated parent (the chaos script's parent and
faults): the service recovers, /healthz says why while it lasts, and no fault changes a token.

Request figures are printed (`make chaos` prints them for the README); only outcomes are asserted.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from enclave_tokenizer.supervisor_state import wait_settled

from tests.bench import chaos
from tests.bench.load import PAN, Load

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def parent(docker_engine: str) -> Iterator[chaos.Parent]:
    with chaos.emulated_parent("fault") as the_parent:
        yield the_parent


def token(parent: chaos.Parent) -> str:
    request = urllib.request.Request(f"{parent.url}/v1/tokenize", data=json.dumps({"pan": PAN}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=90) as answer:
        return json.loads(answer.read())["token"]


def under_load(parent: chaos.Parent, name: str) -> tuple[Load, list[str], str, str]:
    """Run fault ``name`` from the healthy old image under load: (load, notes, token before, after)."""
    parent.roll("old")
    parent.wait_healthy()
    # As the nitro_enclave role waits: the supervisor has recorded the old image as the last good one.
    settled, reason = wait_settled(Path(f"{parent.config}.status"), parent.config, 120)
    assert settled, reason
    before = token(parent)
    with Load(parent.url) as load:
        time.sleep(1)
        notes = chaos.FAULTS[name][1](parent)
        time.sleep(1)
    print(f"\n{chaos.FAULTS[name][0]}: {load.figures()}", *notes, sep="\n  ")
    return load, notes, before, token(parent)


@pytest.mark.parametrize(("name", "code"), [("bad-variable", "E22"), ("memory", "E2")])
def test_a_configuration_the_pool_cannot_hold_keeps_the_previous_one_serving(
    parent: chaos.Parent, name: str, code: str
) -> None:
    load, notes, before, after = under_load(parent, name)
    assert any(code in note and "previous configuration" in note for note in notes), notes
    status, report = parent.health()
    assert status == 200 and report["status"] == "degraded", report  # the previous configuration serves
    assert load.sent > load.failed and after == before


def test_an_image_that_crashes_at_start_is_replaced_by_the_last_good_one(parent: chaos.Parent) -> None:
    load, notes, before, after = under_load(parent, "crash-image")
    assert notes and parent.health()[1]["status"] == "degraded", notes
    assert load.sent > load.failed and after == before


def test_an_image_whose_canary_fails_is_caught_by_the_gate(parent: chaos.Parent) -> None:
    _load, notes, before, after = under_load(parent, "canary-image")
    assert "None" not in notes[0], notes  # the gate gave a reason
    assert after == before  # back on the old image, same key


@pytest.mark.parametrize("name", ["kill", "kms", "gateway"])
def test_the_service_recovers_with_the_same_tokens(parent: chaos.Parent, name: str) -> None:
    load, notes, before, after = under_load(parent, name)
    assert parent.health()[1]["status"] == "ok", notes
    assert load.sent > load.failed and after == before
    if name == "kms":  # while KMS did not answer, health said why
        assert any("/healthz:" in note for note in notes[:-1]), notes
