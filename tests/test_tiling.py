"""Tiling: the plan's geometry, seams and per-tile affine recovery on a scene of known depth (a fake
predictor), and end to end with the tiny random checkpoints."""

import json

import numpy as np
import pytest
import torch

from lotus_cli.errors import UsageError
from lotus_cli.model import tiling
from lotus_cli.model.predictor import LotusPredictor, PredictOptions
from lotus_cli.model.tiling import TileOptions, axis_starts, parse_bytes, plan_tiles, predict_tiled

from .conftest import make_image

# ------------------------------------------------------------------------ a predictor of known depth


class AffineTilePredictor(LotusPredictor):
    """The LotusPredictor interface over a scene of known depth: the image carries the depth in 16 bits
    (R high byte, G low byte), the "latent" is that depth at the processing size (1 pixel per cell), and
    every image passing through ``denoise`` comes out under its own random scale and shift, as Lotus
    tiles come out each in their own affine frame. The first call's (s, b) is in ``self.fits[0]``."""

    def __init__(self, seed: int = 0):  # no weights: only the attributes the steps use
        self.task, self.kind, self.family, self.source = "depth", "disparity", "d", "fake"
        self.latent_factor, self.latent_channels = 1, 1
        self.device, self.dtype, self.channels_last = torch.device("cpu"), torch.float32, False
        self.rng = np.random.default_rng(seed)
        self.fits: list[tuple[float, float]] = []

    @staticmethod
    def to_tensor(rgb):
        d = (rgb[..., 0].astype(np.float32) * 256 + rgb[..., 1]) / 65535  # [H, W] in [0, 1]
        return torch.from_numpy(d)[None, None]  # [1, 1, H, W]

    def encode(self, x, latent="mean", seeds=None):
        return x

    def denoise(self, z, noise=None, switch=None):
        out = []
        for zi in z:
            s = self.rng.uniform(0.4, 1.0)
            b = self.rng.uniform(0.0, 1.0 - s)  # s * d + b stays inside [0, 1]: decode's clamp never bites
            self.fits.append((s, b))
            out.append(s * zi + b)
        return torch.stack(out)

    def decode(self, z):
        return z.expand(-1, 3, -1, -1)  # [B, 3, h, w]


def encode_depth(d: np.ndarray) -> np.ndarray:
    q = np.round(d * 65535).astype(np.uint16)
    return np.stack([q >> 8, q & 255, np.zeros_like(q)], -1).astype(np.uint8)


def scene(h: int, w: int, detail: float = 0.0) -> np.ndarray:
    """Known depth [h, w] in [0.2, 0.9]: a tilted plane and a broad bump, plus a ripple of period 10 px
    (amplitude ``detail``) that a pass at 1/8 of the resolution cannot resolve."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    d = (
        0.3
        + 0.25 * xx / w
        + 0.15 * yy / h
        + 0.1 * np.exp(-(((xx - 0.6 * w) / (0.3 * w)) ** 2 + ((yy - 0.4 * h) / (0.3 * h)) ** 2))
    )
    d += detail * np.sin(2 * np.pi * xx / 10) * np.sin(2 * np.pi * yy / 10)
    return np.round(d * 65535) / 65535  # exactly what the image carries


OPTS = PredictOptions(processing_res=64)
TOPTS = TileOptions(tile=128, overlap=0.25, tile_res=64)  # tiles see the scene 4x finer than the global pass


def aligned_rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    a = np.stack([pred.ravel(), np.ones(pred.size)], 1)
    coef, *_ = np.linalg.lstsq(a, truth.ravel(), rcond=None)
    return float(np.sqrt(((a @ coef - truth.ravel()) ** 2).mean()))


def seam_ratios(d: np.ndarray, plan) -> tuple[float, float]:
    """Mean gradient magnitude where tiles meet over that inside tile cores: (blend bands, where no tile has
    weight 1, over the rest; pixels within 2 px of an inner tile edge over those farther than 8 px)."""
    gy, gx = np.gradient(d.astype(np.float64))
    g = np.hypot(gx, gy)
    wmax = np.zeros(d.shape)
    for y0, y1, x0, x1 in plan.tiles:
        wmax[y0:y1, x0:x1] = np.maximum(wmax[y0:y1, x0:x1], plan.weights(y0, x0))
    band = wmax < 1 - 1e-6
    edges_y = {e for y0, y1, _, _ in plan.tiles for e in (y0, y1) if 0 < e < plan.height}
    edges_x = {e for _, _, x0, x1 in plan.tiles for e in (x0, x1) if 0 < e < plan.width}
    dy = np.min([np.abs(np.arange(plan.height) - e) for e in edges_y], 0)[:, None]
    dx = np.min([np.abs(np.arange(plan.width) - e) for e in edges_x], 0)[None, :]
    dist = np.minimum(dy, dx)
    return float(g[band].mean() / g[~band].mean()), float(g[dist <= 2].mean() / g[dist > 8].mean())


def tiled_and_plan(truth, topts=TOPTS, seed=0):
    fake = AffineTilePredictor(seed)
    pred = predict_tiled(fake, [encode_depth(truth)], OPTS, topts)[0]
    plan = plan_tiles(*truth.shape, topts, processing_res=OPTS.processing_res)
    return pred, plan, fake


# --------------------------------------------------------------------------------- seams and affine


def test_no_seams_on_a_smooth_scene():
    truth = scene(384, 512)
    pred, plan, fake = tiled_and_plan(truth)
    assert len(plan.tiles) == 20 and len(fake.fits) == 21  # the global pass + 20 tiles, each in its own frame
    (band, edge), (truth_band, truth_edge) = seam_ratios(pred.map, plan), seam_ratios(truth, plan)
    print(
        f"\nseam gradient ratios, blend bands / cores: tiled {band:.4f} (truth {truth_band:.4f}); "
        f"tile edges / interiors: tiled {edge:.4f} (truth {truth_edge:.4f})"
    )
    assert band <= 1.1 and edge <= 1.1
    assert abs(band - truth_band) < 0.02 and abs(edge - truth_edge) < 0.02


def test_seam_measure_sees_seams_without_the_fit(monkeypatch):
    truth = scene(384, 512)
    monkeypatch.setattr(tiling, "robust_scale_shift", lambda a, b: (1.0, 0.0, None))
    pred, plan, _ = tiled_and_plan(truth)
    band, _ = seam_ratios(pred.map, plan)
    print(f"\nwithout the fit: blend bands / cores {band:.2f}")
    assert band > 1.5  # the measure has teeth: unfitted tiles leave seams in the bands


def test_per_tile_scale_and_shift_are_recovered():
    truth = scene(384, 512)
    pred, plan, fake = tiled_and_plan(truth, seed=3)
    s0, b0 = fake.fits[0]  # the global pass's frame is the frame of the result
    err = np.abs(pred.map - (s0 * truth + b0)) / s0  # in units of the true depth
    fits = np.array(pred.extra["tiling"]["depth_fit"]["scale_shift"])
    spread = np.ptp([s for s, _ in fake.fits[1:]])
    print(
        f"\naffine recovery: max error {err.max():.2e}, mean {err.mean():.2e} (depth range "
        f"{np.ptp(truth):.2f}); tile scales spread {spread:.2f}"
    )
    assert spread > 0.3 and len(fits) == 20
    assert err.max() < 5e-3 and err.mean() < 1e-3


def test_tiled_error_no_worse_than_a_single_pass():
    for detail in (0.0, 0.03):
        truth = scene(384, 512, detail)
        pred, _, _ = tiled_and_plan(truth)
        single = AffineTilePredictor().predict(encode_depth(truth), OPTS).map
        tiled_err, single_err = aligned_rmse(pred.map, truth), aligned_rmse(single, truth)
        print(f"\ndetail {detail}: RMSE vs truth (affine-aligned) tiled {tiled_err:.2e}, single pass {single_err:.2e}")
        assert tiled_err <= single_err
    assert tiled_err < 0.5 * single_err  # with detail the tiles' 4x finer view shows


# ------------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize(
    "h,w,tile,overlap",
    [(384, 512, 128, 0.25), (1000, 700, 256, 0.5), (300, 2000, 256, 0.0), (530, 530, 256, 0.5), (100, 90, 128, 0.25)],
)
def test_plan_covers_the_image_with_the_overlap_and_weights_sum_to_one(h, w, tile, overlap):
    plan = plan_tiles(h, w, TileOptions(tile=tile, overlap=overlap), processing_res=64)
    cover, wsum = np.zeros((h, w), int), np.zeros((h, w))
    for y0, y1, x0, x1 in plan.tiles:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w and (y1 - y0, x1 - x0) == plan.tile_size
        cover[y0:y1, x0:x1] += 1
        wsum[y0:y1, x0:x1] += plan.weights(y0, x0)
    assert cover.min() >= 1 and np.abs(wsum - 1).max() < 1e-6
    oy, ox = plan.overlap_px()
    assert (len(plan.ys) == 1 or oy >= int(overlap * plan.tile_size[0])) and (
        len(plan.xs) == 1 or ox >= int(overlap * plan.tile_size[1])
    )
    record = json.loads(json.dumps(plan.to_json()))
    assert record["tiles"] == len(plan.tiles) and record["input_size"] == [w, h]


def test_weights_fall_to_zero_at_inner_borders():
    starts = axis_starts(512, 128, 0.25)
    w = tiling.axis_weights(starts, 128, 1)
    assert w[0] < 1e-3 and w[-1] < 1e-3 and w[64] == 1.0 and np.all(np.diff(w[:32]) >= 0)


def test_auto_plan():
    assert plan_tiles(600, 700, processing_res=768).tiles == []  # the global pass already sees every pixel
    assert plan_tiles(600, 800, processing_res=768).tiles == []  # 1.04x finer: not worth tiling
    two = plan_tiles(1024, 1400, processing_res=768)  # 1.8x finer: tiles at one input pixel per model pixel
    assert two.tile_size == (768, 768) and two.tile_processing_size == (768, 768) and len(two.tiles) == 6
    plan = plan_tiles(3024, 4032, processing_res=768)  # 5.25x: tiles grow so they are at most 4x finer
    assert plan.tile_size == (1008, 1008) and plan.tile_processing_size == (768, 768) and len(plan.tiles) == 20
    for h, w in ((3024, 4032), (6928, 9238)):  # 12 MP and 64 MP
        p = plan_tiles(h, w, processing_res=768)
        assert p.tile_processing_size[1] / p.tile_size[1] <= 4 * 768 / w + 1e-9 and len(p.tiles) <= 25
    cost = tiling.MemoryCost(weights=1000, per_pixel=1.0)
    small = plan_tiles(3024, 4032, processing_res=768, cost=cost, budget=1000 + 450_000, batch_size=4)
    assert small.tile_res == 640 and small.tile_size == (840, 840) and small.batch == 1
    assert small.estimated_peak <= small.budget
    batched = plan_tiles(3024, 4032, processing_res=768, cost=cost, budget=1000 + 3 * 768 * 768, batch_size=4)
    assert batched.tile_res == 768 and batched.batch == 3


def test_plan_refuses_what_cannot_fit():
    cost = tiling.MemoryCost(weights=1000, per_pixel=1.0)
    with pytest.raises(UsageError, match="--processing-res"):
        plan_tiles(3000, 4000, processing_res=768, cost=cost, budget=1000 + 100_000)
    with pytest.raises(UsageError, match="--tile-res"):
        plan_tiles(3000, 4000, TileOptions(tile_res=768), processing_res=256, cost=cost, budget=1000 + 100_000)


def test_options_are_validated():
    assert TileOptions(tile="512").tile == 512 and TileOptions(tile="AUTO").tile == "auto"
    assert TileOptions(max_memory="6G").max_memory == 6 * 1024**3 and parse_bytes("512m") == 512 * 1024**2
    assert TileOptions(max_memory="auto").max_memory is None and parse_bytes("1.5GB") == int(1.5 * 1024**3)
    for kwargs, option in [
        ({"tile": "big"}, "--tile"),
        ({"tile": 8}, "--tile"),
        ({"overlap": 0.7}, "--overlap"),
        ({"tile_res": 0}, "--tile-res"),
        ({"max_memory": "lots"}, "--max-memory"),
        ({"max_memory": 0}, "--max-memory"),
    ]:
        with pytest.raises(UsageError, match=option):
            TileOptions(**kwargs)


def test_model_input_by_strips_is_one_resize():
    img = make_image(1100, 300)
    whole = LotusPredictor.resize(LotusPredictor.to_tensor(img), (200, 54))
    strips = tiling.model_input(LotusPredictor, img, (200, 54), rows=256)
    assert torch.allclose(whole, strips, atol=1e-6)


# ----------------------------------------------------------------------- the tiny real checkpoints

SMALL = PredictOptions(processing_res=32, batch_size=3)
SMALL_TILES = TileOptions(tile=48, overlap=0.25, tile_res=32)


@pytest.mark.parametrize("family", ["g", "d"])
def test_tiny_checkpoints_end_to_end(checkpoints, family, tmp_path):
    from lotus_cli.io.sources import expand
    from lotus_cli.run.images import run_images
    from lotus_cli.run.made import OutputSpec

    pred = LotusPredictor.from_pretrained(checkpoints[("depth", family)], device="cpu")
    img = make_image(96, 128, 3)
    out = predict_tiled(pred, [img, img[:80]], SMALL, SMALL_TILES)
    assert [o.map.shape for o in out] == [(96, 128), (80, 128)]
    assert np.isfinite(out[0].map).all() and 0 <= out[0].map.min() and out[0].map.max() <= 1
    record = out[0].extra["tiling"]
    assert record["tiles"] == 12 and record["batch"] == 3 and len(record["depth_fit"]["scale_shift"]) == 12
    assert (record["noise"] is not None) == (family == "g")
    np.testing.assert_array_equal(out[0].map, predict_tiled(pred, [img], SMALL, SMALL_TILES)[0].map)  # reproducible

    from PIL import Image

    Image.fromarray(img).save(tmp_path / "x.png")
    items, _ = expand([str(tmp_path / "x.png")])
    summary = run_images(
        pred,
        items,
        OutputSpec(tmp_path / "out", ("png", "npy")),
        SMALL,
        predict=lambda ims, o: predict_tiled(pred, ims, o, SMALL_TILES),
    )
    assert summary.done == 1
    side = json.loads((tmp_path / "out" / "x.json").read_text())
    assert side["tiling"]["grid"] == [4, 3] and np.load(tmp_path / "out" / "x.npy").shape == (96, 128)


@pytest.mark.parametrize("family", ["g", "d"])
def test_one_tile_over_the_whole_image_is_a_plain_prediction(checkpoints, family):
    pred = LotusPredictor.from_pretrained(checkpoints[("depth", family)], device="cpu")
    img = make_image(40, 56, 4)
    plain = pred.predict(img, SMALL).map
    tiled = predict_tiled(pred, [img], SMALL, TileOptions(tile=64, tile_res=32))[0]
    assert tiled.extra["tiling"]["tiles"] == 1
    np.testing.assert_allclose(tiled.map, plain, atol=1e-5)


def test_g_tiles_share_one_noise_field(depth_g, monkeypatch):
    pred = LotusPredictor.from_pretrained(depth_g, device="cpu")
    seen = []
    real = pred.denoise
    monkeypatch.setattr(pred, "denoise", lambda z, noise=None: (seen.append(noise), real(z, noise))[1])
    predict_tiled(pred, [make_image(48, 128, 5)], PredictOptions(processing_res=32, batch_size=8), SMALL_TILES)
    tiles = seen[1]  # [4, 4, 8, 8]: the 4 tiles of one row; seen[0] is the global pass
    plan = plan_tiles(48, 128, SMALL_TILES, processing_res=32)
    cell = plan.tile_size[1] / tiles.shape[-1]  # input pixels per latent cell
    for a, b in zip(range(3), range(1, 4)):
        shift = round(plan.xs[b] / cell) - round(plan.xs[a] / cell)
        assert 0 < shift < tiles.shape[-1]
        torch.testing.assert_close(tiles[b, :, :, :-shift], tiles[a, :, :, shift:])  # same cells, same noise


def test_normals_blend_to_unit_vectors(checkpoints):
    from lotus_cli.geometry.camera import convert_normals

    pred = LotusPredictor.from_pretrained(checkpoints[("normal", "g")], device="cpu")
    img = make_image(96, 128, 6)
    n = predict_tiled(pred, [img], SMALL, SMALL_TILES)[0]
    assert n.map.shape == (96, 128, 3) and "depth_fit" not in n.extra["tiling"]
    np.testing.assert_allclose(np.linalg.norm(n.map, axis=-1), 1.0, atol=1e-5)
    cv = predict_tiled(pred, [img], PredictOptions(processing_res=32, batch_size=3, frame="opencv"), SMALL_TILES)[0]
    np.testing.assert_allclose(cv.map, convert_normals(n.map, "opencv"), atol=1e-6)


# ------------------------------------------------------------------------------------------ the CLI


def _cli(*args):
    from typer.testing import CliRunner

    from lotus_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


TILE_ARGS = ["--processing-res", "32", "--tile", "48", "--tile-res", "32", "--overlap", "0.25", "-b", "3"]


def test_cli_depth_and_normal_with_tiles(checkpoints, tmp_path):
    from PIL import Image

    img = make_image(96, 128, 7)
    Image.fromarray(img).save(tmp_path / "big.png")
    for task, shape in (("depth", (96, 128)), ("normal", (96, 128, 3))):
        out = tmp_path / task
        r = _cli(
            task, tmp_path / "big.png", "--out", out, "--model", checkpoints[(task, "d")], "--format", "npy", *TILE_ARGS
        )
        assert r.exit_code == 0, r.output
        side = json.loads((out / "big.json").read_text())
        assert side["tiling"]["grid"] == [4, 3] and side["tiling"]["tile_size"] == [48, 48]
        got = np.load(out / "big.npy")
        assert got.shape == shape
        pred = LotusPredictor.from_pretrained(checkpoints[(task, "d")], device="cpu")
        want = predict_tiled(pred, [img], SMALL, SMALL_TILES)[0].map  # the CLI runs exactly the library call
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_cli_uncertainty_with_tiles(depth_g, tmp_path):
    from PIL import Image

    Image.fromarray(make_image(96, 128, 8)).save(tmp_path / "big.png")
    r = _cli(
        "uncertainty",
        tmp_path / "big.png",
        "--out",
        tmp_path / "u",
        "--model",
        depth_g,
        "-n",
        "3",
        "--format",
        "npy",
        *TILE_ARGS,
    )
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "u" / "big.json").read_text())
    assert side["tiling"]["tiles"] == 12 and side["uncertainty"]["samples"] == 3
    spread, mean = np.load(tmp_path / "u" / "big.npy"), np.load(tmp_path / "u" / "big.mean.npy")
    assert spread.shape == mean.shape == (96, 128) and spread.max() > 0 and (spread >= 0).all()


def test_tiling_options_need_tile_and_are_checked_before_loading(depth_d, tmp_path):
    from PIL import Image

    Image.fromarray(make_image(40, 40)).save(tmp_path / "x.png")
    r = _cli("depth", tmp_path / "x.png", "--out", tmp_path / "o", "--tile-res", "256")
    assert r.exit_code == 2 and "--tile-res applies only with --tile" in r.output
    r = _cli("depth", tmp_path / "x.png", "--out", tmp_path / "o", "--tile", "10")
    assert r.exit_code == 2 and "--tile must be auto or a size" in r.output
    r = _cli("depth", tmp_path / "x.png", "--out", tmp_path / "o", "--tile", "auto", "--max-memory", "lots")
    assert r.exit_code == 2 and "--max-memory 'lots' is not a size" in r.output
    assert not (tmp_path / "o").exists()


def test_flat_or_wild_tiles_keep_unit_scale():
    rng = np.random.default_rng(0)
    layout = torch.linspace(0, 1, 64)[None, None, None, :].expand(1, 1, 64, 64).contiguous()  # a ramp
    flat = (0.5 + 1e-4 * rng.normal(size=(128, 128))).astype(np.float32)  # sky: no contrast of its own
    s, b = tiling._fit(flat, layout, (0, 128, 0, 128), (128, 128))
    assert s == 1.0 and abs(b + 0.5 - 0.5) < 0.01  # detail kept at unit scale, level of the ramp's middle
    noisy = rng.random((128, 128)).astype(np.float32)  # no relation to the layout at all
    s, _ = tiling._fit(noisy, layout, (0, 128, 0, 128), (128, 128))
    assert 0 < s <= tiling.MAX_TILE_SCALE


def test_video_sidecar_has_the_tiling_plan(depth_d, tmp_path):
    from .test_video import make_clip

    clip = make_clip(tmp_path / "clip.mp4", 3, 10.0, size=(96, 64))
    r = _cli("depth", clip, "--out", tmp_path / "o", "--model", depth_d, *TILE_ARGS)
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "o" / "clip.json").read_text())
    assert side["tiling"]["grid"] == [3, 2] and side["video"]["frames"] == 3


def test_tiled_uncertainty_encodes_once_and_matches_single_samples(depth_g, monkeypatch):
    from dataclasses import replace

    from lotus_cli.model.predictor import EnsembleOptions
    from lotus_cli.model.tiling import predict_tiled_ensemble

    pred = LotusPredictor.from_pretrained(depth_g, device="cpu")
    img = make_image(96, 128, 9)
    singles = [predict_tiled(pred, [img], replace(SMALL, seed=s), SMALL_TILES)[0].map for s in (0, 1, 2)]
    calls = []
    real = pred.encode
    monkeypatch.setattr(pred, "encode", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ens = predict_tiled_ensemble(pred, [img], SMALL, SMALL_TILES, EnsembleOptions(samples=3))[0]
    assert len(calls) == 1 + 4  # the global pass, and 12 tiles in batches of 3: each encoded once for 3 samples
    stack = np.stack(singles)
    np.testing.assert_allclose(ens.layers["mean"][0], stack.mean(0), atol=1e-5)  # sample k is seed k's prediction
    np.testing.assert_allclose(ens.map, stack.std(0), atol=1e-5)


def test_a_budget_too_small_names_the_option(depth_d, tmp_path):
    from PIL import Image

    Image.fromarray(make_image(96, 128)).save(tmp_path / "x.png")
    r = _cli(
        "depth",
        tmp_path / "x.png",
        "--out",
        tmp_path / "o",
        "--model",
        depth_d,
        "--tile",
        "auto",
        "--max-memory",
        "1M",
        "--processing-res",
        "32",
    )
    assert r.exit_code == 1
    assert "but --max-memory is 1.0 MiB (lower --processing-res or raise --max-memory)" in r.output
    assert "UsageError" not in r.output  # our own message, not a traceback's class name
