"""The Ray engine's CPU stage (ray_engine._decode) and its share of the cluster, without a cluster: the
stage's prepared images are exactly the predictor's own input, and its errors are the runner's."""

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lotus_cli.model.predictor import LotusPredictor, PredictOptions, Prepared, prepare

from .conftest import make_image

ray_engine = pytest.importorskip(
    "lotus_cli.scale.ray_engine", reason="needs the ray extra: pip install 'lotus-cli[ray]'"
)
pytestmark = pytest.mark.ray


def test_prepared_images_predict_exactly_as_the_images(depth_g):
    pred = LotusPredictor.from_pretrained(depth_g, device="cpu", dtype="fp32", processing_res=64)
    opts = PredictOptions(processing_res=64)
    images = [make_image(48, 64, 1), make_image(48, 64, 2)]
    ready = [prepare(im, 64) for im in images]
    assert ready[0].shape == (48, 64, 3) and ready[0].x.shape == (3, 48, 64) and ready[0].x.dtype == np.float32
    want = pred.predict_batch(images, opts)
    got = pred.predict_batch(ready, opts)
    mixed = pred.predict_batch([ready[0], images[1]], opts)
    for w, g, m in zip(want, got, mixed):
        assert np.array_equal(w.map, g.map) and np.array_equal(w.map, m.map)
    with pytest.raises(ValueError, match="another processing_res"):
        pred.predict_batch([prepare(images[0], 32)], opts)


def _job(max_pixels=100_000_000, res=64):
    return SimpleNamespace(max_pixels=max_pixels, opts=PredictOptions(processing_res=res))


def test_the_stage_decodes_prepares_and_words_errors_as_the_runner(tmp_path):
    from lotus_cli.io.sources import read_image

    rgb = make_image(40, 80, 3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "clip.mp4").write_bytes(b"")
    unit = [
        {"path": str(tmp_path / n), "key": n.split(".")[0], "url": "", "error": ""}
        for n in ("a.png", "bad.png", "clip.mp4")
    ]
    for whole in (False, True):
        out = ray_engine._decode({"unit": np.array([json.dumps(unit)], dtype=object)}, _job(), whole)
        (entries,) = [json.loads(u) for u in out["unit"]]
        (images,) = [pickle.loads(b) for b in out["images"]]
        assert set(images) == {"a"}  # the clip is left to its actor; the bad file has no image
        assert entries[0]["error"] == "" and entries[2]["error"] == ""
        with pytest.raises(Exception) as err:
            read_image(tmp_path / "bad.png")
        assert entries[1]["error"] == str(err.value)  # the runner's words
        if whole:  # tiling and ensembles: the decoded image
            assert np.array_equal(images["a"], read_image(tmp_path / "a.png"))
        else:
            p = images["a"]
            assert isinstance(p, Prepared) and p.size == (40, 80) and p.processing_res == 64
            x = LotusPredictor.resize(LotusPredictor.to_tensor(rgb), (32, 64))
            assert torch.equal(torch.from_numpy(p.x)[None], x)
    out = ray_engine._decode({"unit": np.array([json.dumps(unit[:1])], dtype=object)}, _job(max_pixels=100), False)
    assert "above the" in json.loads(out["unit"][0])[0]["error"]  # --max-pixels holds in the stage too


@pytest.mark.parametrize(
    "cpus,gpus,workers,per_worker,remote,stage",
    [
        (3, 2, 2, 1.0, False, 1.0),  # a spare CPU: the stage takes one per task
        (2, 2, 2, 0.8, False, 0.4),  # a spare fraction of one
        (2, 2, 2, 1.0, False, 0.0),  # none spare: the actors decode
        (2, 2, 2, 0.9, True, 0.0),  # remote inputs need a quarter CPU to fetch with
        (9, 1, 2, 1.0, False, None),  # two GPU workers, one GPU
        (1, 2, 2, 1.0, False, None),  # more CPUs than there are
    ],
)
def test_the_stage_gets_the_cpus_the_actors_leave(monkeypatch, cpus, gpus, workers, per_worker, remote, stage):
    from lotus_cli.errors import UsageError
    from lotus_cli.scale.options import Scale

    monkeypatch.setattr(ray_engine.ray, "cluster_resources", lambda: {"CPU": cpus, "GPU": gpus})
    scale = Scale(engine="ray", workers=workers, gpus_per_worker=1, cpus_per_worker=per_worker)
    if stage is None or (remote and cpus - workers * per_worker < ray_engine.MIN_STAGE_CPUS):
        with pytest.raises(UsageError, match="the Ray cluster has"):
            ray_engine.check_resources(scale, remote)
    else:
        assert ray_engine.check_resources(scale, remote) == pytest.approx(stage)
