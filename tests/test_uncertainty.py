import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lotus_cli.cli import app
from lotus_cli.errors import UsageError
from lotus_cli.model.predictor import EnsembleOptions, LotusPredictor, PredictOptions

from .conftest import make_image

runner = CliRunner()
OPTS = PredictOptions(processing_res=32, batch_size=4)


def test_samples_are_the_single_predictions_with_seeds_seed_plus_k(depth_g):
    pred = LotusPredictor.from_pretrained(depth_g, device="cpu")
    img = make_image(24, 32, 1)
    ens = pred.predict_ensemble(img, OPTS, EnsembleOptions(samples=3))
    singles = np.stack([pred.predict(img, PredictOptions(processing_res=32, seed=s)).map for s in (0, 1, 2)])
    np.testing.assert_allclose(ens.layers["mean"][0], singles.mean(0), atol=1e-5)
    np.testing.assert_allclose(ens.map, singles.std(0), atol=1e-5)
    assert ens.map.max() > 1e-4 and ens.extra["uncertainty"]["seeds"] == [0, 1, 2]


def test_spread_is_zero_for_identical_noise(depth_g, monkeypatch):
    pred = LotusPredictor.from_pretrained(depth_g, device="cpu")
    same = pred.noise([0], (6, 8))
    monkeypatch.setattr(pred, "noise", lambda seeds, hw: same.expand(len(seeds), -1, -1, -1))
    ens = pred.predict_ensemble(make_image(24, 32), OPTS, EnsembleOptions(samples=4))
    assert np.abs(ens.map).max() < 1e-6


def test_more_samples_shrink_the_error_of_the_mean(depth_g):
    pred = LotusPredictor.from_pretrained(depth_g, device="cpu")
    img = make_image(24, 32, 2)
    truth = pred.predict_ensemble(img, OPTS, EnsembleOptions(samples=64)).layers["mean"][0]
    errors = {}
    for n in (2, 16):
        # several independent ensembles of n samples each (disjoint seeds), their mean's RMS error
        errs = [
            np.sqrt(
                (
                    (
                        pred.predict_ensemble(
                            img,
                            PredictOptions(processing_res=32, batch_size=8, seed=1000 + 100 * r),
                            EnsembleOptions(samples=n),
                        ).layers["mean"][0]
                        - truth
                    )
                    ** 2
                ).mean()
            )
            for r in range(4)
        ]
        errors[n] = float(np.mean(errs))
    assert errors[16] < 0.6 * errors[2]  # ~1/sqrt(8) in theory


def test_normal_spread_in_degrees_and_flip(checkpoints):
    pred = LotusPredictor.from_pretrained(checkpoints[("normal", "g")], device="cpu")
    ens = pred.predict_ensemble(make_image(24, 32), OPTS, EnsembleOptions(samples=3, tta="flip"))
    assert ens.extra["uncertainty"]["samples"] == 6 and 0 < ens.map.mean() < 180
    np.testing.assert_allclose(np.linalg.norm(ens.layers["mean"][0], axis=-1), 1, atol=1e-5)


def test_d_model_needs_tta(depth_d):
    pred = LotusPredictor.from_pretrained(depth_d, device="cpu")
    with pytest.raises(UsageError) as e:
        pred.predict_ensemble(make_image(24, 32), OPTS, EnsembleOptions(samples=4))
    assert "--tta flip" in str(e.value)
    ens = pred.predict_ensemble(make_image(24, 32), OPTS, EnsembleOptions(samples=4, tta="flip"))
    assert ens.extra["uncertainty"]["samples"] == 2


def test_cli_writes_spread_and_mean(tmp_path, depth_g, depth_d):
    from PIL import Image

    Image.fromarray(make_image(24, 32)).save(tmp_path / "x.png")
    out = tmp_path / "u"
    r = runner.invoke(
        app,
        [
            "uncertainty",
            str(tmp_path / "x.png"),
            "-o",
            str(out),
            "-m",
            str(depth_g),
            "-n",
            "3",
            "--processing-res",
            "32",
            "-f",
            "all",
        ],
    )
    assert r.exit_code == 0, r.output
    spread, mean = np.load(out / "x.npy"), np.load(out / "x.mean.npy")
    assert spread.shape == mean.shape == (24, 32) and spread.max() > 0
    side = json.loads((out / "x.json").read_text())
    assert side["kind"] == "uncertainty" and side["uncertainty"]["statistic"].startswith("standard deviation")
    assert side["layers"]["mean"]["kind"] == "disparity" and (out / "x.mean.png").is_file()
    r = runner.invoke(app, ["uncertainty", str(tmp_path / "x.png"), "-o", str(out), "-m", str(depth_d)])
    assert r.exit_code == 2 and "--tta flip" in r.stderr


def test_cli_skip_existing_redoes_a_spread_made_with_other_samples_and_writes_half_exr(tmp_path, depth_g):
    from PIL import Image

    from .test_formats import exr_channels

    Image.fromarray(make_image(24, 32)).save(tmp_path / "x.png")
    base = [
        "uncertainty",
        str(tmp_path / "x.png"),
        "-o",
        str(tmp_path / "u"),
        "-m",
        str(depth_g),
        "--processing-res",
        "32",
        "-f",
        "npy,exr",
        "--exr-half",
        "--skip-existing",
    ]
    r = runner.invoke(app, [*base, "-n", "3"])
    assert r.exit_code == 0, r.output
    ch, _ = exr_channels(tmp_path / "u" / "x.exr")
    assert ch["Y"].dtype == np.float16  # --exr-half reached the writer
    np.testing.assert_allclose(ch["Y"].astype(np.float32), np.load(tmp_path / "u" / "x.npy"), rtol=1e-3, atol=1e-4)
    r = runner.invoke(app, [*base, "-n", "3"])
    assert r.exit_code == 0 and "1 skipped" in r.stderr  # same options: kept
    r = runner.invoke(app, [*base, "-n", "4"])
    assert r.exit_code == 0 and "redone:" in r.stderr and "samples" in r.stderr, r.stderr
    assert json.loads((tmp_path / "u" / "x.json").read_text())["uncertainty"]["noise_samples"] == 4
