"""Inputs: files, folders, globs and stdin lists -> items with stable output keys; reading images.

No torch here (``lotus --help`` stays fast). An ``Item`` carries the input path and ``key``, the
relative path (without extension) its outputs are named by under ``--out``:

* a file given by name: its name (``x.jpg`` -> ``x``);
* a folder: the path inside the folder (``photos/a/x.jpg`` -> ``a/x``), so outputs mirror the tree;
* a glob: the path below the glob's fixed prefix (``shots/*/x.png`` -> ``<dir>/x``);
* ``-``: paths read from stdin, one per line (stripped; empty and ``#`` lines skipped), each treated as a
  file given by name.

Folder walks follow symlinks but enter each real folder once, under its shortest path; the output
folder is never walked, even inside an input folder.

Keys never chop characters. Two inputs that would share a key (``a/x.jpg`` and ``b/x.jpg`` given as
files, or ``x.jpg`` beside ``x.png``) get keys that keep their parent folders, then their extensions.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO

import numpy as np

from ..errors import InputError, UsageError
from . import formats

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
MEDIA_EXTS = IMAGE_EXTS + VIDEO_EXTS
DEFAULT_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Item:
    path: Path
    key: str  # posix relative path without extension, e.g. "a/x"

    @property
    def name(self) -> str:
        return str(self.path)


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTS


def is_hidden(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") and p not in (".", "..") for p in parts)


def _walk(folder: Path, accept, exclude: frozenset[str] = frozenset(), on_warning=None) -> list[Path]:
    """The files under ``folder`` that ``accept`` takes, hidden names skipped, symlinks followed.

    Breadth-first, so that each real folder (by resolved path) is entered once, under its shortest path
    (the first met at the smallest depth, in name order). A link back to a folder that contains it (a
    loop) is named in one ``on_warning`` line and not followed; other links to a folder already entered
    are skipped quietly. ``exclude``: resolved paths of folders never entered (the output tree)."""
    found: list[Path] = []
    seen: set[str] = set()
    level: list[tuple[Path, tuple[str, ...]]] = [(folder, ())]  # (folder, resolved paths of its ancestors)
    while level:
        deeper = []
        for d, ancestors in level:
            real = os.path.realpath(d)
            if real in exclude:
                continue
            if real in seen:
                if real in ancestors and on_warning is not None:
                    on_warning(f"{d}: symlink loop back to {real}; not followed")
                continue
            seen.add(real)
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue  # an unreadable folder holds nothing we can read
            for e in entries:
                if e.name.startswith("."):
                    continue
                p = d / e.name
                try:
                    if e.is_dir():
                        deeper.append((p, (*ancestors, real)))
                    elif e.is_file() and accept(p):
                        found.append(p)
                except OSError:  # a dangling or unreadable link
                    continue
        level = deeper
    return sorted(found)


def _inside(path: Path, exclude: frozenset[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == x or real.startswith(x.rstrip(os.sep) + os.sep) for x in exclude)


def _glob_base(pattern: str) -> Path:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def expand(
    inputs: Iterable[str],
    stdin: TextIO | None = None,
    exts: tuple[str, ...] = IMAGE_EXTS,
    *,
    exclude: Iterable[str | os.PathLike] = (),
    on_warning=None,
) -> tuple[list[Item], list[InputError]]:
    """Expand command-line inputs into items (in order, without duplicates) and problems.

    ``exts``: the accepted file extensions (any case), e.g. IMAGE_EXTS or MEDIA_EXTS. ``exclude``: folders
    whose contents are never inputs (the output folder, which may sit inside an input folder). Paths read
    from stdin (``-``) are stripped of surrounding whitespace; empty lines and lines starting with ``#``
    are skipped. ``on_warning(text)`` hears of symlink loops in folder walks.
    A problem (missing path, glob matching nothing, unsupported file) is reported, never fatal.
    """

    def accept(p: Path) -> bool:
        return p.suffix.lower() in exts

    excluded = frozenset(os.path.realpath(p) for p in exclude)
    supported = f"supported: {', '.join(exts)} (any case)"
    raw: list[tuple[Path, str, bool]] = []  # (path, relative name, given-by-name)
    problems: list[InputError] = []
    for arg in inputs:
        if arg == "-":
            stream = stdin if stdin is not None else sys.stdin
            for line in stream:
                line = line.strip()
                if line and not line.startswith("#"):
                    raw.extend(_one_file(Path(line), problems, accept, supported, excluded))
            continue
        path = Path(arg).expanduser()
        if path.is_dir():
            files = _walk(path, accept, excluded, on_warning)
            if not files:
                problems.append(InputError(f"{arg}: folder holds no supported files", supported, subject=arg))
            raw.extend((p, p.relative_to(path).as_posix(), False) for p in files)
        elif glob.has_magic(arg) and not path.exists():
            base = _glob_base(arg)
            hits = sorted(Path(p) for p in glob.glob(arg, recursive=True) if not _inside(Path(p), excluded))
            files = [p for p in hits if p.is_file() and accept(p) and not is_hidden(p.relative_to(base).parts)]
            for d in (p for p in hits if p.is_dir()):
                files.extend(_walk(d, accept, excluded, on_warning))
            if not files:
                problems.append(
                    InputError(
                        f"{arg}: pattern matches no supported files", "check the pattern and quoting", subject=arg
                    )
                )
            raw.extend((p, p.relative_to(base).as_posix() if p.is_relative_to(base) else p.name, False) for p in files)
        else:
            raw.extend(_one_file(path, problems, accept, supported, excluded))
    return assign_keys(raw), problems


def _one_file(
    path: Path, problems: list, accept, supported: str, excluded: frozenset[str] = frozenset()
) -> list[tuple[Path, str, bool]]:
    if not path.exists():
        problems.append(InputError(f"{path}: no such file or folder", "check the path", subject=str(path)))
        return []
    if not path.is_file():
        problems.append(InputError(f"{path}: not a regular file", "pass files, folders or globs", subject=str(path)))
        return []
    if not accept(path):
        problems.append(
            InputError(f"{path}: unsupported file type {path.suffix or '(none)'}", supported, subject=str(path))
        )
        return []
    if _inside(path, excluded):
        problems.append(
            InputError(
                f"{path}: inside the output folder; outputs are never read as inputs",
                "give the original file, or another --out",
                subject=str(path),
            )
        )
        return []
    return [(path, path.name, True)]


def assign_keys(raw: list[tuple[Path, str, bool]]) -> list[Item]:
    seen: set[Path] = set()
    entries = []
    for path, rel, by_name in raw:
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        entries.append([path, rel, by_name])

    def stem(rel: str) -> str:
        p = PurePosixPath(rel)
        return str(p.with_suffix("")) if p.suffix else rel

    # Files named on their own that collide by name take their parent folders, one level at a time.
    for level in range(1, 64):
        keys = _counts(stem(e[1]) for e in entries)
        clashing = [e for e in entries if keys[stem(e[1])] > 1 and e[2]]
        if not clashing:
            break
        grew = False
        for e in clashing:
            parts = e[0].resolve().parts
            if len(parts) > level:
                e[1] = PurePosixPath(*parts[-(level + 1) :]).as_posix().lstrip("/")
                grew = True
        if not grew:
            break
    keys = _counts(stem(e[1]) for e in entries)
    # Same folder, same stem, different extension: keep the extension in the key.
    return [Item(e[0], e[1] if keys[stem(e[1])] > 1 else stem(e[1])) for e in entries]


def _counts(keys: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return out


# ------------------------------------------------------------------------------------------- images


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as uint8 RGB [H, W, 3]: EXIF orientation applied, alpha dropped, grey expanded.

    16-bit and float greyscale are scaled to 8 bits rather than clipped. Raises InputError naming the
    file and the fix for empty, unreadable, truncated and oversized files.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # our own limit below names the option that lifts it
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})", "check the path and permissions") from e
    if size == 0:
        raise InputError(f"{path}: empty file (0 bytes)", "re-export or remove it")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise InputError(
                    f"{path}: {w}x{h} is {w * h / 1e6:.1f} MP, above the {max_pixels / 1e6:.0f} MP limit",
                    "raise --max-pixels (0 = no limit) or downscale the image",
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb8(img)
    except InputError:
        raise
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not a readable image", "check that the file is a jpg/png/webp/bmp/tiff image") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: truncated or corrupt image ({e})", "re-export or remove it") from e


def _to_rgb8(img) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        else:
            a = a / 257.0 if a.max() > 255 else a
        g = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def exif_focal_35mm(path: Path) -> float | None:
    """EXIF FocalLengthIn35mmFilm (tag 41989) in mm, or None when the file has none (or is no image)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            f = img.getexif().get_ifd(0x8769).get(41989)
    except (OSError, SyntaxError, ValueError):
        return None
    return float(f) if f else None


DEPTH_UNITS = {"m": 1.0, "mm": 1000.0}


def parse_units(spec: str | None, option: str = "--depth-units") -> float | None:
    """'m' -> 1, 'mm' -> 1000, a number -> stored values per metre (e.g. 5000 for TUM), 'relative' -> None
    (affine-invariant, no unit); an error names ``option``."""
    if spec is None or spec == "relative":
        return None
    if spec in DEPTH_UNITS:
        return DEPTH_UNITS[spec]
    try:
        v = float(spec)
    except ValueError:
        v = 0.0
    if not v > 0:
        raise UsageError(f"{option} {spec!r} is not a unit", "use m, mm, relative, or values per metre (5000)")
    return v


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar `lotus depth` writes beside a map: d/x.npy, d/x.exr, d/x.16bit.png, d/x.png -> d/x.json."""
    return formats.sidecar_of(path)


def read_depth_map(
    path: Path, kind: str | None = None, units: str | None = None, option: str = "--depth"
) -> tuple[np.ndarray, dict]:
    """A depth or disparity map from .npy (float or integer [H, W]), .exr (the ``Z`` or only channel) or a
    16-bit PNG -> (float32 [H, W], info), read through the format registry (``formats``).

    With the sidecar `lotus depth` wrote beside it (x.json), or the ``lotus:kind`` attribute of an EXR it
    wrote, the kind (disparity / depth) comes from there and the 16-bit PNG is decoded by its stated range;
    the values are then affine-invariant (units "relative") unless the EXR says metric and its unit. A
    map of another kind (normals, uncertainty) is refused. Otherwise the map is taken as ``kind`` (default
    depth) in ``units`` (default: m for float maps, mm for integer ones, which is how depth cameras store
    them; the default is recorded as assumed). Non-finite values, and in metric maps 0 and negative values,
    mean "no measurement" (NaN). ``option`` names the option in messages.
    info: {"kind", "per_metre" (None = relative), "sidecar" (path or None), "units" (how they were decided)}.
    """
    from .sidecar import read_record, vouched

    if not path.is_file():
        raise InputError(f"{option} {path}: no such file", "give a .npy, .exr or 16-bit .png depth map")
    side = sidecar_of(path)
    try:
        meta, note = vouched(path)
    except InputError as e:  # a sidecar of ours that is not about this file (another run's leftover)
        raise InputError(f"{option} {e.message}", e.hint) from None
    if meta is None:  # none, or one without an outputs list (written by hand): its kind still counts
        meta, note = read_record(side), None
    try:
        a, notes, fmt = formats.read_stored(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{option} {path}: unreadable ({e})", "give a .npy, .exr or 16-bit .png depth map") from e
    if a.ndim == 3 and a.shape[-1] == 1:  # a trailing channel axis (an EXR's only channel); a 1 x N map stays 2-D
        a = a[..., 0]
    if a.ndim != 2:
        raise InputError(
            f"{option} {path}: shape {list(a.shape)} is not a single-channel map",
            "give an H x W depth map (normals and colour images do not back-project)",
        )
    said_kind, source = None, None
    if meta is not None and isinstance(meta.get("kind"), str):
        said_kind, source = meta["kind"], f"its sidecar {side.name}"
    elif isinstance(notes.get("kind"), str):
        said_kind, source = notes["kind"], "its EXR header"
    if said_kind is not None and units in (None, "relative"):
        if said_kind not in formats.DEPTH_KINDS:
            raise InputError(
                f"{option} {path}: {source} says it is {formats.a_map_of(said_kind)}",
                "give a depth or disparity map (lotus depth output)",
            )
        values = fmt.decode(a, said_kind, note) if note and fmt else a  # a png16's stated range; npy, exr: as stored
        unit = notes.get("scale") == "metric" and meta is None and notes.get("unit")
        if unit:  # a metric EXR of ours: depth in m, or disparity in 1/m
            per_metre = parse_units(unit.removeprefix("1/"))
            return _metric(values, said_kind, per_metre), {
                "kind": said_kind,
                "per_metre": per_metre,
                "sidecar": None,
                "units": f"{unit}, from its EXR header",
            }
        return values.astype(np.float32), {
            "kind": said_kind,
            "per_metre": None,
            "sidecar": str(side) if meta is not None else None,
            "units": f"relative (affine-invariant), from {source}",
        }
    if a.dtype.kind not in "fui":
        raise InputError(f"{option} {path}: {a.dtype} values are not depths", "give a float .npy or a 16-bit PNG")
    if units is not None:
        per_metre, said = parse_units(units), f"{units}, as given"  # the CLI checked them, naming its option
    else:
        per_metre = 1000.0 if a.dtype.kind in "ui" else 1.0
        said = f"assumed {'mm' if per_metre == 1000 else 'm'} (integer maps: mm, float: m); set the units option"
    kind = kind or "depth"
    if per_metre is None:
        values = a.astype(np.float64)
        values[~np.isfinite(values)] = np.nan  # 0 is a relative value
        return values.astype(np.float32), {"kind": kind, "per_metre": None, "sidecar": None, "units": said}
    return _metric(a, kind, per_metre), {"kind": kind, "per_metre": per_metre, "sidecar": None, "units": said}


def _metric(a: np.ndarray, kind: str, per_metre: float) -> np.ndarray:
    """Depth in units -> metres, disparity in 1/units -> 1/metres; non-finite, 0 and negative -> NaN."""
    values = a.astype(np.float64)
    values = values / per_metre if kind == "depth" else values * per_metre
    values[~np.isfinite(values) | (values <= 0)] = np.nan
    return values.astype(np.float32)
