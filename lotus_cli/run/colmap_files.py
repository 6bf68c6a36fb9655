"""The files `lotus colmap` writes for an image and a scene: depth in the reconstruction's units (uint16 PNG in
thousandths, float32 npy, EXR), normal priors in the frames trainers read, and nerfstudio's transforms.json
(docs/colmap.md names the reader of each)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..geometry.camera import convert_normals
from ..geometry.colmap import normals_to_world
from ..io import formats
from ..io.atomic import atomic_open, write_json, write_npy
from .colmap_workspace import Registered, nerfstudio_camera

KIND = "depth"  # what the maps hold: depth (z) in the reconstruction's unit
PNG_PER_UNIT = 1000  # depths/*.png: thousandths of the unit (mm for a metric scene), nerfstudio's default 1e-3


def write_maps(
    files: dict[str, Path], depth: np.ndarray, normals: np.ndarray | None, R: np.ndarray, unit: str | None
) -> dict:
    """Write an image's maps (``files`` as ``SceneRun.files`` names them; ``R`` its world-to-camera rotation,
    ``unit`` the reconstruction's, for the EXR header); the notes its sidecar keeps on each."""
    z = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
    write_npy(files["depth_npy"], z)
    mm = np.rint(z.astype(np.float64) * PNG_PER_UNIT)
    over = int((mm > 65535).sum())
    write_png(files["depth_png"], np.where(mm <= 65535, mm, 0).astype(np.uint16))
    notes = {
        "depth_npy": {
            "file": files["depth_npy"].name,
            "dtype": "float32",
            "meaning": "z, reconstruction units; 0 = none",
        },
        "depth_png": {
            "file": files["depth_png"].name,
            "dtype": "uint16",
            "per_unit": PNG_PER_UNIT,
            "meaning": f"z * {PNG_PER_UNIT}; 0 = none or beyond {65535 / PNG_PER_UNIT:g} units",
            "beyond_range": over,
        },
    }
    if "depth_exr" in files:
        data, info = formats.get_format("exr").encode(z, KIND, formats.Style(), {"unit": unit})
        with atomic_open(files["depth_exr"]) as f:
            f.write(data)
        notes["depth_exr"] = {
            "file": files["depth_exr"].name,
            **info,
            "meaning": f"z in {unit}; 0 = none",
        }
    if normals is not None:
        ok = np.isfinite(normals).all(-1, keepdims=True)
        n = np.where(ok, normals, 0.0).astype(np.float32)
        write_npy(files["normals"], n)
        gl = convert_normals(n, "opengl", "opencv")
        write_png(files["normals_png"], np.where(ok, np.clip((gl + 1) / 2 * 255, 0, 255), 0).astype(np.uint8))
        notes["normals"] = {"file": files["normals"].name, "frame": "opencv camera: x right, y down, z forward"}
        notes["normals_png"] = {
            "file": files["normals_png"].name,
            "frame": "opengl camera: x right, y up, z toward the viewer",
            "encoding": "rgb = (n + 1) / 2 * 255",
        }
        if "normals_world" in files:
            write_npy(files["normals_world"], np.where(ok, normals_to_world(n, R), 0.0).astype(np.float32))
            notes["normals_world"] = {"file": files["normals_world"].name, "frame": "the reconstruction's world"}
    return notes


def write_transforms(out: Path, done: list[tuple[Registered, Path]], units: str) -> None:
    """nerfstudio's transforms.json in ``out``: a frame per aligned image (``done``: each with its depth PNG)
    with ``depth_file_path``. An existing one (ns-process-data's) keeps everything and gains the paths of the
    frames it lists."""
    path = out / "transforms.json"
    depth_of = {g.name: png for g, png in done}
    if path.is_file():
        try:
            meta = json.loads(path.read_text())
            frames = meta["frames"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OutputError(f"{path}: unreadable ({e}), not updated", "remove it to have lotus write one") from e
        by_name = {Path(n).name: p for n, p in depth_of.items()}
        for f in frames:
            p = depth_of.get(str(f.get("file_path", "")).removeprefix("./").removeprefix("images/"))
            p = p or by_name.get(Path(str(f.get("file_path", ""))).name)
            if p is not None:
                f["depth_file_path"] = os.path.relpath(p, out).replace(os.sep, "/")
    else:
        meta = {"applied_transform": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], "frames": []}
        for g, _ in done:
            c2w = np.eye(4)
            c2w[:3, :3], c2w[:3, 3] = g.R.T, -g.R.T @ g.t
            c2w[:3, 1:3] *= -1  # OpenCV camera axes -> nerfstudio's OpenGL ones
            frame = {
                "file_path": os.path.relpath(g.path, out).replace(os.sep, "/"),
                "transform_matrix": c2w.tolist(),
                "depth_file_path": os.path.relpath(depth_of[g.name], out).replace(os.sep, "/"),
                "colmap_im_id": g.image_id,
            }
            frame.update(nerfstudio_camera(g.camera))
            meta["frames"].append(frame)
    meta["lotus_colmap"] = {"depth_unit": units, "depth_png_per_unit": PNG_PER_UNIT}
    write_json(path, meta)


def write_png(path: Path, a: np.ndarray) -> None:
    """A uint8 RGB or uint16 grey PNG, atomically (OpenCV: 16-bit PNGs; BGR order)."""
    import cv2

    arr = a[:, :, ::-1] if a.ndim == 3 else a
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise OutputError(f"{path}: PNG encoding failed", "check the free disk space")
    with atomic_open(path) as f:
        f.write(buf.tobytes())
