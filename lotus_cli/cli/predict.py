"""`lotus depth`, `lotus normal` and `lotus uncertainty`: images, videos and raw pipes -> maps, through the shared
predictor."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from ..errors import InputError, LotusError, UsageError
from . import app, console, escape, fail, load_predictor, say, stdout_closed, write_record

# The option types are shared with `lotus pointcloud` and `lotus eval` (options.py); re-exported here for
# the modules that import them from this one.
from .options import (
    Batch,
    Cmap,
    Compile,
    CpusPerWorker,
    Device,
    Dtype,
    End,
    EngineOpt,
    ExrCompression,
    ExrHalf,
    Format,
    Fps,
    Frame,
    GpusPerWorker,
    Inputs,
    Json,
    Latent,
    MaxFrames,
    MaxMemory,
    MaxPixels,
    Model,
    NormalOutputKind,
    Out,
    OutputKind,
    Overlap,
    ProcRes,
    Raw,
    RawOut,
    RayAddress,
    Resample,
    Samples,
    Seed,
    ShardOpt,
    Skip,
    SpreadCmap,
    SpreadRawOut,
    Stabilize,
    Start,
    Task,
    Tile,
    TileRes,
    Tta,
    Workers,  # noqa: F401
    check_output_kind,
)


@dataclass(frozen=True)
class PredictArgs:
    """The options of one `lotus depth|normal|uncertainty` call, as given on the command line.

    Every field has the commands' default, so a command passes only the options it has (`normal` has no
    --cmap or --stabilize). A new flag is a field here, a parameter of the commands that take it, and a
    keyword in their call to ``_predict``."""

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
    json: bool = False
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
    compile_mode: str = "off"  # --compile: off | on | auto (lotus_cli/compile.py)
    shard: str | None = None  # scale-out (README "Many GPUs and machines"): see _scale_out
    engine: str = "local"
    ray_address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    @property
    def command(self) -> str:
        return "uncertainty" if self.uncertainty else self.task


BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off")


def _check(a: PredictArgs) -> None:
    """Checks of the options that no library object makes (UsageError naming the flag)."""
    if a.max_pixels < 0:
        raise UsageError(f"--max-pixels must be >= 0, not {a.max_pixels}", "0 means no limit")
    if a.uncertainty and a.samples < (1 if a.tta == "flip" else 2):
        raise UsageError(
            f"--samples must be at least 2, not {a.samples}: a spread needs two predictions or more",
            "e.g. --samples 8 (or --tta flip, which adds the mirrored view)",
        )
    check_output_kind(a.output_kind, a.task)
    if a.compile_mode not in ("auto", "on", "off"):
        raise UsageError(f"--compile must be auto, on or off, not {a.compile_mode!r}")
    if a.raw is not None:
        given = [
            f
            for f, on in (("--out", a.out is not None), ("--json", a.json), ("--skip-existing", a.skip_existing))
            if on
        ]
        if given:
            raise UsageError(
                f"--raw writes maps to stdout and no files: {', '.join(given)} cannot apply",
                f"drop {', '.join(given)}, or drop --raw to write files",
            )
        if [i for i in a.inputs if i != "-"]:
            raise UsageError("--raw reads frames from stdin; give no input paths (or just -)")
        from ..run.raw import parse_size

        parse_size(a.raw)  # a bad WIDTHxHEIGHT is a usage error before any model is looked up
    flags = [i for i in a.inputs if i.lower() in BOOLEAN_WORDS and not Path(i).exists()]
    if flags:
        raise UsageError(
            f"input {flags[0]!r} does not exist and looks like a flag's value",
            "flags take no value: write --skip-existing (or --json) alone",
        )


def _predict(a: PredictArgs) -> None:
    """Validate everything once, before any model loads; then load, run and report."""
    try:
        from ..io import sources
        from ..io.atomic import check_out_dir
        from ..io.formats import Style, parse_formats
        from ..io.video import FrameSelect
        from ..io.visualize import colormap_lut
        from ..model import registry
        from ..model.predictor import EnsembleOptions, PredictOptions
        from ..run.made import OutputSpec, VideoSpec

        _check(a)
        opts = PredictOptions(
            processing_res=a.processing_res,
            resample=a.resample,
            latent=a.latent,
            seed=a.seed,
            batch_size=a.batch_size,
            frame=a.frame,
        )
        ensemble = EnsembleOptions(a.samples, a.tta) if a.uncertainty else None
        tiles = _tile_options(a)
        video = VideoSpec(FrameSelect(a.fps, a.start, a.end, a.max_frames), a.stabilize)
        colormap_lut(a.cmap)
        out_dir = a.out if a.out is not None else Path(f"lotus-{a.command}")
        output = OutputSpec(
            out_dir,
            parse_formats(a.fmt),
            Style(a.cmap, exr_half=a.exr_half, exr_compression=a.exr_compression),
            a.skip_existing,
        )
        spec = a.model or (registry.DEFAULT_G_MODEL[a.task] if ensemble else None)
        ref = registry.resolve(
            spec, a.task, a.output_kind
        )  # an unknown or wrong-task model fails before inputs are read
        if a.raw is None:
            _scale_out(a, ref, opts, ensemble, tiles, video, output)  # returns only when not scaled out
            check_out_dir(out_dir)
            if not a.inputs:
                raise UsageError("no inputs given", "pass files, folders, globs, or - to read paths from stdin")
            items, problems = sources.expand(
                a.inputs,
                exts=sources.MEDIA_EXTS,
                exclude=(out_dir,),
                on_warning=lambda w: say(f"warning: {w}", "yellow"),
            )
    except LotusError as e:
        fail(e)
    if a.raw is None:
        for p in problems:
            _report_problem(a, p)
        if not items:
            say("error: no usable inputs", "red")
            raise typer.Exit(1 if problems else 2)
    try:
        ref = registry.fetch(ref)  # a first download shows its own progress bars; nothing is read before
        registry.check_known(ref, a.task)
        _check_processing_res(a, ref)
    except LotusError as e:
        fail(e)
    if a.raw is not None:
        return _raw(a, ref, opts, tiles, ensemble)
    predictor = load_predictor(ref, a.task, a.device, a.dtype, processing_res=a.processing_res)
    _compile(a, predictor, items)
    if ensemble:
        try:
            predictor.ensemble_seeds(opts, ensemble)  # a D model without --tta is refused before any input is read
        except LotusError as e:
            fail(e)
    predict = _predict_fn(predictor, tiles, ensemble)
    _run(
        a,
        predictor,
        items,
        output,
        opts,
        video,
        len(problems),
        predict,
        "uncertainty" if ensemble else None,
        _changing_options(a, tiles, ensemble),
    )


def _changing_options(a: PredictArgs, tiles, ensemble) -> dict:
    """The tiling and ensemble options that change an output, for --skip-existing to compare with a sidecar's."""
    out = {}
    if tiles:
        out.update(tile=a.tile, overlap=a.overlap, tile_res=a.tile_res, max_memory=a.max_memory)
    if ensemble:
        out.update(samples=a.samples, tta=a.tta)
    return out


def _scale_out(a: PredictArgs, ref, opts, ensemble, tiles, video, output) -> None:
    """--shard, torchrun, --engine ray, or URL inputs / --out: run through lotus_cli.distributed, report and
    exit. Returns (nothing done) for a plain run. Scaled-out runs always resume: an item is skipped when
    --skip-existing would keep its outputs, else redone with a `redone:` line saying why."""
    import functools

    from ..io import sources
    from ..scale.dispatch import Scale, dispatch, wanted
    from ..scale.worker import Job

    scale = Scale(a.shard, a.engine, a.ray_address, a.workers, a.gpus_per_worker, a.cpus_per_worker)
    if not wanted(scale, a.inputs, a.out):
        return
    kind = "uncertainty" if ensemble else ref.entry.kind
    job = Job(
        ref,
        a.task,
        output,
        opts,
        video,
        a.device,
        a.dtype,
        a.max_pixels,
        "uncertainty" if ensemble else None,
        functools.partial(_predict_fn, tiles=tiles, ensemble=ensemble),
        _changing_options(a, tiles, ensemble),
    )
    counts = {"problems": 0}

    def on_problem(p):
        counts["problems"] += 1
        _report_problem(a, p)

    def on_result(r, name):
        counts[r.status] = counts.get(r.status, 0) + 1
        status.update(
            f"{a.task}: {counts.get('done', 0)} done, {counts.get('skipped', 0)} skipped, "
            f"{counts.get('failed', 0)} failed"
        )
        if r.redone:  # say() escapes what it prints
            say(f"redone: {name}: {r.redone}", "yellow")
        if r.status == "failed":
            say(f"failed: {r.error}", "red")
        _emit(a, {**r.record(kind), "input": name})

    t0 = time.perf_counter()
    try:
        with console().status(f"{a.task}: listing inputs", spinner="dots") as status:
            s = dispatch(
                job,
                list(a.inputs or ()),
                a.out or output.out_dir,
                scale,
                exts=sources.MEDIA_EXTS,
                on_result=on_result,
                on_problem=on_problem,
                load_predictor=load_predictor,
                on_warning=lambda w: say(f"warning: {w}", "yellow"),
            )
    except KeyboardInterrupt:
        say("interrupted: finished outputs are complete; rerun the same command to finish the rest", "yellow")
        raise typer.Exit(130) from None
    except LotusError as e:
        fail(e)
    failed = s.failed + counts["problems"]
    if not (s.done or s.skipped or failed):
        say("error: no usable inputs" if a.inputs else "error: no inputs given", "red")
        raise typer.Exit(2)
    say(
        f"{s.done} done, {s.skipped} skipped, {failed} failed in {time.perf_counter() - t0:.1f} s -> "
        f"{a.out or output.out_dir}",
        "red" if failed else "green",
    )
    raise typer.Exit(1 if failed else 0)


def _compile(a: PredictArgs, predictor, items=None) -> None:
    """--compile: compile where it pays; one line saying what was done (or why not, when it was asked for)."""
    from ..io.sources import is_video
    from ..model.compile import compile_predictor

    stream = items is None or any(is_video(i.path) for i in items)  # a video or a pipe: long, length unknown
    ok, reason = compile_predictor(predictor, a.compile_mode, n_items=None if stream else len(items), is_video=stream)
    if ok or a.compile_mode == "on":
        say(reason, "dim" if ok else "yellow")


def _check_processing_res(a: PredictArgs, ref) -> None:
    """The VAE halves an image once per level and needs at least one latent cell: a processed side below its
    pixels per latent cell (8 for Stable Diffusion 2, from the checkpoint's vae/config.json) cannot run. The
    UNet runs at any latent size (1 x 1 included). Inputs whose short side falls below it at a valid
    --processing-res fail one by one (``_predict_fn``)."""
    from ..model.weights import pixels_per_latent

    need = pixels_per_latent(ref.folder)
    for flag_, res in (("--processing-res", a.processing_res), ("--tile-res", a.tile_res or 0)):
        if 0 < res < need:
            raise UsageError(
                f"{flag_} {res} is below the model's minimum of {need} px (one latent cell of its VAE)",
                f"use {flag_} {need} or more (Lotus was trained at 768), or 0 for the native size"
                if flag_ == "--processing-res"
                else f"use {flag_} {need} or more",
            )


def _tile_options(a: PredictArgs):
    """TileOptions from --tile/--overlap/--tile-res/--max-memory (validated), or None without --tile."""
    from ..model.tiling import TileOptions

    if a.tile is None:
        for name, value, default in (
            ("--tile-res", a.tile_res, None),
            ("--max-memory", a.max_memory, "auto"),
            ("--overlap", a.overlap, 0.25),
        ):
            if value != default:
                raise UsageError(f"{name} applies only with --tile", "add --tile auto (or --tile SIZE)")
        return None
    return TileOptions(a.tile, a.overlap, a.tile_res, a.max_memory)


def _predict_fn(predictor, tiles, ensemble):
    """The batch function the runner calls in place of predictor.predict_batch: tiled, ensemble or plain,
    refusing inputs too small for the model with one clear line each."""
    from ..model.predictor import processing_size
    from ..model.tiling import predict_tiled, predict_tiled_ensemble

    if tiles and ensemble:
        run = lambda images, o: predict_tiled_ensemble(predictor, images, o, tiles, ensemble)  # noqa: E731
    elif tiles:
        run = lambda images, o: predict_tiled(predictor, images, o, tiles)  # noqa: E731
    elif ensemble:
        run = lambda images, o: [predictor.predict_ensemble(im, o, ensemble) for im in images]  # noqa: E731
    else:
        run = predictor.predict_batch
    need = predictor.latent_factor

    def predict(images, o):
        h, w = processing_size(*images[0].shape[:2], o.processing_res)  # one processing size per batch
        if min(h, w) < need:
            raise InputError(
                f"{images[0].shape[1]}x{images[0].shape[0]} image is processed at {w}x{h} px, below "
                f"the model's minimum of {need} px a side",
                "raise --processing-res, or pad the image",
            )
        return run(images, o)

    return predict


def _raw(a: PredictArgs, ref, opts, tiles=None, ensemble=None) -> None:
    from ..run.raw import RAW_OUTPUTS, parse_size, run_raw

    try:
        size = parse_size(a.raw)
        outs = ("f32",) if ensemble else RAW_OUTPUTS
        if a.raw_out not in outs:
            raise UsageError(
                f"--raw-out must be {' or '.join(outs)}, not {a.raw_out!r}",
                "uncertainty pipes write the float32 spread" if ensemble else None,
            )
    except LotusError as e:
        fail(e)
    predictor = load_predictor(ref, a.task, a.device, a.dtype, processing_res=a.processing_res)
    _compile(a, predictor, None)
    try:
        if ensemble:
            predictor.ensemble_seeds(opts, ensemble)
        n = run_raw(
            predictor,
            sys.stdin.buffer,
            sys.stdout.buffer,
            size,
            opts,
            a.raw_out,
            stabilize=a.stabilize and not ensemble,
            cmap=a.cmap,
            predict=_predict_fn(predictor, tiles, ensemble),
        )
    except LotusError as e:
        fail(e)
    except BrokenPipeError:
        stdout_closed()
    say(f"{n} frames", "green")
    raise typer.Exit(0)


def _report_problem(a: PredictArgs, problem: InputError) -> None:
    """An input that cannot be used at all: its `failed:` line, and its record in --json mode."""
    say(f"failed: {problem}", "red")
    _emit(
        a,
        {
            "input": problem.subject,
            "status": "failed",
            "error": str(problem),
            "outputs": {},
            "kind": None,
            "frames": 0,
            "seconds": 0.0,
        },
    )


def _emit(a: PredictArgs, record: dict) -> None:
    """One NDJSON line on stdout in --json mode (flushed, so pipelines see it at once)."""
    if a.json:
        write_record(record)


def _run(
    a: PredictArgs,
    predictor,
    items,
    output,
    opts,
    video,
    n_problems,
    predict=None,
    kind=None,
    predict_options: dict | None = None,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..io.sources import is_video
    from ..run.clip import run_video
    from ..run.images import run_images
    from ..run.results import Summary

    t0 = time.perf_counter()
    images = [i for i in items if not is_video(i.path)]
    videos = [i for i in items if is_video(i.path)]
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console(),
        disable=not console().is_terminal,
        transient=True,
    )
    summary = Summary()

    def on_result(r):
        if r.redone:
            progress.console.print(f"[yellow]redone:[/] {escape(r.item.path)}: {escape(r.redone)}")
        if r.status == "failed":
            progress.console.print(f"[red]failed:[/] {escape(r.error)}")
        _emit(a, r.record(kind or predictor.kind))

    try:
        with progress:
            if images:
                bar = progress.add_task(f"{predictor.task} images", total=len(images))

                def on_image(r):
                    progress.advance(bar)
                    on_result(r)

                s = run_images(
                    predictor,
                    images,
                    output,
                    opts,
                    max_pixels=a.max_pixels,
                    on_result=on_image,
                    predict=predict,
                    kind=kind,
                    predict_options=predict_options,
                )
                summary.done, summary.skipped, summary.failed = s.done, s.skipped, s.failed
            for item in videos:
                vbar = progress.add_task(item.path.name, total=None)
                r = run_video(
                    predictor,
                    item,
                    output,
                    opts,
                    video,
                    predict=predict,
                    kind=kind,
                    predict_options=predict_options,
                    on_frame=lambda i, n, vbar=vbar: progress.update(vbar, completed=i, total=n),
                )
                progress.remove_task(vbar)
                summary.add(r)
                on_result(r)
    except KeyboardInterrupt:
        say("interrupted: finished outputs are complete; rerun with --skip-existing to resume", "yellow")
        raise typer.Exit(130) from None
    except LotusError as e:
        fail(e)
    from ..model.compile import compile_status

    if compile_status(predictor):  # compiling failed at the first call: the run went on eagerly
        say(compile_status(predictor), "yellow")
    failed = summary.failed + n_problems
    colour = "red" if failed else "green"
    say(
        f"{summary.done} done, {summary.skipped} skipped, {failed} failed in {time.perf_counter() - t0:.1f} s "
        f"-> {output.out_dir}",
        colour,
    )
    raise typer.Exit(1 if failed else 0)


@app.command()
def depth(
    inputs: Inputs = None,
    out: Out = None,
    model: Model = None,
    output_kind: OutputKind = None,
    fmt: Format = "png,png16",
    exr_half: ExrHalf = False,
    exr_compression: ExrCompression = "zip",
    processing_res: ProcRes = 768,
    resample: Resample = "bilinear",
    latent: Latent = "mean",
    seed: Seed = 0,
    batch_size: Batch = 1,
    device: Device = "auto",
    dtype: Dtype = "auto",
    cmap: Cmap = "Spectral",
    skip_existing: Skip = False,
    max_pixels: MaxPixels = 100_000_000,
    json: Json = False,
    fps: Fps = None,
    start: Start = None,
    end: End = None,
    max_frames: MaxFrames = None,
    stabilize: Stabilize = True,
    raw: Raw = None,
    raw_out: RawOut = "f32",
    tile: Tile = None,
    overlap: Overlap = 0.25,
    tile_res: TileRes = None,
    max_memory: MaxMemory = "auto",
    compile_mode: Compile = "off",
    shard: ShardOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddress = None,
    workers: Workers = 1,
    gpus_per_worker: GpusPerWorker = 0.0,
    cpus_per_worker: CpusPerWorker = 1.0,
):
    """Depth maps for images and videos.

    Default model: depth-d (jingheya/lotus-depth-d-v2-0-disparity, deterministic, best AbsRel in the
    paper), which predicts affine-invariant disparity (1 = near)."""
    _predict(
        PredictArgs(
            "depth",
            inputs=tuple(inputs or ()),
            out=out,
            model=model,
            output_kind=output_kind,
            fmt=fmt,
            exr_half=exr_half,
            exr_compression=exr_compression,
            processing_res=processing_res,
            resample=resample,
            latent=latent,
            seed=seed,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            cmap=cmap,
            skip_existing=skip_existing,
            max_pixels=max_pixels,
            json=json,
            fps=fps,
            start=start,
            end=end,
            max_frames=max_frames,
            stabilize=stabilize,
            raw=raw,
            raw_out=raw_out,
            tile=tile,
            overlap=overlap,
            tile_res=tile_res,
            max_memory=max_memory,
            compile_mode=compile_mode,
            shard=shard,
            engine=engine,
            ray_address=ray_address,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
        )
    )


@app.command()
def normal(
    inputs: Inputs = None,
    out: Out = None,
    model: Model = None,
    output_kind: NormalOutputKind = None,
    fmt: Format = "png,png16",
    exr_half: ExrHalf = False,
    exr_compression: ExrCompression = "zip",
    processing_res: ProcRes = 768,
    resample: Resample = "bilinear",
    latent: Latent = "mean",
    seed: Seed = 0,
    batch_size: Batch = 1,
    device: Device = "auto",
    dtype: Dtype = "auto",
    skip_existing: Skip = False,
    max_pixels: MaxPixels = 100_000_000,
    json: Json = False,
    fps: Fps = None,
    start: Start = None,
    end: End = None,
    max_frames: MaxFrames = None,
    raw: Raw = None,
    raw_out: RawOut = "f32",
    frame: Frame = "lotus",
    tile: Tile = None,
    overlap: Overlap = 0.25,
    tile_res: TileRes = None,
    max_memory: MaxMemory = "auto",
    compile_mode: Compile = "off",
    shard: ShardOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddress = None,
    workers: Workers = 1,
    gpus_per_worker: GpusPerWorker = 0.0,
    cpus_per_worker: CpusPerWorker = 1.0,
):
    """Surface-normal maps for images and videos.

    Default model: normal-d (jingheya/lotus-normal-d-v1-1, deterministic). Normals are unit vectors, by
    default in Lotus's frame: x left, y up, z toward the camera (--frame for others). PNGs hold
    RGB = (n + 1) / 2; there is no colour map and no temporal alignment (those are depth's)."""
    _predict(
        PredictArgs(
            "normal",
            inputs=tuple(inputs or ()),
            out=out,
            model=model,
            output_kind=output_kind,
            fmt=fmt,
            exr_half=exr_half,
            exr_compression=exr_compression,
            processing_res=processing_res,
            resample=resample,
            latent=latent,
            seed=seed,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            skip_existing=skip_existing,
            max_pixels=max_pixels,
            json=json,
            fps=fps,
            start=start,
            end=end,
            max_frames=max_frames,
            stabilize=False,
            raw=raw,
            raw_out=raw_out,
            frame=frame,
            tile=tile,
            overlap=overlap,
            tile_res=tile_res,
            max_memory=max_memory,
            compile_mode=compile_mode,
            shard=shard,
            engine=engine,
            ray_address=ray_address,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
        )
    )


@app.command()
def uncertainty(
    inputs: Inputs = None,
    task: Task = "depth",
    samples: Samples = 8,
    tta: Tta = "none",
    out: Out = None,
    model: Model = None,
    output_kind: OutputKind = None,
    fmt: Format = "png,png16",
    exr_half: ExrHalf = False,
    exr_compression: ExrCompression = "zip",
    processing_res: ProcRes = 768,
    resample: Resample = "bilinear",
    latent: Latent = "mean",
    seed: Seed = 0,
    batch_size: Batch = 4,
    device: Device = "auto",
    dtype: Dtype = "auto",
    cmap: SpreadCmap = "inferno",
    skip_existing: Skip = False,
    max_pixels: MaxPixels = 100_000_000,
    json: Json = False,
    fps: Fps = None,
    start: Start = None,
    end: End = None,
    max_frames: MaxFrames = None,
    raw: Raw = None,
    raw_out: SpreadRawOut = "f32",
    frame: Frame = "lotus",
    tile: Tile = None,
    overlap: Overlap = 0.25,
    tile_res: TileRes = None,
    max_memory: MaxMemory = "auto",
    compile_mode: Compile = "off",
    shard: ShardOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddress = None,
    workers: Workers = 1,
    gpus_per_worker: GpusPerWorker = 0.0,
    cpus_per_worker: CpusPerWorker = 1.0,
):
    """Per-pixel uncertainty of depth or normals (Lotus-G's spread over noise samples).

    Paper Sec. 4.4: run a Lotus-G model several times with different noise and write the spread (depth:
    std of the [0,1] maps; normals: RMS angle in degrees) as x.png / x.16bit.png / x.npy, and the mean
    prediction as x.mean.*. Default model: depth-g, or normal-g with --task normal. With --raw, the
    float32 spread of each frame goes to stdout. --output-kind: disparity or depth (normal with --task normal)."""
    if task not in ("depth", "normal"):
        fail(UsageError(f"--task must be depth or normal, not {task!r}"))
    _predict(
        PredictArgs(
            task,
            inputs=tuple(inputs or ()),
            out=out,
            model=model,
            output_kind=output_kind,
            fmt=fmt,
            exr_half=exr_half,
            exr_compression=exr_compression,
            processing_res=processing_res,
            resample=resample,
            latent=latent,
            seed=seed,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            cmap=cmap,
            skip_existing=skip_existing,
            max_pixels=max_pixels,
            json=json,
            fps=fps,
            start=start,
            end=end,
            max_frames=max_frames,
            stabilize=False,
            raw=raw,
            raw_out=raw_out,
            frame=frame,
            tile=tile,
            overlap=overlap,
            tile_res=tile_res,
            max_memory=max_memory,
            compile_mode=compile_mode,
            shard=shard,
            engine=engine,
            ray_address=ray_address,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            uncertainty=True,
            samples=samples,
            tta=tta,
        )
    )
