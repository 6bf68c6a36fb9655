"""Outputs: writers chosen by format name, atomic writes, JSON sidecars. No torch here.

Every file is written to a hidden temporary name in the destination folder and renamed into place,
so an interrupted run never leaves a half-written output. For an item keyed ``a/x`` under ``--out o``:

| format | file            | content                                                                    |
|--------|-----------------|----------------------------------------------------------------------------|
| png    | o/a/x.png       | colour-mapped depth (near warm) or RGB-encoded normals, 8-bit              |
| png16  | o/a/x.16bit.png | 16-bit: depth stretched over 0..65535 (mapping in the sidecar); normals RGB |
| npy    | o/a/x.npy       | raw float32 as the model produces it: depth [H, W], normals [H, W, 3]      |
| (json) | o/a/x.json      | sidecar, always written, last: model, kind, ranges, mappings, sizes, timing |

Point clouds (`lotus pointcloud`) are binary PLY files written by Open3D (``write_ply``).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import visualize
from .errors import OutputError, UsageError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process's umask, for files created through mkstemp
SUFFIXES = {"png": ".png", "png16": ".16bit.png", "npy": ".npy", "json": ".json"}
DEFAULT_FORMATS = ("png", "png16")


def parse_formats(spec: str) -> tuple[str, ...]:
    """'png,npy' -> ('png', 'npy'); 'all' = every format. Sidecars are always written."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return tuple(f for f in SUFFIXES if f != "json")
    bad = [n for n in names if n not in SUFFIXES]
    if bad or not names:
        raise UsageError(f"unknown --format {', '.join(bad) or spec!r}", "use a comma list of png, png16, npy (or all)")
    return tuple(dict.fromkeys(n for n in names if n != "json"))


def output_paths(out_dir: Path, key: str, formats: tuple[str, ...]) -> dict[str, Path]:
    """{format: path} for an item's outputs, sidecar included under "json"."""
    base = out_dir / key
    return {f: base.with_name(base.name + SUFFIXES[f]) for f in (*formats, "json")}


def outputs_exist(paths: dict[str, Path]) -> bool:
    return all(p.is_file() for p in paths.values())


@contextmanager
def atomic_open(path: Path):
    """Binary file handle on a temporary sibling of ``path``, renamed onto ``path`` on success."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot write here ({e.strerror})", "choose a writable --out folder") from e
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def encode_ply(points: np.ndarray, colors: np.ndarray, normals: np.ndarray | None = None,
               comments: list[str] = ()) -> bytes:
    """Binary little-endian PLY bytes, written by Open3D (float32 x y z [nx ny nz], uchar red green blue),
    with ``comments`` added to the header as ``comment`` lines (Open3D's writer has no option for them).
    points/normals [N, 3] float32, colors [N, 3] uint8."""
    try:
        import open3d as o3d
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UsageError(f"point clouds need Open3D ({e})",
                         "pip install 'lotus-cli[pointcloud]' (Linux also needs libusb-1.0: apt-get install libusb-1.0-0)")
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
    head, sep, body = data.partition(b"end_header\n")
    lines = head.split(b"\n")
    extra = [("comment " + " ".join(c.split())).encode("ascii", "replace") for c in comments]
    return b"\n".join(lines[:2] + extra + lines[2:]) + sep + body  # after "ply" and "format ..."


def write_ply(path: Path, points: np.ndarray, colors: np.ndarray, normals: np.ndarray | None = None,
              comments: list[str] = ()) -> None:
    """``encode_ply`` written atomically to ``path``."""
    write_bytes(path, encode_ply(points, colors, normals, comments))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 or uint16 [H, W] or RGB [H, W, 3] -> PNG bytes (OpenCV: the one encoder here that writes
    16-bit colour PNGs)."""
    import cv2

    arr = image[:, :, ::-1] if image.ndim == 3 else image  # OpenCV wants BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise OutputError("PNG encoding failed", "check free disk space and memory")
    return buf.tobytes()


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.save(f, array, allow_pickle=False)


def write_json(path: Path, record: dict) -> None:
    write_bytes(path, (json.dumps(record, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass(frozen=True)
class Style:
    """How maps become pictures: colour map name and, for depth, an optional fixed value range."""

    cmap: str = "Spectral"
    vrange: tuple[float, float] | None = None


def render(fmt: str, value: np.ndarray, kind: str, style: Style = Style()) -> tuple[Callable[[Path], None], dict]:
    """A writer for one format of one map, and what the sidecar should say about it."""
    if kind == "uncertainty":
        hi = style.vrange[1] if style.vrange is not None else visualize.value_range(value)[1]
        if fmt == "png":
            info = {"colormap": style.cmap, "range": [0.0, hi], "high": "bright = uncertain"}
            return _png_writer(visualize.colorize(visualize.normalize(value, 0.0, hi), style.cmap)), info
        if fmt == "png16":
            info = {"min": 0.0, "max": hi, "decode": "value = min + png / 65535 * (max - min)"}
            return _png_writer(visualize.encode16(value, 0.0, hi)), info
    elif kind == "normal":
        if fmt == "png":
            return _png_writer(visualize.normal_to_rgb(value)), {"encoding": "rgb = (n + 1) / 2 * 255 (truncated)"}
        if fmt == "png16":
            return _png_writer(visualize.normal_to_uint16(value)), {"encoding": "n = png / 65535 * 2 - 1"}
    else:
        lo, hi = style.vrange if style.vrange is not None else visualize.value_range(value)
        if fmt == "png":
            info = {"colormap": style.cmap, "range": [lo, hi],
                    "near": "warm (low end of the colour map)"}
            return _png_writer(visualize.colorize_depth(value, kind, style.cmap, (lo, hi))), info
        if fmt == "png16":
            info = {"min": lo, "max": hi, "decode": "value = min + png / 65535 * (max - min)"}
            return _png_writer(visualize.encode16(value, lo, hi)), info
    if fmt == "npy":
        return (lambda p: write_npy(p, value.astype(np.float32, copy=False))), {"dtype": "float32",
                                                                                 "shape": list(value.shape)}
    raise UsageError(f"unknown format {fmt!r}")


def _png_writer(image: np.ndarray) -> Callable[[Path], None]:
    return lambda p: write_bytes(p, encode_png(image))


def layer_paths(paths: dict[str, Path], name: str) -> dict[str, Path]:
    """Paths of a further map written beside an item's own: x.png -> x.<name>.png (no sidecar)."""
    return {fmt: p.with_name(p.name[: -len(SUFFIXES[fmt])] + f".{name}" + SUFFIXES[fmt])
            for fmt, p in paths.items() if fmt != "json"}


def _write_formats(paths: dict[str, Path], value: np.ndarray, kind: str, style: Style) -> dict:
    formats = {}
    for fmt, path in paths.items():
        if fmt == "json":
            continue
        writer, info = render(fmt, value, kind, style)
        writer(path)
        formats[fmt] = {"file": path.name, **info}
    return formats


def write_outputs(paths: dict[str, Path], value: np.ndarray, kind: str, sidecar: dict, style: Style = Style(),
                  layers: dict | None = None) -> dict:
    """Write every requested format, then the sidecar (last, so its presence marks a finished item).

    ``layers``: further maps of the same item, {name: (array, kind)}, written as x.<name>.<format>
    with the default style of their kind. Returns the sidecar record as written.
    """
    formats = _write_formats(paths, value, kind, style)
    layer_records = {}
    for name, (array, layer_kind) in (layers or {}).items():
        layer_records[name] = {"kind": layer_kind, "meaning": meaning(layer_kind),
                               "outputs": _write_formats(layer_paths(paths, name), array, layer_kind, Style())}
    finite = value[np.isfinite(value)]
    record = {
        **sidecar,
        "kind": kind,
        "value_range": [float(finite.min()), float(finite.max())] if finite.size else None,
        "meaning": meaning(kind),
        "outputs": formats,
    }
    if layer_records:
        record["layers"] = layer_records
    write_json(paths["json"], record)
    return record


def meaning(kind: str) -> str:
    return {
        "disparity": "affine-invariant disparity (inverse depth up to scale and shift): 1 = near, 0 = far",
        "depth": "affine-invariant depth (up to scale and shift): 0 = near, 1 = far",
        "normal": "unit surface normals in the camera frame that 'axes' states",
        "uncertainty": "per-pixel spread of several predictions (the statistic is in 'uncertainty')",
    }.get(kind, kind)


def check_out_dir(out_dir: Path) -> None:
    """Fail fast, before any model loads, when ``out_dir`` cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lotus-write-test.", dir=out_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"--out {out_dir}: not writable ({e.strerror})", "choose a folder you can write to") from e
