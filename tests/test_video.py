import json
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.geometry.align import Stabilizer
from lotus_cli.io.sources import Item
from lotus_cli.io.video import FrameSelect, open_video
from lotus_cli.model.predictor import Prediction, PredictOptions
from lotus_cli.run.clip import run_video
from lotus_cli.run.made import OutputSpec, VideoSpec

from .conftest import default_signals

runner = CliRunner()


def make_clip(path: Path, n: int, fps: float, size=(64, 48), faststart=False, codec="libx264") -> Path:
    """A clip whose frame i shows a bright square at x = i mod (w - 8): content known per frame."""
    w, h = size
    params = ["-movflags", "+faststart"] if faststart else None
    pix = "yuv444p" if (w % 2 or h % 2) else "yuv420p"  # yuv420p needs even sizes
    gen = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        fps=fps,
        codec=codec,
        macro_block_size=1,
        pix_fmt_out=pix,
        output_params=params,
        ffmpeg_log_level="error",
    )
    gen.send(None)
    for i in range(n):
        f = np.full((h, w, 3), 60, np.uint8)
        x = i % (w - 8)
        f[h // 4 : h // 4 + 8, x : x + 8] = 250
        gen.send(f)
    gen.close()
    return path


def decode_all(path: Path):
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    frames = [np.frombuffer(f, np.uint8) for f in gen]
    return meta, frames


class FakePredictor:
    """Stands in for LotusPredictor: a fixed scene under a known per-frame affine perturbation."""

    task, kind, family = "depth", "disparity", "d"
    device = torch.device("cpu")  # where an out-of-memory retry frees the cache

    def __init__(self, perturb=True, interrupt_at=None):
        self.perturb, self.interrupt_at, self.calls = perturb, interrupt_at, 0
        self.rng = np.random.default_rng(0)

    def describe(self):
        return {"model": "fake", "task": self.task, "kind": self.kind, "family": self.family}

    def predict_batch(self, images, opts):
        out = []
        for im in images:
            self.calls += 1
            if self.interrupt_at is not None and self.calls > self.interrupt_at:
                raise KeyboardInterrupt
            h, w = im.shape[:2]
            yy, xx = np.mgrid[0:h, 0:w]
            scene = (0.3 + 0.4 * xx / w + 0.1 * yy / h).astype(np.float32)
            if self.perturb:
                s, b = self.rng.uniform(0.6, 1.4), self.rng.uniform(-0.2, 0.2)
                scene = s * scene + b
            out.append(Prediction(scene, (h, w)))
        return out


def test_fps_resampling_counts_and_playable_output(tmp_path, depth_d):
    clip = make_clip(tmp_path / "clip.mp4", n=60, fps=30)  # 2 s
    r = runner.invoke(
        app,
        [
            "depth",
            str(clip),
            "-o",
            str(tmp_path / "o"),
            "-m",
            str(depth_d),
            "--fps",
            "10",
            "--processing-res",
            "32",
            "-f",
            "png,npy",
        ],
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "o" / "clip.json").read_text())
    assert side["video"]["frames"] == 20 and side["video"]["fps"] == 10
    meta, frames = decode_all(tmp_path / "o" / "clip.mp4")
    assert len(frames) == 20 and tuple(meta["size"]) == (64, 48) and meta["fps"] == pytest.approx(10)
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(tmp_path / "o" / "clip.mp4")], capture_output=True, text=True
    ).stderr
    assert "h264" in probe and "yuv420p" in probe
    names = sorted(p.name for p in (tmp_path / "o" / "clip").iterdir())
    assert len(names) == 20 and names[0] == "000000_000000.000s.npy" and names[3] == "000003_000000.300s.npy"


def test_range_selection_and_odd_size(tmp_path):
    clip = make_clip(tmp_path / "odd.mkv", n=50, fps=25, size=(63, 47))
    info, frames = open_video(clip, FrameSelect(start=0.4, end=1.2))
    got = list(frames)
    assert len(got) == 20 and got[0].time == pytest.approx(0.4) and got[0].rgb.shape == (47, 63, 3)
    # frame content proves the seek: frame k of the source has its square at x = k
    assert np.argmax(got[0].rgb[47 // 4 + 4, :, 0] > 200) == 10
    _, frames = open_video(clip, FrameSelect(max_frames=7))
    assert len(list(frames)) == 7
    info, frames = open_video(clip, FrameSelect(fps=60))  # above the source's 25 fps: no repeated frames
    assert info.fps == pytest.approx(25) and len(list(frames)) == 50
    old = make_clip(tmp_path / "old.avi", n=12, fps=12, codec="mpeg4")  # MPEG-4 Part 2, as old cameras write
    info, frames = open_video(old)
    assert info.codec.startswith("mpeg4") and len(list(frames)) == 12
    out = OutputSpec(tmp_path / "o", ("npy",))
    r = run_video(FakePredictor(), Item(clip, "odd"), out, PredictOptions(), VideoSpec(FrameSelect(max_frames=5)))
    assert r.status == "done" and r.frames == 5
    meta, dec = decode_all(tmp_path / "o" / "odd.mp4")
    assert tuple(meta["size"]) == (64, 48) and len(dec) == 5  # padded to even dimensions for yuv420p


def test_stabilize_removes_per_frame_affine_flicker(tmp_path):
    clip = make_clip(tmp_path / "static.mp4", n=30, fps=15)
    out = OutputSpec(tmp_path / "o", ("npy",))
    run_video(FakePredictor(), Item(clip, "on"), out, PredictOptions(), VideoSpec(stabilize=True))
    run_video(FakePredictor(), Item(clip, "off"), out, PredictOptions(), VideoSpec(stabilize=False))
    on = json.loads((tmp_path / "o" / "on.json").read_text())["temporal_change"]
    off = json.loads((tmp_path / "o" / "off.json").read_text())["temporal_change"]
    assert off["raw"] == pytest.approx(off["output"])  # nothing changed without stabilisation
    assert on["output"] < 0.01 * on["raw"]  # the same surface keeps its value
    maps = [np.load(p) for p in sorted((tmp_path / "o" / "on").glob("*.npy"))]
    assert max(np.abs(m - maps[0]).max() for m in maps) < 1e-3


def test_stabilizer_ignores_moving_object():
    rng = np.random.default_rng(1)
    scene = rng.random((40, 50)).astype(np.float32)
    st = Stabilizer()
    st(scene)
    moved = scene.copy()
    moved[:10, :10] = 5.0  # an object passes in front
    aligned, (s, b) = st(2.0 * moved + 0.5)
    assert abs(s - 0.5) < 1e-3 and abs(b + 0.25) < 1e-3
    np.testing.assert_allclose(aligned[10:, 10:], scene[10:, 10:], atol=1e-4)


def test_corrupt_video_keeps_frames_before_damage_and_batch_goes_on(tmp_path, depth_d):
    good = make_clip(tmp_path / "whole.mkv", n=60, fps=30, size=(64, 48))
    data = good.read_bytes()
    broken = tmp_path / "in" / "broken.mkv"
    broken.parent.mkdir()
    broken.write_bytes(data[: len(data) * 2 // 3])  # a download cut short
    make_clip(tmp_path / "in" / "fine.mp4", n=6, fps=6)
    (tmp_path / "in" / "text.mp4").write_text("not a video")
    (tmp_path / "in" / "zero.mov").write_bytes(b"")
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=d=1",
            str(tmp_path / "in" / "sound.mp4"),
        ],
        check=True,
    )
    r = runner.invoke(
        app,
        [
            "depth",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "o"),
            "-m",
            str(depth_d),
            "--processing-res",
            "32",
            "-f",
            "npy",
        ],
    )
    assert r.exit_code == 1
    assert "text.mp4: not a readable video" in r.stderr and "zero.mov: empty file" in r.stderr
    assert "sound.mp4: not a readable video (it has no video stream)" in r.stderr
    assert "1 done, 0 skipped, 4 failed" in r.stderr
    written = list((tmp_path / "o" / "broken").glob("*.npy"))
    assert 0 < len(written) < 60
    side = json.loads((tmp_path / "o" / "broken.json").read_text())
    assert side["video"]["frames"] == len(written) and side["error"]
    assert len(decode_all(tmp_path / "o" / "broken.mp4")[1]) == len(written)
    assert (tmp_path / "o" / "fine.mp4").is_file()


def test_interrupt_closes_a_playable_video(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", n=40, fps=20)
    out = OutputSpec(tmp_path / "o", ("npy",))
    with pytest.raises(KeyboardInterrupt):
        run_video(FakePredictor(interrupt_at=12), Item(clip, "c"), out, PredictOptions(), VideoSpec())
    meta, frames = decode_all(tmp_path / "o" / "c.mp4")
    assert len(frames) == 12
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]


def test_ndjson_on_stdout_only(tmp_path, depth_d):
    clip = make_clip(tmp_path / "a.mp4", n=4, fps=4)
    from PIL import Image

    from .conftest import make_image

    Image.fromarray(make_image(20, 30)).save(tmp_path / "b.png")
    r = runner.invoke(
        app,
        [
            "depth",
            str(clip),
            str(tmp_path / "b.png"),
            str(tmp_path / "missing.jpg"),
            "--json",
            "-o",
            str(tmp_path / "o"),
            "-m",
            str(depth_d),
            "--processing-res",
            "32",
        ],
    )
    assert r.exit_code == 1
    records = [json.loads(line) for line in r.stdout.splitlines()]
    by_input = {Path(rec["input"]).name: rec for rec in records}
    assert set(by_input) == {"a.mp4", "b.png", "missing.jpg"}
    assert by_input["a.mp4"]["frames"] == 4 and by_input["a.mp4"]["status"] == "done"
    assert by_input["b.png"]["frames"] == 1 and by_input["b.png"]["kind"] == "disparity"
    assert by_input["missing.jpg"]["status"] == "failed" and "no such file" in by_input["missing.jpg"]["error"]
    for rec in records:
        assert set(rec) >= {"input", "outputs", "kind", "frames", "seconds", "status", "error"}


MEMORY_SCRIPT = """
import resource, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_video import FakePredictor, make_clip
from lotus_cli.model.predictor import PredictOptions
from lotus_cli.run.made import OutputSpec, VideoSpec
from lotus_cli.run.clip import run_video
from lotus_cli.io.sources import Item
tmp = Path({tmp!r})
clip = make_clip(tmp / "long.mp4", n={n}, fps=30, size=(320, 240))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = run_video(FakePredictor(), Item(clip, "long"), OutputSpec(tmp / "o", ("png",)), PredictOptions(), VideoSpec())
assert r.frames == {n}, r
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


@pytest.mark.heavy
def test_memory_flat_over_a_long_clip(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    growth = {}
    for n in (30, 600):
        d = tmp_path / str(n)
        d.mkdir()
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT.format(root=root, tmp=str(d), n=n)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        growth[n] = int(out.stdout.strip().splitlines()[-1]) * 1024
    # 20x more frames (each 320x240): peak memory grows by less than 10 frames' worth of maps
    assert growth[600] - growth[30] < 10 * 320 * 240 * 4 * 3


@pytest.mark.heavy
def test_ctrl_c_on_the_command_line_leaves_a_playable_video(tmp_path, depth_d):
    import os
    import signal
    import time

    clip = make_clip(tmp_path / "long.mp4", n=300, fps=30)
    out = tmp_path / "o"
    proc = subprocess.Popen(
        ["lotus", "depth", str(clip), "-o", str(out), "-m", str(depth_d), "--processing-res", "32", "-f", "npy"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=default_signals,  # a test run started in the background inherits SIGINT ignored
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "long").glob("*.npy"))) < 5:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    frames = len(list((out / "long").glob("*.npy")))
    assert 5 <= frames < 300
    assert len(decode_all(out / "long.mp4")[1]) == frames  # closed properly: every written frame plays
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_uncertainty_takes_videos(tmp_path, depth_g):
    clip = make_clip(tmp_path / "u.mp4", n=6, fps=6)
    r = runner.invoke(
        app,
        [
            "uncertainty",
            str(clip),
            "-o",
            str(tmp_path / "o"),
            "-m",
            str(depth_g),
            "-n",
            "2",
            "--processing-res",
            "32",
            "-f",
            "png,npy,exr",
        ],
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "o" / "u.json").read_text())
    assert side["kind"] == "uncertainty" and side["video"]["frames"] == 6
    assert len(decode_all(tmp_path / "o" / "u.mp4")[1]) == 6
    assert len(list((tmp_path / "o" / "u").glob("*.npy"))) == 6
    import OpenEXR

    with OpenEXR.File(str(sorted((tmp_path / "o" / "u").glob("*.exr"))[0])) as f:
        header = dict(f.header())  # the bindings empty the live dict on close
    assert header["lotus:statistic"] == "standard deviation of the [0, 1] maps"  # each frame file says what it holds
    assert "no metric unit" in header["lotus:unit"]


class FailingPredictor(FakePredictor):
    def predict_batch(self, images, opts):
        if self.calls >= 7:
            raise RuntimeError("out of memory")
        return super().predict_batch(images, opts)


def test_interrupted_or_failed_clip_is_redone_with_skip_existing(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", n=20, fps=20)
    out = OutputSpec(tmp_path / "o", ("npy",), skip_existing=True)
    with pytest.raises(KeyboardInterrupt):
        run_video(FakePredictor(interrupt_at=6), Item(clip, "c"), out, PredictOptions(), VideoSpec())
    side = json.loads((tmp_path / "o" / "c.json").read_text())
    assert side["interrupted"] is True and side["complete"] is False and side["video"]["frames"] == 6
    r = run_video(FakePredictor(), Item(clip, "c"), out, PredictOptions(), VideoSpec())
    assert r.status == "done" and r.frames == 20 and r.redone == "its run was interrupted"
    assert len(decode_all(tmp_path / "o" / "c.mp4")[1]) == 20 and len(list((tmp_path / "o" / "c").glob("*.npy"))) == 20
    r = run_video(FakePredictor(), Item(clip, "c"), out, PredictOptions(), VideoSpec())
    assert r.status == "skipped"
    r = run_video(FakePredictor(), Item(clip, "c"), out, PredictOptions(), VideoSpec(FrameSelect(max_frames=5)))
    assert r.status == "done" and r.frames == 5 and r.redone == "made with other options (max_frames None -> 5)"
    r = run_video(FailingPredictor(), Item(clip, "f"), out, PredictOptions(), VideoSpec())
    assert r.status == "failed" and "out of memory" in r.error and r.frames == 7
    assert json.loads((tmp_path / "o" / "f.json").read_text())["complete"] is False
    r = run_video(FakePredictor(), Item(clip, "f"), out, PredictOptions(), VideoSpec())
    assert r.status == "done" and r.frames == 20 and r.redone.startswith("its run failed (")
