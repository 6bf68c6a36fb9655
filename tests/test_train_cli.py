"""`lotus train` on the command line: help, and usage errors that stop before any work (exit 2)."""

import pytest
from typer.testing import CliRunner

from lotus_cli.cli import app

runner = CliRunner()


def test_help_lists_the_paper_options():
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0
    for opt in ("--family", "--prediction", "--timesteps", "detail-preserver", "--norm", "--mix", "--resume",
                "--preset", "--num-processes", "--eval-data"):
        assert opt in res.output


@pytest.mark.parametrize("args, message", [
    (["--out", "x", "--data", "a", "--data", "b", "--mix", "0.9"], "one non-negative weight per --data"),
    (["--out", "x"], "no training data"),
    (["--data", "a"], "no --out folder"),
    (["--out", "x", "--data", "a", "--family", "d", "--prediction", "eps"], "needs --family g"),
    (["--out", "x", "--data", "a", "--preset", "huge"], "the only preset is debug"),
    (["--out", "x", "--data", "a", "--size", "big"], "expected HxW"),
    (["--out", "x", "--data", "a", "--eval-data", "nyuv3=/tmp"], "unknown depth dataset"),
])
def test_usage_errors_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["train", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
