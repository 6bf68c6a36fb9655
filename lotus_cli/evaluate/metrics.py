"""The paper's evaluation metrics and alignment, as pure numpy functions (paper Sec. 5, Marigold's protocol).

Depth. Maps are float [H, W] in metres, ``valid`` a bool mask [H, W] of the pixels that count. Every
metric is computed per image over the valid pixels (as Marigold's evaluation does with a batch of one)
and the dataset figure is the plain mean of the per-image values:

| key        | per image                                              | unit            |
|------------|--------------------------------------------------------|-----------------|
| abs_rel    | mean(|p - g| / g)                                      | fraction        |
| sq_rel     | mean((p - g)^2 / g)                                    | metres          |
| rmse       | sqrt(mean((p - g)^2))                                  | metres          |
| rmse_log   | sqrt(mean((ln p - ln g)^2))                            |                 |
| log10      | mean(|log10 p - log10 g|)                              |                 |
| delta1..3  | share of pixels with max(p/g, g/p) < 1.25^k            | fraction        |
| i_rmse     | sqrt(mean((1/p - 1/g)^2))                              | 1 / metres      |
| silog      | 100 * sqrt(mean(d^2) - mean(d)^2), d = ln p - ln g     |                 |

Alignment (``align_depth``): least squares scale and shift of the prediction to the ground truth over the
valid pixels, either in depth space ("depth": s * p + b ~ g) or in disparity space ("disparity", for
disparity models: s * p + b ~ 1 / g over the pixels where g > 0 and p > 0, the aligned disparity clipped
at >= 1e-3 and inverted). Then, whatever the alignment, the depth is clipped to the dataset's range and
to >= 1e-6 so that the logs are defined.

Normals. Vectors [H, W, 3] in one camera frame (need not be unit length: both are normalised); the
angular error in degrees is pooled over every valid pixel of the whole dataset (DSINE's protocol), so
``NormalAccumulator`` keeps running sums and a histogram of 0.001-degree bins for the median.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..geometry import camera as geometry

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "i_rmse", "silog")
NORMAL_METRICS = ("mean", "median", "rmse", "a5", "a7_5", "a11_25", "a22_5", "a30")
NORMAL_THRESHOLDS = {"a5": 5.0, "a7_5": 7.5, "a11_25": 11.25, "a22_5": 22.5, "a30": 30.0}
MIN_DISPARITY = 1e-3  # aligned disparity is clipped here before inversion (depth <= 1000 x the GT's unit)
MIN_DEPTH = 1e-6  # final clip so that ln p is defined
ALIGNMENTS = ("depth", "disparity", "none")
HIST_BIN_DEG = 1e-3


# ------------------------------------------------------------------------------------------- depth


def depth_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """All depth metrics of one image (table in the module doc). pred, gt [H, W] > 0 on ``valid`` [H, W]."""
    p = pred[valid].astype(np.float64)
    g = gt[valid].astype(np.float64)
    if p.size == 0:
        raise ValueError("no valid pixels")
    diff = p - g
    dlog = np.log(p) - np.log(g)
    ratio = np.maximum(p / g, g / p)
    return {
        "abs_rel": float(np.mean(np.abs(diff) / g)),
        "sq_rel": float(np.mean(diff**2 / g)),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "rmse_log": float(np.sqrt(np.mean(dlog**2))),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
        "i_rmse": float(np.sqrt(np.mean((1.0 / p - 1.0 / g) ** 2))),
        # max(0, .) guards the rounding of a perfect prediction, where the two terms agree to ~1e-17
        "silog": float(100.0 * np.sqrt(max(0.0, np.mean(dlog**2) - np.mean(dlog) ** 2))),
    }


def average(records: list[dict[str, float]], keys=DEPTH_METRICS) -> dict[str, float]:
    """Plain mean over images of each metric (the dataset figure for depth)."""
    return {k: float(np.mean([r[k] for r in records])) for k in keys} if records else {}


def nearest_downsample(a: np.ndarray, max_res: int) -> np.ndarray:
    """[H, W] -> nearest-neighbour downsample so the long side is about ``max_res`` (no-op if already
    smaller): output floor(H * f) x floor(W * f), f = min(max_res / H, max_res / W), source index
    floor(i / f), as torch's Upsample(scale_factor=f, mode="nearest") that the reference uses."""
    h, w = a.shape[:2]
    f = min(max_res / h, max_res / w)
    if f >= 1:
        return a
    rows = np.minimum((np.arange(int(h * f)) / f).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(int(w * f)) / f).astype(np.int64), w - 1)
    return a[rows][:, cols]


def fit_scale_shift(
    src: np.ndarray, ref: np.ndarray, mask: np.ndarray, max_res: int | None = None
) -> tuple[float, float]:
    """``geometry.fit_scale_shift`` (least squares in float64; a constant ``src`` gets (0, mean of ref)) on
    the pixels of ``mask``, optionally on a nearest-neighbour downsample of the three maps to ``max_res`` (the
    reference's alignment_max_res, 1024 for ETH3D's 6048 x 4032 maps). Raises ValueError with fewer than 2
    pixels, where no alignment exists."""
    if max_res:
        src, ref, mask = (nearest_downsample(a, max_res) for a in (src, ref, mask))
    n = int(np.count_nonzero(mask))
    if n < 2:
        raise ValueError(f"alignment needs at least 2 valid pixels, got {n}")
    return geometry.fit_scale_shift(src, ref, mask)


@dataclass(frozen=True)
class Aligned:
    """A prediction aligned to metric depth: ``depth`` [H, W] float64 metres (clipped), the fitted
    ``scale`` and ``shift`` (in the space of ``alignment``; 1, 0 for "none")."""

    depth: np.ndarray
    scale: float
    shift: float
    alignment: str


def align_depth(
    pred: np.ndarray,
    gt: np.ndarray,
    valid: np.ndarray,
    alignment: str,
    depth_range: tuple[float, float],
    max_res: int | None = None,
) -> Aligned:
    """Align an affine-invariant prediction [H, W] to the ground truth [H, W] (module doc), then clip it to
    ``depth_range`` = (min, max) metres and to >= 1e-6.

    alignment "depth": s * pred + b ~ gt over ``valid``. "disparity": s * pred + b ~ 1 / gt over ``valid``
    & gt > 0 & pred > 0, the result clipped at >= 1e-3 and inverted. "none": the prediction is metric depth.
    """
    p = pred.astype(np.float64)
    if alignment == "depth":
        s, b = fit_scale_shift(p, gt, valid, max_res)
        depth = s * p + b
    elif alignment == "disparity":
        g = gt.astype(np.float64)
        gt_disp = np.where(g > 0, 1.0 / np.where(g > 0, g, 1.0), 0.0)
        s, b = fit_scale_shift(p, gt_disp, valid & (g > 0) & (p > 0), max_res)
        depth = 1.0 / np.clip(s * p + b, MIN_DISPARITY, None)
    elif alignment == "none":
        s, b, depth = 1.0, 0.0, p
    else:
        raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}, not {alignment!r}")
    lo, hi = depth_range
    depth = np.clip(np.clip(depth, lo, hi), MIN_DEPTH, None)
    return Aligned(depth, s, b, alignment)


def depth_valid_mask(gt: np.ndarray, depth_range: tuple[float, float]) -> np.ndarray:
    """Pixels whose ground truth lies strictly inside (min, max) metres (Marigold's test), finite."""
    lo, hi = depth_range
    with np.errstate(invalid="ignore"):
        return np.isfinite(gt) & (gt > lo) & (gt < hi)


# ----------------------------------------------------------------------------------------- normals


angular_error = geometry.angular_error  # degrees between vectors, both normalised (the one definition)


@dataclass
class NormalAccumulator:
    """Pooled angular-error statistics over every valid pixel of a dataset, in constant memory.

    Mean, RMSE and the threshold shares are exact; the median comes from a histogram of 0.001-degree
    bins (the centre of the bin holding the middle pixel, or the mean of the two middle ones, as
    np.median), so it is within 0.0005 degrees of the exact one.
    """

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    below: dict = field(default_factory=lambda: {k: 0 for k in NORMAL_THRESHOLDS})
    hist: np.ndarray = field(default_factory=lambda: np.zeros(int(round(180 / HIST_BIN_DEG)) + 1, np.int64))

    def add(self, errors: np.ndarray) -> None:
        """Add the errors (degrees, any shape) of the valid pixels of one image."""
        e = np.asarray(errors, np.float64).ravel()
        self.count += e.size
        self.total += float(e.sum())
        self.total_sq += float((e**2).sum())
        for k, t in NORMAL_THRESHOLDS.items():
            self.below[k] += int((e < t).sum())
        idx = np.clip((e / HIST_BIN_DEG).astype(np.int64), 0, self.hist.size - 1)
        self.hist += np.bincount(idx, minlength=self.hist.size)

    def result(self) -> dict[str, float]:
        """mean, median, rmse in degrees; a5 .. a30 = share of pixels below 5 .. 30 degrees (fractions)."""
        if not self.count:
            return {}
        cum = np.cumsum(self.hist)
        n = self.count  # the k-th smallest error (1-based) lies in the first bin whose cumulative count >= k
        ranks = [(n + 1) // 2] if n % 2 else [n // 2, n // 2 + 1]
        median = float(np.mean([(np.searchsorted(cum, k) + 0.5) * HIST_BIN_DEG for k in ranks]))
        out = {"mean": self.total / self.count, "median": median, "rmse": float(np.sqrt(self.total_sq / self.count))}
        out.update({k: v / self.count for k, v in self.below.items()})
        return out


def normal_image_metrics(errors: np.ndarray) -> dict[str, float]:
    """Per-image summary for the per-sample CSV (the dataset figure pools pixels instead)."""
    e = np.asarray(errors, np.float64).ravel()
    out = {"mean": float(e.mean()), "median": float(np.median(e)), "rmse": float(np.sqrt((e**2).mean()))}
    out.update({k: float((e < t).mean()) for k, t in NORMAL_THRESHOLDS.items()})
    return out
