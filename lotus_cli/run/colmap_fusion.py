"""The fused cloud of a `lotus colmap` scene: every aligned view's depth, checked against its covisible
neighbours' (``geometry.fusion``), streamed into ``fused.ply`` in the reconstruction's world frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..geometry.colmap import normals_to_world
from ..geometry.fusion import DepthCache, PlyStream, covisible_neighbours, fuse_views
from ..io import sources
from .colmap_workspace import Registered, camera_for, colmap_view, resize_map
from .events import Reporter


def fuse_scene(rec, done: list[tuple[Registered, Path]], out: Path, r, reporter: Reporter, units: str) -> dict | None:
    """Fuse the aligned views (``done``: each registered image with its depth npy) of reconstruction ``rec``
    into ``out``/fused.ply (``geometry.fusion``: a point is kept where ``r.min_views`` other views agree within
    ``r.tolerance``); the fusion's statistics, or None with a note when too few views are aligned. ``r``: the
    ColmapRequest."""
    depth_of = {g.key: npy for g, npy in done}
    ok = [g for g, npy in done if npy.is_file()]
    if len(ok) < r.min_views + 1:
        reporter.note(f"note: no fusion: {len(ok)} aligned views, --min-views {r.min_views} needs more")
        return None
    sizes = [np.load(depth_of[g.key], mmap_mode="r").shape for g in ok]
    for g, (h, w) in zip(ok, sizes):  # a view kept by --skip-existing still has the model's camera
        g.camera = camera_for(g.camera, w, h, str(g.path))
    views = [colmap_view(g, s[1], s[0]) for g, s in zip(ok, sizes)]
    index = {g.image_id: i for i, g in enumerate(ok)}
    tracks = []
    for p in rec.points3D.values():
        tracks.append([index[e.image_id] for e in p.track.elements if e.image_id in index])
    neighbours = covisible_neighbours(tracks, len(ok), r.neighbours)
    centres = np.array([v.centre for v in views])
    for i, nb in enumerate(neighbours):  # too few shared points: the nearest cameras make up the number
        for j in np.argsort(np.linalg.norm(centres - centres[i], axis=-1)):
            if len(nb) >= r.neighbours:
                break
            if j != i and j not in nb:
                nb.append(int(j))
    depth = DepthCache(lambda i: np.load(depth_of[ok[i].key], mmap_mode="r"), size=2 * r.neighbours)

    def extras(i):
        g = ok[i]
        rgb = sources.read_image(g.path, r.max_pixels)
        h, w = sizes[i]
        if rgb.shape[:2] != (h, w):
            rgb = resize_map(rgb, w, h).astype(np.uint8)
        nfile = out / "normals" / f"{g.key}.npy"
        n = normals_to_world(np.load(nfile), g.R) if nfile.is_file() else None
        return rgb, n

    bar = reporter.progress("fusing views", len(ok))
    comments = [
        "lotus colmap: fused depth of the registered views, world frame of the reconstruction",
        f"units: {units}",
        f"kept where >= {r.min_views} other views agree within {r.tolerance:g} of their depth",
    ]
    sink = PlyStream(out / "fused.ply", comments)
    try:
        stats = fuse_views(
            views,
            depth,
            neighbours,
            sink,
            extras=extras,
            min_views=r.min_views,
            tolerance=r.tolerance,
            stride=r.fusion_stride,
            on_view=lambda i, one: bar.advance(),
        )
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    sink.close()
    per_view = stats.pop("per_view")
    stats["per_view"] = {g.key: v for g, v in zip(ok, per_view)}
    stats.update(file="fused.ply", min_views=r.min_views, tolerance=r.tolerance, stride=r.fusion_stride)
    return stats
