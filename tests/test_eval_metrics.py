"""Metrics and alignment of the evaluation protocol against values worked out by hand on small arrays."""

import math

import numpy as np
import pytest

from lotus_cli.evaluate import metrics as M

# Four valid pixels (p, g): (2, 1), (4, 4), (1, 2), (3, 2), and one masked pixel whose junk must not count.
PRED = np.array([[2.0, 4.0, 1.0], [3.0, 1000.0, 7.0]])
GT = np.array([[1.0, 4.0, 2.0], [2.0, 0.001, 7.0]])
VALID = np.array([[True, True, True], [True, False, False]])


def test_depth_metrics_by_hand():
    m = M.depth_metrics(PRED, GT, VALID)
    ln2, ln15 = math.log(2), math.log(1.5)
    d = [ln2, 0.0, -ln2, ln15]  # ln p - ln g
    assert m["abs_rel"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert m["sq_rel"] == pytest.approx((1 / 1 + 0 + 1 / 2 + 1 / 2) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0 + 1 + 1) / 4))
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in d) / 4))
    assert m["log10"] == pytest.approx((math.log10(2) * 2 + math.log10(1.5)) / 4)
    # ratios max(p/g, g/p) = 2, 1, 2, 1.5 against 1.25, 1.5625, 1.953125
    assert (m["delta1"], m["delta2"], m["delta3"]) == (0.25, 0.5, 0.5)
    assert m["i_rmse"] == pytest.approx(math.sqrt((0.25 + 0 + 0.25 + (1 / 3 - 1 / 2) ** 2) / 4))
    mean_d = sum(d) / 4
    assert m["silog"] == pytest.approx(100 * math.sqrt(sum(x * x for x in d) / 4 - mean_d**2))


def test_perfect_prediction_scores_zero_error():
    g = np.array([[1.0, 2.0], [3.0, 4.0]])
    m = M.depth_metrics(g, g, np.ones_like(g, bool))
    assert m["abs_rel"] == 0 and m["rmse"] == 0 and m["silog"] == 0 and m["delta1"] == 1


def test_average_is_the_plain_mean_of_images():
    recs = [{"abs_rel": 0.1, "delta1": 1.0}, {"abs_rel": 0.3, "delta1": 0.5}]
    assert M.average(recs, ("abs_rel", "delta1")) == pytest.approx({"abs_rel": 0.2, "delta1": 0.75})


def test_fit_scale_shift_by_hand_and_ignores_masked_pixels():
    # x = 0, 1, 2; y = 1, 2, 4: mean x 1, mean y 7/3, cov 1, var 2/3 -> s = 1.5, b = 7/3 - 1.5
    src = np.array([0.0, 1.0, 2.0, 50.0])
    ref = np.array([1.0, 2.0, 4.0, -9.0])
    s, b = M.fit_scale_shift(src, ref, np.array([True, True, True, False]))
    assert s == pytest.approx(1.5) and b == pytest.approx(7 / 3 - 1.5)
    # a constant prediction: the best constant is the mean of the reference
    assert M.fit_scale_shift(np.ones(3), np.array([1.0, 2.0, 6.0]), np.ones(3, bool)) == (0.0, 3.0)
    with pytest.raises(ValueError):
        M.fit_scale_shift(src, ref, np.array([True, False, False, False]))


def test_align_depth_space_recovers_the_map_and_clips_to_the_range():
    gt = np.array([[1.0, 2.0], [3.0, 9.0]])
    valid = np.array([[True, True], [True, False]])
    pred = (gt - 1.0) / 2.0  # gt = 2 * pred + 1
    pred[1, 1] = 20.0  # masked out of the fit; aligned it becomes 41 m, clipped to the 10 m of the range
    a = M.align_depth(pred, gt, valid, "depth", (1e-3, 10.0))
    assert (a.scale, a.shift) == (pytest.approx(2.0), pytest.approx(1.0))
    np.testing.assert_allclose(a.depth, [[1, 2], [3, 10]])
    low = M.align_depth(
        np.array([[-5.0, 0.0], [1.0, 2.0]]),
        np.array([[1.0, 1.0], [3.0, 5.0]]),
        np.array([[False, True], [True, True]]),
        "depth",
        (0.5, 10.0),
    )
    assert low.depth[0, 0] == 0.5  # 2 * -5 + 1 < 0.5: clipped up to the dataset's minimum


def test_align_disparity_space_fits_inverse_depth_then_inverts():
    gt = np.array([[1.0, 2.0, 4.0], [0.0, 5.0, 8.0]])
    valid = np.array([[True, True, True], [False, True, True]])
    pred = 0.5 * np.where(gt > 0, 1 / np.where(gt > 0, gt, 1), 0) + 0.1  # disparity = 2 * pred - 0.2
    pred[1, 2] = 0.0  # pred <= 0 is left out of the fit; its aligned disparity -0.2 clips to 1e-3 -> 1000 m
    a = M.align_depth(pred, gt, valid, "disparity", (1e-3, 10.0))
    assert (a.scale, a.shift) == (pytest.approx(2.0), pytest.approx(-0.2))
    np.testing.assert_allclose(a.depth[0], [1, 2, 4])
    assert a.depth[1, 1] == pytest.approx(5.0)
    assert a.depth[1, 2] == 10.0  # 1 / 1e-3 = 1000 m, then the dataset's 10 m
    big = M.align_depth(pred, gt, valid, "disparity", (1e-3, float("inf")))
    assert big.depth[1, 2] == pytest.approx(1000.0)  # the 1e-3 disparity clip itself


def test_align_none_only_clips():
    a = M.align_depth(np.array([[0.0, 5.0, 50.0]]), np.ones((1, 3)), np.ones((1, 3), bool), "none", (0.1, 10))
    np.testing.assert_allclose(a.depth, [[0.1, 5.0, 10.0]])


def test_nearest_downsample_matches_torch_upsample_nearest():
    import torch

    a = np.random.default_rng(0).random((37, 53))
    for max_res in (10, 20, 36):
        f = min(max_res / 37, max_res / 53)
        ref = torch.nn.Upsample(scale_factor=f, mode="nearest")(torch.as_tensor(a)[None, None])[0, 0].numpy()
        np.testing.assert_array_equal(M.nearest_downsample(a, max_res), ref)
    assert M.nearest_downsample(a, 100) is a


def test_depth_valid_mask_is_strict_and_finite():
    gt = np.array([1e-3, 0.5, 10.0, np.inf, np.nan, 9.99])
    assert M.depth_valid_mask(gt, (1e-3, 10.0)).tolist() == [False, True, False, False, False, True]


def test_angular_error_normalises_both_vectors():
    p = np.array([[[0, 0, 1.0], [1, 0, 0], [1, 0, 1], [0, 0, -3]]])
    g = np.array([[[0, 0, 2.0], [0, 0, 1], [0, 0, 5], [0, 0, 1]]])
    np.testing.assert_allclose(M.angular_error(p, g), [[0, 90, 45, 180]], atol=1e-6)


def test_normal_accumulator_pools_pixels_of_all_images():
    acc = M.NormalAccumulator()
    acc.add(np.array([0.0, 10.0, 45.0]))
    acc.add(np.array([90.0, 6.0]))
    r = acc.result()
    e = np.array([0.0, 10.0, 45.0, 90.0, 6.0])  # pooled: not the mean of the two images' means
    assert r["mean"] == pytest.approx(151 / 5)
    assert r["rmse"] == pytest.approx(math.sqrt((100 + 2025 + 8100 + 36) / 5))
    assert r["median"] == pytest.approx(10.0, abs=1e-3)
    assert (r["a5"], r["a7_5"], r["a11_25"], r["a22_5"], r["a30"]) == (0.2, 0.4, 0.6, 0.6, 0.6)
    acc.add(np.array([20.0]))  # even count: the mean of the two middle errors, as np.median
    e = np.append(e, 20.0)
    assert acc.result()["median"] == pytest.approx(np.median(e), abs=1e-3)
    assert M.NormalAccumulator().result() == {}


def test_normal_accumulator_median_on_many_pixels():
    e = np.random.default_rng(1).uniform(0, 60, 10001)
    acc = M.NormalAccumulator()
    for chunk in np.array_split(e, 7):
        acc.add(chunk)
    r = acc.result()
    assert r["median"] == pytest.approx(np.median(e), abs=6e-4)
    assert r["mean"] == pytest.approx(e.mean()) and r["a11_25"] == pytest.approx((e < 11.25).mean())
