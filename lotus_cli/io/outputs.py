"""An item's map files: paths by format, written through the format registry, then the sidecar (last).

For an item keyed ``a/x`` under ``--out o``, each format of ``formats.FORMATS`` gives ``o/a/x<suffix>``
(x.png, x.16bit.png, x.npy, x.exr: the table in ``formats``), and ``o/a/x.json`` is the sidecar
(``sidecar.sidecar``), written last: its ``complete`` says the run finished.

A rewrite leaves only what its sidecar lists: files the item's earlier sidecar listed that the new one does
not (x.npy after a rerun with ``-f exr`` alone, the x.mean.* layers of an earlier `lotus uncertainty`) are
removed after the new files are in place and before the new sidecar is written, so a complete sidecar never
stands beside a map of another run. Only names an earlier sidecar of ours listed are touched: a file that
merely looks like an output (an input photo x.png in the same folder) stays. No torch here.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import OutputError
from .atomic import atomic_open, write_json
from .formats import FORMATS, Style, get_format, map_paths, meaning
from .sidecar import listed_files, plain_name, read_record

SUFFIXES = {**{f.name: f.suffix for f in FORMATS.values()}, "json": ".json"}


def output_paths(out_dir: Path, key: str, formats: tuple[str, ...]) -> dict[str, Path]:
    """{format: path} for an item's outputs, sidecar included under "json"."""
    base = out_dir / key
    return {**map_paths(base, formats), "json": base.with_name(base.name + ".json")}


def encode_png(image: np.ndarray) -> bytes:
    """uint8 or uint16 [H, W] or RGB [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    FORMATS["png"].dump(image, buf, "", Style(), {})
    return buf.getvalue()


def write_map(
    path: Path, fmt: str, value: np.ndarray, kind: str, style: Style = Style(), about: dict | None = None
) -> dict:
    """One map in format ``fmt`` written atomically to ``path``; returns the sidecar's note on it."""
    f = get_format(fmt)
    stored, info = f.pixels(value, kind, style)
    try:
        with atomic_open(path) as out:
            f.dump(stored, out, kind, style, about or {})
    except (ValueError, RuntimeError) as e:  # an encoder's refusal (OpenCV out of memory; OpenEXR's bindings)
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
    earlier = listed_files(read_record(paths["json"]))
    # an earlier run's sidecar must not vouch for files this run replaces and may not finish
    paths["json"].unlink(missing_ok=True)
    facts = {k: sidecar[k] for k in ("model", "normal_frame", "axes") if sidecar.get(k) is not None}

    def about_of(map_kind: str) -> dict:  # a frame is a fact about vectors: normal maps only
        return {k: v for k, v in facts.items() if k == "model" or map_kind == "normal"}

    about = about_of(kind)
    spread = dict(sidecar.get("uncertainty") or {}) if kind == "uncertainty" else None
    if spread is not None:
        spread.setdefault("unit", spread_unit(sidecar.get("task")))
        about.update({k: spread[k] for k in ("statistic", "unit") if spread.get(k) is not None})
    formats = _write_formats(paths, value, kind, style, about)
    layer_records = {}
    layer_style = replace(Style(), exr_half=style.exr_half, exr_compression=style.exr_compression)
    for name, (array, layer_kind) in (layers or {}).items():
        layer_about = about_of(layer_kind)
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
    if spread is not None and "uncertainty" in sidecar:
        record["uncertainty"] = spread
    if layer_records:
        record["layers"] = layer_records
    remove_unlisted(paths["json"].parent, earlier, listed_files(record))
    write_json(paths["json"], record)
    return record


def spread_unit(task: str | None) -> str:
    """The unit of an uncertainty map of ``task``'s predictions (``ensemble_stats``' statistics)."""
    if task == "normal":
        return "degrees"
    return "the [0, 1] map's own units (affine-invariant: no metric unit)"


def remove_unlisted(folder: Path, earlier: Iterable[str], now: Iterable[str]) -> list[Path]:
    """Remove the files of ``folder`` named in ``earlier`` and not in ``now``: what an item's earlier sidecar
    listed (``listed_files(read_record(side))``, read before that sidecar is removed) that its new one will
    not. Call it after the new files are written and before the new sidecar is: a complete sidecar then
    stands beside exactly the files it lists, and an interruption in between leaves no sidecar (the item is
    redone). Names that are not plain names are ignored; a missing file is fine. Returns the removed paths;
    a file that cannot be removed is an OutputError (the new sidecar must not be written beside it)."""
    removed = []
    keep = set(now)
    for name in sorted(set(earlier) - keep):
        if not plain_name(name):
            continue
        path = folder / name
        try:
            if path.is_dir() and not path.is_symlink():
                continue  # never a whole folder: our outputs are files
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OutputError(
                f"{path}: an earlier run's output, not listed now, cannot be removed ({e.strerror})",
                "remove it by hand, or check the folder's permissions",
            ) from e
        removed.append(path)
    return removed
