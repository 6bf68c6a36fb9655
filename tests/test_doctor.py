"""`lotus doctor`: the machine as /proc/cpuinfo and torch describe it, and the recorded fast-path choices."""

import json

import torch
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.model.cpu import calibrate, strips


def doctor(*args):
    return CliRunner().invoke(app, ["doctor", *map(str, args)])


def test_doctor_names_the_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("LOTUS_CACHE", str(tmp_path))
    r = doctor()
    assert r.exit_code == 0, r.output
    m = calibrate.machine()
    assert m.cpu in r.output and torch.__version__ in r.output and "nothing recorded yet" in r.output
    for flag in calibrate.FLAGS:  # each flag, with whether this CPU has it (as /proc/cpuinfo says)
        assert f"{flag} {'yes' if flag in m.flags else 'no'}" in r.output
    data = json.loads(doctor("--json").output)
    assert data["machine"]["cpu"] == m.cpu and data["machine"]["threads"] == torch.get_num_threads()
    assert data["cache"] == str(tmp_path / "calibration.json") and data["calibrations"] == []


def test_doctor_shows_the_choice_and_the_measured_times(tmp_path, monkeypatch, depth_d):
    monkeypatch.setenv("LOTUS_CACHE", str(tmp_path))
    record = dict(
        unet="nchw",
        vae="channels_last",
        strip_rows=16,
        threads=2,
        how="measured",
        size=[512, 512],
        times={
            "layout": {"nchw": 2.5, "channels_last": 1.25, "channels_last+packed": 1.75},
            "unet": {"nchw": 0.5, "channels_last": 0.55, "channels_last+packed": 0.75},
            "vae": {"nchw": 2.0, "channels_last": 0.7, "channels_last+packed": 1.0},
            "strips": {"0": 0.5, "16": 0.375},
        },
        seconds=3.2,
    )
    entries = {"version": calibrate.CACHE_VERSION, "entries": {"k": record}}
    (tmp_path / "calibration.json").write_text(json.dumps(entries))
    out = doctor().output
    assert "UNet NCHW; VAE channels-last" in out.split("layout")[1].splitlines()[0]
    assert "strips of 16 rows" in out and "measured (3.2 s of timings)" in out
    assert "channels_last 1.250 s *" in out and "nchw 2.500 s" in out and "16 0.375 s *" in out
    assert "measured unet" in out and "nchw 0.500 s *" in out and "channels_last 0.700 s *" in out
    # a model: its own choice (a tiny model takes the rule), without touching the recorded one
    r = doctor("-m", depth_d, "--processing-res", 64)
    assert r.exit_code == 0, r.output
    mine, recorded = r.output.split("recorded on this machine")
    assert "rule:" in mine and "too small to time" in mine and f"strips of {strips.ROWS} rows" in mine
    assert "strips of 16 rows" in recorded
    # --recalibrate forgets what was recorded
    assert doctor("--recalibrate").exit_code == 0
    assert not (tmp_path / "calibration.json").exists()
    assert "nothing recorded yet" in doctor().output


def test_doctor_reports_a_bad_model_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LOTUS_CACHE", str(tmp_path))
    r = doctor("-m", tmp_path / "missing")
    assert r.exit_code == 2 and "error:" in r.output


def test_doctor_takes_the_output_kind_it_advises_and_refuses_a_negative_size(tmp_path, monkeypatch, depth_d):
    """`doctor -m CKPT` advised --output-kind for a checkpoint that says nothing about its output, and did not
    accept it (issue 28); --processing-res -5 was accepted."""
    import shutil

    monkeypatch.setenv("LOTUS_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "my-checkpoint"  # not a registry name, no lotus.json: nothing says what it outputs
    shutil.copytree(depth_d, mine)
    (mine / "lotus.json").unlink(missing_ok=True)
    r = doctor("-m", mine, "--processing-res", 64)
    assert r.exit_code == 2 and "--output-kind" in r.output
    r = doctor("-m", mine, "--output-kind", "disparity", "--processing-res", 64)
    assert r.exit_code == 0, r.output
    assert str(mine) in r.output and "processing size" in r.output
    r = doctor("-m", mine, "--output-kind", "depth", "--processing-res", 64, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["model"] == str(mine)
    r = doctor("-m", mine, "--output-kind", "normal", "--processing-res", 64)  # its model_index.json says depth
    assert r.exit_code == 2 and "predicts depth, not normal" in r.output
    for args, message in [
        (["--processing-res", -5], "--processing-res -5: must be a positive number of pixels"),
        (["--processing-res", 0], "--processing-res 0: must be a positive number of pixels"),
        (["-m", mine, "--output-kind", "inverse"], "--output-kind must be disparity, depth or normal"),
        (["--output-kind", "depth"], "--output-kind describes a model"),
    ]:
        r = doctor(*args)
        assert r.exit_code == 2 and message in r.output, r.output
