"""The app's predictor: loaded once, shared by every request, one prediction at a time.

A request (one uploaded image or video) runs through the same library path as `lotus depth` / `lotus
normal` / `lotus uncertainty`: a ``run.predict.PredictRequest`` planned by ``run.predict.plan`` and run by
``run.predict.run_files`` with the batch function of ``run.predict.make_predict``, into a temporary folder
of its own. So the files a page offers for download (png, png16, npy, exr and the sidecar) are the files
the command line writes for the same image and options. For a depth map, the mesh is built as `lotus
pointcloud --depth MAP IMAGE --mesh` builds it (``run.pointcloud``, from the npy just written: no second
model; without the pointcloud extra's Open3D, no mesh). Only the newest ``keep`` request folders stay on
disk, so a long-running app does not fill it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, UsageError
from ..io import sources
from ..io.sidecar import read_record
from ..io.sources import is_video
from ..model import cpu, registry
from ..run.events import Progress, Reporter
from ..run.loading import load_predictor
from ..run.pointcloud import PointcloudRequest, pointclouds
from ..run.predict import PredictRequest, make_predict, plan, run_files
from ..run.results import Summary
from .security import Limits, check_upload

IMAGE_FORMATS = "png,png16,npy,exr"  # every map format of `lotus depth` (the sidecar always comes too)
VIDEO_FORMATS = "png"  # a clip: the colour-mapped mp4, and a png per frame
DEPTH_KINDS = ("disparity", "depth")
M_ARENA_MAX = -8  # glibc's mallopt parameter: how many malloc arenas threads may create


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas at ``n`` (True when set; a no-op without glibc). glibc gives a thread that
    finds the arenas busy one of its own, up to 8 per core, and Gradio runs events on a pool of up to 40
    threads: the app's RSS grew by 0.9 GB over its first 25 requests and stayed within 2 MB over 20 more
    with the cap (docs/performance.md, web app)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class AppOptions:
    """How the app's predictors are loaded and what its page starts with: ``models`` (names, hub ids or
    folders; default depth-d and normal-d), the page's choice, the first loaded at the start and the others
    when a request asks for them, one resident at a time; ``device`` / ``dtype`` / ``processing_res`` as
    `lotus depth` takes them; ``limits`` on uploads; ``keep``: request folders kept on disk."""

    models: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "auto"
    processing_res: int = 768
    limits: Limits = Limits()
    keep: int = 8

    def __post_init__(self):
        if self.processing_res < 0:
            raise UsageError(f"--processing-res must be >= 0, not {self.processing_res}", "0 = native size")


@dataclass(frozen=True)
class TryOptions:
    """One request's options, as the Try tab offers them. ``task``: the model's own task ("depth" or
    "normal") or "uncertainty" (a G model's spread over ``samples`` noise draws); ``tile``: None or a
    --tile value ("auto", a size); ``cmap``: depth's colour map; ``frame``: the normals' axes; ``mesh``:
    also build the 3-D mesh of a depth map (GLB)."""

    task: str = "depth"
    processing_res: int = 768
    tile: str | None = None
    cmap: str = "Spectral"
    frame: str = "lotus"
    samples: int = 8
    mesh: bool = True
    model: str | None = None  # one of the app's models (``Service.models``); None: the one loaded now


@dataclass
class TryResult:
    """What one request made, all under ``folder``: ``image`` the colour-mapped map (png; None for a clip),
    ``video`` the colour-mapped clip, ``mesh`` the GLB, ``files`` every file to download (maps, sidecars,
    the mesh's PLY and GLB), ``record`` the map's sidecar, ``seconds`` the prediction alone."""

    folder: Path
    kind: str
    image: Path | None = None
    video: Path | None = None
    mesh: Path | None = None
    files: list[Path] = field(default_factory=list)
    record: dict = field(default_factory=dict)
    seconds: float = 0.0


class ProgressReporter(Reporter):
    """A run's events turned into ``tell(fraction or None, text)`` calls (the page's progress bar)."""

    def __init__(self, tell: Callable[[float | None, str], None]):
        self.tell = tell

    def progress(self, label: str, total: int | None) -> Progress:
        tell = self.tell

        class Bar(Progress):
            done = 0

            def advance(self, n: int = 1) -> None:
                self.done += n
                self.update(self.done, total)

            def update(self, completed: int, total_now: int | None = None) -> None:
                n = total_now or total
                tell(completed / n if n else None, f"{label}: {completed}" + (f" of {n}" if n else ""))

        return Bar()

    def note(self, text: str) -> None:
        self.tell(None, text)


class Service:
    """The app's predictor: the first of its models, loaded on construction; a request for another model
    loads that one in its place (one resident at a time, so memory stays that of one model). ``predict`` takes
    one upload at a time (a lock: requests that come together wait their turn, which the page's queue also
    bounds)."""

    def __init__(self, options: AppOptions = AppOptions(), reporter: Reporter = Reporter(), root: Path | None = None):
        self.options = options
        limit_malloc_arenas()  # before the page's threads allocate: flat memory over many requests
        given = [str(m) for m in options.models]
        specs = given or [registry.DEFAULT_MODEL["depth"], registry.DEFAULT_MODEL["normal"]]
        tasks = [None] * len(given) or ["depth", "normal"]
        self.refs = {spec: registry.resolve(spec, task) for spec, task in zip(specs, tasks)}  # unknown: fails now
        self.lock = threading.Lock()
        self.spec = specs[0]
        self.predictor = self._load(self.spec, reporter)
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="lotus-app-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.folders: deque[Path] = deque()

    @property
    def models(self) -> list[str]:
        """The models the page offers, as given (names, hub ids or folders)."""
        return list(self.refs)

    @property
    def tasks(self) -> list[str]:
        """What the Try tab offers for the model loaded now."""
        return self.tasks_of(self.spec)

    def tasks_of(self, spec: str) -> list[str]:
        """A model's task, and uncertainty for a G model (D models take no noise): from the loaded predictor, or
        from what the model's entry says before it is loaded (a model whose metadata says nothing: depth)."""
        if spec == self.spec and self.predictor is not None:
            task, family = self.predictor.task, self.predictor.family
        else:
            entry = self.refs[spec].entry
            task, family = entry.task or "depth", entry.family
        return [task] + (["uncertainty"] if family == "g" else [])

    def _load(self, spec: str, reporter: Reporter):
        o = self.options
        return load_predictor(self.refs[spec], None, o.device, o.dtype, reporter, processing_res=o.processing_res)

    def use(self, spec: str | None, reporter: Reporter = Reporter()) -> None:
        """Make ``spec`` (one of ``models``; None: the one loaded now) the loaded model, the previous one freed
        first. Call with ``lock`` held."""
        if spec is None or spec == self.spec:
            return
        if spec not in self.refs:
            raise UsageError(f"model {spec!r} is not one this app serves", f"choose {' or '.join(self.refs)}")
        self.predictor = None
        cpu.release_memory()  # the old weights go back to the system before the new ones load
        self.spec, self.predictor = spec, self._load(spec, reporter)

    def describe(self) -> dict:
        return self.predictor.describe()

    def request(self, upload: Path, o: TryOptions, out: Path) -> PredictRequest:
        """The `lotus depth|normal|uncertainty` request this page request is (also how the docs explain it)."""
        if o.task not in self.tasks:
            raise UsageError(
                f"task {o.task!r} is not offered by {self.predictor.source}",
                f"choose {' or '.join(self.tasks)}",
            )
        uncertainty = o.task == "uncertainty"
        return PredictRequest(
            self.predictor.task,
            (str(upload),),
            out=out,
            model=self.spec,
            fmt=VIDEO_FORMATS if is_video(Path(upload)) else IMAGE_FORMATS,
            processing_res=o.processing_res,
            device=self.options.device,
            dtype=self.options.dtype,
            cmap=o.cmap if not uncertainty else "inferno",
            max_pixels=self.options.limits.max_pixels,
            frame=o.frame,
            tile=o.tile,
            uncertainty=uncertainty,
            samples=o.samples,
            stabilize=self.predictor.task == "depth" and not uncertainty,
        )

    def predict(self, upload: Path, o: TryOptions = TryOptions(), tell: Callable | None = None) -> TryResult:
        """Predict the uploaded file ``upload`` with ``o``; raises InputError (or UsageError) with a message for
        the page when the upload or the options cannot be used. The upload is checked before it is decoded."""
        upload = Path(upload)
        check_upload(upload, self.options.limits)
        tell = tell or (lambda fraction, text: None)
        items, problems = sources.expand([str(upload)], exts=sources.MEDIA_EXTS)
        if problems or not items:
            raise problems[0] if problems else InputError(f"{upload.name}: not an image or video file")
        if o.model is not None and o.model not in self.refs:
            raise UsageError(f"model {o.model!r} is not one this app serves", f"choose {' or '.join(self.refs)}")
        reporter = ProgressReporter(tell)
        with self.lock:
            if o.model not in (None, self.spec):
                tell(None, f"loading {o.model}")
                self.use(o.model, reporter)
            folder = self._new_folder()
            p = plan(self.request(upload, o, folder / "maps"))
            if p.ensemble:
                self.predictor.ensemble_seeds(p.opts, p.ensemble)  # a D model without --tta is refused here
            batch = make_predict(self.predictor, p.tiles, p.ensemble)
            t0 = time.perf_counter()
            summary = run_files(p, self.predictor, batch, items, reporter, Summary())
            seconds = time.perf_counter() - t0
        if summary.failures:
            raise InputError(_page_text(summary.failures[0].error, upload))
        return self._result(folder, items[0], p, o, upload, seconds, tell)

    def _result(self, folder: Path, item, p, o: TryOptions, upload: Path, seconds: float, tell) -> TryResult:
        maps = folder / "maps"
        base = maps / item.key
        record = read_record(base.with_name(base.name + ".json")) or {}
        kind = record.get("kind") or self.predictor.kind
        files = sorted(f for f in maps.iterdir() if f.is_file())
        if is_video(upload):
            return TryResult(folder, kind, video=base.with_name(base.name + ".mp4"), files=files, record=record,
                             seconds=seconds)  # fmt: skip
        result = TryResult(folder, kind, image=base.with_name(base.name + ".png"), files=files, record=record)
        result.seconds = seconds
        if o.mesh and kind in DEPTH_KINDS and importlib.util.find_spec("open3d") is not None:  # pointcloud extra
            tell(None, "building the mesh")
            mesh_dir = folder / "mesh"
            req = PointcloudRequest(
                inputs=(str(upload),),
                out=mesh_dir,
                depth=base.with_name(base.name + ".npy"),
                normals="depth",
                mesh=True,
                mesh_format="glb",
                max_pixels=self.options.limits.max_pixels,
            )
            cloud = pointclouds(req)
            if cloud.failures:
                raise InputError(_page_text(cloud.failures[0].error, upload))
            glb = sorted(mesh_dir.rglob("*.glb"))
            result.mesh = glb[0] if glb else None
            result.files += sorted(f for f in mesh_dir.iterdir() if f.is_file() and f.suffix != ".json")
        return result

    def _new_folder(self) -> Path:
        """A fresh folder for one request; the oldest beyond ``keep`` are removed."""
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.root))
        self.folders.append(folder)
        while len(self.folders) > max(1, self.options.keep):
            shutil.rmtree(self.folders.popleft(), ignore_errors=True)
        return folder

    def close(self) -> None:
        """Remove every request folder (the app is stopping)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _page_text(error: str | None, upload: Path) -> str:
    """A failed item's message for the page: the upload's temporary path shortened to its name."""
    return (error or "prediction failed").replace(str(upload), upload.name)
