import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.io.sources import read_image
from lotus_cli.model.predictor import LotusPredictor, PredictOptions

from .conftest import make_image

runner = CliRunner()
FAST = ["--processing-res", "48"]


def lotus(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for rel, (h, w, seed) in {"a/x.jpg": (30, 40, 1), "b/x.jpg": (30, 40, 2), "top.PNG": (25, 19, 3)}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_image(h, w, seed)).save(p, quality=95)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


def test_depth_folder_mirrors_tree_and_survives_bad_files(photos, tmp_path, depth_d):
    out = tmp_path / "out"
    r = lotus("depth", photos, "--out", out, "--model", depth_d, "--format", "all", *FAST)
    assert r.exit_code == 1, r.output  # some inputs failed
    assert "3 done, 0 skipped, 2 failed" in r.stderr
    assert "broken.jpg" in r.stderr and "empty.png" in r.stderr
    for key in ("a/x", "b/x", "top"):
        for suffix in (".png", ".16bit.png", ".npy", ".json"):
            assert (out / (key + suffix)).is_file(), key + suffix
    # the npy is exactly what the library predicts for that file
    pred = LotusPredictor.from_pretrained(depth_d, device="cpu")
    expected = pred.predict(read_image(photos / "a" / "x.jpg"), PredictOptions(processing_res=48)).map
    np.testing.assert_allclose(np.load(out / "a" / "x.npy"), expected, atol=1e-6)
    side = json.loads((out / "a" / "x.json").read_text())
    assert side["kind"] == "disparity" and side["input_size"] == [40, 30] and side["family"] == "d"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_single_file_npy_lands_at_out_name(photos, tmp_path, depth_g):
    out = tmp_path / "o"
    r = lotus("depth", photos / "top.PNG", "-o", out, "-m", depth_g, "-f", "npy", *FAST)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["top.json", "top.npy"]
    assert np.load(out / "top.npy").shape == (25, 19)


def test_normal_outputs_unit_vectors(photos, tmp_path, checkpoints):
    out = tmp_path / "n"
    r = lotus("normal", photos / "a", "-o", out, "-m", checkpoints[("normal", "g")], "-f", "npy,png", *FAST)
    assert r.exit_code == 0, r.output
    n = np.load(out / "x.npy")
    assert n.shape == (30, 40, 3)
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1, atol=1e-5)
    side = json.loads((out / "x.json").read_text())
    assert side["kind"] == "normal" and side["axes"].startswith("x left, y up, z toward the camera")
    # another frame on request: the same vectors with axes reversed, and the sidecar says which
    for frame, signs in (("opencv", (-1, -1, -1)), ("opengl", (-1, 1, 1))):
        o = tmp_path / frame
        r = lotus(
            "normal", photos / "a", "-o", o, "-m", checkpoints[("normal", "g")], "-f", "npy", "--frame", frame, *FAST
        )
        assert r.exit_code == 0, r.output
        np.testing.assert_allclose(np.load(o / "x.npy"), n * np.array(signs, np.float32), atol=1e-6)
        assert json.loads((o / "x.json").read_text())["normal_frame"] == frame


def test_seed_reproducible_across_batch_sizes(tmp_path, depth_g):
    src = tmp_path / "same"
    src.mkdir()
    for i in range(3):
        Image.fromarray(make_image(24, 32, i)).save(src / f"{i}.png")
    r1 = lotus("depth", src, "-o", tmp_path / "b1", "-m", depth_g, "-f", "npy", "--seed", 5, "-b", 1, *FAST)
    r3 = lotus("depth", src, "-o", tmp_path / "b3", "-m", depth_g, "-f", "npy", "--seed", 5, "-b", 3, *FAST)
    assert r1.exit_code == r3.exit_code == 0
    for i in range(3):
        a, b = np.load(tmp_path / "b1" / f"{i}.npy"), np.load(tmp_path / "b3" / f"{i}.npy")
        assert np.abs(a - b).max() < 1e-5


def test_skip_existing_resumes(photos, tmp_path, depth_d):
    out = tmp_path / "s"
    lotus("depth", photos / "a", "-o", out, "-m", depth_d, *FAST)
    before = (out / "x.png").stat().st_mtime_ns
    (out / "x.16bit.png").unlink()
    Image.fromarray(make_image(10, 10)).save(photos / "a" / "new.png")
    r = lotus("depth", photos / "a", "-o", out, "-m", depth_d, "--skip-existing", *FAST)
    assert r.exit_code == 0 and "2 done, 0 skipped" in r.stderr  # x lost an output, so it is redone
    r = lotus("depth", photos / "a", "-o", out, "-m", depth_d, "--skip-existing", *FAST)
    assert "0 done, 2 skipped" in r.stderr
    assert (out / "x.png").stat().st_mtime_ns >= before


def test_usage_errors_exit_2_with_one_line(photos, tmp_path, depth_d):
    r = lotus("depth", photos, "--model", "depht-d", "-o", tmp_path / "u")
    assert r.exit_code == 2 and "unknown model 'depht-d'" in r.stderr and "depth-d" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = lotus("depth", photos, "--model", depth_d, "-o", blocker / "sub")
    assert r.exit_code == 2 and "not writable" in r.stderr
    r = lotus("normal", photos, "--model", depth_d, "-o", tmp_path / "u")
    assert r.exit_code == 2 and "predicts depth, not normal" in r.stderr
    r = lotus("depth", photos, "--format", "jpg", "-o", tmp_path / "u")
    assert r.exit_code == 2 and "--format" in r.stderr
    r = lotus("depth", tmp_path / "nope.jpg", "--model", depth_d, "-o", tmp_path / "u")
    assert r.exit_code == 1 and "no such file" in r.stderr


@pytest.mark.heavy
def test_installed_command_reads_stdin_and_keeps_stdout_clean(photos, tmp_path, depth_d):
    listing = f"{photos / 'a' / 'x.jpg'}\n{photos / 'b' / 'x.jpg'}\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        ["lotus", "depth", "-", "-o", str(tmp_path / "p"), "-m", str(depth_d), *FAST, "-f", "npy"],
        input=listing,
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert (tmp_path / "p" / "a" / "x.npy").is_file() and (tmp_path / "p" / "b" / "x.npy").is_file()


def test_help_does_not_import_torch():
    code = "import sys, lotus_cli.cli; sys.exit(1 if 'torch' in sys.modules or 'numpy' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    h = subprocess.run(
        ["lotus", "depth", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    assert "depth-d" in h.stdout and "--processing-res" in h.stdout and "--skip-existing" in h.stdout


# ------------------------------------------------------------------- issue 13: what a new user hit


def test_rerun_on_the_current_folder_never_reads_the_default_output(tmp_path, depth_d, monkeypatch):
    """`lotus depth .` with the default ./lotus-depth: inputs went 1 -> 3 -> 6 over three runs."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(make_image(24, 32)).save(tmp_path / "x.png")
    for _ in range(3):
        r = lotus("depth", ".", "-m", depth_d, *FAST)
        assert r.exit_code == 0, r.output
        assert "1 done, 0 skipped, 0 failed" in r.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "lotus-depth").rglob("*")) == [
        "lotus-depth/x.16bit.png",
        "lotus-depth/x.json",
        "lotus-depth/x.png",
    ]


def test_checkpoint_meaning_comes_from_metadata_and_is_recorded(tmp_path, photos, checkpoints):
    import shutil

    depth_ckpt = tmp_path / "my_weights"
    shutil.copytree(checkpoints[("depth", "d")], depth_ckpt)  # model_index.json says depth, nothing says the kind
    r = lotus("normal", photos / "a", "-m", depth_ckpt, "-o", tmp_path / "n")
    assert r.exit_code == 2 and "predicts depth, not normal" in r.stderr
    r = lotus("depth", photos / "a", "-m", depth_ckpt, "-o", tmp_path / "d")
    assert r.exit_code == 2 and "--output-kind disparity|depth" in r.stderr and len(r.stderr.splitlines()) == 1
    r = lotus("depth", photos / "a", "-m", depth_ckpt, "--output-kind", "normal", "-o", tmp_path / "d")
    assert r.exit_code == 2 and "--output-kind must be disparity or depth" in r.stderr
    for kind in ("disparity", "depth"):
        r = lotus("depth", photos / "a", "-m", depth_ckpt, "--output-kind", kind, "-o", tmp_path / kind, *FAST)
        assert r.exit_code == 0, r.output
        side = json.loads((tmp_path / kind / "x.json").read_text())
        assert (side["kind"], side["kind_source"]) == (kind, "given")
    r = lotus("depth", photos / "a", "-m", checkpoints[("depth", "d")], "-o", tmp_path / "reg", *FAST)
    side = json.loads((tmp_path / "reg" / "x.json").read_text())
    assert (side["kind"], side["kind_source"]) == ("disparity", "registry entry, by folder name = hub repo name")
    (depth_ckpt / "lotus.json").write_text(json.dumps({"task": "depth", "kind": "depth"}))
    r = lotus("depth", photos / "a", "-m", depth_ckpt, "-o", tmp_path / "meta", *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "meta" / "x.json").read_text())["kind_source"] == "lotus.json"
    r = lotus("depth", photos / "a", "-m", depth_ckpt, "--output-kind", "disparity", "-o", tmp_path / "meta")
    assert r.exit_code == 2 and "outputs depth, not disparity" in r.stderr


@pytest.mark.parametrize("n", ["0", "1", "-3"])
def test_uncertainty_needs_two_samples(photos, tmp_path, depth_g, n):
    r = lotus("uncertainty", photos / "a", "-m", depth_g, "-n", n, "-o", tmp_path / "u", *FAST)
    assert r.exit_code == 2 and "--samples must be at least 2" in r.stderr
    assert not (tmp_path / "u" / "x.png").exists()


def test_processing_res_below_the_model_minimum(photos, tmp_path, depth_d):
    """The tiny VAE has 4 px per latent cell (SD2: 8): below that one latent cell cannot be encoded."""
    r = lotus("depth", photos / "a", "-m", depth_d, "--processing-res", 3, "-o", tmp_path / "p")
    assert r.exit_code == 2 and "--processing-res 3 is below the model's minimum of 4 px" in r.stderr
    Image.fromarray(make_image(20, 20)).save(tmp_path / "square.png")
    r = lotus("depth", tmp_path / "square.png", "-m", depth_d, "--processing-res", 4, "-o", tmp_path / "p", "-f", "npy")
    assert r.exit_code == 0, r.output  # 4x4 px: one latent cell
    assert np.load(tmp_path / "p" / "square.npy").shape == (20, 20)
    Image.fromarray(make_image(8, 64)).save(tmp_path / "wide.png")  # 8:1 -> 16x2 at --processing-res 16
    r = lotus(
        "depth",
        tmp_path / "wide.png",
        photos / "top.PNG",
        "-m",
        depth_d,
        "--processing-res",
        16,
        "-o",
        tmp_path / "w",
        "-f",
        "npy",
    )
    assert r.exit_code == 1
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "wide.png" in failed[0] and "below the model's minimum of 4 px" in failed[0]
    assert np.load(tmp_path / "w" / "top.npy").shape == (25, 19)


def test_raw_refuses_file_options_and_inputs(tmp_path, depth_d):
    for extra, named in (
        (["--json"], "--json"),
        (["--out", tmp_path / "o"], "--out"),
        (["--skip-existing"], "--skip-existing"),
    ):
        r = runner.invoke(app, ["depth", "--raw", "32x24", "-m", str(depth_d), *map(str, extra)], input=b"")
        assert r.exit_code == 2 and named in r.stderr and "--raw" in r.stderr
    assert not (tmp_path / "o").exists()


def test_uncertainty_raw_pipe_writes_the_spread(depth_g):
    from lotus_cli.model.predictor import EnsembleOptions

    frames = [make_image(24, 32, s) for s in (1, 2)]
    r = runner.invoke(
        app,
        ["uncertainty", "--raw", "32x24", "-m", str(depth_g), "-n", "3", *FAST],
        input=b"".join(f.tobytes() for f in frames),
    )
    assert r.exit_code == 0, r.stderr
    got = np.frombuffer(r.stdout_bytes, "<f4").reshape(2, 24, 32)
    pred = LotusPredictor.from_pretrained(depth_g, device="cpu")
    for f, g in zip(frames, got):
        want = pred.predict_ensemble(f, PredictOptions(processing_res=48, batch_size=4), EnsembleOptions(3)).map
        np.testing.assert_allclose(g, want, atol=1e-6)
    assert got.max() > 0
    r = runner.invoke(app, ["uncertainty", "--raw", "32x24", "-m", str(depth_g), "--raw-out", "rgb"], input=b"")
    assert r.exit_code == 2 and "--raw-out must be f32" in r.stderr


def _popen(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lotus_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        **kw,
    )


@pytest.mark.heavy
def test_closed_stdout_stops_at_once_with_status_141(tmp_path, depth_d):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(12):
        Image.fromarray(make_image(24, 32, i)).save(src / f"{i:02d}.png")
    p = _popen(["depth", src, "--json", "-m", depth_d, "-o", tmp_path / "o", "-f", "npy", *FAST])
    first = json.loads(p.stdout.readline())
    p.stdout.close()  # `| head -1`
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and first["status"] == "done"
    assert "Traceback" not in err and "Error" not in err
    assert len(list((tmp_path / "o").glob("*.npy"))) < 12  # it stopped, not ran to the end

    p = _popen(["depth", "--raw", "32x24", "-m", depth_d, *FAST], stdin=subprocess.PIPE)
    p.stdin.write(make_image(24, 32).tobytes() * 40)
    p.stdin.close()
    assert len(p.stdout.read(10)) == 10
    p.stdout.close()  # `| head -c 10`
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err


def test_names_are_escaped_on_stderr_and_ndjson_stays_utf8(tmp_path, depth_d):
    src = tmp_path / "odd"
    src.mkdir()
    (src / "bad\nname\x1b[31m.jpg").write_bytes(b"not a jpeg")
    os.close(os.open(os.fsencode(src) + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY))  # not UTF-8, empty
    r = runner.invoke(app, ["depth", str(src), "--json", "-m", str(depth_d), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1
    failed = [line for line in r.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2 and "\x1b" not in r.stderr
    assert any("bad\\nname\\x1b[31m.jpg" in line for line in failed) and any("caf\\xe9.jpg" in x for x in failed)
    records = [json.loads(line) for line in r.stdout_bytes.decode("utf-8").splitlines()]  # strict UTF-8
    inputs = sorted(rec["input"].rsplit("/", 1)[1] for rec in records)
    assert inputs == ["bad\nname\x1b[31m.jpg", "caf\\xe9.jpg"]
    assert all(not any(0xD800 <= ord(c) <= 0xDFFF for c in rec["input"]) for rec in records)


def test_help_shows_flags_as_flags_and_each_command_its_own_options(tmp_path, photos, depth_d):
    env = {**os.environ, "COLUMNS": "200"}
    depth = subprocess.run(
        [sys.executable, "-m", "lotus_cli", "depth", "--help"], capture_output=True, text=True, env=env
    ).stdout
    normal = subprocess.run(
        [sys.executable, "-m", "lotus_cli", "normal", "--help"], capture_output=True, text=True, env=env
    ).stdout
    assert "<bool>" not in depth and "<bool>" not in normal
    assert "--skip-existing" in normal and "--cmap" in depth and "--stabilize" in depth
    assert "--cmap" not in normal and "--stabilize" not in normal and "depth PNGs" not in normal
    assert "lines starting with # skipped" in depth  # stdin lists, as expand reads them
    r = lotus("depth", "--skip-existing", "true", photos / "a", "-m", depth_d, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "flags take no value" in r.stderr


def test_library_errors_name_parameters_and_the_cli_names_flags(photos, tmp_path, depth_d):
    from lotus_cli.errors import UsageError

    with pytest.raises(UsageError, match="^processing_res must be >= 0"):
        PredictOptions(processing_res=-1)
    with pytest.raises(UsageError, match="^batch_size must be >= 1"):
        PredictOptions(batch_size=0)
    for flag_, value, said in (
        ("--processing-res", -1, "--processing-res must be >= 0"),
        ("--batch-size", 0, "--batch-size must be >= 1"),
        ("--resample", "cubic", "--resample must be bilinear or nearest"),
    ):
        r = lotus("depth", photos / "a", "-m", depth_d, flag_, value, "-o", tmp_path / "o")
        assert r.exit_code == 2 and r.stderr.startswith(f"error: {said}"), r.stderr


@pytest.mark.parametrize(
    "command",
    [["depth"], ["normal"], ["uncertainty"], ["pointcloud"], ["eval", "depth"], ["train"], ["models", "list"]],
)
def test_no_command_shows_a_boolean_flag_as_taking_a_value(command):
    text = subprocess.run(
        [sys.executable, "-m", "lotus_cli", *command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "Usage:" in text and "<bool>" not in text


def test_the_predict_commands_take_their_shared_options_from_one_table():
    """depth, normal and uncertainty declare their shared options once (cli/predict_options.PREDICT_OPTIONS):
    each command's parameters are its own plus that table's, so a new entry reaches all three."""
    import inspect

    from lotus_cli.cli import predict
    from lotus_cli.cli.options import ProcRes, with_options
    from lotus_cli.cli.predict_options import PREDICT_OPTIONS

    own = {"depth": {"inputs"}, "normal": {"inputs"}, "uncertainty": {"inputs", "task", "samples", "tta"}}
    left_out = {"depth": {"frame"}, "normal": {"cmap", "stabilize"}, "uncertainty": {"stabilize", "projection"}}
    for name in own:
        params = set(inspect.signature(getattr(predict, name)).parameters)
        assert params == own[name] | (set(PREDICT_OPTIONS) - left_out[name]), name
    table = {**PREDICT_OPTIONS, "new_option": (ProcRes, 5)}

    @with_options(table, omit=("frame",))
    def command(inputs=None, **options):
        return options

    assert command(**{k: v for k, (_, v) in table.items() if k != "frame"})["new_option"] == 5
    assert inspect.signature(command).parameters["new_option"].default == 5
    assert len(lotus("depth", "--help").stdout) > 0 and "--processing-res" in lotus("normal", "--help").stdout
