"""A view of a structure-from-motion reconstruction (COLMAP) as pure numpy: aligning an affine-invariant map to
the SfM points the view observes, and normals in the reconstruction's world frame.

Frames and units. COLMAP's camera frame is OpenCV's (x right, y down, z forward); a view's pose is
``cam_from_world``: X_cam = R @ X_world + t. Depth is z in that frame, in the reconstruction's unit (SfM
fixes scale only up to its own unit: metres only where the reconstruction was scaled or georeferenced).
Pixels follow ``geometry.camera``'s convention (centres at integer coordinates); COLMAP puts the top-left
pixel's centre at (0.5, 0.5), so its image coordinates are ours + ``COLMAP_PIXEL_OFFSET``.

The fit follows ``camera.align_to_metric`` (least squares in the map's own space: disparity against 1 / z,
depth against z), made robust as ``camera.robust_scale_shift`` is: SfM tracks carry outliers (bad
matches, points on moving things), which would drag a plain least-squares fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .camera import fit_scale_shift, to_depth

COLMAP_PIXEL_OFFSET = 0.5
MIN_POINTS = 20  # fewer observed points than this fix two numbers too weakly to trust (refused)
MIN_INLIER_FRACTION = 0.5  # below it the map and the points disagree more than they agree (refused)


def sample_bilinear(values: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """``values`` [H, W] (or [H, W, C]) at pixel positions ``uv`` [N, 2] (u = column, v = row, centres at
    integers), bilinear between the 4 nearest centres; NaN where a position lies outside the outermost
    centres or one of its 4 neighbours is NaN. float64 [N] (or [N, C])."""
    h, w = values.shape[:2]
    u, v = np.asarray(uv, np.float64).T
    inside = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (v >= 0) & (u <= w - 1) & (v <= h - 1)
    u0 = np.clip(np.floor(np.where(inside, u, 0)), 0, max(w - 2, 0)).astype(np.intp)
    v0 = np.clip(np.floor(np.where(inside, v, 0)), 0, max(h - 2, 0)).astype(np.intp)
    u1, v1 = np.minimum(u0 + 1, w - 1), np.minimum(v0 + 1, h - 1)
    fu, fv = np.where(inside, u, 0) - u0, np.where(inside, v, 0) - v0
    if values.ndim == 3:
        fu, fv = fu[:, None], fv[:, None]
    a = values[v0, u0].astype(np.float64)
    b = values[v0, u1].astype(np.float64)
    c = values[v1, u0].astype(np.float64)
    d = values[v1, u1].astype(np.float64)
    out = (a * (1 - fu) + b * fu) * (1 - fv) + (c * (1 - fu) + d * fu) * fv
    out[~inside] = np.nan
    return out


@dataclass
class Alignment:
    """One view's fit of ``scale * value + shift`` (in the map's own space, ``kind``) to its SfM points.

    ``points``: observed points that project inside the image onto a defined value; ``used``: the inliers
    the fit kept; ``residual_median`` / ``residual_p90``: |aligned depth - point depth| over the inliers, in
    the reconstruction's unit, and ``relative_median`` the same relative to the point's depth. ``refused``:
    why no metric map can be claimed for the view (then scale and shift are None)."""

    kind: str
    points: int
    used: int = 0
    scale: float | None = None
    shift: float | None = None
    residual_median: float | None = None
    residual_p90: float | None = None
    relative_median: float | None = None
    refused: str | None = None
    inliers: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)

    @property
    def ok(self) -> bool:
        return self.refused is None

    def depth(self, values: np.ndarray) -> np.ndarray:
        """The view's aligned depth [H, W] float32 (z, reconstruction units; NaN = none) from its map."""
        if not self.ok:
            raise ValueError(f"no alignment: {self.refused}")
        return to_depth(values, self.kind, self.scale, self.shift)

    def to_json(self) -> dict:
        r = lambda x: None if x is None else float(f"{x:.6g}")  # noqa: E731
        return {
            "kind": self.kind,
            "points": self.points,
            "used": self.used,
            "outliers": self.points - self.used if self.ok else None,
            "scale": r(self.scale),
            "shift": r(self.shift),
            "residual_median": r(self.residual_median),
            "residual_p90": r(self.residual_p90),
            "relative_median": r(self.relative_median),
            "refused": self.refused,
        }


def align_to_points(
    values_at: np.ndarray,
    z: np.ndarray,
    kind: str,
    min_points: int = MIN_POINTS,
    k: float = 3.0,
    iters: int = 5,
) -> Alignment:
    """Fit a view's map to its SfM points: ``values_at`` [N] the map sampled where the points project,
    ``z`` [N] the points' depths in the view (reconstruction units), ``kind`` the map's ("disparity":
    scale * v + shift ~ 1 / z; "depth": ~ z).

    Robust: starts from the medians and the spread ratio of the middle halves (unmoved by a minority of
    outliers), then refits by least squares on the points whose residual in the fit's space lies within
    ``k`` robust sigmas (1.4826 MAD) of the median, ``iters`` times. Refuses (``Alignment.refused``) with
    fewer than ``min_points`` usable points, a map that does not vary over them, a scale that is not
    positive (the map orders the points backwards) or fewer than half the points agreeing."""
    if kind not in ("disparity", "depth"):
        raise ValueError(f"kind must be disparity or depth, not {kind!r}")
    x, zz = np.asarray(values_at, np.float64), np.asarray(z, np.float64)
    usable = np.isfinite(x) & np.isfinite(zz) & (zz > 0)
    n = int(usable.sum())
    a = Alignment(kind, n, inliers=np.zeros(len(x), bool))
    if n < min_points:
        a.refused = f"too few SfM points ({n} < {min_points}) project onto the map"
        return a
    x, zz = x[usable], zz[usable]
    y = 1.0 / zz if kind == "disparity" else zz
    q1, q3 = np.percentile(x, [25, 75])
    if not q3 - q1 > 1e-9 * max(1.0, abs(q1)):
        a.refused = "degenerate fit: the map holds one value where the points are"
        return a
    p1, p3 = np.percentile(y, [25, 75])
    s = (p3 - p1) / (q3 - q1)
    b = float(np.median(y - s * x))
    inl = np.ones(n, bool)
    for _ in range(iters):
        r = s * x + b - y
        med = np.median(r[inl])
        sigma = 1.4826 * np.median(np.abs(r[inl] - med)) + 1e-12 * max(1.0, float(np.median(np.abs(y))))
        new = np.abs(r - med) <= k * sigma
        if new.sum() < 2:
            break
        s, b = fit_scale_shift(x, y, new)
        if np.array_equal(new, inl):
            break
        inl = new
    a.used = int(inl.sum())
    if not s > 0:
        a.refused = f"degenerate fit: scale {s:.3g} <= 0 (the map orders the points backwards)"
        return a
    if a.used < max(min_points, MIN_INLIER_FRACTION * n):
        a.refused = f"only {a.used} of {n} SfM points agree with the map (fewer than half, or than {min_points})"
        return a
    pred = to_depth(x[inl], kind, s, b).astype(np.float64)
    err = np.abs(np.where(np.isfinite(pred), pred, np.inf) - zz[inl])
    a.scale, a.shift = float(s), float(b)
    a.residual_median = float(np.median(err))
    a.residual_p90 = float(np.percentile(err, 90))
    a.relative_median = float(np.median(err / zz[inl]))
    full = np.zeros(len(usable), bool)
    full[np.flatnonzero(usable)[inl]] = True
    a.inliers = full
    if not math.isfinite(a.residual_median):
        a.refused = "degenerate fit: the aligned map has no finite depth at most points"
        a.scale = a.shift = None
    return a


def normals_to_world(normals_cam: np.ndarray, R_cam_from_world: np.ndarray) -> np.ndarray:
    """Normals [..., 3] in a view's OpenCV camera frame -> the reconstruction's world frame (n_w = R^T n_c),
    float32; NaN stays NaN."""
    R = np.asarray(R_cam_from_world, np.float64)
    return (np.asarray(normals_cam, np.float64) @ R).astype(np.float32)


def scale_consistency(alignments: dict[str, Alignment]) -> dict:
    """Across views: the spread of log scale (meaningful where the maps are metric or share one affine frame;
    for per-image affine-invariant maps each view has its own scale by construction) and of the relative
    residual; views whose relative residual lies more than 3 robust sigmas above the median are flagged."""
    ok = {k: a for k, a in alignments.items() if a.ok}
    if not ok:
        return {"views": 0, "flagged": []}
    logs = np.log(np.array([a.scale for a in ok.values()]))
    rel = np.array([a.relative_median for a in ok.values()])
    med = float(np.median(rel))
    sigma = 1.4826 * float(np.median(np.abs(rel - med)))
    flagged = [k for k, a in ok.items() if a.relative_median > med + 3 * max(sigma, 0.05 * med, 1e-9)]
    return {
        "views": len(ok),
        "log_scale_median": float(np.median(logs)),
        "log_scale_mad": float(np.median(np.abs(logs - np.median(logs)))),
        "relative_residual_median": med,
        "relative_residual_mad": sigma / 1.4826,
        "flagged": flagged,
    }
