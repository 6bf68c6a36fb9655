"""Evaluation datasets: Marigold's depth format and DSINE's normal format, from folders or tar archives.

Depth sets (Marigold's evaluation format). A dataset is a tar archive or its unpacked folder, plus a split
list: a text file with one sample per line, paths relative to the archive root, separated by spaces:

| name    | archive                       | split list                         | split line               |
|---------|-------------------------------|------------------------------------|--------------------------|
| nyuv2   | nyu_labeled_extracted.tar     | filename_list_test.txt             | rgb depth filled         |
| kitti   | kitti_eigen_split_test.tar    | eigen_test_files_with_gt.txt       | rgb depth focal          |
| scannet | scannet_val_sampled_800_1.tar | scannet_val_sampled_list_800_1.txt | rgb depth                |
| eth3d   | eth3d.tar                     | eth3d_filename_list.txt            | rgb depth                |
| diode   | diode_val.tar                 | diode_val_all_filename_list.txt    | rgb depth.npy mask.npy   |

| name    | GT decoding                       | valid (metres)  | crop / mask                           | res    |
|---------|-----------------------------------|-----------------|---------------------------------------|--------|
| nyuv2   | uint16 PNG / 1000                 | 1e-3 < d < 10   | Eigen: rows 45:471, cols 41:601       | native |
| kitti   | uint16 PNG / 256 ("None": no GT)  | 1e-5 < d < 80   | benchmark crop 1216x352 + Eigen mask  | native |
| scannet | uint16 PNG / 1000                 | 1e-3 < d < 10   | none                                  | native |
| eth3d   | raw float32, image size, inf = 0  | d > 1e-5        | none (alignment fitted at <= 1024 px) | 768    |
| diode   | npy [H, W(, 1)] metres            | the mask file   | none (predictions clipped 0.6 .. 350) | 640    |

The split list is found, in order: ``--split name=FILE``; the default name beside the archive (or in the
folder, or inside the archive at its root); the only ``*.txt`` in that folder. The evaluated depth is
the raw (not the filled) map, as Marigold and Lotus do. Unconfirmed details, chosen as documented here:
ETH3D's depth size is taken from its RGB image (the reference hard-codes 6048 x 4032, the size of every
ETH3D DSLR image); DIODE's valid pixels are the mask file's AND gt > 0 (the reference uses the mask alone;
masked-in zeros would divide by zero).

Normal sets (DSINE's ``dsine_eval`` layout; the Lotus reference reads the same). The dataset folder holds
``<scene>/<id>_img.png`` with ``<id>_normal.<ext>`` beside it (``_intrins.npy`` is not needed here):

| name    | split list       | GT file     | decoding                                      | valid               |
|---------|------------------|-------------|-----------------------------------------------|---------------------|
| nyuv2   | split/test.txt   | _normal.png | 8-bit RGB, n = rgb / 255 * 2 - 1              | r + g + b > 0       |
| scannet | split/test.txt   | _normal.png | as nyuv2                                      | as nyuv2            |
| ibims   | split/ibims.txt  | _normal.exr | float RGB (needs the OpenEXR package)         | |n| > 0.5           |
| sintel  | split/sintel.txt | _normal.exr | as ibims                                      | as ibims            |
| oasis   | split/val.txt    | _normal.pkl | dict: ROI box + its normals; x, y negated     | ROI pixels not 0    |

The split lists ship with DSINE's code (``data/datasets/<name>/split/``; Lotus keeps copies under
``evaluation/dataset_normal/<name>/split/``), not, as far as we could tell, inside ``dsine_eval``: copy the
``split`` folder into the dataset folder or pass ``--split``. Without a split list every
``*_img.png``/``*_img.jpg`` under the folder is a sample (sorted). DSINE's
normals are in the Lotus frame (x left, y up, z toward the camera): the reference compares them with
Lotus's output as they are. Processing resolution: native (the reference pads to a multiple of 32
instead; the shared predictor floors to the VAE's grid and stretches back).

Every sample has a ``key``: its RGB path without the extension (``test/kitchen_0004/rgb_0001``);
predictions given with ``--predictions`` are looked up by it. A missing or malformed file raises
InputError naming the file and the expected layout; the run goes on with the next sample.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import InputError, UsageError
from .metrics import depth_valid_mask

# ------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class DepthSpec:
    """One depth benchmark of Marigold's format (table in the module doc)."""

    name: str
    title: str
    archive: str  # default archive file name
    split: str  # default split list file name
    line: str  # the columns of a split line, for messages
    decode: str  # "png1000" | "png256" | "float32" | "npy"
    depth_range: tuple[float, float]  # valid GT strictly inside, predictions clipped to it (metres)
    crop: str | None = None  # "nyu-eigen" | "kitti"
    processing_res: int = 0  # 0 = native
    alignment_max_res: int | None = None
    size: int = 0  # samples in the full test set (the paper's Sec. 5 evaluation protocol, after Marigold)

    @property
    def layout(self) -> str:
        return (
            f"{self.title}: Marigold's {self.archive} (or its unpacked folder) with the split list "
            f"{self.split} beside it, one sample per line: '{self.line}' (paths inside the archive)"
        )


@dataclass(frozen=True)
class NormalSpec:
    """One normal benchmark of DSINE's format (table in the module doc)."""

    name: str
    title: str
    split: str  # default split list, relative to the dataset folder
    gt: str  # "png" | "exr" | "pkl"
    size: int = 0  # samples in the full test set, where known (0 = not stated here)

    @property
    def layout(self) -> str:
        return (
            f"{self.title}: DSINE's dsine_eval/{self.name} folder: <scene>/<id>_img.png with "
            f"<id>_normal.{self.gt} beside it; split list {self.split} (optional)"
        )


DEPTH_SETS = {
    s.name: s
    for s in (
        DepthSpec(
            "nyuv2",
            "NYUv2 test",
            "nyu_labeled_extracted.tar",
            "filename_list_test.txt",
            "rgb depth filled",
            "png1000",
            (1e-3, 10.0),
            crop="nyu-eigen",
            size=654,
        ),
        DepthSpec(
            "kitti",
            "KITTI Eigen test",
            "kitti_eigen_split_test.tar",
            "eigen_test_files_with_gt.txt",
            "rgb depth focal",
            "png256",
            (1e-5, 80.0),
            crop="kitti",
            size=652,
        ),
        DepthSpec(
            "scannet",
            "ScanNet",
            "scannet_val_sampled_800_1.tar",
            "scannet_val_sampled_list_800_1.txt",
            "rgb depth",
            "png1000",
            (1e-3, 10.0),
            size=800,
        ),
        DepthSpec(
            "eth3d",
            "ETH3D",
            "eth3d.tar",
            "eth3d_filename_list.txt",
            "rgb depth",
            "float32",
            (1e-5, float("inf")),
            processing_res=768,
            alignment_max_res=1024,
            size=454,
        ),
        DepthSpec(
            "diode",
            "DIODE val",
            "diode_val.tar",
            "diode_val_all_filename_list.txt",
            "rgb depth.npy mask.npy",
            "npy",
            (0.6, 350.0),
            processing_res=640,
            size=771,
        ),
    )
}
NORMAL_SETS = {
    s.name: s
    for s in (
        NormalSpec("nyuv2", "NYUv2", "split/test.txt", "png", 654),
        NormalSpec("scannet", "ScanNet", "split/test.txt", "png"),
        NormalSpec("ibims", "iBims-1", "split/ibims.txt", "exr", 100),
        NormalSpec("sintel", "Sintel", "split/sintel.txt", "exr"),
        NormalSpec("oasis", "OASIS val", "split/val.txt", "pkl"),
    )
}
ALIASES = {
    "nyu": "nyuv2",
    "nyu_v2": "nyuv2",
    "kitti_eigen": "kitti",
    "ibims1": "ibims",
    "ibims-1": "ibims",
    "diode_val": "diode",
}
NYU_EIGEN = (45, 471, 41, 601)  # rows, cols of the Eigen crop of a 640 x 480 frame
KITTI_BENCHMARK = (352, 1216)  # h, w of the bottom-centre crop
KITTI_EIGEN = (0.3324324, 0.91351351, 0.0359477, 0.96405229)  # fractions of h, h, w, w


def spec_for(task: str, name: str) -> DepthSpec | NormalSpec:
    sets = DEPTH_SETS if task == "depth" else NORMAL_SETS
    key = ALIASES.get(name.lower(), name.lower())
    if key not in sets:
        raise UsageError(f"unknown {task} dataset {name!r}", f"use one of {', '.join(sets)}")
    return sets[key]


def parse_pairs(values: list[str] | None, option: str) -> list[tuple[str, Path]]:
    """['nyuv2=/data/nyu', ...] -> [('nyuv2', Path('/data/nyu')), ...]."""
    out = []
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UsageError(f"{option} {v!r} is not NAME=PATH", f"e.g. {option} nyuv2=/data/eval/nyuv2")
        out.append((name.strip(), Path(path.strip()).expanduser()))
    return out


# ----------------------------------------------------------------------------------------- stores


class Store:
    """Files of a dataset by POSIX path relative to its root: a folder or a tar archive."""

    label: str

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def has(self, rel: str) -> bool:
        raise NotImplementedError

    def files(self) -> list[str]:
        raise NotImplementedError

    def where(self, rel: str) -> str:
        return f"{self.label}:{rel}"

    def close(self) -> None:
        pass


class FolderStore(Store):
    def __init__(self, root: Path):
        self.root, self.label = root, str(root)

    def where(self, rel: str) -> str:
        return str(self.root / rel)

    def has(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def read(self, rel: str) -> bytes:
        try:
            return (self.root / rel).read_bytes()
        except OSError as e:
            raise InputError(f"{self.where(rel)}: cannot read ({e.strerror})") from e

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())


class TarStore(Store):
    """An uncompressed (or gzip/bz2/xz) tar; member names are matched with or without a leading './'."""

    def __init__(self, path: Path):
        self.path, self.label = path, str(path)
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {_norm(m.name): m for m in self.tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError) as e:
            raise InputError(
                f"{path}: not a readable tar archive ({e})", "re-download or unpack it and pass the folder"
            ) from e

    def has(self, rel: str) -> bool:
        return _norm(rel) in self.members

    def read(self, rel: str) -> bytes:
        m = self.members.get(_norm(rel))
        if m is None:
            raise InputError(f"{self.where(rel)}: not in the archive")
        f = self.tar.extractfile(m)
        return f.read()

    def files(self) -> list[str]:
        return sorted(self.members)

    def close(self) -> None:
        self.tar.close()


def _norm(name: str) -> str:
    return PurePosixPath(name.lstrip("/")).as_posix().removeprefix("./")


# ---------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    key: str  # RGB path without extension: names predictions
    rgb: str
    gt: str
    extra: str | None = None  # DIODE: the mask file


@dataclass
class Item:
    """A loaded sample: ``rgb`` uint8 [H, W, 3]; ``gt`` depth [H, W] float32 metres or normals [H, W, 3]
    float32 (Lotus frame); ``valid`` bool [H, W]."""

    sample: Sample
    rgb: np.ndarray
    gt: np.ndarray
    valid: np.ndarray


@dataclass
class Dataset:
    task: str
    spec: DepthSpec | NormalSpec
    store: Store
    samples: list[Sample]
    split_path: str | None = None
    skipped: int = 0  # split lines without ground truth (KITTI's "None")

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self, s: Sample) -> Item:
        """Read one sample; an InputError names the file and (unless it says better) the expected layout."""
        try:
            return load_depth(self, s) if self.task == "depth" else load_normal(self, s)
        except InputError as e:
            e.hint = e.hint or f"expected {self.spec.layout}"
            raise

    def describe(self) -> dict:
        return {
            "name": self.name,
            "title": self.spec.title,
            "source": self.store.label,
            "split": self.split_path,
            "samples": len(self.samples),
            "skipped_without_gt": self.skipped,
            "full_size": self.spec.size or None,
        }


def open_dataset(task: str, name: str, path: Path, split: Path | None = None) -> Dataset:
    """Open a dataset folder or archive and read its split list (no image is read yet)."""
    spec = spec_for(task, name)
    if not path.exists():
        raise InputError(f"--dataset {name}={path}: no such file or folder", f"expected {spec.layout}")
    if task == "depth":
        store, search = _depth_store(spec, path)
        lines, where = _split_lines(spec, store, search, split)
        samples, skipped = _depth_samples(spec, lines, where)
    else:
        store = TarStore(path) if path.is_file() else FolderStore(path)
        search = [path.parent if path.is_file() else path]
        try:
            lines, where = _split_lines(spec, store, search, split)
        except InputError:
            if split is not None:
                raise
            lines, where = _discover_images(store), None
        samples, skipped = _normal_samples(spec, lines, where or store.label), 0
    if not samples:
        raise InputError(f"{name}: no samples in {where or store.label}", f"expected {spec.layout}")
    return Dataset(task, spec, store, samples, where, skipped)


def _depth_store(spec: DepthSpec, path: Path) -> tuple[Store, list[Path]]:
    if path.is_file():
        return TarStore(path), [path.parent]
    tars = [path / spec.archive] if (path / spec.archive).is_file() else sorted(path.glob("*.tar"))
    if len(tars) == 1:
        return TarStore(tars[0]), [path]
    return FolderStore(path), [path]


def _split_lines(spec, store: Store, search: list[Path], split: Path | None) -> tuple[list[str], str]:
    """The split list's non-empty lines and where they came from."""
    default = PurePosixPath(spec.split).name
    if split is not None:
        candidates = [split]
    else:
        candidates = [d / spec.split for d in search] + [d / default for d in search]
    for c in candidates:
        if c.is_file():
            return _text_lines(c.read_bytes(), str(c)), str(c)
    if split is not None:
        raise InputError(f"--split {split}: no such file", f"expected {spec.layout}")
    for rel in (spec.split, default):
        if store.has(rel):
            return _text_lines(store.read(rel), store.where(rel)), store.where(rel)
    texts = [p for d in search for p in sorted(d.glob("*.txt"))] if isinstance(spec, DepthSpec) else []
    if len(texts) == 1:
        return _text_lines(texts[0].read_bytes(), str(texts[0])), str(texts[0])
    raise InputError(
        f"{spec.name}: no split list {default} in {', '.join(map(str, search))}",
        f"pass --split {spec.name}=FILE; expected {spec.layout}",
    )


def _text_lines(data: bytes, where: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not a text split list", "one sample per line, paths separated by spaces") from e
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _key(rgb: str) -> str:
    p = PurePosixPath(_norm(rgb))
    return p.with_suffix("").as_posix()


def _depth_samples(spec: DepthSpec, lines: list[str], where: str) -> tuple[list[Sample], int]:
    need = 3 if spec.decode == "npy" else 2
    samples, skipped = [], 0
    for i, ln in enumerate(lines, 1):
        cols = ln.split()
        if len(cols) < need:
            raise InputError(f"{where}, line {i}: {len(cols)} column(s) in {ln!r}", f"expected {spec.layout}")
        if cols[1] == "None":  # KITTI: frames without ground truth are listed but not evaluated
            skipped += 1
            continue
        samples.append(Sample(_key(cols[0]), cols[0], cols[1], cols[2] if spec.decode == "npy" else None))
    return samples, skipped


def _normal_samples(spec: NormalSpec, lines: list[str], where: str) -> list[Sample]:
    samples = []
    for i, ln in enumerate(lines, 1):
        rgb = ln.split()[0]
        stem = PurePosixPath(rgb).name
        if "_img" not in stem:
            raise InputError(f"{where}, line {i}: {rgb!r} is not named <id>_img.<ext>", f"expected {spec.layout}")
        base = rgb[: rgb.rfind("_img")]
        samples.append(Sample(_key(rgb), rgb, f"{base}_normal.{spec.gt}"))
    return samples


def _discover_images(store: Store) -> list[str]:
    return [
        f
        for f in store.files()
        if PurePosixPath(f).stem.endswith("_img") and PurePosixPath(f).suffix.lower() in (".png", ".jpg", ".jpeg")
    ]


# ---------------------------------------------------------------------------------------- decoding


def read_rgb(store: Store, rel: str) -> np.ndarray:
    """uint8 RGB [H, W, 3], as stored (no EXIF rotation: the ground truth is aligned to the stored pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(store.read(rel))) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{store.where(rel)}: not a readable RGB image ({e})", "re-extract the dataset") from e


def _imdecode(store: Store, rel: str) -> np.ndarray:
    import cv2

    data = store.read(rel)
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if a is None:
        raise InputError(f"{store.where(rel)}: not a readable PNG", "re-extract the dataset")
    return a


def read_depth(spec: DepthSpec, store: Store, rel: str, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth depth [H, W] float32 metres (0 or out of range = no measurement). ``size`` = RGB (h, w)."""
    if spec.decode in ("png1000", "png256"):
        a = _imdecode(store, rel)
        if a.ndim != 2 or a.dtype not in (np.uint16, np.uint8):
            raise InputError(
                f"{store.where(rel)}: {a.dtype} {a.shape}, not a single-channel 16-bit PNG", f"expected {spec.layout}"
            )
        d = a.astype(np.float32) / (1000.0 if spec.decode == "png1000" else 256.0)
    elif spec.decode == "float32":
        raw = np.frombuffer(store.read(rel), dtype="<f4")
        if raw.size != size[0] * size[1]:
            raise InputError(
                f"{store.where(rel)}: {raw.size} float32 values, not {size[0]} x {size[1]} (the RGB image's size)",
                "ETH3D depth is raw little-endian float32, row-major",
            )
        d = raw.reshape(size).copy()
        d[~np.isfinite(d)] = 0.0
    else:
        d = _read_npy(store, rel, spec).astype(np.float32)
    if d.shape != tuple(size):
        raise InputError(
            f"{store.where(rel)}: depth is {d.shape[1]}x{d.shape[0]}, the image {size[1]}x{size[0]}",
            f"expected {spec.layout}",
        )
    return d


def _read_npy(store: Store, rel: str, spec) -> np.ndarray:
    try:
        a = np.load(io.BytesIO(store.read(rel)), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{store.where(rel)}: not a readable .npy array ({e})", f"expected {spec.layout}") from e
    a = np.squeeze(a)
    if a.ndim != 2:
        raise InputError(f"{store.where(rel)}: shape {a.shape}, not [H, W]", f"expected {spec.layout}")
    return a


def load_depth(ds: Dataset, s: Sample) -> Item:
    spec: DepthSpec = ds.spec
    rgb = read_rgb(ds.store, s.rgb)
    gt = read_depth(spec, ds.store, s.gt, rgb.shape[:2])
    if spec.decode == "npy":  # DIODE: its own validity mask, beside the depth
        mask = _read_npy(ds.store, s.extra, spec)
        if mask.shape != gt.shape:
            raise InputError(f"{ds.store.where(s.extra)}: mask shape {mask.shape} != depth {gt.shape}")
        valid = (mask != 0) & np.isfinite(gt) & (gt > 0)
    else:
        valid = depth_valid_mask(gt, spec.depth_range)
    if spec.crop == "kitti":
        rgb, gt, valid = (kitti_benchmark_crop(a, ds.store.where(s.rgb)) for a in (rgb, gt, valid))
        valid = valid & kitti_eigen_mask(gt.shape)
    elif spec.crop == "nyu-eigen":
        if gt.shape != (480, 640):
            raise InputError(
                f"{ds.store.where(s.gt)}: {gt.shape[1]}x{gt.shape[0]}, not 640x480",
                "the NYUv2 Eigen crop is defined on 640x480 frames",
            )
        valid = valid & nyu_eigen_mask(gt.shape)
    return Item(s, rgb, gt, valid)


def nyu_eigen_mask(shape: tuple[int, int]) -> np.ndarray:
    r0, r1, c0, c1 = NYU_EIGEN
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def kitti_benchmark_crop(a: np.ndarray, where: str = "") -> np.ndarray:
    """The bottom-centre 1216 x 352 window that KITTI's benchmark evaluates ([H, W, ...])."""
    ch, cw = KITTI_BENCHMARK
    h, w = a.shape[:2]
    if h < ch or w < cw:
        raise InputError(
            f"{where}: {w}x{h} is smaller than KITTI's 1216x352 benchmark crop", "KITTI frames are about 1242x375"
        )
    top, left = h - ch, (w - cw) // 2
    return a[top : top + ch, left : left + cw]


def kitti_eigen_mask(shape: tuple[int, int]) -> np.ndarray:
    """Eigen's evaluation window as fractions of the (cropped) frame: rows 0.332..0.914, cols 0.036..0.964."""
    h, w = shape
    r0, r1, c0, c1 = KITTI_EIGEN
    m = np.zeros(shape, bool)
    m[int(r0 * h) : int(r1 * h), int(c0 * w) : int(c1 * w)] = True
    return m


# ------------------------------------------------------------------------------------------ normals


def read_normal(spec: NormalSpec, store: Store, rel: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(normals [H, W, 3] float32 in the Lotus/DSINE frame, valid [H, W] bool) from one GT file."""
    if not store.has(rel):
        raise InputError(f"{store.where(rel)}: ground truth missing", f"expected {spec.layout}")
    if spec.gt == "png":
        a = _imdecode(store, rel)
        if a.ndim != 3 or a.shape[2] < 3 or a.dtype != np.uint8:
            raise InputError(
                f"{store.where(rel)}: {a.dtype} {a.shape}, not an 8-bit RGB PNG", f"expected {spec.layout}"
            )
        rgb = a[:, :, 2::-1].astype(np.float32)  # OpenCV's BGR -> RGB
        valid = rgb.sum(-1) > 0
        n = rgb / 255.0 * 2.0 - 1.0
    elif spec.gt == "exr":
        n = read_exr(store, rel)
        valid = np.linalg.norm(n, axis=-1) > 0.5
    else:
        n, valid = read_oasis_pickle(store, rel, size)
    if n.shape[:2] != tuple(size):
        raise InputError(
            f"{store.where(rel)}: normals are {n.shape[1]}x{n.shape[0]}, the image {size[1]}x{size[0]}",
            f"expected {spec.layout}",
        )
    return n.astype(np.float32), valid


def read_exr(store: Store, rel: str) -> np.ndarray:
    try:
        import OpenEXR
    except ImportError as e:
        raise UsageError(
            "reading EXR ground truth (iBims-1, Sintel) needs the OpenEXR package", "pip install OpenEXR"
        ) from e
    try:
        with OpenEXR.File(io.BytesIO(store.read(rel))) as f:
            ch = f.channels()
            if "RGB" in ch:
                a = np.asarray(ch["RGB"].pixels)
            else:
                a = np.stack([np.asarray(ch[c].pixels) for c in "RGB"], axis=-1)
    except (KeyError, RuntimeError, OSError, ValueError) as e:
        raise InputError(f"{store.where(rel)}: not a readable RGB EXR ({e})", "re-extract the dataset") from e
    return a.astype(np.float32)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a dataset file must not run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "slice"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def read_oasis_pickle(store: Store, rel: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """OASIS: a dict with the ROI box (min_y, max_y, min_x, max_x, inclusive) and its normals [h, w, 3];
    x and y are negated into the Lotus frame (as DSINE's loader does); valid = ROI pixels not all zero."""
    try:
        d = _ArrayUnpickler(io.BytesIO(store.read(rel))).load()
        y0, y1, x0, x1 = (int(d[k]) for k in ("min_y", "max_y", "min_x", "max_x"))
        roi = np.asarray(d["normal"], np.float32)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise InputError(
            f"{store.where(rel)}: not an OASIS normal pickle ({e})",
            "expected a dict with min_y, max_y, min_x, max_x and normal",
        ) from e
    n = np.zeros((*size, 3), np.float32)
    valid = np.zeros(size, bool)
    try:
        n[y0 : y1 + 1, x0 : x1 + 1] = roi
    except ValueError as e:
        raise InputError(f"{store.where(rel)}: ROI {roi.shape} does not fit the box or the image ({e})") from e
    valid[y0 : y1 + 1, x0 : x1 + 1] = (roi != 0).any(-1)
    n[..., :2] *= -1
    return n, valid


def load_normal(ds: Dataset, s: Sample) -> Item:
    rgb = read_rgb(ds.store, s.rgb)
    n, valid = read_normal(ds.spec, ds.store, s.gt, rgb.shape[:2])
    return Item(s, rgb, n, valid)
