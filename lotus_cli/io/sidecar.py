"""The JSON sidecar beside every output, and the rerun decision it carries ("made with").

One shape (``sidecar``) for images, videos and point clouds. ``reuse_verdict`` decides, wherever the outputs
are (a folder, an fsspec URL), whether an earlier run's outputs can stay under ``--skip-existing``: its
run completed, its files exist, and it was made with the same model, kind, options and format settings;
otherwise it says why the item is redone. No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from .. import __version__
from ..errors import InputError
from .atomic import jsonable
from .formats import Style, get_format, meaning, sidecar_of


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
    want = json.loads(json.dumps(options, default=jsonable))
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


def read_record(side: Path) -> dict | None:
    """The JSON record of the sidecar ``side``, or None when there is none or it is unreadable."""
    try:
        record = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def listed_files(record: dict | None) -> set[str]:
    """The file names a sidecar record vouches for, all in its folder: each output's and each layer's output's
    ``file``, and the ``companions`` an output lists (an OBJ's .mtl and texture). Anything but a plain name
    (a path, "..") is left out: a hand-edited sidecar must not point a removal elsewhere."""
    if not isinstance(record, dict):
        return set()
    notes = list((record.get("outputs") or {}).values())
    for layer in (record.get("layers") or {}).values():
        if isinstance(layer, dict):
            notes += list((layer.get("outputs") or {}).values())
    names = []
    for note in notes:
        if isinstance(note, dict):
            names += [note.get("file"), *(note.get("companions") or ())]
    return {n for n in names if isinstance(n, str) and plain_name(n)}


def plain_name(name: str) -> bool:
    """Whether ``name`` names a file in the sidecar's own folder (no path, not "." or "..")."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def vouched(path: Path) -> tuple[dict | None, dict | None]:
    """(the sidecar record beside the map file ``path``, its note on that file: ``outputs[format]``), for
    readers of maps (``lotus eval --predictions``, ``lotus pointcloud --depth``). (None, None) when no sidecar
    of ours is there: none, unreadable, or one without an ``outputs`` list (written by hand, e.g.
    {"kind": "disparity"}); such a map is read on its own terms. Raises InputError when the sidecar lists
    outputs but not this file (a map left by another run, after a rerun with other formats or another
    model) or says its run did not finish: the record is not about this file."""
    side = sidecar_of(path)
    record = read_record(side)
    if record is None or not isinstance(record.get("outputs"), dict):
        return None, None
    if record.get("complete") is False or record.get("interrupted") or record.get("error"):
        raise InputError(
            f"{path}: its sidecar {side.name} says its run did not finish ({record.get('error') or 'incomplete'})",
            "rerun lotus on the input, or remove the sidecar to read the map on its own terms",
        )
    note = next(
        (n for n in record["outputs"].values() if isinstance(n, dict) and n.get("file") == path.name),
        None,
    )
    if note is None:
        listed = ", ".join(sorted(listed_files(record))) or "nothing"
        raise InputError(
            f"{path}: not listed by its sidecar {side.name} (which lists {listed}): the sidecar is about "
            "another run's outputs",
            f"read a file it lists, or remove {path.name}",
        )
    return record, note
