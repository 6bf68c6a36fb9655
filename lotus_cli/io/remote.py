"""Inputs and outputs at fsspec URLs (s3://, gs://, file://, ...), kept apart from local-file code.

memory:// serves as an input (a Python caller may fill it) but not as ``--out``: it dies with the process.

The design is staging, so sources.py and outputs.py stay local-file code:

* an input URL (a file, or a folder listed recursively) becomes an ``Item`` whose path is a local cache
  file ``$LOTUS_CACHE/remote/in/<hash of the URL>/<name>``, downloaded when it is needed (``fetch``,
  to a temporary name, then renamed);
* ``--out URL``: outputs are written by the runner into a local staging folder, then each finished
  item's files are uploaded (the sidecar last, so its presence marks a finished item there too) and
  the staged copies removed (``Outputs.publish``).

The backend comes from fsspec's registry: s3:// needs ``s3fs``, gs:// ``gcsfs``; credentials are theirs
(docs/scale-out.md). A local path is not a URL and never goes through fsspec.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from ..errors import InputError, OutputError, UsageError
from .cache import cache_dir
from .sidecar import listed_files, read_record, reuse_verdict
from .sources import Item, assign_keys, is_hidden

# "s3://b/k", or "s3:/b/k" as pathlib leaves a URL given to a Path option; not "C:/x" (one letter)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")
BACKENDS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "hf": "huggingface_hub",
    "http": "aiohttp",
    "https": "aiohttp",
}


# fsspec filesystems that live in this process only: what is written there is gone when the run ends
NOT_PERSISTENT = {"memory": "fsspec's in-memory filesystem"}


def check_persistent(url: str, option: str = "--out") -> None:
    """UsageError when ``url`` is on a filesystem that does not outlive the process (memory://): outputs
    written there would be reported as done and lost."""
    m = _URL.match(str(url))
    scheme = m.group(1).lower() if m else ""
    if scheme in NOT_PERSISTENT:
        raise UsageError(
            f"{option} {url}: {NOT_PERSISTENT[scheme]} keeps nothing after the run ends",
            f"give a folder or a persistent URL (s3://, gs://, file://) for {option}",
        )


def is_url(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a remote location (file:// is a local path, not a URL here)."""
    m = _URL.match(str(spec))
    return bool(m) and m.group(1).lower() != "file"


def normalise(spec: str | os.PathLike) -> str:
    """A URL with its '//' back (pathlib collapses it), or a local path for file:// and plain paths."""
    m = _URL.match(str(spec))
    if not m:
        return str(spec)
    scheme, rest = m.group(1).lower(), m.group(2)
    return "/" + rest if scheme == "file" else f"{scheme}://{rest}"


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``; a missing backend is a UsageError naming it."""
    import fsspec  # fsspec only when a URL is given

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        scheme = url.split(":", 1)[0]
        pkg = BACKENDS.get(scheme, f"the fsspec backend for {scheme}://")
        raise UsageError(f"{url}: cannot open ({e})", f"pip install {pkg}") from e


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root() -> Path:
    return cache_dir() / "remote"


@dataclass(frozen=True)
class Inputs:
    """The remote side of expanded inputs: {local cache path: URL}."""

    urls: dict

    def url(self, item: Item) -> str | None:
        return self.urls.get(str(item.path))


def expand(
    inputs: list[str], exts: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> tuple[list[Item], list[InputError], Inputs]:
    """URL inputs -> items (keys as for local folders: the path below the URL given) whose paths are
    cache files to ``fetch``; problems as ``sources.expand`` reports them. Local inputs are not handled
    here. ``exclude``: URLs of folders whose contents are never inputs (an --out URL inside an input's)."""
    raw, problems, urls = [], [], {}
    excluded = [_full(u) for u in exclude]
    for spec in inputs:
        url = normalise(spec)
        fs, root = filesystem(url)
        try:
            if fs.isdir(root):
                found = sorted(p for p in fs.find(root) if not is_hidden(PurePosixPath(p).relative_to(root).parts))
                pairs = [(p, PurePosixPath(p).relative_to(root).as_posix(), False) for p in found]
            elif fs.isfile(root):
                pairs = [(root, PurePosixPath(root).name, True)]
            else:
                problems.append(InputError(f"{url}: no such file or folder", "check the URL", subject=url))
                continue
        except OSError as e:
            problems.append(InputError(f"{url}: cannot list ({e})", "check the URL and credentials", subject=url))
            continue
        pairs = [
            p
            for p in pairs
            if PurePosixPath(p[0]).suffix.lower() in exts
            and not any(_below(fs.unstrip_protocol(p[0]), x) for x in excluded)
        ]
        if not pairs:
            problems.append(
                InputError(f"{url}: holds no supported files", f"supported: {', '.join(exts)}", subject=url)
            )
        for path, rel, by_name in pairs:
            full = fs.unstrip_protocol(path)
            local = cache_root() / "in" / _digest(full) / PurePosixPath(path).name
            urls[str(local)] = full
            raw.append((local, rel, by_name))
    return assign_keys(raw), problems, Inputs(urls)


def _full(url: str) -> str:
    """``url`` as fsspec spells it back (e.g. memory://b/out -> memory:///b/out), for comparing places."""
    fs, path = filesystem(normalise(url))
    return fs.unstrip_protocol(path).rstrip("/")


def _below(url: str, folder: str) -> bool:
    return url == folder or url.startswith(folder + "/")


def fetch(url: str, local: Path) -> Path:
    """Download ``url`` to ``local`` unless it is already there (a temporary name, then a rename)."""
    if local.is_file():
        return local
    fs, path = filesystem(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, local)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{url}: cannot download ({e})", "check the URL and credentials", subject=url) from e
    return local


@dataclass(frozen=True)
class Outputs:
    """``--out URL``: where outputs go (``url``) and the local folder they are staged in first."""

    url: str

    @property
    def staging(self) -> Path:
        return cache_root() / "out" / _digest(self.url)

    def remote(self, local: str | Path) -> str:
        """The URL of a staged output file or folder."""
        rel = Path(local).relative_to(self.staging).as_posix()
        return f"{self.url.rstrip('/')}/{rel}"

    def reusable(self, sidecar: str, files: list[str], expected) -> tuple[bool, str | None]:
        """``reusable`` for outputs at the URL: ``sidecar`` and ``files`` are paths below it ('a/x.json',
        'a/x.png'); the sidecar is read there and judged as a local one (``reuse_verdict``)."""
        fs, root = filesystem(self.url)
        base = root.rstrip("/")

        def read() -> bytes | None:
            try:
                return fs.cat_file(f"{base}/{sidecar}")
            except FileNotFoundError:
                return None

        return reuse_verdict(read, files, lambda f: fs.isfile(f"{base}/{f}"), expected)

    def check(self) -> None:
        """Fail fast, before any model loads, when the URL cannot be written or keeps nothing after the run
        (``check_persistent``)."""
        check_persistent(self.url)
        fs, root = filesystem(self.url)
        probe = f"{root.rstrip('/')}/.lotus-write-test"
        try:
            fs.makedirs(root, exist_ok=True)
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except OSError as e:
            raise OutputError(f"--out {self.url}: not writable ({e})", "check the URL and credentials") from e

    def publish(self, result):
        """Upload a finished ``ItemResult``'s files (a video's frame folder first, the sidecar
        last), remove the staged copies, and return the result with URLs for outputs. Layers written
        beside the map (x.mean.png of `lotus uncertainty`) and the companions of a file (an OBJ's material and
        texture) go too: every file the sidecar lists. A failed upload fails the item."""
        if result.status != "done" or not result.outputs:
            return result
        fs, _ = filesystem(self.url)
        sidecar = Path(result.outputs["json"])
        listed = (sidecar.with_name(name) for name in listed_files(read_record(sidecar)))  # layers, companions
        files = sorted({*(Path(v) for v in result.outputs.values()), *listed})
        files.sort(key=lambda p: (p == sidecar, not p.is_dir()))
        try:
            for local in files:
                _, dest = filesystem(self.remote(local))
                if local.is_dir():
                    fs.put(str(local) + "/", dest, recursive=True)
                else:
                    fs.makedirs(str(PurePosixPath(dest).parent), exist_ok=True)
                    fs.put_file(str(local), dest)
        except OSError as e:
            return replace(
                result, status="failed", error=f"{result.item.path}: cannot upload outputs to {self.url} ({e})"
            )
        for local in files:
            shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
        return replace(result, outputs={k: self.remote(v) for k, v in result.outputs.items()})
