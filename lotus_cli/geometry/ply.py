"""Binary PLY point clouds, written by Open3D (imported on first use: it is slow to import and an extra).

Pure numpy in, bytes out; ``write_ply`` writes them atomically. The header carries ``comment`` lines (what
was assumed), which Open3D's writer has no option for.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import OutputError, UsageError
from ..io.atomic import write_bytes


def encode_ply(
    points: np.ndarray, colors: np.ndarray, normals: np.ndarray | None = None, comments: list[str] = ()
) -> bytes:
    """Binary little-endian PLY bytes, written by Open3D (float32 x y z [nx ny nz], uchar red green blue),
    with ``comments`` added to the header as ``comment`` lines (Open3D's writer has no option for them).
    points/normals [N, 3] float32, colors [N, 3] uint8."""
    o3d = open3d("point clouds")
    pc = o3d.t.geometry.PointCloud()
    pc.point.positions = o3d.core.Tensor(np.ascontiguousarray(points, np.float32))
    pc.point.colors = o3d.core.Tensor(np.ascontiguousarray(colors, np.uint8))
    if normals is not None:
        pc.point.normals = o3d.core.Tensor(np.ascontiguousarray(normals, np.float32))
    with tempfile.TemporaryDirectory(prefix="lotus-ply-") as tmp:
        path = os.path.join(tmp, "cloud.ply")
        if not o3d.t.io.write_point_cloud(path, pc, write_ascii=False):
            raise OutputError("Open3D could not write the point cloud", "check the free disk space")
        data = Path(path).read_bytes()
    return ply_comments(data, comments)


def open3d(what: str):
    """The open3d module, imported on first use (it is slow to import and an extra), or a UsageError saying
    how to install it for ``what`` ("point clouds", "meshes")."""
    try:
        import open3d as o3d
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UsageError(
            f"{what} need Open3D ({e})",
            "pip install 'lotus-cli[pointcloud]' (Linux also needs libusb-1.0: apt-get install libusb-1.0-0)",
        ) from e
    return o3d


def ply_comments(data: bytes, comments: list[str]) -> bytes:
    """``comment`` lines after a PLY's "ply" and "format" lines (Open3D's writers have no option for them)."""
    head, sep, body = data.partition(b"end_header\n")
    lines = head.split(b"\n")
    extra = [("comment " + " ".join(c.split())).encode("ascii", "replace") for c in comments]
    return b"\n".join(lines[:2] + extra + lines[2:]) + sep + body


def write_ply(
    path: Path, points: np.ndarray, colors: np.ndarray, normals: np.ndarray | None = None, comments: list[str] = ()
) -> None:
    """``encode_ply`` written atomically to ``path``."""
    write_bytes(path, encode_ply(points, colors, normals, comments))
