"""Camera geometry as pure numpy functions with stated shapes, units and conventions.

Frames. Lotus predicts normals in its own camera frame: x LEFT, y UP, z TOWARD the camera (a wall facing
the camera is (0, 0, 1), a floor (0, 1, 0)). Point clouds are in the OpenCV camera frame: x right, y down,
z forward (away from the camera), in metres; there a wall facing the camera has normal (0, 0, -1). Every
frame here is the Lotus frame with some axes reversed, so conversion is a sign flip per axis.

Pixels. (u, v) = (column, row), u right, v down, with pixel CENTRES at integer coordinates, so an image of
width W spans u in [-0.5, W - 0.5] and its centre is at ((W - 1) / 2, (H - 1) / 2) (OpenCV's convention).

Depth kinds. "depth" is distance along the optical axis (z), "disparity" its inverse (1 / z). Lotus's
released depth checkpoints predict AFFINE-INVARIANT disparity: metric disparity = scale * d + shift with
unknown scale and shift, so every metric statement needs them from somewhere (near/far, a metric map, or
the normals: see ``shape_from_normals``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# name -> (signs applied to Lotus's (x, y, z), description)
NORMAL_FRAMES: dict[str, tuple[tuple[int, int, int], str]] = {
    "lotus": ((1, 1, 1), "x left, y up, z toward the camera (Lotus camera frame)"),
    "opengl": ((-1, 1, 1), "x right, y up, z toward the camera (OpenGL / Blender camera frame)"),
    "opencv": ((-1, -1, -1), "x right, y down, z away from the camera (OpenCV camera frame)"),
}
# OpenCV camera frame (x right, y down, z forward) <-> OpenGL (x right, y up, z toward the viewer): y and z
# reversed, a rotation by 180 degrees about x, its own inverse
TO_OPENGL = np.array([1, -1, -1], np.float32)
DEFAULT_FOV = 60.0  # degrees, horizontal: between a phone's main camera (~65-70) and a normal lens (~40-50)
FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)  # what a "35 mm equivalent" focal length refers to


def edge_lengths(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Lengths [F, 3] of each triangle's edges (``vertices`` [N, D], ``faces`` [F, 3]), in the vertices' units."""
    p = vertices[faces].astype(np.float64)
    return np.linalg.norm(p - np.roll(p, -1, axis=1), axis=-1)


def convert_normals(n: np.ndarray, frame: str, source: str = "lotus") -> np.ndarray:
    """Normals (or any vectors) [..., 3] from frame ``source`` to frame ``frame`` (names in NORMAL_FRAMES)."""
    a, b = np.asarray(NORMAL_FRAMES[source][0]), np.asarray(NORMAL_FRAMES[frame][0])
    signs = (a * b).astype(n.dtype)  # each frame's signs are their own inverse
    return n * signs


# ------------------------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class Intrinsics:
    """A pinhole camera for an image of ``width`` x ``height`` pixels: focal lengths ``fx``, ``fy`` and the
    principal point ``cx``, ``cy``, all in pixels, pixel centres at integer coordinates (module doc)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def resized(self, width: int, height: int) -> Intrinsics:
        """The same camera for the image resized to width x height: pixel edges scale, so a centre at u maps
        to (u + 0.5) * sx - 0.5."""
        sx, sy = width / self.width, height / self.height
        return Intrinsics(
            self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5, width, height
        )

    @property
    def hfov(self) -> float:
        """Horizontal field of view in degrees (edge to edge, for a centred principal point)."""
        return math.degrees(2 * math.atan(self.width / 2 / self.fx))

    def to_json(self) -> dict:
        return {
            "fx": self.fx,
            "fy": self.fy,
            "cx": self.cx,
            "cy": self.cy,
            "width": self.width,
            "height": self.height,
            "hfov_deg": round(self.hfov, 4),
        }


def intrinsics_from_focal(width: int, height: int, fx: float, fy: float | None = None) -> Intrinsics:
    """Focal length(s) in pixels, principal point at the image centre."""
    if not fx > 0 or (fy is not None and not fy > 0):
        raise ValueError(f"focal length must be positive, not {fx}, {fy}")
    return Intrinsics(float(fx), float(fy or fx), (width - 1) / 2, (height - 1) / 2, width, height)


def intrinsics_from_fov(width: int, height: int, hfov_deg: float = DEFAULT_FOV) -> Intrinsics:
    """Horizontal field of view in degrees (0 < fov < 180) -> square pixels, centred principal point."""
    if not 0 < hfov_deg < 180:
        raise ValueError(f"field of view must be between 0 and 180 degrees, not {hfov_deg}")
    return intrinsics_from_focal(width, height, width / 2 / math.tan(math.radians(hfov_deg) / 2))


def focal_px_from_35mm(f35_mm: float, width: int, height: int) -> float:
    """EXIF FocalLengthIn35mmFilm -> pixels: the 35 mm equivalent matches the image diagonal to the 36 x 24 mm
    frame's (43.27 mm), so f_px = f35 * diagonal_px / 43.27 (the image's crop is what the camera stored)."""
    return f35_mm * math.hypot(width, height) / FULL_FRAME_DIAGONAL_MM


# ---------------------------------------------------------------------------------- back-projection


def backproject(depth: np.ndarray, K: Intrinsics) -> np.ndarray:
    """Depth [H, W] (z, metres; NaN or <= 0 = none) -> points [H, W, 3] float32 in the OpenCV frame:
    X = (u - cx) z / fx, Y = (v - cy) z / fy, Z = z. ``K`` must describe an H x W image."""
    h, w = depth.shape
    if (w, h) != (K.width, K.height):
        raise ValueError(f"intrinsics are for {K.width}x{K.height}, depth is {w}x{h}")
    z = depth.astype(np.float64)
    u = (np.arange(w) - K.cx) / K.fx  # [W]
    v = (np.arange(h) - K.cy) / K.fy  # [H]
    return np.stack([u[None, :] * z, v[:, None] * z, z], axis=-1).astype(np.float32)


def normals_from_depth(depth: np.ndarray, K: Intrinsics, window: int = 1) -> np.ndarray:
    """Surface normals [H, W, 3] float32 of the back-projected depth [H, W], unit vectors in the OpenCV frame
    facing the camera (n . p < 0), from differences of the points along each image axis.

    Per axis, the longest central difference of reach r <= ``window`` pixels whose two ends have depth
    (wider ones average out quantised sensor depth), else the longest one-sided one (p[i + r] - p[i] or
    p[i] - p[i - r]): near holes and borders the reach shortens instead of the normal going missing. NaN
    only where the pixel has no depth or no pixel with depth within ``window`` on an axis. Independent of a
    global scale of the depth; exact for planes."""
    p = backproject(np.where(depth > 0, depth, np.nan), K).astype(np.float64)
    ok = np.isfinite(p).all(-1)
    dv = _axis_difference(p, ok, 0, window)  # d/dv (down): [H, W, 3]
    du = _axis_difference(p, ok, 1, window)  # d/du (right)
    n = np.cross(dv, du)  # for a fronto-parallel plane: (0, 0, -) = toward the camera
    with np.errstate(invalid="ignore", divide="ignore"):
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
    flip = (n * p).sum(-1) > 0  # numerically grazing surfaces: keep every normal facing the camera
    n[flip] *= -1
    return n.astype(np.float32)


def _shifted(a: np.ndarray, d: int, axis: int, fill) -> np.ndarray:
    """out[i] = a[i + d] along ``axis`` (0 or 1), ``fill`` where i + d falls outside."""
    out = np.full_like(a, fill)
    n = a.shape[axis]
    if abs(d) >= n:
        return out
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    src[axis], dst[axis] = (slice(d, None), slice(0, n - d)) if d >= 0 else (slice(0, n + d), slice(-d, None))
    out[tuple(dst)] = a[tuple(src)]
    return out


def _axis_difference(p: np.ndarray, ok: np.ndarray, axis: int, window: int) -> np.ndarray:
    """p [H, W, 3] (ok [H, W]: p is valid): p[i + a] - p[i - b] along ``axis`` for the first (a, b) in
    (window, window), (window - 1, window - 1) ... (1, 1), (window, 0), (0, window) ... (1, 0), (0, 1) whose
    ends are both valid; NaN where none is (the direction matters for the normal, the length does not)."""
    out = np.full_like(p, np.nan)
    todo = ok.copy()
    reaches = [(r, r) for r in range(window, 0, -1)] + [s for r in range(window, 0, -1) for s in ((r, 0), (0, r))]
    for a, b in reaches:
        if not todo.any():
            break
        both = todo & _shifted(ok, a, axis, False) & _shifted(ok, -b, axis, False)
        out[both] = (_shifted(p, a, axis, np.nan) - _shifted(p, -b, axis, np.nan))[both]
        todo &= ~both
    return out


def depth_to_disparity(depth: np.ndarray) -> np.ndarray:
    """1 / depth where depth > 0, else 0 (float32, same shape)."""
    d = np.asarray(depth, np.float64)
    return np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0).astype(np.float32)


def disparity_to_depth(disparity: np.ndarray, min_disparity: float = 1e-6) -> np.ndarray:
    """1 / disparity where disparity >= min_disparity, else NaN (no finite depth; float32, same shape)."""
    d = np.asarray(disparity, np.float64)
    ok = d >= min_disparity
    return np.where(ok, 1.0 / np.where(ok, d, 1.0), np.nan).astype(np.float32)


def to_depth(
    values: np.ndarray, kind: str, scale: float = 1.0, shift: float = 0.0, min_disparity: float = 1e-6
) -> np.ndarray:
    """An affine-invariant map [H, W] and its (scale, shift) -> metric depth [H, W] float32 (NaN = none).
    kind "disparity": depth = 1 / (scale * v + shift); kind "depth": depth = scale * v + shift (<= 0 -> NaN)."""
    m = scale * np.asarray(values, np.float64) + shift
    if kind == "disparity":
        return disparity_to_depth(m, min_disparity)
    if kind == "depth":
        return np.where(m > 0, m, np.nan).astype(np.float32)
    raise ValueError(f"kind must be depth or disparity, not {kind!r}")


def near_far_affine(
    values: np.ndarray, kind: str, near: float, far: float, mask: np.ndarray | None = None
) -> tuple[float, float]:
    """(scale, shift) putting the nearest predicted value at ``near`` metres and the farthest at ``far``
    (``far`` may be inf for disparity: the farthest value becomes infinitely far). Nearest = highest
    disparity / lowest depth over ``mask`` (default: all finite values)."""
    if not 0 < near < far:
        raise ValueError(f"need 0 < near < far, not near={near}, far={far}")
    v = values[np.isfinite(values) & (mask if mask is not None else True)]
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return (0.0, 1.0 / near) if kind == "disparity" else (0.0, near)
    if kind == "disparity":  # scale * hi + shift = 1 / near, scale * lo + shift = 1 / far
        scale = (1 / near - 1 / far) / (hi - lo)
        return scale, 1 / far - scale * lo
    if math.isinf(far):
        raise ValueError("far must be finite for a depth map")
    scale = (far - near) / (hi - lo)  # scale * lo + shift = near, scale * hi + shift = far
    return scale, near - scale * lo


# --------------------------------------------------------------------------------------- alignment


def fit_scale_shift(src: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Least squares (s, b) minimising sum over ``mask`` of (s * src + b - ref)^2, in float64.

    A constant ``src`` gets (0, mean of ref), the answer least squares itself gives; fewer than 2 pixels
    give (1, 0), leaving the map as it is."""
    x = src[mask] if mask is not None else src.ravel()
    y = ref[mask] if mask is not None else ref.ravel()
    if x.size < 2:
        return 1.0, 0.0
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    xm, ym = x.mean(), y.mean()
    var = ((x - xm) ** 2).mean()
    if var <= 1e-20 * max(1.0, xm * xm):
        return 0.0, float(ym)
    s = ((x - xm) * (y - ym)).mean() / var
    return float(s), float(ym - s * xm)


def robust_scale_shift(
    src: np.ndarray, ref: np.ndarray, iters: int = 3, k: float = 2.5
) -> tuple[float, float, np.ndarray]:
    """(s, b, inliers) for s * src + b ~ ref, robust to outlying pixels (moving objects, occlusions).

    Starts from medians and median absolute deviations (unmoved by a minority of outliers), then refits by
    least squares on the pixels whose residual lies within ``k`` robust sigmas, ``iters`` times.
    """
    x, y = src.astype(np.float64), ref.astype(np.float64)
    mx, my = np.median(x), np.median(y)
    sx = np.median(np.abs(x - mx))
    s = float(np.median(np.abs(y - my)) / sx) if sx > 1e-12 else 1.0
    b = float(my - s * mx)
    inliers = np.ones(x.shape, bool)
    for _ in range(iters):
        r = np.abs(s * x + b - y)
        med = np.median(r)
        inliers = r <= med + k * 1.4826 * np.median(np.abs(r - med)) + 1e-9
        s, b = fit_scale_shift(x, y, inliers)
    return s, b, inliers


def align_to_metric(
    values: np.ndarray, kind: str, metric: np.ndarray, min_disparity: float = 1e-3
) -> tuple[float, float, float]:
    """(scale, shift, rmse_m) fitting an affine-invariant map [H, W] to a metric depth map [H, W] (metres;
    NaN or <= 0 = no measurement, so sparse maps work) by least squares in the map's own space: disparity
    against 1 / metric (aligned disparity below ``min_disparity`` has no finite depth: NaN),
    depth against metric. ``rmse_m`` is the RMS depth error of the result over the measured pixels."""
    valid = np.isfinite(metric) & (metric > 0) & np.isfinite(values)
    if valid.sum() < 2:
        raise ValueError("the metric map has fewer than 2 valid pixels where the prediction is defined")
    target = depth_to_disparity(metric) if kind == "disparity" else metric
    s, b = fit_scale_shift(values, target, valid)
    depth = to_depth(values, kind, s, b, min_disparity)
    err = np.where(valid, np.nan_to_num(depth, nan=0.0) - metric, 0.0)[valid]
    return s, b, float(np.sqrt(np.mean(err.astype(np.float64) ** 2)))


# ------------------------------------------------------------------------------- shape from normals


def angular_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees [...] between vectors a, b [..., 3], each normalised first (cosine clipped to
    [-1, 1]; a zero vector has cosine 0 with anything: 90 degrees; NaN where either is NaN). float64."""
    p, q = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(q, axis=-1), 1e-12)
    return np.degrees(np.arccos(np.clip((p * q).sum(-1) / norm, -1.0, 1.0)))


def shape_from_normals(
    values: np.ndarray,
    kind: str,
    normals: np.ndarray,
    K: Intrinsics,
    mask: np.ndarray | None = None,
    max_side: int = 160,
) -> tuple[float, dict]:
    """The shift that an affine-invariant map lacks, recovered from predicted normals.

    The shape of 1 / (v + c) (disparity) or of v + c (depth) depends only on c = shift / scale (the scale
    only resizes the scene), so choose c to make the normals of the back-projected surface agree with
    ``normals`` ([H, W, 3] unit vectors in the OpenCV frame): minimise their median angle over ``mask``,
    first on a log-spaced grid of c above -min(v) (where depth stays positive), then by golden-section
    search around the best grid point. The maps are averaged down to ``max_side`` pixels first.
    Returns (c, record) with the angle before (c at the grid's far end ~ a nearly flat scene) and after.
    """
    h, w = values.shape
    f = max(1, math.ceil(max(h, w) / max_side))
    hs, ws = h // f, w // f
    v = values[: hs * f, : ws * f].reshape(hs, f, ws, f).mean(axis=(1, 3))
    n = normals[: hs * f, : ws * f].reshape(hs, f, ws, f, 3).mean(axis=(1, 3))
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
    m = np.ones((hs, ws), bool) if mask is None else mask[: hs * f, : ws * f].reshape(hs, f, ws, f).all(axis=(1, 3))
    Ks = Intrinsics(K.fx, K.fy, K.cx, K.cy, ws * f, hs * f).resized(ws, hs)  # the top-left crop, averaged down
    m &= np.isfinite(v) & np.isfinite(n).all(-1)
    lo, span = float(np.nanmin(v[m])), float(np.nanmax(v[m]) - np.nanmin(v[m])) or 1.0

    def cost(t: float) -> float:  # t = log of (c + lo) / span: c just above -lo ... far above
        c = math.exp(t) * span - lo
        z = 1.0 / (v + c) if kind == "disparity" else v + c
        e = angular_error(normals_from_depth(z, Ks), n)[m]
        e = e[np.isfinite(e)]
        return float(np.median(e)) if e.size else 180.0

    ts = np.linspace(math.log(1e-3), math.log(1e3), 61)
    costs = [cost(t) for t in ts]
    i = int(np.argmin(costs))
    a, b = ts[max(i - 1, 0)], ts[min(i + 1, len(ts) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(30):  # golden-section search on [a, b]
        c1, c2 = b - g * (b - a), a + g * (b - a)
        if cost(c1) <= cost(c2):
            b = c2
        else:
            a = c1
    t = (a + b) / 2
    c = math.exp(t) * span - lo
    return c, {
        "shift_over_scale": c,
        "median_angle_deg": cost(t),
        "median_angle_deg_flat": costs[-1],
        "at_grid_edge": i in (0, len(ts) - 1),
        "grid_points": len(ts),
        "working_size": [ws, hs],
    }


# ------------------------------------------------------------------------------ cleaning and stats


def edge_mask(depth: np.ndarray, threshold: float) -> np.ndarray:
    """True where a pixel is kept: its depth [H, W] is finite and differs from each 4-neighbour by at most
    ``threshold`` relative to the nearer of the two (flying pixels at depth discontinuities fail this).
    threshold <= 0 keeps every finite pixel."""
    z = np.asarray(depth, np.float64)
    keep = np.isfinite(z) & (z > 0)
    if threshold <= 0:
        return keep
    zz = np.where(keep, z, np.nan)
    with np.errstate(invalid="ignore"):
        for a, b in ((zz[1:], zz[:-1]), (zz[:, 1:], zz[:, :-1])):
            jump = np.abs(a - b) / np.minimum(a, b) > threshold  # NaN (a missing neighbour) compares False
            if a.shape[0] < z.shape[0]:
                keep[1:] &= ~jump
                keep[:-1] &= ~jump
            else:
                keep[:, 1:] &= ~jump
                keep[:, :-1] &= ~jump
    return keep


def subsample(mask: np.ndarray, stride: int = 1, max_points: int = 0, seed: int = 0) -> np.ndarray:
    """``mask`` [H, W] thinned to every ``stride``-th row and column, then (if more than ``max_points`` > 0
    remain) to ``max_points`` pixels chosen uniformly at random with ``seed`` (reproducible)."""
    out = np.zeros_like(mask)
    out[::stride, ::stride] = mask[::stride, ::stride]
    if max_points and out.sum() > max_points:
        idx = np.flatnonzero(out)
        keep = np.random.default_rng(seed).choice(idx, max_points, replace=False)
        out[:] = False
        out.flat[keep] = True
    return out


def plane_fit(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Best-fit plane of points [N, 3]: (unit normal [3], RMS distance to the plane, planarity), where
    planarity = that RMS over the RMS distance from the centroid (scale-free: 0 for a perfect plane)."""
    p = np.asarray(points, np.float64)
    q = p - p.mean(0)
    _, s, vt = np.linalg.svd(q, full_matrices=False)
    rms = float(s[-1] / math.sqrt(len(p)))
    return vt[-1], rms, float(s[-1] / math.sqrt((s**2).sum()))
