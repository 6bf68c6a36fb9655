"""Our map file formats in one place: how a map is stored, under which suffix, and how it is read back.

No torch here. A format is chosen by name (``get_format``, as whisper's writers are): it turns a map into
the array it stores and the sidecar's note on it (``pixels``), that array into file bytes (``dump`` /
``encode``), and a file back into the stored array (``read``) and then into the map's values
(``decode``, with the sidecar's note where the encoding needs one). Sinks write, and sources, the
evaluation and ``lotus pointcloud --depth`` read, through these objects, so a suffix or an encoding is
stated once.

Maps: depth or disparity [H, W] (kind "depth" / "disparity", affine-invariant in [0, 1] as Lotus predicts
them, paper Sec. 3), unit normals [H, W, 3] (kind "normal", in the camera frame the sidecar's ``axes``
name) and a per-pixel spread [H, W] (kind "uncertainty", paper Sec. 4.4).

| name  | suffix     | stores                                                              | back to values    |
|-------|------------|---------------------------------------------------------------------|-------------------|
| png   | .png       | uint8 RGB: depth colour map (near warm), spread heat map, (n+1)/2    | normals only      |
| png16 | .16bit.png | uint16: (v - min) / (max - min) * 65535 (grey); normals (n+1)/2      | sidecar's min/max |
| npy   | .npy       | float32 as predicted                                                | as stored         |
| exr   | .exr       | OpenEXR float32 (half: ``exr_half``), ZIP by default: depth in ``Z``, | as stored         |
|       |            | normals in ``R,G,B`` = x, y, z, a spread in ``Y``; meaning in header |                   |

Depth EXRs also carry ``Y``, a copy of ``Z``: OpenCV 4 reads a file whose only channel is ``Z`` as zeros
(opencv/opencv#22592) and many viewers show only colour or luminance; with ZIP the copy adds about 2% to
the file. DWA (dwaa, dwab) compresses the channels it takes for colour or luminance (``Y``, ``R``, ``G``,
``B``) lossily and the others, ``Z`` among them, losslessly: the ``Y`` copy is then not exact (about 1e-2
off on a [0, 1] map), which the header (``lotus:Y``) and the sidecar say. The spread goes in ``Y`` alone:
compositors treat ``Z`` as depth (defocus, fog, merges) and a spread is no depth (for normals it is in
degrees), while ``Y`` is the plain one-channel (luminance) image every EXR reader shows as grey.

--exr-compression names, like format names, are read in any case (ZIP = zip).
"""

from __future__ import annotations

import importlib.util
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .. import __version__
from ..errors import UsageError
from . import visualize

DEPTH_KINDS = ("disparity", "depth")
_EXR_HINT = "pip install OpenEXR (a dependency of lotus-cli, also in its 'eval' extra: pip install 'lotus-cli[eval]')"
# --exr-compression name -> the OpenEXR bindings' constant (they spell "none" NO_COMPRESSION)
EXR_CONSTANTS = {
    "zip": "ZIP_COMPRESSION",
    "zips": "ZIPS_COMPRESSION",
    "piz": "PIZ_COMPRESSION",
    "rle": "RLE_COMPRESSION",
    "none": "NO_COMPRESSION",
    "pxr24": "PXR24_COMPRESSION",
    "b44": "B44_COMPRESSION",
    "b44a": "B44A_COMPRESSION",
    "dwaa": "DWAA_COMPRESSION",
    "dwab": "DWAB_COMPRESSION",
}
EXR_COMPRESSIONS = tuple(EXR_CONSTANTS)
LOSSLESS_EXR = ("zip", "zips", "piz", "rle", "none")
# lossy for channels named Y, R, G, B only; Z and other names are stored losslessly
LOSSY_COLOUR_EXR = ("dwaa", "dwab")


@dataclass(frozen=True)
class Style:
    """How maps are stored: colour map and an optional fixed value range (pictures), and EXR's pixel type
    and compression. ``vrange`` None = each map's own range (a spread: 0 to its maximum)."""

    cmap: str = "Spectral"
    vrange: tuple[float, float] | None = None
    exr_half: bool = False  # 16-bit half floats (about 3 significant digits) instead of float32
    exr_compression: str = "zip"  # one of EXR_COMPRESSIONS; lossy: pxr24 (float32 to 24 bits), b44*, dwa*

    def __post_init__(self):
        if isinstance(self.exr_compression, str):  # any case, as format names (ZIP = zip)
            object.__setattr__(self, "exr_compression", self.exr_compression.strip().lower())
        if self.exr_compression not in EXR_COMPRESSIONS:
            raise UsageError(
                f"--exr-compression {self.exr_compression!r} is not an EXR compression",
                f"use one of {', '.join(EXR_COMPRESSIONS)} (zip, the default, is lossless)",
            )


def meaning(kind: str, statistic: str | None = None) -> str:
    """One line on what a map's values mean, for sidecars and EXR headers. ``statistic``: an uncertainty
    map's (e.g. "standard deviation of the [0, 1] maps"), stated in the line when given; without it the line
    points to the sidecar's 'uncertainty' section, which holds it."""
    if kind == "uncertainty":
        spread = "per-pixel spread of several predictions"
        return f"{spread}: {statistic}" if statistic else f"{spread} (statistic and unit: the sidecar's 'uncertainty')"
    return {
        "disparity": "affine-invariant disparity (inverse depth up to scale and shift): 1 = near, 0 = far",
        "depth": "affine-invariant depth (up to scale and shift): 0 = near, 1 = far",
        "normal": "unit surface normals in the camera frame that 'axes' states",
        "pointcloud": "3-D points in metres in the camera frame that 'cloud.frame' states",
    }.get(kind, kind)


def a_map_of(kind: str) -> str:
    """'a depth map', 'an uncertainty map': a kind in messages."""
    return f"{'an' if kind[:1].lower() in tuple('aeiou') else 'a'} {kind} map"


def y_copy_note(compression: str) -> str:
    """What a depth EXR's ``Y`` channel is under ``compression`` (module doc: DWA keeps only ``Z`` exact)."""
    if compression in LOSSY_COLOUR_EXR:
        return (
            f"a copy of Z for readers that load only colour or luminance (OpenCV), compressed lossily by "
            f"{compression} while Z is exact: read Z for the values"
        )
    return "a copy of Z, for readers that load only colour or luminance (OpenCV)"


def _spread_range(value: np.ndarray, style: Style) -> tuple[float, float]:
    return style.vrange if style.vrange is not None else (0.0, visualize.value_range(value)[1])


class Format:
    """One file format of maps. Subclasses set ``name``, ``suffix`` and ``per_frame`` (written per frame of a
    video; the colour picture goes into the clip's mp4 instead) and implement the four steps."""

    name = ""
    suffix = ""
    per_frame = True

    def pixels(self, value: np.ndarray, kind: str, style: Style) -> tuple[np.ndarray, dict]:
        """The array this format stores for ``value`` and the sidecar's note on it (how to decode it)."""
        raise NotImplementedError

    def dump(self, stored: np.ndarray, f: BinaryIO, kind: str, style: Style, about: dict) -> None:
        """Write ``stored`` as this format's file to the binary stream ``f``. ``about``: facts about the map
        for self-describing formats (EXR headers), e.g. model, normal_frame, axes, unit."""
        raise NotImplementedError

    def read(self, path: Path) -> tuple[np.ndarray, dict]:
        """The array as stored (channels in RGB order) and the file's own notes (EXR header; else {}).
        Raises OSError or ValueError when the file cannot be read."""
        raise NotImplementedError

    def decode(self, stored: np.ndarray, kind: str | None, info: dict | None = None) -> np.ndarray:
        """Stored array -> float32 values. ``info``: the sidecar's note on this file (``outputs[name]``);
        without it integers are read as [0, 1] (normals as (n + 1) / 2), which keeps affine maps affine."""
        return stored.astype(np.float32)

    def settings(self, kind: str, style: Style) -> dict:
        """The part of ``style`` this format's file depends on, as its sidecar note records it (compared
        when a rerun keeps existing outputs)."""
        return {}

    def encode(
        self, value: np.ndarray, kind: str, style: Style = Style(), about: dict | None = None
    ) -> tuple[bytes, dict]:
        """``value`` -> (file bytes, the sidecar's note)."""
        stored, info = self.pixels(value, kind, style)
        buf = io.BytesIO()
        self.dump(stored, buf, kind, style, about or {})
        return buf.getvalue(), info


class Png(Format):
    name, suffix, per_frame = "png", ".png", False

    def pixels(self, value, kind, style):
        if kind == "normal":
            return visualize.normal_to_rgb(value), {"encoding": "rgb = (n + 1) / 2 * 255 (truncated)"}
        if kind == "uncertainty":
            lo, hi = _spread_range(value, style)
            info = {"colormap": style.cmap, "range": [lo, hi], "high": "bright = uncertain"}
            return visualize.colorize(visualize.normalize(value, lo, hi), style.cmap), info
        lo, hi = style.vrange if style.vrange is not None else visualize.value_range(value)
        info = {"colormap": style.cmap, "range": [lo, hi], "near": "warm (low end of the colour map)"}
        return visualize.colorize_depth(value, kind, style.cmap, (lo, hi)), info

    def dump(self, stored, f, kind, style, about):
        import cv2

        arr = stored[:, :, ::-1] if stored.ndim == 3 else stored  # OpenCV wants BGR
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))  # OpenCV: it writes 16-bit colour PNGs
        if not ok:
            raise ValueError("PNG encoding failed")
        f.write(buf.tobytes())

    def read(self, path):
        import cv2

        data = np.fromfile(path, np.uint8)  # not cv2.imread: it fails silently on some non-ASCII paths
        a = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if a is None:
            raise ValueError("not a readable PNG")
        if a.ndim == 3:
            a = a[:, :, 2::-1]  # BGR(A) -> RGB
        return a, {}

    def decode(self, stored, kind, info=None):
        a = stored.astype(np.float32)
        if stored.dtype.kind in "ui":
            a /= float(np.iinfo(stored.dtype).max)
        if kind == "normal":
            return a * 2 - 1
        if a.ndim == 3 and kind is not None:
            a = a.mean(-1)  # a grey map saved as RGB
        return a

    def settings(self, kind, style):
        return {} if kind == "normal" else {"colormap": style.cmap}


class Png16(Png):
    name, suffix, per_frame = "png16", ".16bit.png", True

    def pixels(self, value, kind, style):
        if kind == "normal":
            return visualize.normal_to_uint16(value), {"encoding": "n = png / 65535 * 2 - 1"}
        lo, hi = (
            _spread_range(value, style)
            if kind == "uncertainty"
            else (style.vrange if style.vrange is not None else visualize.value_range(value))
        )
        info = {"min": lo, "max": hi, "decode": "value = min + png / 65535 * (max - min)"}
        return visualize.encode16(value, lo, hi), info

    def decode(self, stored, kind, info=None):
        if kind != "normal" and info and "min" in info and stored.dtype == np.uint16:
            return (info["min"] + stored.astype(np.float64) / 65535 * (info["max"] - info["min"])).astype(np.float32)
        return super().decode(stored, kind, info)

    def settings(self, kind, style):
        return {}


class Npy(Format):
    name, suffix, per_frame = "npy", ".npy", True

    def pixels(self, value, kind, style):
        stored = value.astype(np.float32, copy=False)
        return stored, {"dtype": "float32", "shape": list(value.shape)}

    def dump(self, stored, f, kind, style, about):
        np.save(f, stored, allow_pickle=False)

    def read(self, path):
        return np.load(path, allow_pickle=False), {}


class Exr(Format):
    name, suffix, per_frame = "exr", ".exr", True

    def pixels(self, value, kind, style):
        dtype = np.float16 if style.exr_half else np.float32
        stored = value.astype(dtype, copy=False)
        info = {
            "dtype": np.dtype(dtype).name,
            "channels": _exr_channels(kind),
            "compression": style.exr_compression,
            "shape": list(value.shape),
        }
        if kind in DEPTH_KINDS:
            info["Y"] = y_copy_note(style.exr_compression)
        return stored, info

    def dump(self, stored, f, kind, style, about):
        OpenEXR = _openexr()
        if kind == "normal":  # separate contiguous planes: the bindings ignore a strided view's strides
            channels = {c: np.ascontiguousarray(stored[..., i]) for i, c in enumerate("RGB")}
        else:
            channels = dict.fromkeys(_exr_channels(kind), np.ascontiguousarray(stored))
        header = {
            "compression": _exr_constant(OpenEXR, style.exr_compression),
            "type": OpenEXR.scanlineimage,
            "comments": meaning(kind, about.get("statistic")),
            **exr_attributes(kind, about),
        }
        if kind in DEPTH_KINDS:
            header["lotus:Y"] = y_copy_note(style.exr_compression)
        with OpenEXR.File(header, channels) as exr:
            try:
                exr.write(f)  # streams: OpenEXR >= 3.5
            except TypeError:
                _write_via_file(exr, f)

    def read(self, path):
        OpenEXR = _openexr()
        try:
            with OpenEXR.File(str(path), separate_channels=True) as exr:
                channels = {name: c.pixels for name, c in exr.channels().items()}
                header = dict(exr.header())  # the bindings empty the live dict on close
        except RuntimeError as e:  # the bindings raise RuntimeError for unreadable files
            raise ValueError(str(e).strip() or "not a readable EXR") from e
        notes = {k[len("lotus:") :]: v for k, v in header.items() if k.startswith("lotus:")}
        if "Z" in channels:
            return channels["Z"], notes
        if all(c in channels for c in "RGB"):
            return np.stack([channels[c] for c in "RGB"], axis=-1), notes
        if len(channels) == 1:
            return next(iter(channels.values())), notes
        raise ValueError(
            f"channels {', '.join(sorted(channels))}: not a depth (Z), normal (R, G, B) or one-channel map"
        )

    def settings(self, kind, style):
        return {"dtype": "float16" if style.exr_half else "float32", "compression": style.exr_compression}


def _exr_channels(kind: str) -> list[str]:
    return ["R", "G", "B"] if kind == "normal" else ["Z", "Y"] if kind in DEPTH_KINDS else ["Y"]


def _exr_constant(OpenEXR, compression: str):
    """The bindings' constant for an --exr-compression name; a UsageError if this OpenEXR lacks it."""
    value = getattr(OpenEXR, EXR_CONSTANTS[compression], None)
    if value is None:
        raise UsageError(
            f"--exr-compression {compression}: this OpenEXR package has no {EXR_CONSTANTS[compression]}",
            "pip install -U OpenEXR, or use zip (lossless)",
        )
    return value


def exr_attributes(kind: str, about: dict) -> dict:
    """EXR header attributes (``lotus:<name>``, strings) that say what the values are: kind, for depth
    whether affine-invariant or metric and the unit, for normals the frame and axes, and ``about``'s facts
    (for an uncertainty map its ``statistic`` and ``unit``)."""
    attrs = {"kind": kind, "software": f"lotus-cli {__version__}"}
    if kind in DEPTH_KINDS:
        unit = about.get("unit")
        attrs["scale"] = "metric" if unit else "affine-invariant"
        affine = "none (up to an unknown scale and shift)"
        attrs["unit"] = (unit if kind == "depth" else f"1/{unit}") if unit else affine
        attrs["values"] = "disparity: larger = nearer" if kind == "disparity" else "depth: larger = farther"
    elif kind == "normal":
        attrs["channels"] = "R, G, B = x, y, z of the unit normal"
    for k, v in about.items():
        if v is not None and not (k == "unit" and kind in DEPTH_KINDS):  # a depth map's unit is worded above
            attrs[k] = str(v)
    return {f"lotus:{k}": v for k, v in attrs.items()}


def _openexr():
    try:
        import OpenEXR
    except ImportError as e:  # a default dependency: missing only in installs that left it out
        raise UsageError(f"EXR maps need the OpenEXR package ({e})", _EXR_HINT) from e
    return OpenEXR


def _write_via_file(exr, f: BinaryIO) -> None:
    """OpenEXR before 3.5 writes only to paths: through a temporary file."""
    fd, tmp = tempfile.mkstemp(suffix=".exr")
    os.close(fd)
    try:
        exr.write(tmp)
        with open(tmp, "rb") as src:
            while chunk := src.read(1 << 20):
                f.write(chunk)
    finally:
        os.unlink(tmp)


FORMATS: dict[str, Format] = {f.name: f for f in (Png(), Png16(), Npy(), Exr())}
DEFAULT_FORMATS = ("png", "png16")
READ_ORDER = ("npy", "exr", "png16", "png")  # the first existing of a key's maps is read: raw values first


def get_format(name: str) -> Format:
    """The format named ``name`` (png, png16, npy, exr)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown format {name!r}", f"use one of {', '.join(FORMATS)}") from None


def parse_formats(spec: str) -> tuple[str, ...]:
    """'png,npy' -> ('png', 'npy'); 'all' = every format. Sidecars are always written."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        names = list(FORMATS)
    bad = [n for n in names if n not in FORMATS and n != "json"]
    if bad or not names:
        raise UsageError(
            f"unknown --format {', '.join(bad) or spec!r}", f"use a comma list of {', '.join(FORMATS)} (or all)"
        )
    if "exr" in names and importlib.util.find_spec("OpenEXR") is None:  # said once, before any model loads
        raise UsageError("--format exr needs the OpenEXR package", _EXR_HINT)
    return tuple(dict.fromkeys(n for n in names if n != "json"))


def format_of(path: Path) -> Format | None:
    """The format a file's name says (any case; x.16bit.png is png16, not png), or None."""
    name = path.name.lower()
    for fmt in sorted(FORMATS.values(), key=lambda f: -len(f.suffix)):
        if name.endswith(fmt.suffix):
            return fmt
    return None


def stem(path: Path) -> str:
    """The output key's last part: d/x.16bit.png -> x, d/x.npy -> x; other files lose their last suffix."""
    fmt = format_of(path)
    return path.name[: -len(fmt.suffix)] if fmt is not None else path.stem


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar written beside a map: d/x.npy, d/x.exr, d/x.16bit.png, d/x.png -> d/x.json."""
    return path.with_name(stem(path) + ".json")


def map_paths(base: Path, formats: tuple[str, ...]) -> dict[str, Path]:
    """{format: base + suffix}, e.g. o/a/x -> {"npy": o/a/x.npy}."""
    return {f: base.with_name(base.name + get_format(f).suffix) for f in formats}


def read_stored(path: Path) -> tuple[np.ndarray, dict, Format | None]:
    """A map file as stored (RGB order), the file's own notes, and its format (None: any other image that
    Pillow reads, e.g. a float TIFF). Raises OSError or ValueError when unreadable."""
    fmt = format_of(path)
    if fmt is not None:
        stored, notes = fmt.read(path)
        return stored, notes, fmt
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img), {}, None


def read_map(path: Path, kind: str | None = None, info: dict | None = None) -> np.ndarray:
    """A map file -> float32 values: depth [H, W] (an RGB picture averaged) or, for ``kind`` "normal",
    normals [H, W, 3]. ``info``: the sidecar's note on the file, where the encoding needs one (png16 ranges).
    Raises OSError or ValueError when unreadable."""
    stored, _, fmt = read_stored(path)
    return (fmt or FORMATS["png"]).decode(stored, kind, info)
