import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.predictor import LotusPredictor, PredictOptions
from lotus_cli.sources import read_image

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
        r = lotus("normal", photos / "a", "-o", o, "-m", checkpoints[("normal", "g")], "-f", "npy", "--frame", frame,
                  *FAST)
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


def test_installed_command_reads_stdin_and_keeps_stdout_clean(photos, tmp_path, depth_d):
    listing = f"{photos / 'a' / 'x.jpg'}\n{photos / 'b' / 'x.jpg'}\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(["lotus", "depth", "-", "-o", str(tmp_path / "p"), "-m", str(depth_d), *FAST, "-f", "npy"],
                       input=listing, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert (tmp_path / "p" / "a" / "x.npy").is_file() and (tmp_path / "p" / "b" / "x.npy").is_file()


def test_help_does_not_import_torch():
    code = "import sys, lotus_cli.cli; sys.exit(1 if 'torch' in sys.modules or 'numpy' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    h = subprocess.run(["lotus", "depth", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert "depth-d" in h.stdout and "--processing-res" in h.stdout and "--skip-existing" in h.stdout
