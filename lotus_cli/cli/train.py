"""`lotus train`: Stable Diffusion 2 -> Lotus-G / Lotus-D (the paper's protocol), on accelerate."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LotusError
from ..train.preset import DEBUG, DEFAULT_BASE
from .application import app
from .options import flag
from .report import console, fail, progress_bar, say

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
        from ..train.preset import training_options, uses_debug_inputs

        opts = training_options(locals())
        if preset == "debug":
            import torch

            # tiny models: a second thread only adds synchronisation, and on a busy machine far more
            torch.set_num_threads(DEBUG["threads"])
            if uses_debug_inputs(opts):
                _debug_inputs(opts.out)
        if num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise typer.Exit(_launch(num_processes))
    except LotusError as e:
        fail(e)
    _run(opts)


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


def _debug_inputs(out: Path) -> dict:
    """The debug preset's base and scenes (``train.debug``), with the VAE fit's progress: a bar on a terminal,
    a line every quarter otherwise."""
    from ..train.debug import build_debug_inputs

    every = max(1, DEBUG["vae_steps"] // 4)
    with progress_bar("fitting the debug VAE", detail=True) as bars:
        bar = bars.add_task("", total=DEBUG["vae_steps"])

        def show(k: int, n: int, loss: float) -> None:
            bars.update(bar, completed=k, description=f"loss {loss:.4f}")
            if not console().is_terminal and (k % every == 0 or k == n):
                bars.console.print(f"fitting the debug VAE: step {k}/{n}, loss {loss:.4f}")

        return build_debug_inputs(out, lambda text: say(text, "dim"), show)


def _run(opts) -> None:
    """The training run (``train.trainer.train``), its events shown as lines and a progress bar."""
    from ..train.trainer import train as run_training

    progress, bar = progress_bar("train", detail=True), None

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
