"""Maps -> pictures: depth colour maps, normal RGB encoding, 16-bit encodings. Pure numpy.

Conventions: depth maps are float [H, W]; "disparity" maps read 1 = near, "depth" maps 0 = near.
Normals are float [H, W, 3] unit vectors in Lotus's frame (x left, y up, z toward the camera).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def colormap_lut(name: str = "Spectral") -> np.ndarray:
    """uint8 [256, 3] table of a matplotlib colour map, truncated to uint8 as the reference does."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as e:
        from ..errors import UsageError

        raise UsageError(
            f"unknown colour map {name!r}", "use a matplotlib name such as Spectral, turbo, viridis"
        ) from e
    lut = cmap(np.arange(cmap.N))[:, :3]
    if cmap.N != 256:
        lut = cmap(np.linspace(0, 1, 256))[:, :3]
    return (lut * 255).astype(np.uint8)


def value_range(values: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    v = values[mask] if mask is not None else values
    v = v[np.isfinite(v)]
    return (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)


def normalize(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(values - lo) / (hi - lo), clipped to [0, 1]; all zeros when hi <= lo."""
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return np.clip((values.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def colorize(t: np.ndarray, cmap: str = "Spectral") -> np.ndarray:
    """t in [0, 1] [H, W] -> uint8 RGB [H, W, 3]; bin = floor(t * 256) as matplotlib does."""
    idx = np.clip((np.nan_to_num(t) * 256).astype(np.int64), 0, 255)
    return colormap_lut(cmap)[idx]


def colorize_depth(
    d: np.ndarray, kind: str, cmap: str = "Spectral", vrange: tuple[float, float] | None = None
) -> np.ndarray:
    """Depth or disparity [H, W] -> uint8 RGB, near warm (red with Spectral) for either kind.

    ``vrange`` defaults to the map's own min and max (per image, as the reference); videos pass one
    range for the whole clip so colours do not flicker.
    """
    lo, hi = vrange if vrange is not None else value_range(d)
    t = normalize(d, lo, hi)
    return colorize(1.0 - t if kind == "disparity" else t, cmap)


def normal_to_rgb(n: np.ndarray) -> np.ndarray:
    """Unit normals [H, W, 3] -> uint8 RGB by (n + 1) / 2 * 255, truncated as the reference does.

    In Lotus's frame a wall facing the camera (0, 0, 1) is (127, 127, 255) and a floor (0, 1, 0) green.
    """
    return np.clip((n * 0.5 + 0.5) * 255.0, 0, 255).astype(np.uint8)


def encode16(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values -> uint16 over the full 0..65535 range: round((v - lo) / (hi - lo) * 65535).
    Decode with v = lo + png / 65535 * (hi - lo)."""
    return np.rint(normalize(values, lo, hi) * 65535.0).astype(np.uint16)


def normal_to_uint16(n: np.ndarray) -> np.ndarray:
    """Unit normals [H, W, 3] -> uint16 RGB by round((n + 1) / 2 * 65535); decode n = png / 65535 * 2 - 1."""
    return np.rint(np.clip(n * 0.5 + 0.5, 0, 1) * 65535.0).astype(np.uint16)
