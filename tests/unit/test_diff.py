"""The one --diff result builder (ansible_collections.nitro_enclaves.fleet.plugins.module_utils.diff)."""

from __future__ import annotations

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.diff import diff_result


def test_headed_text_diff_of_a_new_file() -> None:
    assert diff_result(None, "new\n", "/etc/x") == {
        "before": "",
        "after": "new\n",
        "before_header": "/etc/x",
        "after_header": "/etc/x",
    }


def test_data_diff_without_header_keeps_values() -> None:
    assert diff_result({}, {"a": 1}) == {"before": {}, "after": {"a": 1}}
    assert diff_result("old", None) == {"before": "old", "after": ""}
