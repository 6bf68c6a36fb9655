"""Outputs: atomic writes, map files through the format registry, JSON sidecars, reruns. No torch here.

Every file is written to a hidden temporary name in the destination folder (``.<name>.<random>.tmp``) and
renamed into place, so an interrupted run never leaves a half-written output; the first write of a run
into a folder removes such temporaries that a killed run left there (ours by name, and only old ones, so
a concurrent run's live file stays). For an item keyed ``a/x`` under ``--out o``, each format of
``formats.FORMATS`` gives ``o/a/x<suffix>`` (x.png, x.16bit.png, x.npy, x.exr: the table in ``formats``),
and ``o/a/x.json`` is the sidecar (``sidecar``), written last: its ``complete`` says the run finished.

Point clouds (`lotus pointcloud`) are binary PLY files written by Open3D (``write_ply``).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import __version__
from .errors import OutputError, UsageError
from .formats import DEFAULT_FORMATS, FORMATS, Style, get_format, map_paths, meaning, parse_formats  # noqa: F401

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process's umask, for files created through mkstemp
SUFFIXES = {**{f.name: f.suffix for f in FORMATS.values()}, "json": ".json"}
# tempfile.mkstemp's names: prefix, 8 characters of [a-z0-9_], suffix
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
STALE_AFTER = 3600.0  # seconds without a write after which a temporary of ours is taken as abandoned
_cleared: set[Path] = set()
_cleared_lock = threading.Lock()


def output_paths(out_dir: Path, key: str, formats: tuple[str, ...]) -> dict[str, Path]:
    """{format: path} for an item's outputs, sidecar included under "json"."""
    base = out_dir / key
    return {**map_paths(base, formats), "json": base.with_name(base.name + ".json")}


def clear_stale_temporaries(folder: Path, older_than: float = STALE_AFTER) -> list[Path]:
    """Remove the temporaries of ours (``.<name>.<random>.tmp``) in ``folder`` not written to for
    ``older_than`` seconds: what a killed run left. Other files, and younger temporaries (a concurrent
    run's), stay. Returns the removed paths."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not _TEMP_NAME.match(e.name):
            continue
        try:
            if e.is_file(follow_symlinks=False) and now - e.stat(follow_symlinks=False).st_mtime > older_than:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:  # gone meanwhile, or not ours to remove
            pass
    return removed


def _clear_once(folder: Path) -> None:
    """``clear_stale_temporaries`` on the first write of this process into ``folder``."""
    with _cleared_lock:
        if folder in _cleared:
            return
        _cleared.add(folder)
    clear_stale_temporaries(folder)


def temporary_path(path: Path) -> Path:
    """A new, empty hidden temporary file beside ``path`` (our naming: ``.<name>.<random>.tmp``), with
    the usual permissions; the folder is created and cleared of stale temporaries first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_once(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot write here ({e.strerror})", "choose a writable --out folder") from e
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    return Path(tmp)


@contextmanager
def atomic_open(path: Path):
    """Binary file handle on a temporary sibling of ``path``, renamed onto ``path`` on success."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
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


def encode_png(image: np.ndarray) -> bytes:
    """uint8 or uint16 [H, W] or RGB [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    FORMATS["png"].dump(image, buf, "", Style(), {})
    return buf.getvalue()


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


def write_map(
    path: Path, fmt: str, value: np.ndarray, kind: str, style: Style = Style(), about: dict | None = None
) -> dict:
    """One map in format ``fmt`` written atomically to ``path``; returns the sidecar's note on it."""
    f = get_format(fmt)
    stored, info = f.pixels(value, kind, style)
    try:
        with atomic_open(path) as out:
            f.dump(stored, out, kind, style, about or {})
    except ValueError as e:  # an encoder's refusal (e.g. out of memory in OpenCV)
        raise OutputError(f"{path}: {f.name} encoding failed ({e})", "check free disk space and memory") from e
    return info


def layer_paths(paths: dict[str, Path], name: str) -> dict[str, Path]:
    """Paths of a further map written beside an item's own: x.png -> x.<name>.png (no sidecar)."""
    return {
        fmt: p.with_name(p.name[: -len(SUFFIXES[fmt])] + f".{name}" + SUFFIXES[fmt])
        for fmt, p in paths.items()
        if fmt != "json"
    }


def _write_formats(paths: dict[str, Path], value: np.ndarray, kind: str, style: Style, about: dict) -> dict:
    return {
        fmt: {"file": path.name, **write_map(path, fmt, value, kind, style, about)}
        for fmt, path in paths.items()
        if fmt != "json"
    }


def write_outputs(
    paths: dict[str, Path],
    value: np.ndarray,
    kind: str,
    sidecar: dict,
    style: Style = Style(),
    layers: dict | None = None,
) -> dict:
    """Write every requested format, then the sidecar (last, so its presence marks a finished item).

    ``sidecar``: the record so far (``sidecar()``'s, or any dict); its model, frame and axes also go into
    self-describing files (EXR headers). ``layers``: further maps of the same item, {name: (array, kind)},
    written as x.<name>.<format> with the default style of their kind (the EXR settings kept). Returns the
    sidecar record as written.
    """
    # an earlier run's sidecar must not vouch for files this run replaces and may not finish
    paths["json"].unlink(missing_ok=True)
    about = {k: sidecar[k] for k in ("model", "normal_frame", "axes") if sidecar.get(k) is not None}
    formats = _write_formats(paths, value, kind, style, about)
    layer_records = {}
    layer_style = replace(Style(), exr_half=style.exr_half, exr_compression=style.exr_compression)
    for name, (array, layer_kind) in (layers or {}).items():
        layer_about = {k: v for k, v in about.items() if layer_kind == "normal" or k not in ("normal_frame", "axes")}
        layer_records[name] = {
            "kind": layer_kind,
            "meaning": meaning(layer_kind),
            "outputs": _write_formats(layer_paths(paths, name), array, layer_kind, layer_style, layer_about),
        }
    finite = value[np.isfinite(value)]
    record = {
        **sidecar,
        "kind": kind,
        "value_range": [float(finite.min()), float(finite.max())] if finite.size else None,
        "meaning": meaning(kind),
        "outputs": {**sidecar.get("outputs", {}), **formats},
    }
    if layer_records:
        record["layers"] = layer_records
    write_json(paths["json"], record)
    return record


# --------------------------------------------------------------------------------------------- sidecars


def sidecar(
    kind: str,
    *,
    model: dict | None = None,
    options: dict | None = None,
    input: str | None = None,
    key: str | None = None,
    outputs: dict | None = None,
    complete: bool = True,
    error: str | None = None,
    interrupted: bool = False,
    seconds: float | None = None,
    **sections,
) -> dict:
    """The one shape of our JSON sidecars, for images, videos and point clouds.

    ``model``: what made the output (``LotusPredictor.describe()``: model, task, family, device, dtype ...;
    or {"model": ...} for point clouds). ``options``: every option that changes the output (processing
    size, resampling, latent, seed, frame, tiling, ensembles, video range, cloud options ...): a rerun
    with ``skip_existing`` keeps an output only when these, ``model["model"]`` and ``kind`` are the same
    (``reusable``). ``outputs``: {format: {"file": name, ...the format's note}}. ``complete``: the run
    finished (False: interrupted or failed part-way, ``error`` says why); ``sections``: further parts
    (video, camera, uncertainty, tiling ...), kept as given.
    """
    return {
        "lotus_cli": __version__,
        **(model or {}),
        "input": input,
        "key": key,
        "kind": kind,
        "meaning": meaning(kind),
        "options": options or {},
        **sections,
        "outputs": outputs or {},
        "complete": bool(complete and not interrupted and error is None),
        "interrupted": interrupted,
        "error": error,
        "seconds": None if seconds is None else round(seconds, 4),
    }


def format_settings(formats: Iterable[str], kind: str, style: Style) -> dict[str, dict]:
    """{format: what its file depends on in ``style``}, the ``settings`` argument of ``reusable``."""
    return {f: get_format(f).settings(kind, style) for f in formats}


def reusable(
    side: Path, files: Iterable[Path], *, kind: str, model: str | None, options: dict, settings: dict[str, dict]
) -> tuple[bool, str | None]:
    """Whether an earlier run's outputs can stay under ``skip_existing``: (True, None) when ``side`` (the
    sidecar) says its run completed, every one of ``files`` exists, and it was made with the same model,
    kind and ``options`` and, for each format in ``settings``, the same settings. Otherwise (False, why it
    is redone), the reason None when there was nothing to reuse."""
    wanted = {"kind": kind, "model": model, "options": options, "settings": settings}
    return reusable_at(side, files, lambda: wanted)


def reusable_at(side: Path, files: Iterable[Path], expected: Callable[[], dict]) -> tuple[bool, str | None]:
    """``reusable`` with its keyword arguments given by ``expected()``, asked only when there is a sidecar."""
    return reuse_verdict(lambda: side.read_text() if side.is_file() else None, files, Path.is_file, expected)


def reuse_verdict(
    read: Callable[[], str | bytes | None],
    files: Iterable,
    exists: Callable[[object], bool],
    expected: Callable[[], dict],
) -> tuple[bool, str | None]:
    """The decision of ``reusable`` wherever the outputs are (a folder, an fsspec URL). ``read()`` gives the
    sidecar's text (None: there is none; OSError: unreadable), ``files`` are the other outputs (paths or
    URL paths; a message names a file by its last part), ``exists(f)`` says whether one is there, and
    ``expected()`` gives ``reusable``'s model, kind, options and settings; it is asked only when there is
    a sidecar to compare with (working them out may import the model code)."""
    files = list(files)
    try:
        text = read()
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        return False, f"its sidecar is unreadable ({e})"
    if text is None:
        return False, ("no sidecar: its run did not finish" if any(exists(f) for f in files) else None)
    try:
        old = json.loads(text)
        old_options, old_outputs = old.get("options") or {}, old.get("outputs") or {}
    except (ValueError, AttributeError) as e:
        return False, f"its sidecar is unreadable ({e})"
    if old.get("interrupted"):
        return False, "its run was interrupted"
    if old.get("error") or old.get("complete") is False:
        return False, f"its run failed ({old.get('error') or 'incomplete'})"
    missing = [str(f).replace("\\", "/").rsplit("/", 1)[-1] for f in files if not exists(f)]
    if missing:
        return False, f"{', '.join(missing)} missing"
    made = expected()
    model, kind, options, settings = made["model"], made["kind"], made["options"], made["settings"]
    if old.get("model") != model:
        return False, f"made with another model ({old.get('model')})"
    if old.get("kind") != kind:
        return False, f"made as {old.get('kind')} maps"
    want = json.loads(json.dumps(options, default=_jsonable))
    changed = [k for k in sorted(set(want) | set(old_options)) if want.get(k) != old_options.get(k)]
    if changed:
        return False, "made with other options (" + ", ".join(
            f"{k} {old_options.get(k)!r} -> {want.get(k)!r}" for k in changed
        ) + ")"
    for fmt, wanted in settings.items():
        note = old_outputs.get(fmt)
        if not isinstance(note, dict):
            return False, f"its {fmt} output is not from that run"
        diff = [k for k, v in wanted.items() if note.get(k) != v]
        if diff:
            return False, f"its {fmt} was made with other settings (" + ", ".join(
                f"{k} {note.get(k)!r} -> {wanted[k]!r}" for k in diff
            ) + ")"
    return True, None


def check_out_dir(out_dir: Path) -> None:
    """Fail fast, before any model loads, when ``out_dir`` cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lotus-write-test.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"--out {out_dir}: not writable ({e.strerror})", "choose a folder you can write to") from e
