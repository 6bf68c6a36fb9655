"""A COLMAP workspace of known geometry for the `lotus colmap` tests and benchmark.

A closed room (floor, ceiling, three walls) with a sphere, ray-cast exactly from ``views`` cameras through
pycolmap's own camera model (distortion included), so depth (z), normals and colours are known per pixel.
Its COLMAP model holds the true poses and sparse points sampled from the surfaces the views see, with
noise, plus ``outliers`` (a fraction) of points floating in the room (bad matches), each with its track.
The stand-in for the network is each view's true disparity under an unknown scale and shift of its own
(``fake_maps``): what an affine-invariant model would give if it were perfect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# OpenCV-like world: y down. (unit normal facing into the room, offset d): n . p + d = 0
PLANES = [
    (np.array([0.0, -1.0, 0.0]), 1.0),  # floor y = 1
    (np.array([0.0, 1.0, 0.0]), 1.5),  # ceiling y = -1.5
    (np.array([0.0, 0.0, -1.0]), 6.0),  # back wall z = 6
    (np.array([1.0, 0.0, 0.0]), 2.5),  # left wall x = -2.5
    (np.array([-1.0, 0.0, 0.0]), 2.5),  # right wall x = 2.5
    (np.array([0.0, 0.0, 1.0]), 3.0),  # wall behind the cameras z = -3
]
SPHERE = (np.array([0.4, 0.2, 3.2]), 0.8)


def surface_distance(p: np.ndarray) -> np.ndarray:
    """Distance [N] of world points [N, 3] to the nearest surface of the room (planes taken as infinite)."""
    d = [np.abs(p @ n + off) for n, off in PLANES]
    c, r = SPHERE
    d.append(np.abs(np.linalg.norm(p - c, axis=-1) - r))
    return np.min(d, axis=0)


def look_at(centre: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, t) of cam_from_world for a camera at ``centre`` looking at ``target`` (OpenCV axes, y down)."""
    z = target - centre
    z /= np.linalg.norm(z)
    x = np.cross(np.array([0.0, 1.0, 0.0]), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return R, -R @ centre


def cast(origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast rays origin + s * dirs [N, 3]: (s of the first hit [N], world normal there [N, 3])."""
    best = np.full(len(dirs), np.inf)
    normal = np.zeros_like(dirs)
    for n, off in PLANES:
        den = dirs @ n
        with np.errstate(divide="ignore", invalid="ignore"):
            s = -(origin @ n + off) / den
        hit = np.isfinite(s) & (s > 1e-6) & (s < best)
        best[hit], normal[hit] = s[hit], n
    c, r = SPHERE
    oc = origin - c
    b = dirs @ oc
    a = (dirs * dirs).sum(-1)
    disc = b * b - a * (oc @ oc - r * r)
    with np.errstate(invalid="ignore"):
        s = (-b - np.sqrt(np.where(disc >= 0, disc, np.nan))) / a
    hit = np.isfinite(s) & (s > 1e-6) & (s < best)
    best[hit] = s[hit]
    normal[hit] = ((origin + s[hit, None] * dirs[hit]) - c) / r
    return best, normal


@dataclass
class Scene:
    root: Path
    names: list[str]
    poses: list[tuple[np.ndarray, np.ndarray]]
    depth: list[np.ndarray]  # [H, W] z
    normals_world: list[np.ndarray]  # [H, W, 3]
    outlier_ids: set[int]
    cameras: list  # pycolmap.Camera per view


def render(camera, R, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth z [H, W], world normals [H, W, 3], rgb uint8 [H, W, 3]) seen by a pycolmap camera at pose R, t."""
    h, w = camera.height, camera.width
    vv, uu = np.mgrid[0:h, 0:w]
    uv = np.stack([uu.ravel(), vv.ravel()], -1).astype(np.float64) + 0.5  # COLMAP pixel centres
    xy = np.asarray(camera.cam_from_img(uv))
    dirs_cam = np.concatenate([xy, np.ones((len(xy), 1))], -1)
    centre = -R.T @ t
    s, n = cast(centre, dirs_cam @ R)  # the ray's camera z is 1, so s is the depth z
    p = centre + s[:, None] * (dirs_cam @ R)
    checker = (np.floor(p[:, 0] * 3) + np.floor(p[:, 1] * 3) + np.floor(p[:, 2] * 3)) % 2
    shade = 0.4 + 0.6 * np.abs(n @ np.array([0.3, -0.8, -0.5]) / np.linalg.norm([0.3, -0.8, -0.5]))
    base = 0.5 + 0.5 * np.abs(n)
    rgb = np.clip(base * (0.6 + 0.4 * checker[:, None]) * shade[:, None] * 255, 0, 255).astype(np.uint8)
    return s.reshape(h, w).astype(np.float32), n.reshape(h, w, 3).astype(np.float32), rgb.reshape(h, w, 3)


def build_scene(
    root: Path,
    views: int = 6,
    size: tuple[int, int] = (96, 72),
    model: str = "PINHOLE",
    points_per_view: int = 160,
    noise: float = 0.002,
    outliers: float = 0.1,
    binary: bool = True,
    seed: int = 0,
) -> Scene:
    """Write images/ and sparse/0/ (binary or text) of the room under ``root``."""
    import pycolmap
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "sparse/0").mkdir(parents=True, exist_ok=True)
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera.create_from_model_name(1, model, 0.8 * w, w, h)
    if model == "OPENCV":
        cam.params = [0.8 * w, 0.82 * w, w / 2 + 1.5, h / 2 - 1.0, -0.12, 0.03, 0.002, -0.001]
    rec.add_camera_with_trivial_rig(cam)
    names, poses, depths, normals, cams = [], [], [], [], []
    for i in range(views):
        a = 2 * np.pi * i / views
        centre = np.array([0.9 * np.cos(a), 0.3 * np.sin(a), -0.8 + 0.4 * np.sin(a)])
        target = SPHERE[0] + rng.normal(0, 0.3, 3)
        R, t = look_at(centre, target)
        d, n, rgb = render(cam, R, t)
        name = f"view_{i:02d}.png"
        Image.fromarray(rgb).save(root / "images" / name)
        names.append(name)
        poses.append((R, t))
        depths.append(d)
        normals.append(n)
        cams.append(cam)
    # surface points seen by each view (with noise), then outliers floating in the room
    pts = []
    for i, (R, t) in enumerate(poses):
        uv = rng.uniform([2, 2], [w - 3, h - 3], (points_per_view, 2))
        xy = np.asarray(cam.cam_from_img(uv + 0.5))
        z = depths[i][np.rint(uv[:, 1]).astype(int), np.rint(uv[:, 0]).astype(int)]
        # the ray-cast depth at the pixel's centre is exact only there: sample at the centre
        uvc = np.rint(uv)
        xy = np.asarray(cam.cam_from_img(uvc + 0.5))
        Xc = np.concatenate([xy * z[:, None], z[:, None]], -1)
        pts.append((Xc - t) @ R)
    pts = np.concatenate(pts)
    pts += rng.normal(0, noise, pts.shape) * np.linalg.norm(pts - pts.mean(0), axis=-1, keepdims=True).clip(1, None)
    n_out = int(round(outliers / (1 - outliers) * len(pts)))
    floaters = rng.uniform([-2.0, -1.2, 0.5], [2.0, 0.8, 5.5], (n_out, 3))
    all_pts = np.concatenate([pts, floaters])
    is_out = np.r_[np.zeros(len(pts), bool), np.ones(n_out, bool)]
    tracks: list[list[tuple[int, np.ndarray]]] = []
    for p, out in zip(all_pts, is_out):
        track = []
        for i, (R, t) in enumerate(poses):
            X = R @ p + t
            if X[2] <= 0:
                continue
            uv = np.asarray(cam.img_from_cam(X[None]))[0]  # COLMAP pixel coordinates
            if not (np.isfinite(uv).all() and 0 <= uv[0] < w and 0 <= uv[1] < h):
                continue
            if not out:
                dz = depths[i][min(int(uv[1]), h - 1), min(int(uv[0]), w - 1)]
                if abs(X[2] - dz) > 0.03 * dz:  # hidden from this view
                    continue
            track.append((i, uv))
        if out:  # a bad match: seen in 2 or 3 views it projects into
            rng.shuffle(track)
            track = track[: rng.integers(2, 4)]
        tracks.append(track if len(track) >= 2 else [])
    keypoints = [[] for _ in poses]
    for tr in tracks:
        for i, uv in tr:
            keypoints[i].append(uv)
    for i, (R, t) in enumerate(poses):
        kp = np.array(keypoints[i], np.float64).reshape(-1, 2)
        image = pycolmap.Image(name=names[i], keypoints=kp, camera_id=1, image_id=i + 1)
        q = pycolmap.Rotation3d(R)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(q, t))
    counters = [0] * len(poses)
    outlier_ids = set()
    for p, out, tr in zip(all_pts, is_out, tracks):
        if not tr:
            continue
        track = pycolmap.Track()
        for i, _ in tr:
            track.add_element(i + 1, counters[i])
            counters[i] += 1
        pid = rec.add_point3D(p, track, np.array([128, 128, 128], np.uint8))
        if out:
            outlier_ids.add(pid)
    if binary:
        rec.write_binary(str(root / "sparse/0"))
    else:
        rec.write_text(str(root / "sparse/0"))
    return Scene(root, names, poses, depths, normals, outlier_ids, cams)


def fake_maps(scene: Scene, folder: Path, normals_folder: Path | None = None, seed: int = 1) -> None:
    """The stand-in network: each view's true disparity normalised to [0, 1] (an unknown scale and shift per
    view, as an affine-invariant model gives), as .npy by image stem; with ``normals_folder`` the true
    normals in the Lotus camera frame (x left, y up, z toward the camera) too."""
    from lotus_cli.geometry.camera import convert_normals

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, d, n, (R, _) in zip(scene.names, scene.depth, scene.normals_world, scene.poses):
        disp = 1.0 / d.astype(np.float64)
        lo, hi = disp.min(), disp.max()
        squeeze = rng.uniform(0.7, 1.0)  # not exactly [0, 1]: a different unknown scale per view
        v = (disp - lo) / (hi - lo) * squeeze + rng.uniform(0, 1 - squeeze)
        np.save(folder / f"{Path(name).stem}.npy", v.astype(np.float32))
        if normals_folder is not None:
            normals_folder.mkdir(parents=True, exist_ok=True)
            n_cam = n.astype(np.float64) @ R.T  # world -> OpenCV camera
            np.save(
                normals_folder / f"{Path(name).stem}.npy", convert_normals(n_cam, "lotus", "opencv").astype(np.float32)
            )
