"""`lotus train` on the command line: help, usage errors that stop before any work and leave nothing behind
(exit 2), and the debug preset's progress while it fits its VAE."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.cli import train as cli_train

runner = CliRunner()


def test_help_lists_the_paper_options():
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0
    for opt in (
        "--family",
        "--prediction",
        "--timesteps",
        "detail-preserver",
        "--norm",
        "--mix",
        "--resume",
        "--preset",
        "--num-processes",
        "--eval-data",
    ):
        assert opt in res.output


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Run in an empty folder; building the debug inputs or starting a run fails the test at once."""
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(cli_train, "_debug_inputs", refuse)
    monkeypatch.setattr(cli_train, "_run", refuse)
    monkeypatch.setattr(cli_train, "_launch", refuse)
    (tmp_path / "data").mkdir()
    return tmp_path


def invoke_usage_error(args, message, folder):
    before = sorted(p.name for p in folder.iterdir())
    res = runner.invoke(app, ["train", *args])
    assert res.exit_code == 2, (res.output, res.exception)
    assert message in res.output
    assert "Traceback" not in res.output
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing created


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "x", "--data", "data", "--data", "data", "--mix", "0.9"], "one non-negative weight per --data"),
        (["--out", "x", "--data", "data", "--mix", "a,b"], "expected numbers separated by commas"),
        (["--out", "x"], "no training data"),
        (["--data", "data"], "no --out folder"),
        (["--out", "x", "--data", "data", "--family", "d", "--prediction", "eps"], "needs --family g"),
        (["--out", "x", "--data", "data", "--preset", "huge"], "the only preset is debug"),
        (["--out", "x", "--data", "data", "--size", "big"], "expected HxW"),
        (["--out", "x", "--data", "data", "--size", "30x30"], "multiples of 8"),
        (["--out", "x", "--data", "data", "--eval-data", "nyuv3=/tmp"], "unknown depth dataset"),
        (["--out", "x", "--data", "missing"], "missing is not a folder"),
        (["--out", "x", "--data", "nyu=data"], "unknown dataset 'nyu'"),
        (["--out", "x", "--data", "data", "--val-data", "folder=missing"], "--val-data folder=missing"),
        (["--out", "x", "--data", "data", "--base", "./no-such-base"], "unknown model"),
        (["--out", "x", "--data", "data"], "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ],
)
def test_usage_errors_exit_2(args, message, no_work):
    invoke_usage_error(args, message, no_work)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be >= 1, not 0"),
        (["--lr", "-1"], "--lr must be > 0, not -1.0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, not 0"),
        (["--family", "x"], "--family must be g or d, not 'x'"),
        (["--task", "edges"], "--task must be depth or normal"),
        (["--resume", "latest"], "--resume latest: no checkpoint"),
        (["--resume", "data"], "--resume data: not a checkpoint folder"),
        (["--num-processes", "0"], "--num-processes must be >= 1"),
        (["--val-every", "-5"], "--val-every must be >= 0"),
        (["--eval-max-samples", "0"], "--eval-max-samples must be >= 1"),
    ],
)
def test_the_debug_preset_checks_options_before_building_anything(args, message, no_work):
    invoke_usage_error(["--preset", "debug", *args], message, no_work)
    assert not (no_work / "runs").exists()


def test_out_naming_a_file_is_a_usage_error(no_work):
    (no_work / "taken").write_text("a file\n")
    invoke_usage_error(["--preset", "debug", "--out", "taken"], "taken is a file, not a folder", no_work)
    invoke_usage_error(["--preset", "debug", "--out", "taken/run"], "taken is a file, not a folder", no_work)
    invoke_usage_error(["--out", "taken", "--data", "data"], "taken is a file, not a folder", no_work)


def test_debug_preset_shows_its_vae_fit_and_trains(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(cli_train.DEBUG, "train_scenes", 4)
    monkeypatch.setitem(cli_train.DEBUG, "val_samples", 2)
    monkeypatch.setitem(cli_train.DEBUG, "vae_steps", 8)
    res = runner.invoke(app, ["train", "--preset", "debug", "--out", "run", "--steps", "2", "--batch-size", "2"])
    assert res.exit_code == 0, (res.output, res.exception)
    for k in (2, 4, 6, 8):  # not a terminal: a line every quarter of the fit
        assert f"fitting the debug VAE: step {k}/8" in res.output
    assert (tmp_path / "run" / ".debug-ready").is_file()
    assert json.loads((tmp_path / "run" / "final" / "lotus.json").read_text())["kind"] == "disparity"


def test_debug_preset_with_its_own_inputs_builds_none(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(cli_train, "_debug_inputs", lambda out: calls.append(out))
    monkeypatch.setattr(cli_train, "_run", lambda opts: calls.append(opts))
    (tmp_path / "d").mkdir()
    (tmp_path / "base").mkdir()
    res = runner.invoke(
        app, ["train", "--preset", "debug", "--base", "base", "--data", "folder=d", "--val-data", "folder=d"]
    )
    assert res.exit_code == 0, (res.output, res.exception)
    (opts,) = calls  # trained, nothing built
    assert (opts.base, opts.data, opts.steps, opts.size) == ("base", ("folder=d",), 300, (32, 32))
    res = runner.invoke(app, ["train", "--preset", "debug", "--base", "base", "--data", "folder=d"])
    assert res.exit_code == 0 and calls[1] == opts.out  # the validation scenes come from the preset


def test_option_errors_come_before_torch_is_imported(tmp_path):
    """The checks import no torch (seconds under load), so a bad option is answered at once."""
    code = (
        "import sys; from typer.testing import CliRunner; from lotus_cli.cli import app; "
        "r = CliRunner().invoke(app, ['train', '--preset', 'debug', '--steps', '0']); "
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr[-2000:]
    assert not any(tmp_path.iterdir())
