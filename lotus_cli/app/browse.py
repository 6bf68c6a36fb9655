"""Reading a finished output folder for the Browse tab: its items, their sidecars' facts, filters and the
run's summary. Read-only: nothing here writes, and no path outside the folder is ever opened.

An item is what a sidecar describes (``io.sidecar``): done when its run completed, interrupted or failed
when the sidecar says so. Maps without a sidecar are an item whose run stopped before its sidecar (the
sidecar is written last: ``io.outputs``), shown as interrupted. Inputs that failed before writing anything
leave no file in the folder; their `--json` records do: keep them in the folder (`lotus depth ... --json >
OUT/records.jsonl`) and Browse lists those items as failed, and marks items a rerun redid.

Paths: ``resolve_inside`` is the one door from a name to a file. It refuses absolute paths, ``..``, and
anything whose real path (symlinks followed) leaves the folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, UsageError
from ..io.formats import FORMATS
from ..io.sidecar import read_record

STATUSES = ("done", "failed", "interrupted")
FILTERS = ("all", "failed", "redone", "interrupted")
MAP_SUFFIXES = sorted((f.suffix for f in FORMATS.values()), key=len, reverse=True)  # .16bit.png before .png
SHOWN = (".png", ".preview.png", ".mp4")  # what a gallery tile shows, in order of preference
MODELS_3D = (".glb", ".obj", ".ply")


@dataclass
class Entry:
    """One item of the folder: ``key`` (its path under the folder, without suffix), ``status`` (done, failed,
    interrupted), ``files`` (names under the folder), ``record`` (its sidecar, or its --json record),
    ``error`` and ``redone`` as the record says."""

    key: str
    status: str
    files: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    error: str | None = None
    redone: str | None = None

    @property
    def shown(self) -> str | None:
        """The file a gallery tile shows (the colour-mapped png, a cloud's preview, a clip), or None."""
        for suffix in SHOWN:
            for name in self.files:
                if name.endswith(suffix) and not name.endswith(".16bit.png"):
                    return name
        return None

    @property
    def model_3d(self) -> str | None:
        """A mesh or point cloud of this item, for the 3-D view."""
        for suffix in MODELS_3D:
            for name in self.files:
                if name.endswith(suffix):
                    return name
        return None

    def facts(self) -> dict:
        """What the page shows about the item: status, model, options, timing, sizes, the error."""
        r = self.record
        keep = ("input", "kind", "model", "task", "family", "device", "dtype", "options", "input_size",
                "processing_size", "seconds", "frames", "complete", "interrupted")  # fmt: skip
        facts = {"key": self.key, "status": self.status, **{k: r[k] for k in keep if k in r}}
        if self.error:
            facts["error"] = self.error
        if self.redone:
            facts["redone"] = self.redone
        facts["files"] = self.files
        return facts


class Folder:
    """A finished output folder, read on ``scan``."""

    def __init__(self, root: str | os.PathLike):
        path = Path(root).expanduser()
        if not path.is_dir():
            raise UsageError(f"--browse {root}: no such folder", "give the --out folder of a finished lotus run")
        self.root = path.resolve()
        self.entries: list[Entry] = []

    def resolve_inside(self, name: str) -> Path:
        """The file ``name`` (relative to the folder) as a real path inside it; InputError for an absolute path,
        a ``..`` part, or a path that (through symlinks) leads outside."""
        text = str(name).strip().replace("\\", "/")
        if not text:
            raise InputError("no path given", "name a file in the folder, e.g. a/x.png")
        if text.startswith("/") or Path(text).is_absolute() or (len(text) > 1 and text[1] == ":"):
            raise InputError(f"{name}: refused, an absolute path", "name a file relative to the browsed folder")
        if ".." in text.split("/") or "\0" in text:
            raise InputError(f"{name}: refused, '..' leads outside the browsed folder", "name a file inside it")
        real = (self.root / text).resolve()
        if not real.is_relative_to(self.root):
            raise InputError(
                f"{name}: refused, it leads outside the browsed folder (a symlink)", "name a file inside it"
            )
        if not real.is_file():
            raise InputError(f"{name}: no such file in the browsed folder")
        return real

    def scan(self) -> list[Entry]:
        """Every item of the folder (sidecars, maps without one, --json records), sorted by key."""
        sidecars, maps, records = {}, {}, []
        for dirpath, dirnames, filenames in os.walk(self.root):  # symlinked folders are not followed
            here = Path(dirpath)
            dirnames.sort()
            for fname in sorted(filenames):
                path = here / fname
                if path.is_symlink() and not path.resolve().is_relative_to(self.root):
                    continue  # a symlink out of the folder is never read
                rel = path.relative_to(self.root).as_posix()
                if fname.endswith(".jsonl"):
                    records.append(path)
                elif fname.endswith(".json"):
                    record = read_record(path)
                    if record is not None and "kind" in record and "outputs" in record:
                        sidecars[rel[: -len(".json")]] = record
                else:
                    suffix = next((s for s in MAP_SUFFIXES if fname.endswith(s)), None)
                    if suffix:
                        maps.setdefault(rel[: -len(suffix)], []).append(rel)
        entries = {key: self._from_sidecar(key, record) for key, record in sidecars.items()}
        for key, files in maps.items():
            if key not in entries and not _inside_clip(key, sidecars):
                entries[key] = Entry(key, "interrupted", sorted(files), error="no sidecar: its run did not finish")
        for path in records:
            self._add_records(path, entries)
        self.entries = sorted(entries.values(), key=lambda e: e.key)
        return self.entries

    def _from_sidecar(self, key: str, record: dict) -> Entry:
        folder = (self.root / key).parent
        files = []
        for note in (record.get("outputs") or {}).values():
            name = note.get("file") if isinstance(note, dict) else None
            if isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
                if (folder / name).is_file():
                    files.append((folder / name).relative_to(self.root).as_posix())
        files.append(f"{key}.json")
        if record.get("interrupted"):
            status = "interrupted"
        elif record.get("error") or record.get("complete") is False:
            status = "failed"
        else:
            status = "done"
        return Entry(key, status, files, record, error=record.get("error"))

    @staticmethod
    def _add_records(path: Path, entries: dict) -> None:
        """--json records (NDJSON, docs/records.md): failed inputs that wrote nothing, and redone items."""
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or "status" not in rec:
                continue
            key = rec.get("key") or rec.get("input") or "?"
            entry = entries.get(key)
            if entry is None:
                if rec["status"] != "failed":
                    continue  # a done record whose files are gone (moved, or another folder's)
                entries[key] = entry = Entry(key, "failed", [], rec, error=rec.get("error"))
            elif rec["status"] == "failed" and entry.status == "done" and not entry.record.get("seconds"):
                entry.status, entry.error = "failed", rec.get("error")
            if rec.get("redone"):
                entry.redone = rec["redone"]

    def filtered(self, which: str = "all") -> list[Entry]:
        """The scanned entries passing the filter ``which`` (all, failed, redone, interrupted)."""
        if which not in FILTERS:
            raise UsageError(f"filter {which!r}: expected {', '.join(FILTERS)}")
        if which == "all":
            return list(self.entries)
        if which == "redone":
            return [e for e in self.entries if e.redone]
        return [e for e in self.entries if e.status == which]

    def summary(self) -> dict:
        """The run's counts and time, from the scanned entries: {"items", "done", "failed", "interrupted",
        "redone", "seconds", "models", "kinds"}."""
        s = {"folder": str(self.root), "items": len(self.entries)}
        for status in STATUSES:
            s[status] = sum(e.status == status for e in self.entries)
        s["redone"] = sum(bool(e.redone) for e in self.entries)
        s["seconds"] = round(sum(float(e.record.get("seconds") or 0) for e in self.entries if e.files), 3)
        s["models"] = sorted({str(e.record["model"]) for e in self.entries if e.record.get("model") and e.files})
        s["kinds"] = sorted({str(e.record["kind"]) for e in self.entries if e.record.get("kind")})
        return s

    def entry(self, key: str) -> Entry:
        for e in self.entries:
            if e.key == key:
                return e
        raise InputError(f"{key}: no such item in the browsed folder")

    def input_path(self, entry: Entry) -> Path | None:
        """The input an item's sidecar names, when it is still there (outside the folder, maybe: the page shows
        it only decoded and re-encoded as a thumbnail, never as the file, see ``ui``)."""
        name = entry.record.get("input")
        if not isinstance(name, str) or "://" in name:
            return None
        path = Path(name)
        return path if path.is_file() else None


def _inside_clip(key: str, sidecars: dict) -> bool:
    """Whether ``key`` is a frame map in a clip's frame folder (x/000001_0.033s under a sidecar x)."""
    parent = key.rsplit("/", 1)[0] if "/" in key else None
    return parent is not None and parent in sidecars
