"""The emulator's `[ Exx ]` rendering: nitro-cli's templates, chosen by the number of info items."""

from __future__ import annotations

import pytest

from nitro_emulator.errors import NitroCliError, report


def test_render_shape_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code = report(NitroCliError(22, "cpu-count", 8))
    err = capsys.readouterr().err
    assert code == 22
    assert err.startswith("[ E22 ] Insufficient CPUs available in the pool. User provided `cpu-count` is 8,")
    assert err.endswith("cli-errors.html#E22\n")


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (("/x.eif", "Open"), "File operation failure.\nFile: '/x.eif', failing operation: 'Open'."),
        (("cannot read /x.eif",), "File operation failure. cannot read /x.eif"),
    ],
)
def test_e19_template_follows_the_item_count(info: tuple[str, ...], expected: str) -> None:
    assert NitroCliError(19, *info).message == expected


def test_e26_zero_memory_and_minimum() -> None:
    assert NitroCliError(26, "memory", 0).message.endswith("and memory should be greater than 0 MB.")
    assert NitroCliError(26, "memory", 100, 512).message.endswith("the minimum memory should be 512 MB")


def test_missing_info_is_spelled_out_as_nitro_cli_does() -> None:
    assert NitroCliError(3).message == (
        "Invalid argument provided. The parameter `MISSING_INFO` is not a valid integer (`MISSING_INFO`)"
    )
