"""`lotus train`: Stable Diffusion 2 -> Lotus-G / Lotus-D (the paper's protocol), on accelerate."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LotusError, UsageError
from . import app
from .options import flag
from .report import console, fail, say

DEBUG = dict(
    steps=300,
    batch_size=4,
    lr=1e-3,
    checkpoint_every=100,
    val_every=100,
    val_samples=8,
    log_every=10,
    size=(32, 32),
    train_scenes=64,
    vae_steps=400,
    threads=1,
)
DEFAULT_BASE = "stabilityai/stable-diffusion-2-base"

Opt = typer.Option


@app.command("train", no_args_is_help=True)
def train(
    task: Annotated[str, Opt("--task", "-t", help="depth or normal.")] = "depth",
    family: Annotated[str, Opt("--family", help="g (noise input, 8-channel conv_in) or d (deterministic).")] = "g",
    base: Annotated[
        str, Opt("--base", help="Hub id or folder of Stable Diffusion 2 (or a Lotus checkpoint to continue from).")
    ] = DEFAULT_BASE,
    data: Annotated[
        list[str] | None,
        Opt(
            "--data",
            "-d",
            help="NAME=PATH, repeatable; NAME: hypersim, vkitti, "
            "folder (generic format: rgb/, depth/, normal/, mask/, lotus_data.json).",
            show_default=False,
        ),
    ] = None,
    mix: Annotated[
        str | None,
        Opt(
            "--mix", help="Per-batch probabilities, one per --data, e.g. 0.9,0.1 (default: equal).", show_default=False
        ),
    ] = None,
    out: Annotated[
        Path | None, Opt("--out", "-o", help="Run folder (log, checkpoints, validation, final/).", show_default=False)
    ] = None,
    prediction: Annotated[str, Opt("--prediction", help="x0 (Lotus) or eps (standard diffusion, G only).")] = "x0",
    timesteps: Annotated[
        int,
        Opt(
            "--timesteps",
            help="1 = single step at t=999 (Lotus); N = N evenly spaced "
            "training steps and DDIM at validation (G only).",
        ),
    ] = 1,
    detail_preserver: Annotated[
        bool,
        flag(
            "--detail-preserver/--no-detail-preserver",
            help="Also reconstruct the input image (task switch [0, 1]), loss weight 1:1.",
        ),
    ] = True,
    norm: Annotated[
        str, Opt("--norm", help="Depth normalisation: trunc_disparity (v2 models), trunc_depth, disparity, depth.")
    ] = "trunc_disparity",
    latent: Annotated[
        str, Opt("--latent", help="Training latents: sample (reference) or mean of the VAE posterior.")
    ] = "sample",
    steps: Annotated[int | None, Opt("--steps", help="Optimiser steps [20000].", show_default=False)] = None,
    batch_size: Annotated[
        int | None, Opt("--batch-size", "-b", help="Samples per process per micro-batch [16].", show_default=False)
    ] = None,
    grad_accum: Annotated[int, Opt("--grad-accum", help="Micro-batches per optimiser step.")] = 1,
    lr: Annotated[float | None, Opt("--lr", help="AdamW learning rate, constant [3e-5].", show_default=False)] = None,
    weight_decay: Annotated[float, Opt("--weight-decay")] = 1e-2,
    max_grad_norm: Annotated[float, Opt("--max-grad-norm", help="Gradient clipping.")] = 1.0,
    mixed_precision: Annotated[str, Opt("--mixed-precision", help="no, fp16 (the paper, GPUs) or bf16.")] = "no",
    gradient_checkpointing: Annotated[bool, flag("--gradient-checkpointing", help="Trade compute for memory.")] = False,
    checkpoint_every: Annotated[
        int | None, Opt("--checkpoint-every", help="Steps between checkpoints [2000].", show_default=False)
    ] = None,
    resume: Annotated[str | None, Opt("--resume", help="latest, or a checkpoint folder.", show_default=False)] = None,
    seed: Annotated[int, Opt("--seed")] = 0,
    size: Annotated[
        str | None, Opt("--size", help="HxW training size for folder data (default: as stored).", show_default=False)
    ] = None,
    flip: Annotated[bool, flag("--flip/--no-flip", help="Random horizontal flips (normal x negated).")] = True,
    val_data: Annotated[
        str | None,
        Opt(
            "--val-data",
            help="NAME=PATH of validation samples (images and AbsRel / mean angle logged).",
            show_default=False,
        ),
    ] = None,
    val_every: Annotated[
        int | None, Opt("--val-every", help="Steps between validations (0 = start and end).", show_default=False)
    ] = None,
    eval_data: Annotated[
        list[str] | None,
        Opt(
            "--eval-data",
            help="NAME=PATH, repeatable: benchmark sets of "
            "`lotus eval` (depth: nyuv2, kitti, scannet, eth3d, diode; normal: nyuv2, scannet, ibims, "
            "sintel, oasis), scored at the end and every --val-every steps.",
            show_default=False,
        ),
    ] = None,
    eval_max_samples: Annotated[
        int | None, Opt("--eval-max-samples", help="Only the first N samples of each benchmark.", show_default=False)
    ] = None,
    log_every: Annotated[int, Opt("--log-every", help="Steps between lines of OUT/log.jsonl.")] = 10,
    num_workers: Annotated[int, Opt("--num-workers", help="Data-loading worker processes.")] = 0,
    num_processes: Annotated[
        int,
        Opt("--num-processes", help="Launch this many data-parallel processes (torchrun; one per GPU, gloo on CPU)."),
    ] = 1,
    preset: Annotated[
        str | None,
        Opt(
            "--preset",
            help="debug: synthetic scenes and a tiny base it "
            "builds under OUT (default runs/debug); defaults become 300 steps, batch 4, lr 1e-3, 32x32, "
            "validation every 100 steps; a few minutes on a CPU, most of it fitting the tiny VAE.",
            show_default=False,
        ),
    ] = None,
):
    """Fine-tune Stable Diffusion 2 into a Lotus depth or normal model; the result (OUT/final) loads with
    `lotus depth --model OUT/final`. Every option is checked before any data is built or any folder made."""
    try:
        opts = _options(locals())
        if preset == "debug":
            import torch

            # tiny models: a second thread only adds synchronisation, and on a busy machine far more
            torch.set_num_threads(DEBUG["threads"])
            if _uses_debug_inputs(opts):
                _debug_inputs(opts.out)
        if num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise typer.Exit(_launch(num_processes))
    except LotusError as e:
        fail(e)
    _run(opts)


def _options(a: dict):
    """The command's options as TrainOptions, every check done; creates nothing. Raises UsageError."""
    from ..train.data import parse_spec
    from ..train.options import StepOptions, TrainOptions, find_checkpoint

    dbg = a["preset"] == "debug"
    if a["preset"] not in (None, "debug"):
        raise UsageError(f"--preset {a['preset']!r}: the only preset is debug")
    if a["num_processes"] < 1:
        raise UsageError(f"--num-processes must be >= 1, not {a['num_processes']}")
    pick = lambda name, default: a[name] if a[name] is not None else (DEBUG[name] if dbg else default)  # noqa: E731
    out = a["out"] or (Path("runs/debug") if dbg else None)
    if out is None:
        raise UsageError("no --out folder", "pass --out runs/NAME")
    _check_out(out)
    base, data, val, size = a["base"], a["data"], a["val_data"], _size(a["size"])
    for spec in data or ():
        parse_spec(spec, "--data")
    if val:
        parse_spec(val, "--val-data")
    built_base = dbg and base == DEFAULT_BASE  # the debug preset builds its own base, after these checks
    if dbg:
        paths = _debug_paths(out)
        base = str(paths["base"]) if built_base else base
        data = data or [f"folder={paths['train']}"]
        val = val or f"folder={paths['val']}"
        size = size or DEBUG["size"]
    step = StepOptions(
        task=a["task"],
        family=a["family"],
        prediction=a["prediction"],
        timesteps=a["timesteps"],
        detail_preserver=a["detail_preserver"],
        norm=a["norm"],
        latent=a["latent"],
    )
    opts = TrainOptions(
        base=base,
        out=out,
        data=tuple(data or ()),
        step=step,
        mix=_mix(a["mix"]),
        steps=pick("steps", 20_000),
        batch_size=pick("batch_size", 16),
        grad_accum=a["grad_accum"],
        lr=pick("lr", 3e-5),
        weight_decay=a["weight_decay"],
        max_grad_norm=a["max_grad_norm"],
        mixed_precision=a["mixed_precision"],
        gradient_checkpointing=a["gradient_checkpointing"],
        checkpoint_every=pick("checkpoint_every", 2000),
        resume=a["resume"],
        seed=a["seed"],
        size=size,
        flip=a["flip"],
        val_data=val,
        val_every=pick("val_every", 0),
        val_samples=DEBUG["val_samples"],
        eval_data=tuple(a["eval_data"] or ()),
        eval_max_samples=a["eval_max_samples"],
        log_every=a["log_every"],
        num_workers=a["num_workers"],
        name=out.name,
    )
    if opts.resume:
        find_checkpoint(out, opts.resume)
    if not built_base:
        _check_base(base)
    return opts


def _check_out(out: Path) -> None:
    """--out must be a folder, or a path where one can be made: no file in the way, a writable parent."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"--out {out}: {p} is a file, not a folder", "pass --out runs/NAME")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UsageError(f"--out {out}: {p} is not writable", "pass --out a folder you can write to")
            return


def _check_base(base: str) -> None:
    """--base names a folder or a hub id that is at hand (a folder, the local cache, or the network)."""
    from ..model import registry

    ref = registry.resolve(base)
    if ref.folder is None and registry.hub_offline() and registry.cached_folder(ref.repo_id) is None:
        raise UsageError(
            f"--base {base}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
            "download it once with the network on, or pass --base /path/to/a/folder",
        )


def _mix(spec: str | None) -> tuple[float, ...] | None:
    if not spec:
        return None
    try:
        return tuple(float(v) for v in spec.split(","))
    except ValueError as e:
        raise UsageError(f"--mix {spec!r}: expected numbers separated by commas, e.g. 0.9,0.1") from e


def _size(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        h, w = (int(v) for v in spec.lower().split("x"))
    except ValueError as e:
        raise UsageError(f"--size {spec!r}: expected HxW, e.g. 576x768") from e
    if h < 8 or w < 8 or h % 8 or w % 8:
        raise UsageError(f"--size {spec!r}: both sides must be multiples of 8 (the VAE's latent cells), e.g. 576x768")
    return h, w


def _debug_paths(out: Path) -> dict:
    return {"base": out / "debug-base", "train": out / "debug-data", "val": out / "debug-val"}


def _uses_debug_inputs(opts) -> bool:
    """Whether the run takes its base, data or validation set from the debug preset (else nothing to build)."""
    paths = _debug_paths(opts.out)
    specs = {f"folder={paths['train']}", f"folder={paths['val']}"}
    return opts.base == str(paths["base"]) or bool(specs & {*opts.data, opts.val_data})


def _debug_inputs(out: Path) -> dict:
    """A tiny random SD2-like base and synthetic scenes under OUT/debug-*; built once, by rank 0 only. The
    VAE fit is the slow part: a progress bar on a terminal, a line every quarter otherwise."""
    from ..model.synthetic import write_synthetic_dataset
    from ..train.data import FolderData, autoencoder_images
    from ..train.surgery import build_tiny_base

    paths = _debug_paths(out)
    marker = out / ".debug-ready"
    if marker.exists():
        return paths
    if int(os.environ.get("RANK", "0")) != 0:
        for _ in range(600):
            if marker.exists():
                return paths
            time.sleep(0.5)
        raise UsageError(f"{marker} did not appear: rank 0 failed to build the debug inputs")
    say(
        f"debug preset: {DEBUG['train_scenes']} synthetic scenes and a tiny base (its VAE fitted to them) under {out}",
        "dim",
    )
    write_synthetic_dataset(paths["train"], DEBUG["train_scenes"], DEBUG["size"], seed=1)
    write_synthetic_dataset(paths["val"], DEBUG["val_samples"], DEBUG["size"], seed=2, holes=False)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    steps, every = DEBUG["vae_steps"], max(1, DEBUG["vae_steps"] // 4)
    with Progress(
        TextColumn("[bold]fitting the debug VAE"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console(),
        transient=True,
    ) as bar:
        task = bar.add_task("", total=steps)

        def show(k: int, n: int, loss: float) -> None:
            bar.update(task, completed=k, description=f"loss {loss:.4f}")
            if not console().is_terminal and (k % every == 0 or k == n):
                bar.console.print(f"fitting the debug VAE: step {k}/{n}, loss {loss:.4f}")

        build_tiny_base(
            paths["base"], fit_images=autoencoder_images(FolderData(paths["train"])), fit_steps=steps, progress=show
        )
    marker.write_text("ok\n")
    return paths


def _launch(n: int) -> int:
    """Re-run this command under torchrun with ``n`` processes (the options minus --num-processes)."""
    import subprocess

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--num-processes":
            skip = True
            continue
        if arg.startswith("--num-processes="):
            continue
        argv.append(arg)
    if argv and argv[0] == "train":
        argv = argv[1:]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "lotus_cli.train",
        *argv,
    ]
    say(f"launching {n} processes: {' '.join(cmd[2:])}", "dim")
    return subprocess.call(cmd)


def _run(opts) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..train.trainer import train as run_training

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console(),
        transient=True,
    )
    bar = None

    def on_event(event: str, r: dict) -> None:
        nonlocal bar
        if event == "start":
            say(
                f"training {opts.step.task}-{r['family']} on {r['device']}: {r['processes']} process(es), global "
                f"batch {r['global_batch']}, steps {r['start']}..{r['steps']}"
            )
            progress.start()
            bar = progress.add_task("", total=r["steps"], completed=r["start"])
        elif event == "log" and bar is not None:
            progress.update(
                bar,
                completed=r["step"],
                description=f"loss {r['loss']:.4f} (anno {r['loss_anno']:.4f}, rgb {r['loss_rgb']:.4f})",
            )
        elif event == "validation":
            metric = "AbsRel" if opts.step.task == "depth" else "mean angle"
            progress.console.print(f"step {r['step']}: validation {metric} {r['error']:.4f}")
        elif event == "evaluation":
            if "skipped" in r:
                progress.console.print(f"step {r['step']}: benchmarks skipped ({r['skipped']})", style="yellow")
            else:
                shown = ", ".join(
                    f"{k} {r['metrics'][k]:.4f}" for k in ("abs_rel", "delta1", "mean", "a11_25") if k in r["metrics"]
                )
                progress.console.print(f"step {r['step']}: {r['dataset']} ({r['evaluated']} samples): {shown}")
        elif event == "checkpoint":
            progress.console.print(f"checkpoint {r['path']}", style="dim")
        elif event == "done":
            progress.stop()
            say(f"saved {r['final']} (load it with `lotus {opts.step.task} --model {r['final']}`)", "green")

    try:
        run_training(opts, on_event)
    except LotusError as e:
        progress.stop()
        fail(e)
    finally:
        progress.stop()
