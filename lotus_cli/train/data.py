"""Training data: Hypersim, Virtual KITTI 2 and a generic folder format, mixed per batch.

Every dataset yields samples of numpy arrays, as the authors' loaders see their data (docs/training.md):

    rgb     uint8 [H, W, 3]
    depth   float32 [H, W] metres as stored, also where it is not ``valid`` (0 = no measurement), or None (a
            folder sample without a depth map); the annotation is the depth normalisation applied to every
            pixel, so a pixel without depth holds what the normalisation makes of 0 (+1 for disparity) and is
            kept out of the loss
    valid   bool [H, W]: measured depth in the dataset's range; these pixels set the 2 % / 98 % range of
            the normalisation and are in the loss (Hypersim: every pixel, as the authors train it)
    sky     bool [H, W] or absent: far background without a usable depth (Virtual KITTI: depth >= 80 m),
            trained as the farthest value, in the depth loss
    normal  float32 [H, W, 3] in the Lotus camera frame (x left, y up, z toward the camera), a zero vector
            where unknown; or None

``to_tensors`` flips (normal x negated) and converts them.

Generic folder format (``--data folder=ROOT``; what `lotus train --preset debug` writes):

    ROOT/rgb/<key>.png|jpg            colour image (any size; all samples of one folder share one size,
                                      or pass a training size and they are resized)
    ROOT/depth/<key>.npy|png|exr      depth: npy/exr float metres; png 16-bit, metres = value / depth_scale;
                                      0, negative or non-finite = no measurement; outside depth_range = kept
                                      but not valid
    ROOT/normal/<key>.npy|png|exr     optional normals: npy/exr float [H, W, 3]; png 8- or 16-bit, n = 2 v / max - 1
    ROOT/mask/<key>.png               optional: nonzero = valid pixel
    ROOT/lotus_data.json              optional: {"depth_scale": 1000, "normal_frame": "lotus"|"opengl"|"opencv",
                                      "depth_range": [min_m, max_m]}

Random numbers: which dataset and which samples make up a batch, and each flip, are a function of (seed,
step, micro-batch) only, so a run resumed from a checkpoint, or split over N processes, sees the same data.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from ..geometry.camera import Intrinsics, convert_normals, normals_from_depth
from .options import parse_spec

IMAGE_EXT = (".png", ".jpg", ".jpeg")
HYPERSIM_FOCAL = 886.81  # px, on the native 1024 x 768 grid
HYPERSIM_SIZE = (576, 768)  # (H, W) training size (native 768 x 1024 scaled by 3/4)
VKITTI_SCENES = ("02", "06", "18", "20")
VKITTI_CAMERAS = ("0", "1")  # the stereo pair: the authors train on both
VKITTI_CROP = (352, 1216)  # (H, W), bottom centre
VKITTI_RANGE = (1e-5, 80.0)  # metres
VKITTI_K = (725.0087, 725.0087, 620.5, 187.0)  # fx, fy, cx, cy of the full 1242 x 375 frame


# ------------------------------------------------------------------------------------ pure helpers


def hypersim_planar_depth(distance: np.ndarray, focal: float = HYPERSIM_FOCAL) -> np.ndarray:
    """Hypersim's distance from the camera centre [H, W] (metres) -> planar depth z [H, W] float32.

    z = distance * f / |(u - cx, v - cy, f)| with pixel centres u - cx = -W/2 + 1/2 .. W/2 - 1/2 (likewise v);
    ``focal`` is in pixels of this grid (886.81 for the native 1024 x 768 images)."""
    h, w = distance.shape
    u = np.linspace(-0.5 * w + 0.5, 0.5 * w - 0.5, w)
    v = np.linspace(-0.5 * h + 0.5, 0.5 * h - 0.5, h)
    ray = np.sqrt(u[None, :] ** 2 + v[:, None] ** 2 + focal**2)  # [H, W]
    return (distance.astype(np.float64) * focal / ray).astype(np.float32)


def face_camera(normal: np.ndarray, focal: float = HYPERSIM_FOCAL) -> np.ndarray:
    """Normals [H, W, 3] (Lotus frame) turned to face the camera: n -> -n where n points away from it, i.e.
    where n . ray < 0 for the ray K^-1 (u, v, 1) of pixel (u, v) (u, v = 0 .. W-1, H-1; principal point
    (W/2, H/2); the ray in OpenCV axes, which the Lotus frame mirrors on every axis). Hypersim stores some
    normals facing away (its issue 26); the authors re-orient them so for normal training."""
    h, w = normal.shape[:2]
    u = (np.arange(w) - w / 2) / focal
    v = (np.arange(h) - h / 2) / focal
    dot = normal[..., 0] * u[None, :] + normal[..., 1] * v[:, None] + normal[..., 2]  # [H, W]
    return np.where((dot < 0)[..., None], -normal, normal).astype(normal.dtype)


def bottom_centre_crop(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """The bottom ``height`` rows and the central ``width`` columns (left offset (W - width) // 2) of [H, W, ...]."""
    h, w = a.shape[:2]
    if h < height or w < width:
        raise ValueError(f"cannot crop {width}x{height} from {w}x{h}")
    left = (w - width) // 2
    return a[h - height :, left : left + width]


def resize_sample(s: dict, size: tuple[int, int]) -> dict:
    """Resize a sample to (H, W): rgb bilinear (area when shrinking), depth, normal and the masks nearest."""
    import cv2

    h, w = size
    if s["rgb"].shape[:2] == (h, w):
        return s
    shrink = s["rgb"].shape[0] > h
    out = dict(s, rgb=cv2.resize(s["rgb"], (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
    for k in ("depth", "normal"):
        if s.get(k) is not None:
            out[k] = cv2.resize(s[k], (w, h), interpolation=cv2.INTER_NEAREST)
    for k in ("valid", "sky"):
        if s.get(k) is not None:
            out[k] = cv2.resize(s[k].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return out


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays
    except OSError as e:
        raise InputError(f"{path}: unreadable image ({e})", "re-extract the dataset") from e


def _read_array(path: Path) -> np.ndarray:
    """npy / exr float arrays, png as stored (uint8 / uint16)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".exr":
            try:
                import OpenEXR
            except ImportError as e:
                raise UsageError(f"{path}: reading EXR needs the OpenEXR package", "pip install OpenEXR") from e
            with OpenEXR.File(str(path)) as f:
                ch = f.channels()
                key = "RGB" if "RGB" in ch else next(iter(ch))
                return np.asarray(ch[key].pixels, dtype=np.float32)
        import cv2

        a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if a is None:
            raise OSError("not an image")
        return a[..., ::-1].copy() if a.ndim == 3 else a  # BGR -> RGB
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e})", "re-extract or re-export the file") from e


def _find(folder: Path, key: str, exts=(".npy", ".png", ".exr")) -> Path | None:
    for ext in exts:
        if (folder / f"{key}{ext}").is_file():
            return folder / f"{key}{ext}"
    return None


# ----------------------------------------------------------------------------------------- datasets


class FolderData:
    """The generic folder format (module doc). ``size`` (H, W) resizes every sample; None keeps it."""

    name = "folder"

    def __init__(self, root: str | Path, size: tuple[int, int] | None = None):
        self.root, self.size = Path(root), size
        if not (self.root / "rgb").is_dir():
            raise UsageError(f"--data {self.root}: no rgb/ folder", "see `lotus train --help` for the folder format")
        meta_file = self.root / "lotus_data.json"
        self.meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        rgbs = sorted(
            (p for p in (self.root / "rgb").iterdir() if p.suffix.lower() in IMAGE_EXT), key=lambda p: (p.stem, p.name)
        )
        self._rgb = [p for p in rgbs if _find(self.root / "depth", p.stem) or _find(self.root / "normal", p.stem)]
        self.keys = [p.stem for p in self._rgb]  # the rgb paths are listed once here, not globbed per sample
        if not self.keys:
            raise UsageError(f"--data {self.root}: no rgb/<key> image with a depth/<key> or normal/<key> map")

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int) -> dict:
        key = self.keys[i]
        rgb = _read_rgb(self._rgb[i])
        h, w = rgb.shape[:2]
        depth, valid = None, np.ones((h, w), bool)
        if (p := _find(self.root / "depth", key)) is not None:
            d = _read_array(p).astype(np.float64)
            d = d / float(self.meta.get("depth_scale", 1000.0)) if p.suffix.lower() == ".png" else d
            lo, hi = self.meta.get("depth_range", (0.0, np.inf))
            measured = np.isfinite(d) & (d > 0)
            depth, valid = np.where(measured, d, 0.0).astype(np.float32), measured & (d > lo) & (d <= hi)
        normal = None
        if (p := _find(self.root / "normal", key)) is not None:
            n = _read_array(p)
            if n.dtype.kind in "ui":
                n = n.astype(np.float64) / np.iinfo(n.dtype).max * 2 - 1
            n = convert_normals(n.astype(np.float32), "lotus", self.meta.get("normal_frame", "lotus"))
            normal = np.nan_to_num(n)
        if (p := _find(self.root / "mask", key, (".png",))) is not None:
            valid &= _read_array(p).reshape(h, w, -1)[..., 0] > 0
        s = dict(rgb=rgb, depth=depth, normal=normal, valid=valid, key=key)
        return resize_sample(s, self.size) if self.size else s


class Hypersim:
    """Hypersim: tone-mapped jpg, depth_meters (distance -> planar depth) and normal_cam hdf5, the official
    split csv; frames whose depth has any NaN are dropped (a scan on first use, cached beside the csv or in
    lotus-cli's cache). Resized to 576 x 768. Every pixel is valid: the authors train Hypersim without a mask
    and take the normalisation's quantiles over the whole frame. Normals are turned to face the camera
    (``face_camera``), as the authors' normal training does."""

    name = "hypersim"

    def __init__(
        self,
        root: str | Path,
        split_csv: str | Path | None = None,
        split: str = "train",
        size: tuple[int, int] = HYPERSIM_SIZE,
    ):
        self.root, self.size = Path(root), size
        split_csv = Path(split_csv) if split_csv else self.root / "metadata_images_split_scene_v1.csv"
        if not split_csv.is_file():
            raise UsageError(
                f"--data hypersim={root}: no split file {split_csv.name}",
                "put Hypersim's metadata_images_split_scene_v1.csv in the dataset root",
            )
        with open(split_csv, newline="") as f:
            rows = [
                r
                for r in csv.DictReader(f)
                if r.get("included_in_public_release", "True") == "True" and r["split_partition_name"] == split
            ]
        self.frames = [(r["scene_name"], r["camera_name"], int(r["frame_id"])) for r in rows]
        self.frames = [fr for fr in self.frames if self._path(fr, "depth").is_file()]
        self.frames = self._drop_nan_frames(split_csv.with_name(f"lotus_nan_free_{split}.txt"))
        if not self.frames:
            raise UsageError(f"--data hypersim={root}: no usable frame of split {split!r}")

    def _path(self, frame, what: str) -> Path:
        scene, cam, i = frame
        img = self.root / scene / "images"
        if what == "rgb":
            return img / f"scene_{cam}_final_preview" / f"frame.{i:04d}.tonemap.jpg"
        name = {"depth": "depth_meters", "normal": "normal_cam"}[what]
        return img / f"scene_{cam}_geometry_hdf5" / f"frame.{i:04d}.{name}.hdf5"

    def _drop_nan_frames(self, cache: Path) -> list:
        import hashlib

        from ..io.cache import cache_dir

        fallback = cache_dir() / f"hypersim_{hashlib.sha256(str(cache.resolve()).encode()).hexdigest()[:16]}.txt"
        cached = [c for c in (cache, fallback) if c.is_file()]
        if cached:
            keep = set(cached[0].read_text().split())
            return [fr for fr in self.frames if "/".join(map(str, fr)) in keep]
        good = [fr for fr in self.frames if np.isfinite(_h5(self._path(fr, "depth"))).all()]
        text = "\n".join("/".join(map(str, fr)) for fr in good)
        for target in (cache, fallback):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
                break
            except OSError:
                continue
        return good

    def __len__(self) -> int:
        return len(self.frames)

    def load(self, i: int) -> dict:
        fr = self.frames[i]
        depth = hypersim_planar_depth(np.nan_to_num(_h5(self._path(fr, "depth")), nan=0.0))
        n = np.nan_to_num(_h5(self._path(fr, "normal")).astype(np.float32))
        normal = face_camera(convert_normals(n, "lotus", "opengl"))  # Hypersim: x right, y up, z to the viewer
        valid = np.ones(depth.shape, bool)
        s = dict(
            rgb=_read_rgb(self._path(fr, "rgb")), depth=depth, normal=normal, valid=valid, key="/".join(map(str, fr))
        )
        return resize_sample(s, self.size)


def _h5(path: Path) -> np.ndarray:
    try:
        import h5py
    except ImportError as e:
        raise UsageError("reading Hypersim needs h5py", "pip install h5py") from e
    with h5py.File(path, "r") as f:
        return np.asarray(f["dataset"])


class VKITTI:
    """Virtual KITTI 2 as the authors train on it: scenes 02, 06, 18, 20, every variation, both cameras
    (Camera_0 and Camera_1); rgb jpg, depth png in cm, bottom-centre crop 1216 x 352. Valid: 1e-5 < d < 80 m;
    sky: d >= 80 m (the renderer stores 655.35 m), trained as the farthest value. Normals are derived from
    the valid depth (local plane of the back-projected neighbours, geometry.normals_from_depth)."""

    name = "vkitti"

    def __init__(
        self, root: str | Path, scenes: tuple[str, ...] = VKITTI_SCENES, cameras: tuple[str, ...] = VKITTI_CAMERAS
    ):
        self.root = Path(root)
        self.items = []
        for sc in scenes:
            for cam in cameras:
                for rgb in sorted(self.root.glob(f"**/Scene{sc}/*/frames/rgb/Camera_{cam}/rgb_*.jpg")):
                    depth = self._depth_path(rgb)
                    if depth is not None:
                        self.items.append((rgb, depth))
        if not self.items:
            raise UsageError(
                f"--data vkitti={root}: no SceneXX/<variation>/frames/rgb/Camera_N/rgb_*.jpg with its depth png",
                "extract vkitti_2.0.3_rgb and vkitti_2.0.3_depth into this folder",
            )

    def _depth_path(self, rgb: Path) -> Path | None:
        rel = rgb.relative_to(self.root).as_posix().replace("/frames/rgb/", "/frames/depth/")
        rel = rel.replace("rgb_", "depth_").replace(".jpg", ".png")
        for cand in (self.root / rel, *(self.root.glob(f"*/{rel.split('/', 1)[1]}") if "/" in rel else [])):
            if cand.is_file():
                return cand
        return None

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> dict:
        rgb_path, depth_path = self.items[i]
        d = _read_array(depth_path).astype(np.float64) / 100.0  # cm -> m
        lo, hi = VKITTI_RANGE
        valid, sky = (d > lo) & (d < hi), (d > lo) & (d >= hi)
        h, w = d.shape
        fx, fy, cx, cy = VKITTI_K
        n = normals_from_depth(np.where(valid, d, 0.0).astype(np.float32), Intrinsics(fx, fy, cx, cy, w, h))
        normal = np.nan_to_num(convert_normals(n, "lotus", "opencv"))  # NaN (no normal) at holes and sky -> 0
        crop = lambda a: np.ascontiguousarray(bottom_centre_crop(a, *VKITTI_CROP))  # noqa: E731
        return dict(
            rgb=crop(_read_rgb(rgb_path)),
            depth=crop(d.astype(np.float32)),
            normal=crop(normal),
            valid=crop(valid),
            sky=crop(sky),
            key=rgb_path.relative_to(self.root).with_suffix("").as_posix(),
        )


READERS = {"folder": FolderData, "hypersim": Hypersim, "vkitti": VKITTI}


def open_data(spec: str, size: tuple[int, int] | None = None, option: str = "--data"):
    """``NAME=PATH`` or a bare PATH (``parse_spec``) -> a dataset."""
    name, root = parse_spec(spec, option)
    return FolderData(root, size) if name == "folder" else READERS[name](root)


# --------------------------------------------------------------------------------- batches, mixing


@dataclass(frozen=True)
class BatchPlan:
    """Which samples form each micro-batch: the global batch of ``global_batch`` samples for (step, micro)
    is drawn from one dataset chosen with probabilities ``mix``; process ``rank`` of ``world`` takes its slice."""

    sizes: tuple[int, ...]  # dataset lengths
    mix: tuple[float, ...]
    global_batch: int
    seed: int = 0
    flip: bool = True

    def pick(self, step: int, micro: int) -> tuple[int, list[int], list[bool]]:
        """(dataset index, sample indices [global_batch], flips [global_batch])."""
        rng = np.random.default_rng([self.seed, step, micro])
        ds = int(rng.choice(len(self.sizes), p=np.asarray(self.mix) / sum(self.mix)))
        idx = rng.integers(0, self.sizes[ds], self.global_batch).tolist()
        flips = (rng.random(self.global_batch) < 0.5).tolist() if self.flip else [False] * self.global_batch
        return ds, idx, flips


def to_tensors(s: dict, flip: bool) -> dict:
    """A sample -> tensors: rgb float32 [3, H, W] in [-1, 1], depth [1, H, W], normal [3, H, W] (zeros when
    absent), valid and sky bool [1, H, W] (sky all False when absent). A horizontal flip mirrors every map
    and negates normal x."""
    import torch

    rgb, depth, normal, valid, sky = s["rgb"], s.get("depth"), s.get("normal"), s["valid"], s.get("sky")
    if depth is None:
        depth = np.zeros(rgb.shape[:2], np.float32)
    if normal is None:
        normal = np.zeros((*rgb.shape[:2], 3), np.float32)
    if sky is None:
        sky = np.zeros(rgb.shape[:2], bool)
    if flip:
        rgb, depth, valid, sky = rgb[:, ::-1], depth[:, ::-1], valid[:, ::-1], sky[:, ::-1]
        normal = normal[:, ::-1] * np.array([-1, 1, 1], np.float32)
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731  (a writable contiguous copy)
    return {
        "rgb": t(rgb).permute(2, 0, 1).float() / 127.5 - 1,
        "depth": t(depth.astype(np.float32))[None],
        "normal": t(normal.astype(np.float32)).permute(2, 0, 1),
        "valid": t(valid)[None],
        "sky": t(sky)[None],
    }


class StepBatches:
    """A map-style dataset over micro-batches: item k is micro-batch (k // accum, k % accum) of this process,
    collated ({rgb [b, 3, H, W], depth [b, 1, H, W], normal [b, 3, H, W], valid [b, 1, H, W]}). Use with
    DataLoader(batch_size=None) so workers prefetch whole batches."""

    def __init__(self, datasets: list, plan: BatchPlan, accum: int, rank: int = 0, world: int = 1, task: str = "depth"):
        if plan.global_batch % world:
            raise UsageError(f"the global batch {plan.global_batch} does not split over {world} processes")
        self.datasets, self.plan, self.accum, self.task = datasets, plan, accum, task
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict:
        import torch

        ds, idx, flips = self.plan.pick(k // self.accum, k % self.accum)
        b = self.plan.global_batch // self.world
        mine = slice(self.rank * b, (self.rank + 1) * b)
        samples = [to_tensors(self._load(ds, i), f) for i, f in zip(idx[mine], flips[mine])]
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def _load(self, ds: int, i: int) -> dict:
        s = self.datasets[ds].load(i)
        if s.get(self.task) is None:
            raise UsageError(
                f"{self.datasets[ds].name} sample {s.get('key')} has no {self.task} map",
                f"train {self.task} on data with {self.task} maps",
            )
        return s
