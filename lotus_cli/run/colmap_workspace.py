"""A COLMAP workspace as `lotus colmap` reads it: where the model is, its registered images with their poses
and cameras (pycolmap, an extra: imported here only), maps made already and matched by stem, and nerfstudio's
per-frame intrinsics of a COLMAP camera."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError, brief
from ..geometry.colmap import COLMAP_PIXEL_OFFSET
from ..geometry.fusion import View

MAP_SUFFIXES = (".npy", ".exr", ".16bit.png", ".png")
PIP_HINT = "pip install 'lotus-cli[colmap]' (or: pip install pycolmap)"


def pycolmap_module():
    """The pycolmap module (an extra), or a UsageError with the pip command."""
    try:
        import pycolmap
    except ImportError as e:
        raise UsageError(f"lotus colmap reads COLMAP workspaces with pycolmap, not installed ({e})", PIP_HINT) from e
    return pycolmap


def find_model(scene: Path, sparse: Path | None) -> Path:
    """The folder of the COLMAP model: ``sparse`` if given, else the first of SCENE/sparse/0 (COLMAP, gsplat),
    SCENE/colmap/sparse/0 (nerfstudio's ns-process-data), SCENE/sparse and SCENE holding cameras, images
    and points3D (.bin or .txt). InputError naming what is missing."""
    if not Path(scene).is_dir():
        raise InputError(
            f"{scene}: no such folder", "give a COLMAP workspace: the folder holding images/ and sparse/0/"
        )
    candidates = (
        [Path(sparse)]
        if sparse is not None
        else [scene / "sparse/0", scene / "colmap/sparse/0", scene / "sparse", scene]
    )
    for folder in candidates:
        have = {
            n: any((folder / f"{n}.{e}").is_file() for e in ("bin", "txt")) for n in ("cameras", "images", "points3D")
        }
        if all(have.values()):
            return folder
        if sparse is not None or any(have.values()):
            missing = ", ".join(f"{n}.bin/.txt" for n, ok in have.items() if not ok)
            raise InputError(
                f"{folder}: not a COLMAP model ({missing} missing)",
                "give --sparse the folder COLMAP's mapper wrote (cameras, images and points3D, .bin or .txt)",
            )
    raise InputError(
        f"{scene}: not a COLMAP workspace (no sparse/0, colmap/sparse/0 or sparse model in it)",
        "give the folder holding images/ and sparse/0/ (or --sparse DIR and --images DIR)",
    )


def read_reconstruction(folder: Path):
    """The pycolmap Reconstruction of a model folder (binary or text); InputError when pycolmap cannot read it
    (a camera model it does not know, a truncated file)."""
    pycolmap = pycolmap_module()
    try:
        rec = pycolmap.Reconstruction(str(folder))
    except Exception as e:  # pycolmap raises its own C++ errors (ValueError, RuntimeError) with the reason
        raise InputError(
            f"{folder}: pycolmap cannot read this COLMAP model ({brief(e)})",
            "re-export it with COLMAP (model_converter), using a camera model COLMAP knows",
        ) from e
    if rec.num_cameras() == 0 or rec.num_reg_images() == 0:
        raise InputError(f"{folder}: the model has no cameras or no registered images", "run COLMAP's mapper first")
    return rec


def image_key(name: str) -> str:
    """An image's output key: its name in the model without the suffix (a/b/x.jpg -> a/b/x)."""
    return name.rsplit(".", 1)[0] if "." in Path(name).name else name


@dataclass
class Registered:
    """One registered image of the model: its key, file, pose (X_cam = R X_world + t) and camera."""

    image_id: int
    name: str
    key: str
    path: Path
    R: np.ndarray
    t: np.ndarray
    camera: object  # pycolmap.Camera


def pose_of(image) -> tuple[np.ndarray, np.ndarray]:
    """(R [3, 3], t [3]) of a pycolmap Image's cam_from_world (a method in pycolmap 3.12+, an attribute before)."""
    cw = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
    return np.asarray(cw.rotation.matrix(), np.float64), np.asarray(cw.translation, np.float64)


def colmap_view(reg: Registered, width: int, height: int) -> View:
    """A fusion ``View`` of a registered image, its rays and projections through pycolmap's camera model."""
    cam = reg.camera

    def rays(uv):
        return np.asarray(cam.cam_from_img(np.ascontiguousarray(uv + COLMAP_PIXEL_OFFSET, np.float64)), np.float64)

    def project(X):
        uv = np.asarray(cam.img_from_cam(np.ascontiguousarray(X, np.float64)), np.float64)
        return uv - COLMAP_PIXEL_OFFSET  # behind the camera: NaN (pycolmap's cheirality check)

    return View(reg.R, reg.t, width, height, rays, project)


def camera_for(camera, width: int, height: int, what: str):
    """``camera`` for an image of width x height: itself, or a rescaled copy when the image was resized (the
    same aspect ratio within a pixel); InputError otherwise."""
    if (camera.width, camera.height) == (width, height):
        return camera
    if abs(camera.width * height / camera.height - width) > 1.0:
        raise InputError(
            f"{what} is {width}x{height}, its camera {camera.camera_id} is {camera.width}x{camera.height}",
            "give the images the model was made from (--images)",
        )
    pycolmap = pycolmap_module()
    c = pycolmap.Camera(camera.todict())
    c.rescale(width, height)
    return c


def find_map(folder: Path, key: str) -> Path | None:
    """The map of ``key`` in ``folder``: folder/key (or its last part) + .npy, .exr, .16bit.png or .png."""
    for base in dict.fromkeys((key, key.rsplit("/", 1)[-1])):
        for suffix in MAP_SUFFIXES:
            p = Path(folder) / f"{base}{suffix}"
            if p.is_file():
                return p
    return None


def given_map(folder: Path, key: str, flag: str, name: str, hint: str) -> Path:
    """``find_map``'s path, or an InputError naming ``flag`` and the image ``name`` it has no map for."""
    path = find_map(folder, key)
    if path is None:
        raise InputError(f"{flag} {folder}: no map for {name} ({key} + one of {', '.join(MAP_SUFFIXES)})", hint)
    return path


def resize_map(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """A map [h, w] or [h, w, 3] resized to height x width (bilinear; NaN spread to its neighbours)."""
    if a.shape[:2] == (height, width):
        return a
    import cv2

    return cv2.resize(a.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def nerfstudio_camera(camera) -> dict:
    """A COLMAP camera as nerfstudio's per-frame intrinsics (fl_x, fl_y, cx, cy, w, h, camera_model, k1 ...):
    COLMAP's own principal point (pixel edges at integers, as nerfstudio reads it)."""
    p = [float(v) for v in camera.params]
    m = camera.model_name
    out = {"w": int(camera.width), "h": int(camera.height)}
    if m in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        out.update(fl_x=p[0], fl_y=p[0], cx=p[1], cy=p[2], camera_model="OPENCV")
        out.update(k1=p[3] if len(p) > 3 else 0.0, k2=p[4] if len(p) > 4 else 0.0, p1=0.0, p2=0.0)
    elif m in ("PINHOLE", "OPENCV"):
        out.update(fl_x=p[0], fl_y=p[1], cx=p[2], cy=p[3], camera_model="OPENCV")
        if m == "OPENCV":
            out.update(k1=p[4], k2=p[5], p1=p[6], p2=p[7])
    elif m == "OPENCV_FISHEYE":
        out.update(fl_x=p[0], fl_y=p[1], cx=p[2], cy=p[3], camera_model="OPENCV_FISHEYE")
        out.update(k1=p[4], k2=p[5], k3=p[6], k4=p[7])
    else:
        out.update(fl_x=camera.focal_length_x, fl_y=camera.focal_length_y, cx=camera.principal_point_x)
        out.update(cy=camera.principal_point_y, camera_model="OPENCV", note=f"{m}: distortion not carried over")
    return out
