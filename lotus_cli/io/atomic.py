"""Atomic writes: every file is written to a hidden temporary name in its folder and renamed into place.

An interrupted run never leaves a half-written output. Temporaries are named ``.<name>.<random>.tmp``; the
first write of a process into a folder removes such temporaries that a killed run left there (ours by name,
and only old ones, so a concurrent run's live file stays). No torch here.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import OutputError

_UMASK = os.umask(0)


# tempfile.mkstemp's names: prefix, 8 characters of [a-z0-9_], suffix
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


STALE_AFTER = 3600.0  # seconds without a write after which a temporary of ours is taken as abandoned


_cleared: set[Path] = set()


_cleared_lock = threading.Lock()


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


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.save(f, array, allow_pickle=False)


def write_json(path: Path, record: dict) -> None:
    write_bytes(path, (json.dumps(record, indent=2, default=jsonable) + "\n").encode())


def jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_out_dir(out_dir: Path) -> None:
    """Fail fast, before any model loads, when ``out_dir`` cannot be created or written; a file (or a file
    where one of its parent folders should be) is named as such, not as an unwritable folder."""
    blocking = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        what = "it is a file" if blocking == out_dir else f"{blocking} is a file"
        raise OutputError(f"--out {out_dir}: not writable: {what}, not a folder", "give a folder (created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lotus-write-test.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"--out {out_dir}: not writable ({e.strerror})", "choose a folder you can write to") from e
