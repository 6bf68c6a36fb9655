"""THE --json record (docs/records.md): every command writes the same fields, every finished input gets its
record before the command exits (Ctrl-C and SIGTERM included), and the pipelines run without Typer."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.run.events import Reporter
from lotus_cli.run.results import RECORD_FIELDS, STATUSES

from .conftest import default_signals, make_image

runner = CliRunner()


def lotus(*args):
    return runner.invoke(app, [str(a) for a in args])


def records(stdout: str) -> list[dict]:
    out = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    for r in out:
        assert tuple(r) == RECORD_FIELDS and r["status"] in STATUSES, r
    return out


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(make_image(24, 32)).save(d / "a.png")
    Image.fromarray(make_image(24, 32, seed=1)).save(d / "b.png")
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    return d


@pytest.mark.parametrize(
    "command",
    [
        ["depth"],
        ["normal"],
        ["uncertainty", "-n", "2"],
        ["pointcloud", "--normals", "depth"],
        ["depth", "--shard", "0/1"],
    ],
    ids=["depth", "normal", "uncertainty", "pointcloud", "depth-scaled-out"],
)
def test_every_command_writes_the_one_record_shape(command, folder, tmp_path, checkpoints):
    task = "normal" if command[0] == "normal" else "depth"
    family = "g" if command[0] == "uncertainty" else "d"
    model = checkpoints[(task, family)]
    out = tmp_path / "o"
    r = lotus(*command, folder, "-o", out, "-m", model, "--processing-res", 32, "--json")
    assert r.exit_code == 1, r.output  # the broken file
    recs = {rec["key"]: rec for rec in records(r.stdout)}
    assert {k: v["status"] for k, v in recs.items()} == {"a": "done", "b": "done", "broken": "failed"}
    kind = {"depth": "disparity", "normal": "normal", "uncertainty": "uncertainty", "pointcloud": "pointcloud"}
    assert {recs["a"]["kind"], recs["b"]["kind"]} == {kind[command[0]]}
    assert "not a readable image" in recs["broken"]["error"] or "broken.jpg" in recs["broken"]["error"]
    for rec in (recs["a"], recs["b"]):
        assert json.loads((out / f"{rec['key']}.json").read_text())["complete"]
        assert all(os.path.isfile(p) for p in rec["outputs"].values())
    assert "2 done, 0 skipped, 1 failed" in r.stderr


def test_a_missing_input_is_one_failed_record(tmp_path, depth_d):
    r = lotus("pointcloud", tmp_path / "nowhere.png", "-o", tmp_path / "o", "-m", depth_d, "--json")
    assert r.exit_code == 1 and "0 done, 0 skipped, 1 failed" in r.stderr, r.output
    (rec,) = records(r.stdout)
    assert rec["status"] == "failed" and rec["key"] is None and "no such file" in rec["error"]


def test_an_empty_shard_is_a_success_with_nothing_done(tmp_path, depth_d):
    """A Slurm array task whose share is empty exits 0 with a zero summary (not "no usable inputs", exit 2, which
    would fail the array task)."""
    from lotus_cli.scale.shard import shard_of

    (tmp_path / "in").mkdir()
    Image.fromarray(make_image(24, 32)).save(tmp_path / "in" / "only.png")
    empty = next(k for k in range(3) if shard_of("only", 3) != k)
    r = lotus("depth", tmp_path / "in", "-o", tmp_path / "o", "-m", depth_d, "--shard", f"{empty}/3", "--json")
    assert r.exit_code == 0 and "0 done, 0 skipped, 0 failed" in r.stderr and r.stdout == "", r.output


class Recorder(Reporter):
    def __init__(self):
        self.results, self.warnings, self.notes = [], [], []

    def result(self, r):
        self.results.append(r)

    def warning(self, text):
        self.warnings.append(text)

    def note(self, text):
        self.notes.append(text)


def test_point_clouds_run_without_the_command_line(folder, tmp_path, depth_d):
    from lotus_cli.run.pointcloud import PointcloudRequest, pointclouds

    rec = Recorder()
    request = PointcloudRequest(
        (str(folder),), tmp_path / "o", str(depth_d), normals="depth", processing_res=32, near=1.0, far=5.0
    )
    summary = pointclouds(request, rec)
    assert (summary.done, summary.skipped, summary.failed, summary.exit_code) == (2, 0, 1, 1)
    done = {r.item.key: r for r in rec.results if r.status == "done"}
    assert set(done) == {"a", "b"} and any("model " in n for n in rec.notes)
    side = json.loads((tmp_path / "o" / "a.json").read_text())
    points = side["cloud"]["points"]
    import open3d as o3d

    cloud = o3d.io.read_point_cloud(done["a"].outputs["ply"])
    z = np.asarray(cloud.points)[:, 2]
    assert len(z) == points > 0 and 1.0 - 1e-4 <= z.min() and z.max() <= 5.0 + 1e-4  # --near / --far in metres
    again = pointclouds(PointcloudRequest(**{**vars(request), "skip_existing": True}), Recorder())
    assert (again.done, again.skipped) == (0, 2)


@pytest.mark.heavy
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_a_stopped_run_writes_the_record_of_every_finished_input(sig, code, tmp_path, depth_d):
    """Ctrl-C, or SIGTERM as Slurm, Kubernetes and `timeout` send it: every input whose sidecar says complete has
    its record on stdout, the summary so far is printed, and the exit status says which signal it was."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(300):
        Image.fromarray(make_image(24, 32, seed=i)).save(src / f"im{i:03d}.png")
    out = tmp_path / "o"
    proc = subprocess.Popen(
        ["lotus", "depth", str(src), "-o", str(out), "-m", str(depth_d), "--processing-res", "32", "-f", "npy"]
        + ["--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=default_signals,  # a test run started in the background inherits SIGINT ignored
    )
    first = proc.stdout.readline()  # one input is finished: the run is under way
    time.sleep(0.2)
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    recs = records(first + rest)
    complete = {p.stem for p in out.glob("*.json") if json.loads(p.read_text())["complete"]}
    assert 1 <= len(recs) < 300 and {r["key"] for r in recs} == complete
    assert "interrupted:" in err and f"{len(recs)} done, 0 skipped, 0 failed" in err


def test_the_ray_engine_without_ray_says_how_to_install_it(monkeypatch, tmp_path, depth_d):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    (tmp_path / "x.png").write_bytes(b"")
    r = lotus("depth", tmp_path / "x.png", "-o", tmp_path / "o", "-m", depth_d, "--engine", "ray")
    assert r.exit_code == 2 and "pip install 'lotus-cli[ray]'" in r.stderr and len(r.stderr.splitlines()) == 1


def test_a_batch_out_of_memory_fails_no_input_and_one_too_big_fails_alone(tmp_path, depth_d):
    """The runners take out of memory item by item (model.fallbacks): a batch that does not fit is redone image
    by image and each sidecar says so; an image that fits neither alone nor in tiles fails alone, and the run
    goes on: never the whole batch."""
    import torch

    from lotus_cli.io.sources import Item
    from lotus_cli.model.predictor import LotusPredictor, PredictOptions
    from lotus_cli.run.images import run_images
    from lotus_cli.run.made import OutputSpec

    class Tight(LotusPredictor):
        def predict_batch(self, images, opts):
            if len(images) > 1 or images[0].shape[1] > 40:  # a batch, or the wide image even alone
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().predict_batch(images, opts)

    predictor = Tight.from_pretrained(str(depth_d), device="cpu")
    items = []
    for i, w in enumerate((32, 32, 64)):
        Image.fromarray(make_image(24, w, seed=i)).save(tmp_path / f"im{i}.png")
        items.append(Item(tmp_path / f"im{i}.png", f"im{i}"))
    got = []
    s = run_images(predictor, items, OutputSpec(tmp_path / "o", ("npy",)), PredictOptions(processing_res=32,
                   batch_size=2), on_result=got.append)  # fmt: skip
    status = {r.item.key: r.status for r in got}
    assert status["im0"] == status["im1"] == "done" and s.done >= 2
    side = json.loads((tmp_path / "o" / "im0.json").read_text())
    assert side["memory_fallback"].startswith("alone: the batch of 2 ran out of memory")
    wide = next(r for r in got if r.item.key == "im2")
    if wide.status == "failed":  # in tiles it still asks for more than it is given: that image alone fails
        assert "out of memory" in wide.error and "--processing-res" in wide.error
    else:  # its tiles fitted: a plain map of the whole image, said so
        assert "tiles" in json.loads((tmp_path / "o" / "im2.json").read_text())["memory_fallback"]


def test_the_ray_engine_refuses_a_gpu_index_its_actors_cannot_see(tmp_path, depth_d):
    Image.fromarray(make_image(24, 32)).save(tmp_path / "x.png")
    r = lotus("depth", tmp_path / "x.png", "-o", tmp_path / "o", "-m", depth_d, "--engine", "ray", "--device", "cuda:1")
    assert r.exit_code == 2 and "each actor sees only its own GPU" in r.stderr and len(r.stderr.splitlines()) == 1


def test_a_tiled_image_says_its_plan_up_front_and_how_long_it_will_take(tmp_path, depth_d):
    """A large image at small tiles runs for minutes: the plan (tiles, model calls) is said before the first
    tile, and an estimate once the first calls are timed, also when stderr is no terminal."""
    Image.fromarray(make_image(192, 256)).save(tmp_path / "big.png")
    r = lotus("depth", tmp_path / "big.png", "-o", tmp_path / "o", "-m", depth_d, "--processing-res", 32,
              "--tile", 48, "--tile-res", 32)  # fmt: skip
    assert r.exit_code == 0, r.output
    tiling = json.loads((tmp_path / "o" / "big.json").read_text())["tiling"]
    n = tiling["tiles"]
    assert n > 4 and f"tiling 256x192: {n} tiles of " in r.stderr and "model calls" in r.stderr
    assert "tiling: about " in r.stderr and r.stderr.index("model calls") < r.stderr.index("tiling: about ")


def test_a_stopped_scaled_out_run_reports_what_its_workers_finished(tmp_path, depth_d, monkeypatch):
    """Under Ray the driver reads the actors' rows as they come: on Ctrl-C, inputs whose outputs are complete
    but whose rows were not read yet still get their records (judged as a rerun judges them)."""
    from lotus_cli.scale import dispatch as D

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(make_image(24, 32, seed=i)).save(src / f"im{i}.png")
    real = D.run_items

    def finished_unread(predictor, batch, items, job, staged, outputs, report):
        real(predictor, batch, items[:2], job, staged, outputs, lambda r: None)  # written, rows never read
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "run_items", finished_unread)
    r = lotus("depth", src, "-o", tmp_path / "o", "-m", depth_d, "--processing-res", 32, "--shard", "0/1", "--json")
    assert r.exit_code == 130, r.output
    assert {rec["key"]: rec["status"] for rec in records(r.stdout)} == {"im0": "done", "im1": "done"}
    assert "2 done, 0 skipped, 0 failed" in r.stderr


def test_on_a_gpu_the_reader_threads_resize_for_the_model(tmp_path):
    """Issue 27 (Low): the model's thread does not scale and resize images between two calls on a GPU; the
    readers hand it the prepared input (bit for bit the predictor's own), while a CPU's cores stay the model's."""
    from types import SimpleNamespace

    import torch

    from lotus_cli.io.sources import Item
    from lotus_cli.model.predictor import Prepared, prepare
    from lotus_cli.run.predict import PredictRequest, image_reader

    Image.fromarray(make_image(24, 32)).save(tmp_path / "x.png")
    item = Item(tmp_path / "x.png", "x")

    class OnDevice:
        def __init__(self, kind):
            self.device = torch.device(kind)

    request = PredictRequest("depth", (str(tmp_path),), processing_res=16)
    p = SimpleNamespace(tiles=None, ensemble=None, request=request, opts=SimpleNamespace(processing_res=16))
    assert image_reader(p, OnDevice("cpu")) is None
    got = image_reader(p, OnDevice("cuda"))(item)
    assert isinstance(got, Prepared) and got.size == (24, 32)
    assert np.array_equal(got.x, prepare(make_image(24, 32), 16).x)
    assert image_reader(SimpleNamespace(**{**vars(p), "tiles": object()}), OnDevice("cuda")) is None
