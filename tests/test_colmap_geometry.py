"""The pure-numpy parts of `lotus colmap`: the robust fit to SfM points, bilinear sampling, and fusion."""

import numpy as np
import pytest

from lotus_cli.geometry.camera import Intrinsics
from lotus_cli.geometry.colmap import align_to_points, normals_to_world, sample_bilinear
from lotus_cli.geometry.fusion import (
    DepthCache,
    PlyStream,
    covisible_neighbours,
    fuse_views,
    pinhole_view,
    read_ply_points,
)


def test_fit_recovers_scale_and_shift_despite_outliers():
    rng = np.random.default_rng(0)
    z = rng.uniform(1, 8, 400)
    s, b = 2.5, -0.1  # value = (1 / z - b) / s
    v = (1 / z - b) / s
    bad = rng.choice(400, 40, replace=False)  # 10 % of the points far off
    z_obs = z.copy()
    z_obs[bad] *= rng.choice([0.5, 1.8], 40)
    a = align_to_points(v, z_obs, "disparity")
    assert a.ok and a.scale == pytest.approx(s, rel=1e-9) and a.shift == pytest.approx(b, abs=1e-9)
    assert set(np.flatnonzero(~a.inliers)) == set(bad)
    assert a.residual_median < 1e-6 and a.used == 360  # float32 depth


def test_fit_in_depth_space_and_noise_statistics():
    rng = np.random.default_rng(1)
    z = rng.uniform(1, 5, 300)
    v = (z - 0.5) / 3.0
    z_obs = z * (1 + rng.normal(0, 0.01, 300))
    a = align_to_points(v, z_obs, "depth")
    assert a.ok and a.scale == pytest.approx(3.0, rel=0.01)
    # residuals in the reconstruction's unit: about 0.6745 sigma (median) and 1.645 sigma (p90) of |N(0, 0.01 z)|
    assert 0.4 * 0.01 * 3 < a.residual_median < 1.0 * 0.01 * 3 and a.residual_p90 > a.residual_median


def test_refusals():
    z = np.linspace(1, 5, 50)
    assert "too few" in align_to_points(1 / z[:10], z[:10], "disparity").refused
    assert "one value" in align_to_points(np.full(50, 0.3), z, "disparity").refused
    assert "backwards" in align_to_points(1 / z, z, "depth").refused  # disparity taken for depth
    rng = np.random.default_rng(2)
    assert "agree" in align_to_points(rng.uniform(0, 1, 50), z, "disparity", k=0.5).refused


def test_sample_bilinear_is_exact_on_a_ramp():
    h, w = 5, 7
    ramp = (np.arange(w)[None, :] * 2.0 + np.arange(h)[:, None] * 10.0).astype(np.float32)
    uv = np.array([[0, 0], [1.25, 2.5], [6, 4], [6.01, 1], [-0.01, 1]])
    out = sample_bilinear(ramp, uv)
    np.testing.assert_allclose(out[:3], [0, 2.5 + 25, 12 + 40])
    assert np.isnan(out[3:]).all()  # beyond the outermost pixel centres


def test_world_normals_rotate_back():
    a = 0.7
    R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])  # cam_from_world
    n_world = np.array([[0.0, 0.0, -1.0]])
    np.testing.assert_allclose(normals_to_world(n_world @ R.T, R), n_world, atol=1e-6)


def plane_views(n: int, K: Intrinsics, wall: float = 4.0):
    """Cameras side by side looking at the wall z = ``wall`` (world = camera axes, shifted in x)."""
    views, depths = [], []
    for i in range(n):
        t = np.array([-0.2 * i, 0.0, 0.0])
        views.append(pinhole_view(np.eye(3), t, K))
        depths.append(np.full((K.height, K.width), wall, np.float32))
    return views, depths


def test_fusion_keeps_agreement_and_drops_a_wrong_view(tmp_path):
    K = Intrinsics(40, 40, 19.5, 14.5, 40, 30)
    views, depths = plane_views(4, K)
    depths[2] = depths[2] * 1.05  # one view 5 % too deep: the others disagree with it
    nbrs = [[j for j in range(4) if j != i] for i in range(4)]
    sink = PlyStream(tmp_path / "f.ply", ["test"])
    stats = fuse_views(views, DepthCache(lambda i: depths[i], 2), nbrs, sink, min_views=2, tolerance=0.01, stride=1)
    sink.close()
    per = stats["per_view"]
    assert per[2]["kept"] == 0 and all(per[i]["kept"] > 0 for i in (0, 1, 3))
    pts = read_ply_points(tmp_path / "f.ply")["points"]
    assert len(pts) == stats["kept"] and np.allclose(pts[:, 2], 4.0, atol=1e-5)


def test_fusion_is_occlusion_aware(tmp_path):
    """A view whose own surface hides the point (an object in front) neither votes for nor against it."""
    K = Intrinsics(40, 40, 19.5, 14.5, 40, 30)
    views, depths = plane_views(3, K)
    depths[1] = np.full_like(depths[1], 2.0)  # view 1 sees a board at z = 2 in front of the wall
    nbrs = [[1, 2], [0, 2], [0, 1]]
    sink = PlyStream(tmp_path / "f.ply")
    stats = fuse_views(views, lambda i: depths[i], nbrs, sink, min_views=1, tolerance=0.01, stride=1)
    sink.close()
    # the wall points of view 0 lie behind view 1's board (hidden from it): view 2 alone keeps them
    assert stats["per_view"][0]["kept"] > 0
    # the board is seen by view 1 only: no other view agrees
    assert stats["per_view"][1]["kept"] == 0


def test_depth_cache_holds_at_most_its_size():
    loads = []
    cache = DepthCache(lambda i: loads.append(i) or np.zeros(1), size=2)
    for i in (0, 1, 0, 2, 1, 0):
        cache(i)
    assert len(cache.maps) == 2 and loads == [0, 1, 2, 1, 0]


def test_covisible_neighbours_rank_by_shared_points():
    tracks = [[0, 1]] * 5 + [[0, 2]] * 2 + [[1, 2, 3]]
    assert covisible_neighbours(tracks, 4, 2) == [[1, 2], [0, 2], [0, 1], [1, 2]]
