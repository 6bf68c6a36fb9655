"""Occlusion-aware fusion of many views' aligned depth into one point cloud, in bounded memory (pure numpy).

A pixel of view i, back-projected to the world, is kept when at least ``min_views`` OTHER views agree with it:
seen from view j the point lies within ``tolerance`` (relative) of view j's own depth at the pixel it
projects to. A point farther than view j's surface is hidden from j (occluded: no vote either way), one
nearer lies in space that j sees as empty (no vote), so occlusion does not count against a point and
only agreement counts for it. Each view is checked against ``neighbours[i]`` (the views sharing the most
SfM points), so the work is O(views x neighbours) and memory holds one view's points plus the depth maps
of a small cache, whatever the number of views; points stream to a PLY file as they are accepted.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_open
from .camera import Intrinsics


@dataclass(frozen=True)
class View:
    """One registered image: pose ``R`` [3, 3], ``t`` [3] (X_cam = R X_world + t, OpenCV camera frame), size,
    and its camera model as two functions on our pixel convention (centres at integers):
    ``rays(uv [N, 2]) -> [N, 2]`` normalised coordinates (x / z, y / z) and ``project(X_cam [N, 3]) -> uv
    [N, 2]`` (distortion included in both; NaN where a point cannot be projected)."""

    R: np.ndarray
    t: np.ndarray
    width: int
    height: int
    rays: Callable[[np.ndarray], np.ndarray]
    project: Callable[[np.ndarray], np.ndarray]

    @property
    def centre(self) -> np.ndarray:
        return -self.R.T @ self.t


def pinhole_view(R: np.ndarray, t: np.ndarray, K: Intrinsics) -> View:
    """A ``View`` of an undistorted pinhole camera ``K``."""

    def rays(uv):
        return np.stack([(uv[:, 0] - K.cx) / K.fx, (uv[:, 1] - K.cy) / K.fy], -1)

    def project(X):
        z = np.where(X[:, 2] > 0, X[:, 2], np.nan)
        return np.stack([K.fx * X[:, 0] / z + K.cx, K.fy * X[:, 1] / z + K.cy], -1)

    return View(np.asarray(R, np.float64), np.asarray(t, np.float64), K.width, K.height, rays, project)


def covisible_neighbours(tracks: Sequence[Sequence[int]], views: int, k: int) -> list[list[int]]:
    """For each view 0 .. views-1, the (at most ``k``) other views that share the most SfM points with it, most
    first; ``tracks`` lists, per SfM point, the views that observe it."""
    pairs: Counter = Counter()
    for track in tracks:
        for a, b in itertools.combinations(sorted(set(track)), 2):
            pairs[a, b] += 1
    shared: list[list[tuple[int, int]]] = [[] for _ in range(views)]
    for (a, b), n in pairs.items():
        shared[a].append((n, b))
        shared[b].append((n, a))
    return [[j for _, j in sorted(s, key=lambda p: (-p[0], p[1]))[:k]] for s in shared]


class PlyStream:
    """A binary little-endian PLY of points (float32 x y z, nx ny nz; uchar red green blue) written in chunks:
    the body goes to a temporary file beside ``path`` and the header, which needs the count, is written in
    front of it at ``close``, atomically; memory holds one chunk, not the cloud."""

    def __init__(self, path: Path, comments: Sequence[str] = ()):
        self.path, self.comments, self.count = Path(path), list(comments), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.body.", suffix=".tmp", dir=self.path.parent)
        self.tmp, self.body = Path(tmp), os.fdopen(fd, "wb")
        self.dtype = np.dtype([(n, "<f4") for n in ("x", "y", "z", "nx", "ny", "nz")] + [(n, "u1") for n in "rgb"])

    def add(self, points: np.ndarray, normals: np.ndarray | None, colors: np.ndarray | None) -> None:
        n = len(points)
        rec = np.zeros(n, self.dtype)
        for i, c in enumerate("xyz"):
            rec[c] = points[:, i]
            rec["n" + c] = normals[:, i] if normals is not None else 0.0
        for i, c in enumerate("rgb"):
            rec[c] = colors[:, i] if colors is not None else 200
        self.body.write(rec.tobytes())
        self.count += n

    def close(self) -> None:
        self.body.close()
        names = ["x", "y", "z", "nx", "ny", "nz"]
        header = ["ply", "format binary_little_endian 1.0"]
        header += ["comment " + " ".join(c.split()) for c in self.comments]
        header += [f"element vertex {self.count}"] + [f"property float {n}" for n in names]
        header += ["property uchar red", "property uchar green", "property uchar blue", "end_header"]
        try:
            with atomic_open(self.path) as f, open(self.tmp, "rb") as body:
                f.write(("\n".join(header) + "\n").encode("ascii", "replace"))
                shutil.copyfileobj(body, f, 1 << 20)
        finally:
            self.tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        self.body.close()
        self.tmp.unlink(missing_ok=True)


def read_ply_points(path: Path) -> dict[str, np.ndarray]:
    """The vertices of a PLY written by ``PlyStream`` (for tests and checks): {"points", "normals", "colors"}."""
    data = Path(path).read_bytes()
    head, _, body = data.partition(b"end_header\n")
    n = int(next(line.split()[-1] for line in head.split(b"\n") if line.startswith(b"element vertex")))
    dtype = np.dtype([(c, "<f4") for c in ("x", "y", "z", "nx", "ny", "nz")] + [(c, "u1") for c in "rgb"])
    rec = np.frombuffer(body, dtype, count=n)
    return {
        "points": np.stack([rec[c] for c in "xyz"], -1),
        "normals": np.stack([rec["n" + c] for c in "xyz"], -1),
        "colors": np.stack([rec[c] for c in "rgb"], -1),
    }


class DepthCache:
    """``load(i)`` -> view i's depth [H, W] (NaN or <= 0: none), keeping at most ``size`` maps (least recently
    used leave first): the memory bound of fusion."""

    def __init__(self, load: Callable[[int], np.ndarray], size: int = 16):
        self.load, self.size, self.maps = load, size, OrderedDict()

    def __call__(self, i: int) -> np.ndarray:
        if i in self.maps:
            self.maps.move_to_end(i)
            return self.maps[i]
        m = self.load(i)
        self.maps[i] = m
        while len(self.maps) > self.size:
            self.maps.popitem(last=False)
        return m


def agreeing_views(
    points_world: np.ndarray,
    others: Sequence[int],
    views: Sequence[View],
    depth: Callable[[int], np.ndarray],
    tol: float,
    need: int | None = None,
) -> np.ndarray:
    """How many of the views ``others`` agree with each world point [N, 3]: it projects inside view j with
    positive depth z_j and |z_j - d_j| <= tol * d_j, d_j being view j's depth at the nearest pixel. With
    ``need``, counting stops at ``need`` for a point (it is kept either way), and a point that can no longer
    reach it is not looked at again: most points are settled by the first few views."""
    votes = np.zeros(len(points_world), np.int32)
    active = np.arange(len(points_world))
    for left, j in zip(range(len(others), 0, -1), others):
        if need is not None:
            active = active[(votes[active] < need) & (votes[active] + left >= need)]
        if active.size == 0:
            break
        v = views[j]
        X = points_world[active] @ v.R.T + v.t
        z = X[:, 2]
        uv = v.project(X)
        u, w = np.rint(uv[:, 0]), np.rint(uv[:, 1])
        inside = (z > 0) & (u >= 0) & (w >= 0) & (u < v.width) & (w < v.height)  # NaN compares False
        idx = np.flatnonzero(inside)
        if idx.size == 0:
            continue
        d = np.asarray(depth(j)[w[idx].astype(np.intp), u[idx].astype(np.intp)], np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.abs(z[idx] - d) <= tol * d  # NaN or <= 0 depth: no vote
        votes[active[idx[ok]]] += 1
    return votes


def fuse_views(
    views: Sequence[View],
    depth: Callable[[int], np.ndarray],
    neighbours: Sequence[Sequence[int]],
    sink: PlyStream,
    *,
    extras: Callable[[int], tuple[np.ndarray | None, np.ndarray | None]] | None = None,
    min_views: int = 2,
    tolerance: float = 0.01,
    stride: int = 2,
    on_view: Callable[[int, dict], None] | None = None,
) -> dict:
    """Fuse every view's depth (``depth(i)`` [H, W], z in the reconstruction's unit) into ``sink``: the pixels of
    every ``stride``-th row and column that at least ``min_views`` of ``neighbours[i]`` agree with (see
    ``agreeing_views``). ``extras(i)`` gives view i's colours [H, W, 3] uint8 and world-frame normals
    [H, W, 3] (either None). ``depth`` should be a ``DepthCache`` for many views. Returns counts per view."""
    stats = {"views": len(views), "candidates": 0, "kept": 0, "per_view": []}
    for i, v in enumerate(views):
        d = np.asarray(depth(i))[::stride, ::stride]
        rows, cols = np.nonzero(np.isfinite(d) & (d > 0))
        z = d[rows, cols].astype(np.float64)
        uv = np.stack([cols * stride, rows * stride], -1).astype(np.float64)
        xy = v.rays(uv)
        X_cam = np.concatenate([xy * z[:, None], z[:, None]], -1)
        X_world = (X_cam - v.t) @ v.R  # R^T (X - t), row form
        votes = agreeing_views(X_world, neighbours[i], views, depth, tolerance, min_views)
        keep = votes >= min_views
        colors = normals = None
        if extras is not None and keep.any():
            rgb, nrm = extras(i)
            r, c = rows[keep] * stride, cols[keep] * stride
            colors = rgb[r, c] if rgb is not None else None
            normals = nrm[r, c] if nrm is not None else None
        sink.add(X_world[keep], normals, colors)
        one = {"candidates": int(len(z)), "kept": int(keep.sum())}
        stats["candidates"] += one["candidates"]
        stats["kept"] += one["kept"]
        stats["per_view"].append(one)
        if on_view is not None:
            on_view(i, one)
    return stats
