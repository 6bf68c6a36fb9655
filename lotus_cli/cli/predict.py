"""`lotus depth` and `lotus normal`: images and videos -> maps, through the shared predictor."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LotusError, UsageError
from . import app, console, escape, fail, load_predictor, say

# ------------------------------------------------------------------------------- shared options

Inputs = Annotated[Optional[list[str]], typer.Argument(
    help="Image or video files, folders (searched recursively), globs, or - to read paths from stdin "
         "(one per line).",
    show_default=False)]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder; the input tree is mirrored "
                                             "under it. Default: ./lotus-<task>.", show_default=False)]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name (see `lotus models list`), "
                                              "hub id (owner/name) or local checkpoint folder.", show_default=False)]
Format = Annotated[str, typer.Option("--format", "-f", help="Comma list of png (colour map), png16 (16-bit), "
                                     "npy (raw float32), or all. A JSON sidecar is always written.")]
ProcRes = Annotated[int, typer.Option("--processing-res", help="Long side fed to the model, in pixels "
                                      "(0 = native size).")]
Resample = Annotated[str, typer.Option("--resample", help="Back to the input size: bilinear, or nearest "
                                       "(the reference's nearest-exact).")]
Latent = Annotated[str, typer.Option("--latent", help="Image latent: mean of the VAE posterior "
                                     "(deterministic), or sample (the reference's posterior sample).")]
Seed = Annotated[int, typer.Option("--seed", help="Noise seed for G models; the same seed gives the same "
                                   "result for an image whatever the batch or order.")]
Batch = Annotated[int, typer.Option("--batch-size", "-b", help="Images of the same processing size per "
                                    "model call.")]
Device = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (fp16 on CUDA/MPS, fp32 on CPU), fp32, fp16, bf16.")]
Cmap = Annotated[str, typer.Option("--cmap", help="Matplotlib colour map for depth PNGs (near is warm "
                                   "with Spectral).")]
Skip = Annotated[bool, typer.Option("--skip-existing", help="Skip inputs whose outputs all exist "
                                    "(resume an interrupted run).")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help="Refuse images above this many pixels "
                                        "(0 = no limit).")]
Json = Annotated[bool, typer.Option("--json", help="Write one JSON record per finished input on stdout "
                                    "(input, outputs, kind, frames, seconds, status, error); nothing else goes "
                                    "to stdout.")]
Fps = Annotated[Optional[float], typer.Option("--fps", help="Videos: resample to this many frames per second, "
                                              "by timestamp, never above the source rate (default: the source "
                                              "rate).", show_default=False)]
Start = Annotated[Optional[float], typer.Option("--start", help="Videos: first second to process.",
                                                show_default=False)]
End = Annotated[Optional[float], typer.Option("--end", help="Videos: last second to process.", show_default=False)]
MaxFrames = Annotated[Optional[int], typer.Option("--max-frames", help="Videos: stop after this many frames.",
                                                  show_default=False)]
Frame = Annotated[str, typer.Option("--frame", help="Camera frame of the normals written: lotus (x left, y up, "
                                    "z toward the camera), opengl (x right, y up, z toward the camera; Blender) or "
                                    "opencv (x right, y down, z forward).")]
Raw = Annotated[Optional[str], typer.Option("--raw", help="Pipe mode: read raw RGB24 frames of WIDTHxHEIGHT "
                                           "from stdin and write raw maps to stdout (see --raw-out); no files.",
                                           show_default=False)]
RawOut = Annotated[str, typer.Option("--raw-out", help="Pipe mode output per frame: f32 (float32 map), u16 "
                                     "(uint16, [0,1] x 65535) or rgb (colour map, rgb24).")]
Stabilize = Annotated[bool, typer.Option("--stabilize/--no-stabilize", help="Videos, depth: fit each frame's "
                                         "scale and shift to a running reference on stable pixels, so a surface "
                                         "keeps its value across frames.")]
Tile = Annotated[Optional[str], typer.Option("--tile", help="High-resolution inputs: a global pass at "
                                           "--processing-res for the layout plus overlapping tiles for detail, "
                                           "blended seam-free at full resolution. auto (tile size from the image size "
                                           "and --max-memory; no tiles when the global pass sees nearly every pixel) "
                                           "or the tile side in input pixels. Off by default.",
                                           show_default=False)]
Overlap = Annotated[float, typer.Option("--overlap", help="With --tile: fraction of a tile shared with each "
                                        "neighbour (0 .. 0.5).")]
TileRes = Annotated[Optional[int], typer.Option("--tile-res", help="With --tile: long side of a tile as fed to "
                                                "the model (default: --processing-res, or 768 when that is 0).",
                                                show_default=False)]
MaxMemory = Annotated[str, typer.Option("--max-memory", help="With --tile: memory budget for the weights plus "
                                        "one batch of tiles, e.g. 6G; auto = the weights plus half the free "
                                        "device memory.")]


@dataclass(frozen=True)
class Args:
    """The options of one `lotus depth|normal|uncertainty` call, as given."""

    task: str
    inputs: list
    out: Optional[Path]
    model: Optional[str]
    fmt: str
    processing_res: int
    resample: str
    latent: str
    seed: int
    batch_size: int
    device: str
    dtype: str
    cmap: str
    skip_existing: bool
    max_pixels: int
    json: bool
    fps: Optional[float]
    start: Optional[float]
    end: Optional[float]
    max_frames: Optional[int]
    stabilize: bool
    raw: Optional[str] = None
    raw_out: str = "f32"
    samples: int = 0  # > 0: `lotus uncertainty`
    tta: str = "none"
    frame: str = "lotus"
    tile: Optional[str] = None
    overlap: float = 0.25
    tile_res: Optional[int] = None
    max_memory: str = "auto"
    shard: Optional[str] = None  # scale-out options: see _scale_out
    engine: str = "local"
    ray_address: Optional[str] = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0


def _predict(a: Args) -> None:
    """Validate everything once, before any model loads; then load, run and report."""
    try:
        from .. import sinks, sources
        from ..models import DEFAULT_G_MODEL, resolve
        from ..predictor import EnsembleOptions, PredictOptions
        from ..runner import OutputSpec, VideoSpec
        from ..video import FrameSelect
        from ..visualize import colormap_lut

        opts = PredictOptions(processing_res=a.processing_res, resample=a.resample, latent=a.latent, seed=a.seed,
                              batch_size=a.batch_size, frame=a.frame)
        ensemble = EnsembleOptions(a.samples, a.tta) if a.samples else None
        tiles = _tile_options(a)
        if a.max_pixels < 0:
            raise UsageError(f"--max-pixels must be >= 0, not {a.max_pixels}", "0 means no limit")
        video = VideoSpec(FrameSelect(a.fps, a.start, a.end, a.max_frames), a.stabilize)
        colormap_lut(a.cmap)
        out_dir = a.out if a.out is not None else Path("lotus-uncertainty" if ensemble else f"lotus-{a.task}")
        output = OutputSpec(out_dir, sinks.parse_formats(a.fmt), sinks.Style(cmap=a.cmap), a.skip_existing)
        model = a.model or (DEFAULT_G_MODEL[a.task] if ensemble else None)
        resolve(model, a.task)  # an unknown or wrong-task model fails before inputs are read
        if a.raw is not None:
            return _raw(a, opts, tiles)
        _scale_out(a, model, opts, ensemble, tiles, video, output)  # returns only when not scaled out
        sinks.check_out_dir(out_dir)
        if not a.inputs:
            raise UsageError("no inputs given", "pass files, folders, globs, or - to read paths from stdin")
        items, problems = sources.expand(a.inputs, exts=sources.MEDIA_EXTS)
    except LotusError as e:
        fail(e)
    for p in problems:
        say(f"failed: {p}", "red")
        _emit(a, {"input": p.subject, "status": "failed", "error": str(p), "outputs": {},
                  "kind": None, "frames": 0, "seconds": 0.0})
    if not items:
        say("error: no usable inputs", "red")
        raise typer.Exit(1 if problems else 2)
    predictor = load_predictor(model, a.task, a.device, a.dtype)
    if ensemble:
        try:
            predictor.ensemble_seeds(opts, ensemble)  # a D model without --tta is refused before any input is read
        except LotusError as e:
            fail(e)
    predict = _predict_fn(predictor, tiles, ensemble)
    _run(a, predictor, items, output, opts, video, len(problems), predict, "uncertainty" if ensemble else None)


def _tile_options(a: Args):
    """TileOptions from --tile/--overlap/--tile-res/--max-memory (validated), or None without --tile."""
    from ..tiling import TileOptions

    if a.tile is None:
        for name, value, default in (("--tile-res", a.tile_res, None), ("--max-memory", a.max_memory, "auto"),
                                     ("--overlap", a.overlap, 0.25)):
            if value != default:
                raise UsageError(f"{name} applies only with --tile", "add --tile auto (or --tile SIZE)")
        return None
    return TileOptions(a.tile, a.overlap, a.tile_res, a.max_memory)


def _predict_fn(predictor, tiles, ensemble):
    """The batch function the runner calls in place of predictor.predict_batch (None: that one)."""
    from ..tiling import predict_tiled, predict_tiled_ensemble

    if tiles and ensemble:
        return lambda images, o: predict_tiled_ensemble(predictor, images, o, tiles, ensemble)
    if tiles:
        return lambda images, o: predict_tiled(predictor, images, o, tiles)
    if ensemble:
        return lambda images, o: [predictor.predict_ensemble(im, o, ensemble) for im in images]
    return None


def _raw(a: Args, opts, tiles=None) -> None:
    from ..runner import RAW_OUTPUTS, parse_size, run_raw

    size = parse_size(a.raw)
    if a.raw_out not in RAW_OUTPUTS:
        fail(UsageError(f"--raw-out must be one of {', '.join(RAW_OUTPUTS)}, not {a.raw_out!r}"))
    if [i for i in (a.inputs or []) if i != "-"]:
        fail(UsageError("--raw reads frames from stdin; give no input paths (or just -)"))
    predictor = load_predictor(a.model, a.task, a.device, a.dtype)
    try:
        n = run_raw(predictor, sys.stdin.buffer, sys.stdout.buffer, size, opts, a.raw_out,
                    stabilize=a.stabilize, cmap=a.cmap, predict=_predict_fn(predictor, tiles, None))
    except LotusError as e:
        fail(e)
    except BrokenPipeError:
        raise typer.Exit(0)
    say(f"{n} frames", "green")
    raise typer.Exit(0)


def _emit(a: Args, record: dict) -> None:
    """One NDJSON line on stdout in --json mode (flushed, so pipelines see it at once)."""
    if a.json:
        import json

        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def _run(a: Args, predictor, items, output, opts, video, n_problems, predict=None, kind=None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..runner import Summary, run_images, run_video
    from ..sources import is_video

    t0 = time.perf_counter()
    images = [i for i in items if not is_video(i.path)]
    videos = [i for i in items if is_video(i.path)]
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console(), disable=not console().is_terminal, transient=True)
    summary = Summary()

    def on_result(r):
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

                s = run_images(predictor, images, output, opts, max_pixels=a.max_pixels, on_result=on_image,
                               predict=predict, kind=kind)
                summary.done, summary.skipped, summary.failed = s.done, s.skipped, s.failed
            for item in videos:
                vbar = progress.add_task(item.path.name, total=None)
                r = run_video(predictor, item, output, opts, video, predict=predict, kind=kind,
                              on_frame=lambda i, n, vbar=vbar: progress.update(vbar, completed=i, total=n))
                progress.remove_task(vbar)
                summary.add(r)
                on_result(r)
    except KeyboardInterrupt:
        say("interrupted: finished outputs are complete; rerun with --skip-existing to resume", "yellow")
        raise typer.Exit(130)
    except LotusError as e:
        fail(e)
    failed = summary.failed + n_problems
    colour = "red" if failed else "green"
    say(f"{summary.done} done, {summary.skipped} skipped, {failed} failed in {time.perf_counter() - t0:.1f} s "
        f"-> {output.out_dir}", colour)
    raise typer.Exit(1 if failed else 0)


# ------------------------------------- many processes and machines: lotus_cli/distributed.py, ray_engine.py

ShardOpt = Annotated[Optional[str], typer.Option("--shard", help="Process share K/N of the inputs (0-based K), by a "
                                                 "stable hash of each output key: for Slurm arrays and hand-launched "
                                                 "processes. Under torchrun, RANK/WORLD_SIZE shard by themselves.",
                                                 show_default=False)]
EngineOpt = Annotated[str, typer.Option("--engine", help="local (this process), or ray (a Ray Data pipeline over "
                                        "--workers predictor actors; needs the ray extra of lotus-cli).")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="With --engine ray: the cluster to join "
                                                   "(auto = the one `ray start` runs here); default: start a local "
                                                   "one.", show_default=False)]
Workers = Annotated[int, typer.Option("--workers", help="With --engine ray: predictor actors (one model each).")]
GpusPerWorker = Annotated[float, typer.Option("--gpus-per-worker", help="With --engine ray: GPUs per actor.")]
CpusPerWorker = Annotated[float, typer.Option("--cpus-per-worker", help="With --engine ray: CPUs per actor.")]


def _scale_out(a: Args, model, opts, ensemble, tiles, video, output) -> None:
    """--shard, torchrun, --engine ray, or URL inputs / --out: run through lotus_cli.distributed, report and
    exit. Returns (nothing done) for a plain run. Scaled-out runs always resume: finished items are skipped."""
    import functools

    from .. import distributed, models, sources

    scale = distributed.Scale(a.shard, a.engine, a.ray_address, a.workers, a.gpus_per_worker, a.cpus_per_worker)
    if not distributed.wanted(scale, a.inputs, a.out):
        return
    kind = "uncertainty" if ensemble else models.resolve(model, a.task).entry.kind
    job = distributed.Job(model, a.task, output, opts, video, a.device, a.dtype, a.max_pixels,
                          kind if ensemble else None, functools.partial(_predict_fn, tiles=tiles, ensemble=ensemble))
    counts = {"problems": 0}

    def on_problem(p):
        counts["problems"] += 1
        say(f"failed: {p}", "red")
        _emit(a, {"input": p.subject, "status": "failed", "error": str(p), "outputs": {}, "kind": None, "frames": 0,
                  "seconds": 0.0})

    def on_result(r, name):
        counts[r.status] = counts.get(r.status, 0) + 1
        status.update(f"{a.task}: {counts.get('done', 0)} done, {counts.get('skipped', 0)} skipped, "
                      f"{counts.get('failed', 0)} failed")
        if r.status == "failed":
            say(f"failed: {r.error}", "red")
        _emit(a, {**r.record(kind), "input": name})

    t0 = time.perf_counter()
    try:
        with console().status(f"{a.task}: listing inputs", spinner="dots") as status:
            s = distributed.dispatch(job, a.inputs or [], a.out or output.out_dir, scale, exts=sources.MEDIA_EXTS,
                                     on_result=on_result, on_problem=on_problem, load_predictor=load_predictor)
    except KeyboardInterrupt:
        say("interrupted: finished outputs are complete; rerun the same command to finish the rest", "yellow")
        raise typer.Exit(130)
    except LotusError as e:
        fail(e)
    failed = s.failed + counts["problems"]
    if not (s.done or s.skipped or failed):
        say("error: no usable inputs" if a.inputs else "error: no inputs given", "red")
        raise typer.Exit(2)
    say(f"{s.done} done, {s.skipped} skipped, {failed} failed in {time.perf_counter() - t0:.1f} s -> "
        f"{a.out or output.out_dir}", "red" if failed else "green")
    raise typer.Exit(1 if failed else 0)


@app.command()
def depth(inputs: Inputs = None, out: Out = None, model: Model = None, fmt: Format = "png,png16",
          processing_res: ProcRes = 768, resample: Resample = "bilinear", latent: Latent = "mean", seed: Seed = 0,
          batch_size: Batch = 1, device: Device = "auto", dtype: Dtype = "auto", cmap: Cmap = "Spectral",
          skip_existing: Skip = False, max_pixels: MaxPixels = 100_000_000, json: Json = False, fps: Fps = None,
          start: Start = None, end: End = None, max_frames: MaxFrames = None, stabilize: Stabilize = True,
          raw: Raw = None, raw_out: RawOut = "f32", tile: Tile = None, overlap: Overlap = 0.25,
          tile_res: TileRes = None, max_memory: MaxMemory = "auto",
          shard: ShardOpt = None, engine: EngineOpt = "local", ray_address: RayAddress = None, workers: Workers = 1,
          gpus_per_worker: GpusPerWorker = 0.0, cpus_per_worker: CpusPerWorker = 1.0):
    """Depth maps for images and videos.

    Default model: depth-d (jingheya/lotus-depth-d-v2-0-disparity, deterministic, best AbsRel in the
    paper), which predicts affine-invariant disparity (1 = near)."""
    _predict(Args("depth", **locals()))


@app.command()
def normal(inputs: Inputs = None, out: Out = None, model: Model = None, fmt: Format = "png,png16",
           processing_res: ProcRes = 768, resample: Resample = "bilinear", latent: Latent = "mean", seed: Seed = 0,
           batch_size: Batch = 1, device: Device = "auto", dtype: Dtype = "auto", cmap: Cmap = "Spectral",
           skip_existing: Skip = False, max_pixels: MaxPixels = 100_000_000, json: Json = False, fps: Fps = None,
           start: Start = None, end: End = None, max_frames: MaxFrames = None, stabilize: Stabilize = True,
           raw: Raw = None, raw_out: RawOut = "f32", frame: Frame = "lotus", tile: Tile = None,
           overlap: Overlap = 0.25, tile_res: TileRes = None, max_memory: MaxMemory = "auto",
           shard: ShardOpt = None, engine: EngineOpt = "local", ray_address: RayAddress = None, workers: Workers = 1,
           gpus_per_worker: GpusPerWorker = 0.0, cpus_per_worker: CpusPerWorker = 1.0):
    """Surface-normal maps for images and videos.

    Default model: normal-d (jingheya/lotus-normal-d-v1-1, deterministic). Normals are unit vectors, by
    default in Lotus's frame: x left, y up, z toward the camera (--frame for others)."""
    _predict(Args("normal", **locals()))


Samples = Annotated[int, typer.Option("--samples", "-n", help="Noise samples of the G model (seeds seed, seed+1, ...);"
                                      " they run as batches of --batch-size.")]
Tta = Annotated[str, typer.Option("--tta", help="Test-time augmentation: none, or flip (also the mirrored image; "
                                  "the only ensemble a D model has).")]
Task = Annotated[str, typer.Option("--task", "-t", help="depth or normal.")]


@app.command()
def uncertainty(inputs: Inputs = None, task: Task = "depth", samples: Samples = 8, tta: Tta = "none",
                out: Out = None, model: Model = None, fmt: Format = "png,png16",
                processing_res: ProcRes = 768, resample: Resample = "bilinear", latent: Latent = "mean",
                seed: Seed = 0, batch_size: Batch = 4, device: Device = "auto", dtype: Dtype = "auto",
                cmap: Annotated[str, typer.Option("--cmap", help="Colour map of the spread (bright = uncertain).")]
                = "inferno", skip_existing: Skip = False, max_pixels: MaxPixels = 100_000_000, json: Json = False,
                fps: Fps = None, start: Start = None, end: End = None, max_frames: MaxFrames = None,
                frame: Frame = "lotus", tile: Tile = None, overlap: Overlap = 0.25, tile_res: TileRes = None,
                max_memory: MaxMemory = "auto",
                shard: ShardOpt = None, engine: EngineOpt = "local", ray_address: RayAddress = None,
                workers: Workers = 1, gpus_per_worker: GpusPerWorker = 0.0, cpus_per_worker: CpusPerWorker = 1.0):
    """Per-pixel uncertainty of depth or normals (Lotus-G's spread over noise samples).

    Paper Sec. 4.4: run a Lotus-G model several times with different noise and write the spread (depth:
    std of the [0,1] maps; normals: RMS angle in degrees) as x.png / x.16bit.png / x.npy, and the mean
    prediction as x.mean.*. Default model: depth-g, or normal-g with --task normal."""
    if task not in ("depth", "normal"):
        fail(UsageError(f"--task must be depth or normal, not {task!r}"))
    args = dict(locals())
    del args["task"]
    _predict(Args(task, **args, stabilize=False))
