"""Equirectangular panoramas (geometry/panorama.py, model/panorama.py): conventions checked analytically, and
ray-cast rooms predicted through a stand-in network whose views are each off by an unknown scale and shift."""

import math

import numpy as np
import pytest

from lotus_cli.geometry.camera import angular_error, fit_scale_shift, robust_scale_shift
from lotus_cli.geometry.panorama import (
    border_ramp,
    cube_views,
    equirect_to_view,
    joint_scale_shift,
    pixel_directions,
    ray_cos,
    ring_views,
    rotate_normals,
    sample_bilinear,
    to_equirect,
)
from lotus_cli.model import panorama
from lotus_cli.model.panorama import PanoramaOptions, plan_views, predict_panorama
from lotus_cli.model.predictor import PredictOptions
from lotus_cli.model.tiling import smoothstep

from .panorama_rooms import StandIn, box_room, furnished_room, render_panorama

H, W = 128, 256
OPTS = PredictOptions(processing_res=96, batch_size=4)
ROOMS = {"box": box_room, "furnished": furnished_room}


def run(room, task="depth", kind="disparity", spoil=None, opts=OPTS, popts=PanoramaOptions()):
    scene = render_panorama(H, W, room)
    views = plan_views(H, W, opts, popts)
    standin = StandIn(scene["rgb"], views, room, task, kind, spoil=spoil)
    return scene, standin, predict_panorama(standin, [scene["rgb"]], opts, popts)[0]


def blend_bands(views, h=H, w=W) -> np.ndarray:
    """[H, W] True where views are blended (a view's weight strictly between 0 and 1): the bands from each
    view's core to its border, where a seam would show."""
    d = pixel_directions(h, w)
    out = np.zeros((h, w), bool)
    for v in views:
        u, y, ahead = v.project(d)
        wt = np.where(v.inside(u, y, ahead), smoothstep(border_ramp(v, u, y)), 0.0)
        out |= (wt > 0) & (wt < 1)
    return out


def gradients(m: np.ndarray) -> np.ndarray:
    """|right neighbour - pixel| + |lower neighbour - pixel| [H, W]; the right neighbour of column W - 1 is
    column 0 (longitude wrap), the last row has no lower one."""
    g = np.abs(np.roll(m, -1, axis=1) - m)
    g[:-1] += np.abs(m[1:] - m[:-1])
    return g


def seam_ratio(pred: np.ndarray, truth: np.ndarray, where: np.ndarray) -> float:
    """How much more the prediction's gradient exceeds the truth's on ``where`` than elsewhere: 1 = no seam."""
    gp, gt = gradients(pred), gradients(truth)
    on = gp[where].mean() / gt[where].mean()
    off = gp[~where].mean() / gt[~where].mean()
    return float(on / off)


# ------------------------------------------------------------------------------------------- geometry


def test_pixel_directions_follow_the_stated_conventions():
    d = pixel_directions(4, 8, dtype=np.float64)  # columns 3, 4 straddle longitude 0; rows 1, 2 the equator
    mid = (d[1, 3] + d[2, 4]) / 2
    np.testing.assert_allclose(mid / np.linalg.norm(mid), [0, 0, 1], atol=1e-12)  # forward
    assert d[0, 6, 0] > 0.3 and d[0, 6, 1] < 0  # right of the middle turns right; the top row looks up
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1, atol=1e-12)
    x, y = to_equirect(d, 4, 8)
    np.testing.assert_allclose(x, np.broadcast_to(np.arange(8.0), (4, 8)), atol=1e-9)
    np.testing.assert_allclose(y, np.broadcast_to(np.arange(4.0)[:, None], (4, 8)), atol=1e-9)


def test_sampling_wraps_at_the_longitude_seam():
    img = np.arange(8, dtype=np.float32)[None, :].repeat(2, 0)
    # half-way between the last column (7) and the first (0) is their mean across the wrap, not a clamp
    assert sample_bilinear(img, np.array([7.5]), np.array([0.0]), wrap_x=True)[0] == pytest.approx(3.5)
    assert sample_bilinear(img, np.array([-0.5]), np.array([0.0]), wrap_x=True)[0] == pytest.approx(3.5)
    assert sample_bilinear(img, np.array([7.5]), np.array([0.0]))[0] == pytest.approx(7.0)


def test_a_view_resampled_from_the_panorama_sees_what_its_camera_sees():
    # a panorama whose pixels hold their own direction: each view pixel must receive its ray's direction
    d = pixel_directions(256, 512, dtype=np.float64)
    for v in cube_views(110.0, 32):
        got = equirect_to_view(d.astype(np.float32), v)
        want = v.rays() @ v.rotation.T
        want /= np.linalg.norm(want, axis=-1, keepdims=True)
        assert np.degrees(np.arccos(np.clip((got * want).sum(-1) / np.linalg.norm(got, axis=-1), -1, 1))).max() < 0.6


def test_normals_rotate_from_a_view_into_the_panorama_frame():
    views = {v.name: v for v in cube_views(100.0, 8)}
    facing = np.array([0.0, 0.0, 1.0], np.float32)  # a wall facing the view's camera (Lotus axes)
    # panorama frame, Lotus axes: x left, y up, z backward
    np.testing.assert_allclose(rotate_normals(facing, views["front"]), [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(rotate_normals(facing, views["right"]), [1, 0, 0], atol=1e-6)  # faces left
    np.testing.assert_allclose(rotate_normals(facing, views["back"]), [0, 0, -1], atol=1e-6)
    np.testing.assert_allclose(rotate_normals(facing, views["up"]), [0, -1, 0], atol=1e-6)  # a ceiling
    np.testing.assert_allclose(rotate_normals(facing, views["down"]), [0, 1, 0], atol=1e-6)  # a floor


@pytest.mark.parametrize("layout", ["cube", "ring8"])
def test_blend_weights_sum_to_one_and_fall_to_zero_at_view_borders(layout):
    views = cube_views(110.0, 64) if layout == "cube" else ring_views(8, 110.0, 64)
    d = pixel_directions(H, W)
    raw = []
    for v in views:
        u, y, ahead = v.project(d)
        raw.append(np.where(v.inside(u, y, ahead), smoothstep(border_ramp(v, u, y)), 0.0))
    total = np.sum(raw, axis=0)
    assert total.min() >= 1.0 - 1e-6  # every ray lies in one view's core: no division by ~0
    weights = np.array(raw) / total
    np.testing.assert_allclose(weights.sum(0), 1.0, atol=1e-6)
    for v, wt in zip(views, weights):
        u, y, ahead = v.project(d)
        edge = v.inside(u, y, ahead) & (
            np.maximum(np.abs(u - v.intrinsics.cx), np.abs(y - v.intrinsics.cy)) > v.size / 2 - 0.5
        )
        assert edge.any() and wt[edge].max() < 0.01  # within half a view pixel of its border
        edges = np.array([-0.5, v.size - 0.5])
        assert border_ramp(v, edges, np.full(2, (v.size - 1) / 2)).max() == 0.0  # exactly 0 on it
        assert border_ramp(v, np.full(2, (v.size - 1) / 2), edges).max() == 0.0


def test_joint_fit_recovers_every_views_scale_and_shift():
    rng = np.random.default_rng(0)
    q = rng.uniform(0.2, 1.0, 3000)  # the shared quantity on 3000 rays
    scales, shifts = np.array([1.0, 0.5, 2.0]), np.array([0.1, -0.2, 0.3])
    i, j = rng.integers(0, 3, 3000), rng.integers(0, 3, 3000)
    i, j, q = i[i != j], j[i != j], q[i != j]
    fi, fj = rng.uniform(0.6, 1.0, i.size), rng.uniform(0.6, 1.0, i.size)
    mi, mj = (q / fi - shifts[i]) / scales[i], (q / fj - shifts[j]) / scales[j]  # fi (s mi + b) = q
    mj[:100] += 5.0  # outliers
    s, b, record = joint_scale_shift((i, j, mi, mj, fi, fj), 3)
    np.testing.assert_allclose(s, scales, rtol=1e-6)
    np.testing.assert_allclose(b, shifts, atol=1e-6)
    assert record["pairs_kept"] <= i.size - 100


# -------------------------------------------------------------------------------------------- rooms


@pytest.mark.parametrize("name", sorted(ROOMS))
@pytest.mark.parametrize("kind", ["disparity", "depth"])
def test_panorama_depth_is_the_truth_up_to_one_scale_and_shift(name, kind):
    scene, standin, pred = run(ROOMS[name](), kind=kind)
    truth = 1 / scene["distance"] if kind == "disparity" else scene["distance"]
    assert pred.map.shape == (H, W) and pred.map.dtype == np.float32 and pred.map.max() == pytest.approx(1.0)
    s, b = fit_scale_shift(pred.map, truth)
    rel = np.abs(s * pred.map + b - truth) / truth
    assert np.median(rel) < 0.01
    poles = np.r_[0 : H // 10, H - H // 10 : H]
    assert np.median(rel[poles]) < 0.01
    # a shift of a view's map is not a shift along the ray, so the overlaps fix it: 0 stays 0
    assert abs(b) < 0.01 * truth.mean()
    views = plan_views(H, W, OPTS, PanoramaOptions())
    assert seam_ratio(s * pred.map + b, truth, blend_bands(views)) <= 1.1
    wrap = np.zeros((H, W), bool)
    wrap[:, -1] = True  # the gradient from column W - 1 to column 0
    assert seam_ratio(s * pred.map + b, truth, wrap) <= 1.1
    record = pred.extra["panorama"]
    assert [v["name"] for v in record["views"]] == ["front", "right", "back", "left", "up", "down"]
    assert record["depth_fit"]["relative_rms_residual"] < 1e-3 and len(record["depth_fit"]["scale_shift"]) == 6
    assert standin.calls == [4, 2]  # the views go through the predictor batch_size at a time


def test_a_seam_is_detected_when_views_are_not_fitted(monkeypatch):
    """The seam measure can fail: with each view left at its own scale and shift, borders show."""
    monkeypatch.setattr(panorama, "joint_scale_shift", lambda pairs, n: (np.ones(n), np.zeros(n), {}))
    scene, _, pred = run(box_room())
    truth = 1 / scene["distance"]
    s, b = fit_scale_shift(pred.map, truth)
    assert seam_ratio(s * pred.map + b, truth, blend_bands(plan_views(H, W, OPTS, PanoramaOptions()))) > 1.5


def test_depth_fit_is_robust_to_a_spoiled_view():
    scene, _, pred = run(furnished_room(), spoil={1: 0.05})  # 5 % of the right view's pixels are nonsense
    truth = 1 / scene["distance"]
    s, b, _ = robust_scale_shift(pred.map, truth)  # the spoiled pixels stay wrong where the right view decides
    assert np.median(np.abs(s * pred.map + b - truth) / truth) < 0.01
    fit = pred.extra["panorama"]["depth_fit"]
    assert fit["pairs_kept"] < fit["pairs"]


@pytest.mark.parametrize("name", sorted(ROOMS))
def test_panorama_normals_are_the_truth_in_the_panorama_frame(name):
    scene, _, pred = run(ROOMS[name](), task="normal")
    err = angular_error(pred.map, scene["normal"])
    assert np.mean(err) < 1.0 and np.median(err) < 1.0
    assert np.median(err[: H // 10]) < 1.0 and np.median(err[-H // 10 :]) < 1.0  # poles
    np.testing.assert_allclose(np.linalg.norm(pred.map, axis=-1), 1.0, atol=1e-5)
    views = plan_views(H, W, OPTS, PanoramaOptions())
    for axis in range(3):
        assert seam_ratio(pred.map[..., axis], scene["normal"][..., axis], blend_bands(views)) <= 1.1


def test_normals_in_another_frame():
    scene, _, pred = run(
        box_room(), task="normal", opts=PredictOptions(processing_res=96, batch_size=6, frame="opencv")
    )
    assert np.median(angular_error(pred.map, -scene["normal"])) < 1.0


def test_view_resolution_follows_the_processing_resolution():
    assert {v.size for v in plan_views(H, W, PredictOptions(processing_res=96), PanoramaOptions())} == {96}
    native = plan_views(2048, 4096, PredictOptions(processing_res=0), PanoramaOptions(fov=110.0))[0].size
    assert native == round(4096 / math.pi * math.tan(math.radians(55)))


def test_an_image_that_is_not_2_to_1_is_refused():
    from lotus_cli.errors import InputError

    scene = render_panorama(64, 100, box_room())
    with pytest.raises(InputError, match="100x64 image is not an equirectangular panorama"):
        predict_panorama(None, [scene["rgb"]], OPTS)


def test_ray_cos_is_the_angle_to_the_views_axis():
    v = cube_views(100.0, 64)[0]
    c = (v.size - 1) / 2
    assert ray_cos(v, np.array(c), np.array(c)) == pytest.approx(1.0)
    assert ray_cos(v, np.array(-0.5), np.array(c)) == pytest.approx(math.cos(math.radians(50)))  # the left edge
    assert ray_cos(v).shape == (64, 64) and ray_cos(v).min() == pytest.approx(ray_cos(v, np.array(0.0), np.array(0.0)))


def test_the_ring_layout_recovers_the_room_too():
    popts = PanoramaOptions(layout="ring8")
    scene, standin, pred = run(furnished_room(), popts=popts)
    truth = 1 / scene["distance"]
    s, b = fit_scale_shift(pred.map, truth)
    assert np.median(np.abs(s * pred.map + b - truth) / truth) < 0.01
    assert seam_ratio(s * pred.map + b, truth, blend_bands(plan_views(H, W, OPTS, popts))) <= 1.1
    assert len(pred.extra["panorama"]["views"]) == 10 and sum(standin.calls) == 10
