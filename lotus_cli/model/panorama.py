"""360-degree panoramas: an equirectangular image predicted as overlapping perspective views, merged without seams.

Lotus was trained on perspective images (arXiv 2409.18124, Sec. 4.1); an equirectangular image fed whole is
stretched towards the poles and has no single camera frame. So, for an H x W equirectangular RGB image
(geometry/panorama.py states the frames and pixel conventions):

1. views: the six faces of a cube, each widened to ``fov`` degrees so that neighbours overlap, resampled
   from the panorama (bilinear, across the longitude wrap) at the model's resolution and predicted by the
   shared predictor ``batch_size`` at a time;
2. depth: each view's affine-invariant map is taken to the quantity all views share, per ray: inverse
   distance along the ray for disparity models (x cos theta), distance for depth models (/ cos theta);
   every view's scale and shift are then fitted at once over the overlaps (one least-squares system, the
   front view's scale fixed, refitted on the pairs within 2.5 robust sigmas), so views agree where they
   meet; the panorama's map is divided by its maximum, so 0 stays 0 (infinitely far for disparity);
3. normals: each view's normals are rotated into the panorama's frame (Lotus axes of the forward view);
4. blending at the input's full size, in row bands: a view's weight is a smoothstep of where a pixel lies
   between the view's core (its 90 degree cube face: weight 1) and its border (0); weights are normalised
   over the views, so they sum to 1 and fall to 0 at every view border, as tiling's do (model/tiling.py);
   normals are blended as vectors and renormalised.

What was verified, and how, is in docs/panoramas.md: ray-cast rooms with a stand-in for the network, no real
360 photo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError, UsageError
from ..geometry.camera import convert_normals
from ..geometry.panorama import (
    View,
    border_ramp,
    cube_views,
    equirect_to_view,
    joint_scale_shift,
    native_view_size,
    pixel_directions,
    ray_cos,
    ray_factor,
    ring_views,
    rotate_normals,
    sample_bilinear,
)
from ..io.xmp import is_two_to_one
from .predictor import Prediction, PredictOptions
from .tiling import smoothstep

DEFAULT_FOV = 110.0  # degrees per widened cube face: 10 degrees of overlap beyond each edge (docs/panoramas.md)
FIT_ROWS = 128  # rows of the equirectangular grid the fit samples (2x as many columns); the views are coarser
FIT_SAMPLES = 60_000  # pairs of views on one ray kept for the fit; more only costs time
BAND_ROWS = 128  # output rows blended at a time: bounds the temporary arrays whatever the panorama's size
LAYOUTS = ("cube", "ring8")
MARGIN = 1.0  # view pixels: the fit samples no closer to a view's border, where bilinear samples clamp


@dataclass(frozen=True)
class PanoramaOptions:
    """How to split a panorama. ``layout``: "cube" (six faces) or "ring8" (eight views around the horizon
    and the cube's up and down faces: 10 views; docs/panoramas.md compares them); ``fov``: degrees per view
    (90 < fov < 180); ``view_res``:
    pixels a side of each view (None: the processing resolution, or the panorama's own density when that is
    0); ``rule``: what decided that the input is equirectangular, for the sidecar."""

    fov: float = DEFAULT_FOV
    view_res: int | None = None
    rule: str = "--projection equirect"
    layout: str = "cube"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise UsageError(f"a panorama's layout must be {' or '.join(LAYOUTS)}, not {self.layout!r}")
        if not 90 < self.fov < 180:
            raise UsageError(f"a panorama's view fov must be between 90 and 180 degrees, not {self.fov}")
        if self.view_res is not None and self.view_res < 8:
            raise UsageError(f"a panorama's views need at least 8 pixels a side, not {self.view_res}")


def plan_views(height: int, width: int, opts: PredictOptions, popts: PanoramaOptions) -> list[View]:
    """The views of an H x W panorama: a widened cube, each view square at ``view_res`` or the processing
    resolution (so the model sees each at exactly that size, resampled once from the panorama)."""
    size = popts.view_res or opts.processing_res or native_view_size(width, popts.fov)
    return cube_views(popts.fov, size) if popts.layout == "cube" else ring_views(8, popts.fov, size)


def predict_panorama(
    predictor,
    images: list[np.ndarray],
    opts: PredictOptions = PredictOptions(),
    popts: PanoramaOptions = PanoramaOptions(),
) -> list[Prediction]:
    """Equirectangular uint8 RGB images [H, W, 3] -> one Prediction each at the input's size, the contract of
    ``LotusPredictor.predict_batch``: depth [H, W] in [0, 1] in the predictor's kind but along the ray
    (inverse distance, or distance, divided by the maximum), or unit normals [H, W, 3] in ``opts.frame``'s
    axes of the forward view; ``extra["panorama"]`` records the views, the fits and their residuals."""
    return [_predict_one(predictor, rgb, opts, popts) for rgb in images]


def _predict_one(predictor, rgb: np.ndarray, opts: PredictOptions, popts: PanoramaOptions) -> Prediction:
    t0 = time.perf_counter()
    h, w = rgb.shape[:2]
    if not is_two_to_one(w, h):  # the pixel grid would not be the sphere's: every ray would be wrong
        raise InputError(
            f"a {w}x{h} image is not an equirectangular panorama of the whole sphere, which is twice as wide as high",
            "give the full 2:1 panorama, or --projection perspective for an ordinary image",
        )
    views = plan_views(h, w, opts, popts)
    vopts = replace(opts, frame="lotus")
    preds: list[Prediction] = []
    t_resample = 0.0
    for k in range(0, len(views), opts.batch_size):
        t = time.perf_counter()
        batch = [equirect_to_view(rgb, v) for v in views[k : k + opts.batch_size]]
        t_resample += time.perf_counter() - t
        preds += predictor.predict_batch(batch, vopts)
    t_views = time.perf_counter() - t0
    maps = [p.map for p in preds]
    record = {
        "projection": "equirect",
        "rule": popts.rule,
        "frame": "panorama: the forward view's camera (longitude 0, latitude 0); longitude grows to the right",
        "layout": f"cube faces widened to {popts.fov:g} degrees"
        if popts.layout == "cube"
        else f"8 views around the horizon and 2 at the poles, {popts.fov:g} degrees each",
        "views": [v.to_json() for v in views],
        "blend": "smoothstep from each view's core to its border, normalised over the views",
    }
    if predictor.task == "normal":
        out = blend(views, [rotate_normals(m, v) for m, v in zip(maps, views)], h, w)
        out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-6)
        if opts.frame != "lotus":
            out = convert_normals(out, opts.frame)
    else:
        out, record["depth_fit"] = merge_depth(predictor.kind, views, maps, h, w)
    seconds = time.perf_counter() - t0
    record["seconds"] = {
        "resample": round(t_resample, 3),  # the views from the panorama
        "predict": round(t_views - t_resample, 3),
        "merge": round(seconds - t_views, 3),  # fit and blend at full size
    }
    extra = {"panorama": record}
    for p in preds:
        extra.update({k: v for k, v in p.extra.items() if k == "vae_fallback"})
    return Prediction(out.astype(np.float32), preds[0].processing_size, seconds, extra)


def merge_depth(kind: str, views: list[View], maps: list[np.ndarray], height: int, width: int):
    """Views' affine-invariant maps [S, S] of ``kind`` -> (the panorama's map [H, W] in [0, 1] along the ray,
    the fit's record): jointly fitted scales and shifts (view 0 fixed), blended, divided by the maximum."""
    factors = [ray_factor(kind, ray_cos(v)) for v in views]
    s, b, fit = joint_scale_shift(overlap_pairs(views, maps, kind), len(views))
    shared = [(f * (si * m + bi)).astype(np.float32) for f, m, si, bi in zip(factors, maps, s, b)]
    out = blend(views, shared, height, width)
    top = float(np.max(out)) if out.size else 0.0
    if top > 0:
        out /= top
        how = "divided by its maximum (0 stays 0)"
    else:  # a map with nothing positive (an untrained model): spread over [0, 1] to show what there is
        lo = float(np.min(out))
        out = (out - lo) / max(top - lo, 1e-12)
        how = "no positive value: stretched to [0, 1]"
    np.clip(out, 0.0, 1.0, out=out)
    quantity = "inverse distance along the ray" if kind == "disparity" else "distance along the ray"
    fit.update(
        space=kind,
        quantity=quantity,
        method="one least-squares system over every pair of overlapping views, scale of view 0 fixed, "
        "3 refits on the pairs within 2.5 robust sigmas",
        scale_shift=[[round(float(x), 6), round(float(y), 6)] for x, y in zip(s, b)],
        normalisation=how,
    )
    return out, fit


def overlap_pairs(views: list[View], maps: list[np.ndarray], kind: str, rows: int = FIT_ROWS):
    """Pairs (i, j, mi, mj, fi, fj) of views seeing one ray, sampled on an equirectangular grid of ``rows``
    x 2 ``rows`` rays (every pair of views at each ray), at most FIT_SAMPLES of them (evenly thinned)."""
    d = pixel_directions(rows, 2 * rows).reshape(-1, 3)
    seen = []
    for v, m in zip(views, maps):
        u, y, ahead = v.project(d)
        lo, hi = MARGIN, v.size - 1 - MARGIN
        ok = ahead & (u >= lo) & (u <= hi) & (y >= lo) & (y <= hi)
        val = np.where(ok, sample_bilinear(m, u, y), np.nan)
        seen.append((ok, val, ray_factor(kind, ray_cos(v, u, y))))
    parts = []
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            both = seen[i][0] & seen[j][0]
            if both.any():
                k = np.flatnonzero(both)
                parts.append(
                    (
                        np.full(k.size, i),
                        np.full(k.size, j),
                        seen[i][1][k],
                        seen[j][1][k],
                        seen[i][2][k],
                        seen[j][2][k],
                    )
                )
    if not parts:
        raise ValueError("no two views overlap: the fov must exceed 90 degrees")
    cols = [np.concatenate(c) for c in zip(*parts)]
    n = cols[0].size
    if n > FIT_SAMPLES:
        pick = np.linspace(0, n - 1, FIT_SAMPLES).astype(np.int64)
        cols = [c[pick] for c in cols]
    return tuple(cols)


def blend(views: list[View], maps: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Views' maps [S, S] or [S, S, C] (already in the panorama's quantity and frame) -> the blended
    equirectangular map [H, W] or [H, W, C] float32: per pixel, the views that see it, weighted by
    smoothstep(border_ramp) normalised to sum to 1; computed BAND_ROWS rows at a time."""
    extra = maps[0].shape[2:]
    out = np.zeros((height, width, *extra), np.float32)
    for y0 in range(0, height, BAND_ROWS):
        y1 = min(height, y0 + BAND_ROWS)
        d = pixel_directions(height, width, (y0, y1))
        num = np.zeros((y1 - y0, width, *extra), np.float32)
        den = np.zeros((y1 - y0, width), np.float32)
        for v, m in zip(views, maps):
            u, y, ahead = v.project(d)
            ok = v.inside(u, y, ahead)
            if not ok.any():
                continue
            wgt = np.where(ok, smoothstep(border_ramp(v, u, y)), 0.0).astype(np.float32)
            idx = np.nonzero(wgt > 0)
            val = sample_bilinear(m, u[idx], y[idx])
            num[idx] += (wgt[idx][:, None] * val) if extra else wgt[idx] * val
            den[idx] += wgt[idx]
        den = np.maximum(den, 1e-12)
        out[y0:y1] = num / (den[..., None] if extra else den)
    return out
