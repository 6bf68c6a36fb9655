"""`lotus depth`, `lotus normal` and `lotus uncertainty` as library calls.

A ``PredictRequest`` holds one call's options; ``plan`` validates every one of them and resolves the model
before any input is read or any model loads (a ``UsageError`` names the flag at fault). ``predict`` then
runs the plan in this process: images and videos through the shared predictor (``run_files``), or raw
frames from a pipe (``run_pipe``). Spreading a request over processes and machines is ``scale.dispatch``'s.
Nothing here prints: the run reports through a ``Reporter`` and returns its ``Summary``.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UsageError
from ..io import sources
from ..io.atomic import check_out_dir
from ..io.formats import Style, parse_formats
from ..io.sources import Item, is_video, read_image
from ..io.video import FrameSelect
from ..io.visualize import colormap_lut
from ..io.xmp import auto_projection
from ..model import backends, registry, weights
from ..model.compile import compile_status
from ..model.fallbacks import predict_items, tiled_smaller
from ..model.panorama import PanoramaOptions, predict_panorama
from ..model.predictor import EnsembleOptions, PredictOptions, prepare, processing_size
from ..model.tiling import TileOptions, predict_tiled, predict_tiled_ensemble
from .clip import run_video
from .events import Reporter
from .images import run_images
from .loading import compile_for_run, load_predictor
from .made import OutputSpec, VideoSpec
from .raw import RAW_OUTPUTS, parse_size, run_raw
from .results import ItemResult, Summary

BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off")
PROJECTIONS = ("perspective", "equirect", "auto")


@dataclass(frozen=True)
class PredictRequest:
    """The options of one `lotus depth|normal|uncertainty` call (defaults: the commands'; the docs' usage page
    says what each means). A new option is a field here and, on the command line, one entry of the shared
    vocabulary (cli/options.py)."""

    task: str  # "depth" | "normal"
    inputs: tuple[str, ...] = ()
    out: Path | None = None
    model: str | None = None
    output_kind: str | None = None
    fmt: str = "png,png16"
    exr_half: bool = False
    exr_compression: str = "zip"
    processing_res: int = 768
    resample: str = "bilinear"
    latent: str = "mean"
    seed: int = 0
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    cmap: str = "Spectral"
    skip_existing: bool = False
    max_pixels: int = 100_000_000
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    max_frames: int | None = None
    stabilize: bool = True
    raw: str | None = None
    raw_out: str = "f32"
    frame: str = "lotus"
    tile: str | None = None
    overlap: float = 0.25
    tile_res: int | None = None
    max_memory: str = "auto"
    uncertainty: bool = False  # `lotus uncertainty`: an ensemble of samples x views
    samples: int = 8
    tta: str = "none"
    compile_mode: str = "off"  # --compile: off | on | auto (model/compile.py)
    projection: str = "perspective"  # --projection: perspective | equirect | auto (docs/panoramas.md)
    backend: str | None = None  # --backend: torch | onnxruntime | auto; None: what auto recorded, else torch

    @property
    def command(self) -> str:
        return "uncertainty" if self.uncertainty else self.task

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path(f"lotus-{self.command}")


@dataclass(frozen=True)
class Plan:
    """A validated request: the model it names (resolved, not yet fetched) and the library's option objects.
    ``kind``: "uncertainty" for an ensemble's spread, else None (the model's own kind);
    ``predict_options``: the tiling and ensemble options that change an output (sidecars record them and
    --skip-existing compares them)."""

    request: PredictRequest
    ref: registry.ModelRef
    opts: PredictOptions
    ensemble: EnsembleOptions | None
    tiles: TileOptions | None
    video: VideoSpec
    output: OutputSpec
    kind: str | None
    predict_options: dict


def plan(r: PredictRequest) -> Plan:
    """Check every option and resolve the model, before any input is read or any model loads."""
    _check(r)
    opts = PredictOptions(
        processing_res=r.processing_res,
        resample=r.resample,
        latent=r.latent,
        seed=r.seed,
        batch_size=r.batch_size,
        frame=r.frame,
    )
    ensemble = EnsembleOptions(r.samples, r.tta) if r.uncertainty else None
    tiles = _tile_options(r)
    video = VideoSpec(FrameSelect(r.fps, r.start, r.end, r.max_frames), r.stabilize)
    colormap_lut(r.cmap)
    style = Style(r.cmap, exr_half=r.exr_half, exr_compression=r.exr_compression)
    output = OutputSpec(r.out_dir, parse_formats(r.fmt), style, r.skip_existing)
    spec = r.model or (registry.DEFAULT_G_MODEL[r.task] if ensemble else None)
    ref = backends.resolve_model(spec, r.task, r.output_kind)  # an unknown or wrong-task model fails before inputs
    changing = {}
    if tiles:
        changing.update(tile=r.tile, overlap=r.overlap, tile_res=r.tile_res, max_memory=r.max_memory)
    if ensemble:
        changing.update(samples=r.samples, tta=r.tta)
    if r.projection != "perspective":
        changing.update(projection=r.projection)
    kind = "uncertainty" if ensemble else None
    return Plan(r, ref, opts, ensemble, tiles, video, output, kind, changing)


def _check(r: PredictRequest) -> None:
    """Checks of the options that no library object makes (UsageError naming the flag)."""
    if r.max_pixels < 0:
        raise UsageError(f"--max-pixels must be >= 0, not {r.max_pixels}", "0 means no limit")
    if r.uncertainty and r.samples < (1 if r.tta == "flip" else 2):
        raise UsageError(
            f"--samples must be at least 2, not {r.samples}: a spread needs two predictions or more",
            "e.g. --samples 8 (or --tta flip, which adds the mirrored view)",
        )
    registry.check_output_kind(r.output_kind, r.task)
    if r.compile_mode not in ("auto", "on", "off"):
        raise UsageError(f"--compile must be auto, on or off, not {r.compile_mode!r}")
    backends.check(r.backend, r.model, dtype=r.dtype, latent=r.latent, compile_mode=r.compile_mode)
    _check_projection(r)
    if r.raw is not None:
        given = [f for f, on in (("--out", r.out is not None), ("--skip-existing", r.skip_existing)) if on]
        if given:
            raise UsageError(
                f"--raw writes maps to stdout and no files: {', '.join(given)} cannot apply",
                f"drop {', '.join(given)}, or drop --raw to write files",
            )
        if [i for i in r.inputs if i != "-"]:
            raise UsageError("--raw reads frames from stdin; give no input paths (or just -)")
        parse_size(r.raw)  # a bad WIDTHxHEIGHT is a usage error before any model is looked up
    flags = [i for i in r.inputs if i.lower() in BOOLEAN_WORDS and not Path(i).exists()]
    if flags:
        raise UsageError(
            f"input {flags[0]!r} does not exist and looks like a flag's value",
            "flags take no value: write --skip-existing (or --json) alone",
        )


def _check_projection(r: PredictRequest) -> None:
    """--projection: a known value, and none of the options a panorama's views cannot take."""
    if r.projection not in PROJECTIONS:
        raise UsageError(f"--projection must be {', '.join(PROJECTIONS)}, not {r.projection!r}")
    if r.projection == "perspective":
        return
    flag = f"--projection {r.projection}"
    if r.tile is not None:
        raise UsageError(f"--tile does not apply with {flag}", "a panorama is split into views of its own: drop --tile")
    if r.uncertainty:
        raise UsageError(f"lotus uncertainty does not take {flag}", "use lotus depth or lotus normal for panoramas")
    if r.projection == "auto" and r.raw is not None:
        raise UsageError(
            "--projection auto reads each file's metadata; --raw frames have none", "use --projection equirect"
        )


def _tile_options(r: PredictRequest) -> TileOptions | None:
    """TileOptions from --tile/--overlap/--tile-res/--max-memory (validated), or None without --tile."""
    if r.tile is None:
        for name, value, default in (
            ("--tile-res", r.tile_res, None),
            ("--max-memory", r.max_memory, "auto"),
            ("--overlap", r.overlap, 0.25),
        ):
            if value != default:
                raise UsageError(f"{name} applies only with --tile", "add --tile auto (or --tile SIZE)")
        return None
    return TileOptions(r.tile, r.overlap, r.tile_res, r.max_memory)


def check_model(p: Plan) -> registry.ModelRef:
    """Fetch the plan's model (a first download shows the hub's progress bars) and check what the options need
    of it: the VAE halves an image once per level and needs at least one latent cell, so a processed side
    below its pixels per latent cell (8 for Stable Diffusion 2, from vae/config.json) cannot run. Inputs
    whose short side falls below it at a valid --processing-res fail one by one (``make_predict``)."""
    ref = registry.fetch(p.ref)
    registry.check_known(ref, p.request.task)
    need = weights.pixels_per_latent(ref.folder) if (ref.folder / "vae").is_dir() else 1  # ONNX: checked per image
    for flag, res in (("--processing-res", p.request.processing_res), ("--tile-res", p.request.tile_res or 0)):
        if 0 < res < need:
            raise UsageError(
                f"{flag} {res} is below the model's minimum of {need} px (one latent cell of its VAE)",
                f"use {flag} {need} or more (Lotus was trained at 768), or 0 for the native size"
                if flag == "--processing-res"
                else f"use {flag} {need} or more",
            )
    return ref


def make_predict(
    predictor,
    tiles: TileOptions | None,
    ensemble: EnsembleOptions | None,
    projection: str = "perspective",
    rule: str | None = None,
    progress: Callable | None = None,
) -> Callable:
    """The batch function the runners call in place of predictor.predict_batch: panorama, tiled, ensemble or
    plain, refusing inputs too small for the model with one clear line each. ``projection`` "equirect": the
    images are equirectangular panoramas (model/panorama.py); ``rule``: what decided the projection, recorded
    in each sidecar (default: the flag). Out of memory is taken item by item (``model.fallbacks.predict_items``:
    the batch again image by image, then, for a plain prediction, in tiles), so the function gives one result
    per image: a ``Prediction``, or the ``LotusError`` that fails that image alone. ``progress``: told a tiled
    image's plan and each tile done (``tile_progress``). Module-level, so that a partial of it travels to
    scaled-out workers."""
    if projection == "equirect":
        popts = PanoramaOptions(rule=rule or "--projection equirect")
        run = lambda images, o: predict_panorama(predictor, images, o, popts)
    elif tiles and ensemble:
        run = lambda images, o: predict_tiled_ensemble(predictor, images, o, tiles, ensemble, progress)
    elif tiles:
        run = lambda images, o: predict_tiled(predictor, images, o, tiles, progress)
    elif ensemble:
        run = lambda images, o: [predictor.predict_ensemble(im, o, ensemble) for im in images]
    else:
        run = predictor.predict_batch
    if projection == "perspective" and rule:  # --projection auto decided against a panorama: say why
        unnoted = run

        def run(images, o):
            preds = unnoted(images, o)
            for pr in preds:
                pr.extra["projection"] = {"projection": "perspective", "rule": rule}
            return preds

    need = predictor.latent_factor
    plain = projection == "perspective" and not (tiles or ensemble)
    smaller = (lambda rgb, o: tiled_smaller(predictor, rgb, o)) if plain else None

    def predict(images, o):
        h, w = processing_size(*images[0].shape[:2], o.processing_res)  # one processing size per batch
        if min(h, w) < need:
            raise InputError(
                f"{images[0].shape[1]}x{images[0].shape[0]} image is processed at {w}x{h} px, below "
                f"the model's minimum of {need} px a side",
                "raise --processing-res, or pad the image",
            )
        return predict_items(predictor, images, o, run, tiled=smaller)

    return predict


def predict_factory(p: Plan) -> Callable:
    """``make_predict`` with the plan's tiling, ensemble and projection bound: what a worker calls with its
    predictor. Workers see arrays, not files, so --projection auto (a file's metadata) cannot travel."""
    if p.request.projection == "auto":
        raise UsageError(
            "--projection auto reads each file's metadata, which a scaled-out run does not",
            "use --projection equirect (or perspective) with --shard, --engine ray, torchrun or URLs",
        )
    return functools.partial(make_predict, tiles=p.tiles, ensemble=p.ensemble, projection=p.request.projection)


def load(p: Plan, ref: registry.ModelRef, reporter: Reporter, items: list[Item] | None):
    """The plan's predictor, compiled where it pays for ``items`` (None: a pipe), and its batch function. A D
    model asked for an ensemble without --tta is refused here, before any input is read."""
    r = p.request
    backend = backends.check(r.backend, r.model, dtype=r.dtype, latent=r.latent, compile_mode=r.compile_mode)
    predictor = load_predictor(
        ref, r.task, r.device, r.dtype, reporter, processing_res=r.processing_res, backend=backend
    )
    compile_for_run(predictor, r.compile_mode, items, reporter)
    if p.ensemble:
        predictor.ensemble_seeds(p.opts, p.ensemble)
    projection = "equirect" if r.projection == "equirect" else "perspective"  # auto: per file, in run_auto
    return predictor, make_predict(predictor, p.tiles, p.ensemble, projection, progress=tile_progress(reporter))


def tile_progress(reporter: Reporter) -> Callable:
    """A tiled image's plan said up front (tiles, model calls), a bar over its tiles, and once the first calls
    are timed an estimate of the time it takes: a 12 MP photo at --tile 64 runs for minutes."""
    state = {}

    def tell(plan, done: int, total: int) -> None:
        if done == 0:
            calls = -(-total // plan.batch) + 1  # the tiles' batches and the global pass
            (tw, th), (pw, ph) = plan.tile_size[::-1], plan.tile_processing_size[::-1]
            reporter.note(
                f"tiling {plan.width}x{plan.height}: {total} tiles of {tw}x{th} px at {pw}x{ph}, {calls} model calls"
            )
            state.update(bar=reporter.progress("tiles", total), t0=time.perf_counter(), said=False)
            return
        state["bar"].update(done, total)
        if not state["said"] and (done >= plan.batch or done == total) and done < total:
            left = (time.perf_counter() - state["t0"]) / done * (total - done)
            reporter.note(f"tiling: about {left:.0f} s more for this image")
            state["said"] = True
        if done == total:
            state["bar"].close()

    return tell


def predict(request: PredictRequest, reporter: Reporter = Reporter(), stdin=None, stdout=None) -> Summary:
    """Run ``request`` in this process: its inputs' maps written under ``request.out_dir``, or with ``raw``
    frames from ``stdin`` to ``stdout`` (default: this process's). Raises UsageError / ModelError before any
    input is read when the options or the model are wrong; a bad input is a failed result, never an error."""
    p = plan(request)
    if request.raw is not None:
        return run_pipe(p, reporter, stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
    check_out_dir(p.output.out_dir)
    if not request.inputs:
        raise UsageError("no inputs given", "pass files, folders, globs, or - to read paths from stdin")
    items, problems = sources.expand(
        request.inputs, exts=sources.MEDIA_EXTS, exclude=(p.output.out_dir,), on_warning=reporter.warning
    )
    if not items and not problems:
        raise UsageError("no usable inputs", "pass image or video files, or folders that hold them")
    summary = Summary(out=str(p.output.out_dir))
    for problem in problems:
        r = ItemResult.unusable(problem)
        summary.add(r)
        reporter.result(r)
    if not items:
        return summary
    ref = check_model(p)
    predictor, batch = load(p, ref, reporter, items)
    if request.projection == "auto":
        return run_auto(p, predictor, items, reporter, summary)
    return run_files(p, predictor, batch, items, reporter, summary)


def run_auto(p: Plan, predictor, items: list[Item], reporter: Reporter, summary: Summary) -> Summary:
    """--projection auto: each image decided by its file (io/xmp.py), then ``run_files`` once per decision and
    rule, so each sidecar says which rule decided. A video's metadata is not read: it stays perspective."""
    groups: dict[tuple[str, str], list[Item]] = {}
    for item in items:
        decided = (
            ("perspective", "auto: a video's metadata is not read (--projection equirect for a 360 clip)")
            if is_video(item.path)
            else auto_projection(item.path)
        )
        groups.setdefault(decided, []).append(item)
    for (projection, rule), group in groups.items():
        batch = make_predict(predictor, p.tiles, p.ensemble, projection, rule, tile_progress(reporter))
        run_files(p, predictor, batch, group, reporter, summary)
    return summary


def run_files(p: Plan, predictor, batch: Callable, items: list[Item], reporter: Reporter, summary: Summary) -> Summary:
    """Images (batched by processing size), then each video, through ``predictor``; every result is added to
    ``summary`` and reported as it finishes."""
    t0 = time.perf_counter()
    images = [i for i in items if not is_video(i.path)]
    videos = [i for i in items if is_video(i.path)]

    def report(r: ItemResult) -> None:
        summary.add(r)
        reporter.result(r)

    common = dict(predict=batch, kind=p.kind, predict_options=p.predict_options)
    if images:
        bar = reporter.progress(f"{predictor.task} images", len(images))

        def on_image(r: ItemResult) -> None:
            bar.advance()
            report(r)

        limit, read = p.request.max_pixels, image_reader(p, predictor)
        run_images(predictor, images, p.output, p.opts, max_pixels=limit, on_result=on_image, read=read, **common)
    for item in videos:
        bar = reporter.progress(item.path.name, None)
        r = run_video(predictor, item, p.output, p.opts, p.video, on_frame=bar.update, **common)
        bar.close()
        report(r)
    status = compile_status(predictor) if predictor.unet is not None else None  # ONNX Runtime: no modules
    if status:  # compiling failed at the first call: the run went on eagerly
        reporter.warning(status)
    summary.seconds += time.perf_counter() - t0
    return summary


def image_reader(p: Plan, predictor) -> Callable | None:
    """On a GPU, the reader threads make each image of a plain prediction into the model's input (scaled and
    resized: ``model.predictor.prepare``), beside the model instead of in its thread between two calls. None
    (the runner's own reader) on a CPU, whose cores are the model's, and for tiles, ensembles and panoramas,
    which take the image whole."""
    plain = p.tiles is None and p.ensemble is None and p.request.projection == "perspective"
    if not plain or predictor.device.type == "cpu":
        return None
    res, limit = p.opts.processing_res, p.request.max_pixels
    return lambda item: prepare(read_image(item.path, limit), res)


def run_pipe(p: Plan, reporter: Reporter, stdin, stdout) -> Summary:
    """--raw: rgb24 frames of the given size on ``stdin`` -> one map per frame on ``stdout``."""
    r = p.request
    size = parse_size(r.raw)
    outs = ("f32",) if p.ensemble else RAW_OUTPUTS
    if r.raw_out not in outs:
        raise UsageError(
            f"--raw-out must be {' or '.join(outs)}, not {r.raw_out!r}",
            "uncertainty pipes write the float32 spread" if p.ensemble else None,
        )
    predictor, batch = load(p, check_model(p), reporter, None)
    n = run_raw(
        predictor,
        stdin,
        stdout,
        size,
        p.opts,
        r.raw_out,
        stabilize=r.stabilize and not p.ensemble,
        cmap=r.cmap,
        predict=batch,
    )
    return Summary(done=n, out="stdout")
