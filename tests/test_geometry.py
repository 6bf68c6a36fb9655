"""Geometry against analytic answers: planes, a sphere, cameras, conversions and the alignment fits."""

import math

import numpy as np
import pytest

from lotus_cli.geometry import camera as g

K64 = g.intrinsics_from_fov(64, 48, 60.0)


def rays(K: g.Intrinsics) -> np.ndarray:
    """[H, W, 3] ray directions with z = 1 through every pixel centre (OpenCV frame)."""
    u = (np.arange(K.width) - K.cx) / K.fx
    v = (np.arange(K.height) - K.cy) / K.fy
    return np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((K.height, K.width))), -1)


def plane_depth(K, normal, offset):
    """z of the plane {X : normal . X = offset} along every pixel's ray."""
    return offset / (rays(K) @ normal)


def sphere_depth(K, centre, radius):
    """z of the near side of a sphere along every pixel's ray (NaN where the ray misses)."""
    d = rays(K)
    a, b, c = (d * d).sum(-1), -2 * d @ centre, centre @ centre - radius**2
    disc = b * b - 4 * a * c
    return np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.nan)


def test_convert_normals_round_trip():
    n = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    for frame in g.NORMAL_FRAMES:
        np.testing.assert_array_equal(g.convert_normals(g.convert_normals(n, frame), "lotus", frame), n)
    wall, floor = np.array([0.0, 0, 1]), np.array([0.0, 1, 0])  # in Lotus's frame
    np.testing.assert_array_equal(g.convert_normals(wall, "opencv"), [0, 0, -1])  # toward the camera: -z
    np.testing.assert_array_equal(g.convert_normals(floor, "opencv"), [0, -1, 0])  # up: -y when y points down
    np.testing.assert_array_equal(g.convert_normals(np.array([1.0, 0, 0]), "opengl"), [-1, 0, 0])  # left: -x
    np.testing.assert_array_equal(g.convert_normals(floor, "opengl"), [0, 1, 0])


def test_fronto_parallel_plane_faces_the_camera():
    z = np.full((48, 64), 2.5)
    p = g.backproject(z, K64)
    np.testing.assert_allclose(p[..., 2], 2.5)
    assert abs(p[0, 0, 0] - (0 - K64.cx) * 2.5 / K64.fx) < 1e-6 and p[0, 0, 1] < 0  # top-left is left and up
    n = g.normals_from_depth(z, K64)
    np.testing.assert_allclose(n, np.broadcast_to([0, 0, -1], n.shape), atol=1e-4)  # OpenCV: toward the camera
    np.testing.assert_allclose(g.convert_normals(n, "lotus", "opencv"), np.broadcast_to([0, 0, 1], n.shape), atol=1e-4)


def test_tilted_plane_round_trips():
    normal = np.array([0.3, -0.5, -0.8]) / np.linalg.norm([0.3, -0.5, -0.8])
    z = plane_depth(K64, normal, -2.0)
    assert np.all(z > 0)
    p = g.backproject(z, K64).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(p @ normal, -2.0, atol=1e-5)  # every point on the plane
    n = g.normals_from_depth(z, K64)
    np.testing.assert_allclose(n, np.broadcast_to(normal, n.shape), atol=1e-4)
    fitted, rms, planarity = g.plane_fit(p)
    assert abs(abs(fitted @ normal) - 1) < 1e-9 and rms < 1e-5 and planarity < 1e-5


def test_sphere_round_trips():
    K = g.intrinsics_from_fov(160, 120, 50.0)
    centre = np.array([0.2, -0.1, 4.0])
    z = sphere_depth(K, centre, 1.0)
    p = g.backproject(np.nan_to_num(z), K)
    hit = np.isfinite(z)
    np.testing.assert_allclose(np.linalg.norm(p[hit] - centre, axis=-1), 1.0, atol=1e-5)
    n = g.normals_from_depth(z, K)
    truth = (p - centre) / np.linalg.norm(p - centre, axis=-1, keepdims=True)
    inner = hit & np.isfinite(n).all(-1)
    inner[[0, -1]] = False
    inner[:, [0, -1]] = False
    err = g.angular_error(n[inner], truth[inner])
    assert np.median(err) < 0.2 and np.percentile(err, 90) < 1.0  # central differences on a curved surface


def test_intrinsics_stay_consistent_through_resize():
    K = g.Intrinsics(500.0, 480.0, 300.0, 210.0, 640, 480)
    X = np.array([0.4, -0.3, 2.0])
    u, v = K.fx * X[0] / X[2] + K.cx, K.fy * X[1] / X[2] + K.cy
    R = K.resized(320, 240)
    u2, v2 = R.fx * X[0] / X[2] + R.cx, R.fy * X[1] / X[2] + R.cy
    assert abs(u2 - ((u + 0.5) / 2 - 0.5)) < 1e-9 and abs(v2 - ((v + 0.5) / 2 - 0.5)) < 1e-9  # pixel edges scale
    assert abs(R.hfov - K.hfov) < 1e-9
    # a plane back-projected from a half-size map is the same plane
    normal = np.array([0.0, -0.6, -0.8])
    small = g.backproject(plane_depth(R, normal, -1.5), R).reshape(-1, 3)
    np.testing.assert_allclose(small @ normal, -1.5, atol=1e-5)


def test_fov_and_35mm_focal():
    K = g.intrinsics_from_fov(600, 400, 90.0)
    assert abs(K.fx - 300.0) < 1e-9 and (K.cx, K.cy) == (299.5, 199.5) and abs(K.hfov - 90) < 1e-9
    # an 18 mm lens on a 36 x 24 mm (3:2) frame sees 90 degrees across: 2 atan(18 / 18)
    f = g.focal_px_from_35mm(18.0, 3000, 2000)
    assert abs(g.intrinsics_from_focal(3000, 2000, f).hfov - 90.0) < 1e-9
    with pytest.raises(ValueError):
        g.intrinsics_from_fov(10, 10, 180)


def test_depth_disparity_and_near_far():
    d = np.array([[0.5, 2.0], [0.0, -1.0]])
    np.testing.assert_allclose(g.depth_to_disparity(d), [[2.0, 0.5], [0.0, 0.0]])
    back = g.disparity_to_depth(g.depth_to_disparity(d))
    np.testing.assert_allclose(back[0], [0.5, 2.0], rtol=1e-6)
    assert np.isnan(back[1]).all()
    v = np.linspace(0, 1, 11)
    s, b = g.near_far_affine(v, "disparity", 0.5, 8.0)
    z = g.to_depth(v, "disparity", s, b)
    assert abs(z.max() - 8.0) < 1e-4 and abs(z.min() - 0.5) < 1e-6 and z[-1] == z.min()  # 1 = near
    s, b = g.near_far_affine(v, "disparity", 1.0, math.inf)
    assert np.isnan(g.to_depth(v, "disparity", s, b)[0])  # the farthest at infinity
    s, b = g.near_far_affine(v, "depth", 2.0, 6.0)
    np.testing.assert_allclose(g.to_depth(v, "depth", s, b)[[0, -1]], [2.0, 6.0])  # 0 = near for depth


@pytest.mark.parametrize("kind", ["disparity", "depth"])
def test_align_to_a_sparse_metric_map_recovers_the_geometry(kind):
    normal = np.array([0.2, -0.7, -0.68]) / np.linalg.norm([0.2, -0.7, -0.68])
    z = plane_depth(K64, normal, -1.2)
    truth = 1 / z if kind == "disparity" else z
    values = (truth - truth.min()) / (truth.max() - truth.min())  # affine-invariant, as a model gives it
    sparse = np.where(np.random.default_rng(1).random(z.shape) < 0.05, z, 0.0)  # 5% of pixels measured
    s, b, rmse = g.align_to_metric(values, kind, sparse)
    assert rmse < 1e-5
    np.testing.assert_allclose(g.to_depth(values, kind, s, b), z, rtol=1e-4)


@pytest.mark.parametrize("kind", ["disparity", "depth"])
def test_shape_from_normals_recovers_the_shift(kind):
    """A scene of a tilted floor and a sphere: from its affine-invariant map and its true normals, the shift
    (relative to the scale) comes back, and with it the geometry up to scale."""
    K = g.intrinsics_from_fov(128, 96, 60.0)
    z = plane_depth(K, np.array([0.0, -0.8, -0.6]), -1.5)
    zs = sphere_depth(K, np.array([0.3, 0.1, 3.0]), 0.8)
    z = np.where(np.isfinite(zs) & (zs < z), zs, z)
    truth = 1 / z if kind == "disparity" else z
    lo, span = truth.min(), truth.max() - truth.min()
    values = (truth - lo) / span  # truth = span * (values + lo / span)
    c, rec = g.shape_from_normals(values, kind, g.normals_from_depth(z, K), K)
    assert abs(c - lo / span) / (lo / span) < 0.02, (c, lo / span)
    assert rec["median_angle_deg"] < 1.0 < rec["median_angle_deg_flat"]


def test_edge_mask_drops_flying_pixels_only():
    z = np.full((10, 12), 2.0)
    z[:, 6:] = 4.0  # a depth step between columns 5 and 6
    z[0, 0] = np.nan
    keep = g.edge_mask(z, 0.05)
    assert not keep[:, 5:7].any() and keep[:, :5][1:].all() and keep[:, 7:].all() and not keep[0, 0]
    assert g.edge_mask(z, 0).sum() == z.size - 1
    ramp = np.tile(np.linspace(1, 1.2, 12), (10, 1))  # 1.8% steps: a slanted surface, kept
    assert g.edge_mask(ramp, 0.05).all()


def test_subsample():
    m = np.ones((10, 10), bool)
    assert g.subsample(m, 2).sum() == 25 and g.subsample(m, 1, 7).sum() == 7
    np.testing.assert_array_equal(g.subsample(m, 1, 7, seed=3), g.subsample(m, 1, 7, seed=3))


def holes(shape, seed=0) -> np.ndarray:
    """[H, W] bool, True = no depth: 15% of pixels at random, two blocks, and a one-pixel line per axis."""
    rng = np.random.default_rng(seed)
    m = rng.random(shape) < 0.15
    m[10:18, 5:30] = True
    m[30:33, 40:44] = True
    m[:, 50] = True
    m[20] = True
    return m


@pytest.mark.parametrize("window", [1, 3])
def test_normals_next_to_holes_are_exact(window):
    """A tilted plane with holes: every pixel with depth and some depth within reach on each axis gets the
    plane's exact normal (one-sided or shorter differences next to holes); only the others get none."""
    normal = np.array([0.3, -0.5, -0.8]) / np.linalg.norm([0.3, -0.5, -0.8])
    z = plane_depth(K64, normal, -2.0)
    hole = holes(z.shape)
    z[hole] = np.nan
    n = g.normals_from_depth(z, K64, window)
    valid = ~hole
    reach = np.zeros_like(valid)  # depth within `window` pixels on both axes
    for axis in (0, 1):
        near = np.zeros_like(valid)
        for d in range(1, window + 1):
            for s in (d, -d):
                near |= np.roll(valid, s, axis) & _inside(valid.shape, s, axis)
        reach = near if axis == 0 else reach & near
    has = np.isfinite(n).all(-1)
    np.testing.assert_array_equal(has, valid & reach)
    assert (valid & reach).sum() > (0.9 if window == 1 else 0.99) * valid.sum()  # 15% random holes
    np.testing.assert_allclose(n[has], np.broadcast_to(normal, n[has].shape), atol=1e-4)


def _inside(shape, s, axis):
    """True where np.roll(., s, axis) brought a value from inside the array (no wrap-around)."""
    idx = np.arange(shape[axis])
    ok = (idx - s >= 0) & (idx - s < shape[axis])
    return ok[:, None] if axis == 0 else ok[None, :]


def test_a_pixel_with_no_neighbour_on_an_axis_has_no_normal():
    z = np.full((5, 5), np.nan)
    z[2, :] = 2.0  # one row: neighbours along u, none along v
    assert not np.isfinite(g.normals_from_depth(z, g.intrinsics_from_fov(5, 5, 60.0))).any()
    z[3, 1] = 2.0  # (2, 1) now has a neighbour on both axes; (3, 1) has none along u
    n = g.normals_from_depth(z, g.intrinsics_from_fov(5, 5, 60.0))
    assert np.isfinite(n).all(-1).sum() == 1 and np.allclose(n[2, 1], [0, 0, -1], atol=1e-6)
