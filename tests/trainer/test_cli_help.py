"""`--help` of every trainer command prints (field descriptions may hold '%', which argparse
would otherwise read as a format directive)."""

from __future__ import annotations

import pytest

from trainer.cli import main as cli_main


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_prints_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"simclr-embed {command}" in out
    if command == "train":
        assert "--warmup-epochs" in out and "10%" in out  # the escaped description, printed as written
