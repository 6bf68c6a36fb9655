import json

import cv2
import matplotlib
import numpy as np
import pytest

from lotus_cli.errors import UsageError
from lotus_cli.io import outputs, visualize
from lotus_cli.io.atomic import STALE_AFTER, atomic_open, write_bytes
from lotus_cli.io.formats import Style, parse_formats
from lotus_cli.io.outputs import output_paths, write_map, write_outputs
from lotus_cli.io.sidecar import reusable, sidecar


def test_depth_colour_map_is_the_reference_formula():
    d = np.random.default_rng(0).random((7, 9)).astype(np.float32)
    ours = visualize.colorize_depth(d, "disparity")
    t = (d - d.min()) / (d.max() - d.min())
    ref = (matplotlib.colormaps["Spectral"](1 - t)[..., :3] * 255).astype(np.uint8)  # reference: cmap(1-d)
    assert np.array_equal(ours, ref)
    near = visualize.colorize_depth(np.array([[1.0, 0.0]]), "disparity")
    assert near[0, 0, 0] > 150 and near[0, 0, 2] < 100  # near (disparity 1) is red
    near_depth = visualize.colorize_depth(np.array([[0.0, 1.0]]), "depth")
    assert np.array_equal(near_depth[0, 0], near[0, 0])  # near is warm for both kinds


def test_normal_encoding():
    n = np.array([[[0, 0, 1], [0, 1, 0]]], np.float32)
    rgb = visualize.normal_to_rgb(n)
    assert rgb[0, 0].tolist() == [127, 127, 255] and rgb[0, 1].tolist() == [127, 255, 127]


def test_formats_parse():
    assert parse_formats("png, NPY") == ("png", "npy")
    assert parse_formats("all") == ("png", "png16", "npy", "exr")  # every format, EXR included
    with pytest.raises(UsageError):
        parse_formats("png,exr2")


def test_write_outputs_round_trip(tmp_path):
    d = np.linspace(0.2, 0.7, 30, dtype=np.float32).reshape(5, 6)
    paths = output_paths(tmp_path, "a/x", ("png", "png16", "npy"))
    assert paths["npy"] == tmp_path / "a" / "x.npy" and paths["png16"].name == "x.16bit.png"
    rec = write_outputs(paths, d, "disparity", {"model": "m"})
    assert np.array_equal(np.load(paths["npy"]), d)
    png16 = cv2.imread(str(paths["png16"]), cv2.IMREAD_UNCHANGED)
    assert png16.dtype == np.uint16 and png16.min() == 0 and png16.max() == 65535  # the full range
    side = json.loads(paths["json"].read_text())
    assert side == json.loads(json.dumps(rec))
    m = side["outputs"]["png16"]
    decoded = m["min"] + png16 / 65535 * (m["max"] - m["min"])
    assert np.abs(decoded - d).max() < 1e-5
    assert side["kind"] == "disparity" and side["value_range"] == pytest.approx([0.2, 0.7])
    colour = cv2.imread(str(paths["png"]))[:, :, ::-1]
    assert np.array_equal(colour, visualize.colorize_depth(d, "disparity"))


def test_normal_png16_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = rng.normal(size=(4, 5, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    paths = output_paths(tmp_path, "n", ("png16",))
    write_outputs(paths, n, "normal", {})
    back = cv2.imread(str(paths["png16"]), cv2.IMREAD_UNCHANGED)[:, :, ::-1] / 65535 * 2 - 1
    assert np.abs(back - n).max() < 2e-5


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.npy"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target) as f:
            f.write(b"new but partial")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


# ------------------------------------------------------------------------------------------------ reruns


def test_stale_temporaries_of_ours_are_cleared_young_and_foreign_ones_stay(tmp_path):
    import os
    import time

    folder = tmp_path / "out"
    folder.mkdir()
    old = time.time() - 2 * STALE_AFTER
    names = {
        ".x.npy.k3j_9a2b.tmp": True,  # ours, left by a killed run: removed
        ".clip.mp4.ab12cd34.tmp": True,
        ".y.npy.zz99yy88.tmp": False,  # ours but young (a concurrent run's): kept, see below
        ".notes.tmp": False,
        "x.ab12cd34.tmp": False,
        ".x.npy.AB12CD34.tmp": False,
        "keep.npy": False,
    }
    for name, stale in names.items():
        (folder / name).write_bytes(b"partial")
        if stale or name != ".y.npy.zz99yy88.tmp":
            os.utime(folder / name, (old, old))
    write_bytes(folder / "new.npy", b"data")
    left = {p.name for p in folder.iterdir()}
    assert left == {n for n, stale in names.items() if not stale} | {"new.npy"}


class FakeImagePredictor:
    """Stands in for LotusPredictor in run_images: a map that depends on the image and the model name."""

    task, kind, family = "depth", "disparity", "g"

    def __init__(self, model="model-a"):
        self.model = model

    def describe(self):
        return {"model": self.model, "task": self.task, "kind": self.kind, "family": self.family}

    def predict_batch(self, images, opts):
        from lotus_cli.model.predictor import Prediction

        return [Prediction(im.mean(-1).astype(np.float32) / 255, im.shape[:2]) for im in images]


def test_skip_existing_redoes_outputs_made_with_another_model_or_options(tmp_path):
    from PIL import Image

    from lotus_cli.io.sources import Item
    from lotus_cli.model.predictor import PredictOptions
    from lotus_cli.run.images import run_images
    from lotus_cli.run.made import OutputSpec

    from .conftest import make_image

    Image.fromarray(make_image(12, 16)).save(tmp_path / "x.png")
    items = [Item(tmp_path / "x.png", "x")]
    spec = OutputSpec(tmp_path / "o", ("png", "npy"), skip_existing=True)

    def rerun(predictor=FakeImagePredictor(), output=spec, opts=PredictOptions(processing_res=32), **kw):
        got = []
        s = run_images(predictor, items, output, opts, on_result=got.append, **kw)
        return got[0], s

    r, _ = rerun()
    assert r.status == "done" and r.redone is None  # nothing was there
    r, _ = rerun()
    assert r.status == "skipped"  # same model and options
    r, s = rerun(FakeImagePredictor("model-b"))
    assert r.status == "done" and r.redone == "made with another model (model-a)" and s.redone == 1
    r, _ = rerun(FakeImagePredictor("model-b"), opts=PredictOptions(processing_res=48))
    assert r.redone == "made with other options (processing_res 32 -> 48)"
    r, _ = rerun(FakeImagePredictor("model-b"), opts=PredictOptions(processing_res=48, seed=3))
    assert r.redone == "made with other options (seed 0 -> 3)"  # a G model: its seed changes the map
    opts = PredictOptions(processing_res=48, seed=3)
    turbo = OutputSpec(tmp_path / "o", ("png", "npy"), Style(cmap="turbo"), True)
    r, _ = rerun(FakeImagePredictor("model-b"), turbo, opts)
    assert r.redone == "its png was made with other settings (colormap 'Spectral' -> 'turbo')"
    r, _ = rerun(FakeImagePredictor("model-b"), opts=opts, predict_options={"tile": 512})
    assert r.redone == "made with other options (tile None -> 512)"
    side = json.loads((tmp_path / "o" / "x.json").read_text())
    assert side["complete"] is True and side["options"]["tile"] == 512 and side["model"] == "model-b"
    r, _ = rerun(FakeImagePredictor("model-b"), opts=opts, predict_options={"tile": 512})
    assert r.status == "skipped"
    # outputs left from an older run without the sidecar of this one are not trusted
    (tmp_path / "o" / "x.json").unlink()
    r, _ = rerun(FakeImagePredictor("model-b"), opts=opts, predict_options={"tile": 512})
    assert r.status == "done" and r.redone == "no sidecar: its run did not finish"


def test_a_redo_that_fails_part_way_leaves_no_sidecar_vouching_for_the_old_outputs(tmp_path, monkeypatch):
    d = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    paths = output_paths(tmp_path, "x", ("png", "npy"))
    write_outputs(paths, d, "disparity", sidecar("disparity", model={"model": "a"}))
    real = write_map

    def disk_full(path, fmt, *a, **kw):
        if fmt == "npy":
            raise OSError(28, "No space left on device")
        return real(path, fmt, *a, **kw)

    monkeypatch.setattr(outputs, "write_map", disk_full)
    with pytest.raises(OSError):  # model b's png is written, its npy is not
        write_outputs(paths, 1 - d, "disparity", sidecar("disparity", model={"model": "b"}))
    keep, why = reusable(
        paths["json"], [paths["png"], paths["npy"]], kind="disparity", model="a", options={}, settings={}
    )
    assert not keep and why == "no sidecar: its run did not finish"
