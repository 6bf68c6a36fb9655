"""`lotus depth` and `lotus normal`: images -> maps, through the shared predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LotusError, UsageError
from . import app, console, escape, fail, say

# ------------------------------------------------------------------------------- shared options

Inputs = Annotated[list[str], typer.Argument(
    help="Image files, folders (searched recursively), globs, or - to read paths from stdin (one per line).",
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


def _predict(task: str, inputs, out, model, fmt, processing_res, resample, latent, seed, batch_size, device,
             dtype, cmap, skip_existing, max_pixels) -> None:
    try:
        from .. import sinks, sources
        from ..predictor import PredictOptions

        formats = sinks.parse_formats(fmt)
        opts = PredictOptions(processing_res=processing_res, resample=resample, latent=latent, seed=seed,
                              batch_size=batch_size)
        if max_pixels < 0:
            raise UsageError(f"--max-pixels must be >= 0, not {max_pixels}", "0 means no limit")
        out_dir = out if out is not None else Path(f"lotus-{task}")
        sinks.check_out_dir(out_dir)
        from ..models import resolve

        resolve(model, task)  # an unknown or wrong-task model fails before inputs are read
        items, problems = sources.expand(inputs)
        from ..visualize import colormap_lut

        colormap_lut(cmap)
    except LotusError as e:
        fail(e)
    for p in problems:
        say(f"skipped: {p}", "yellow")
    if not items:
        say("error: no usable inputs", "red")
        raise typer.Exit(1 if problems else 2)
    predictor = _load(model, task, device, dtype)
    _run(predictor, items, sinks, out_dir, formats, opts, cmap, skip_existing, max_pixels, len(problems))


def _load(model, task, device, dtype):
    from ..predictor import LotusPredictor

    with console().status(f"loading {model or 'default ' + task + ' model'} ...", spinner="dots"):
        try:
            predictor = LotusPredictor.from_pretrained(model, task=task, device=device, dtype=dtype)
        except LotusError as e:
            fail(e)
    for w in predictor.warnings:
        say(f"warning: {w}", "yellow")
    say(f"model {predictor.source} ({predictor.task}, {predictor.kind}, Lotus-{predictor.family.upper()}) "
        f"on {predictor.device} in {str(predictor.dtype).replace('torch.', '')}", "dim")
    return predictor


def _run(predictor, items, sinks, out_dir, formats, opts, cmap, skip_existing, max_pixels, n_problems) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..runner import OutputSpec, run_images

    output = OutputSpec(out_dir, formats, sinks.Style(cmap=cmap), skip_existing)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console(), disable=not console().is_terminal, transient=True)

    def on_result(r):
        progress.advance(bar)
        if r.status == "failed":
            progress.console.print(f"[red]failed:[/] {escape(r.error)}")

    try:
        with progress:
            bar = progress.add_task(predictor.task, total=len(items))
            summary = run_images(predictor, items, output, opts, max_pixels=max_pixels, on_result=on_result)
    except KeyboardInterrupt:
        say("interrupted: finished outputs are complete; rerun with --skip-existing to resume", "yellow")
        raise typer.Exit(130)
    except LotusError as e:
        fail(e)
    failed = summary.failed + n_problems
    colour = "red" if failed else "green"
    say(f"{summary.done} done, {summary.skipped} skipped, {failed} failed in {summary.seconds:.1f} s -> {out_dir}",
        colour)
    raise typer.Exit(1 if failed else 0)


@app.command()
def depth(inputs: Inputs, out: Out = None, model: Model = None, fmt: Format = "png,png16",
          processing_res: ProcRes = 768, resample: Resample = "bilinear", latent: Latent = "mean", seed: Seed = 0,
          batch_size: Batch = 1, device: Device = "auto", dtype: Dtype = "auto", cmap: Cmap = "Spectral",
          skip_existing: Skip = False, max_pixels: MaxPixels = 100_000_000):
    """Predict depth. Default model: depth-d (jingheya/lotus-depth-d-v2-0-disparity, deterministic,
    best AbsRel in the paper), which predicts affine-invariant disparity (1 = near)."""
    _predict("depth", inputs, out, model, fmt, processing_res, resample, latent, seed, batch_size, device, dtype,
             cmap, skip_existing, max_pixels)


@app.command()
def normal(inputs: Inputs, out: Out = None, model: Model = None, fmt: Format = "png,png16",
           processing_res: ProcRes = 768, resample: Resample = "bilinear", latent: Latent = "mean", seed: Seed = 0,
           batch_size: Batch = 1, device: Device = "auto", dtype: Dtype = "auto", cmap: Cmap = "Spectral",
           skip_existing: Skip = False, max_pixels: MaxPixels = 100_000_000):
    """Predict surface normals. Default model: normal-d (jingheya/lotus-normal-d-v1-1, deterministic).
    Normals are unit vectors with x left, y up, z toward the camera."""
    _predict("normal", inputs, out, model, fmt, processing_res, resample, latent, seed, batch_size, device, dtype,
             cmap, skip_existing, max_pixels)
