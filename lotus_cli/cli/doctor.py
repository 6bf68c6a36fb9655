"""`lotus doctor`: this machine as the model sees it, and which CPU fast paths were chosen for it, and why."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import LotusError, UsageError
from .application import app
from .options import flag
from .report import fail, say


def _row(label: str, value) -> None:
    typer.echo(f"{label:<22}{value}")


def _describe(choice: dict) -> None:
    """One calibration record (calibrate.Choices as a dict): what runs, why, and the measured seconds."""
    names = {"nchw": "NCHW", "channels_last": "channels-last", "channels_last+packed": "channels-last, packed weights"}
    unet, vae = choice["unet"], choice["vae"]
    layout = names[unet] if unet == vae else f"UNet {names[unet]}; VAE {names[vae]}"
    strips = f"strips of {choice['strip_rows']} rows" if choice["strip_rows"] else "diffusers' modules (no strips)"
    size = choice.get("size") or (0, 0)
    _row("  processing size", f"{size[0]} x {size[1]} px" if size[0] else "-")
    _row("  layout", layout)
    _row("  VAE high-res stages", strips)
    _row("  threads", choice["threads"])
    _row("  decided by", choice["how"] + (f" ({choice['seconds']:.1f} s of timings)" if choice.get("seconds") else ""))
    times = choice.get("times") or {}
    for what, per in times.items():
        if per:
            best = min(per.values())
            shown = ", ".join(f"{k} {v:.3f} s{' *' if v == best else ''}" for k, v in per.items())
            _row(f"  measured {what}", shown)


OUTPUT_KINDS = ("disparity", "depth", "normal")


def _check_options(model: str | None, output_kind: str | None, processing_res: int) -> None:
    """UsageError for doctor's options that cannot apply, before anything is read or loaded."""
    if processing_res <= 0:
        raise UsageError(
            f"--processing-res {processing_res}: must be a positive number of pixels",
            "the long side the choice is made for, e.g. 768 (the default)",
        )
    if output_kind is not None and output_kind not in OUTPUT_KINDS:
        raise UsageError(f"--output-kind must be {', '.join(OUTPUT_KINDS[:-1])} or normal, not {output_kind!r}")
    if output_kind is not None and model is None:
        raise UsageError("--output-kind describes a model", "add --model (-m) CHECKPOINT")


@app.command()
def doctor(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Also load this model (name, hub id or folder) and show its choice, calibrating it if needed.",
        ),
    ] = None,
    output_kind: Annotated[
        str | None,
        typer.Option(
            "--output-kind",
            help="What a --model without metadata (no lotus.json, not a registry model) outputs: disparity "
            "(1 = near), depth (0 = near) or normal, as lotus depth / normal take it.",
            show_default=False,
        ),
    ] = None,
    processing_res: Annotated[
        int, typer.Option("--processing-res", help="The size (long side, pixels) the choice is made for.")
    ] = 768,
    recalibrate: Annotated[bool, flag("--recalibrate", help="Forget the recorded choices first.")] = False,
    as_json: Annotated[bool, flag("--json", help="One JSON object on stdout.")] = False,
):
    """Show the CPU (model, avx2 / avx512f / avx512_bf16 / amx flags, cores), torch and its threads, and the
    fast paths chosen for this machine (channels-last, packed weights, VAE strips) with the measured times."""
    try:
        _check_options(model, output_kind, processing_res)
    except LotusError as e:
        fail(e)
    import torch

    from ..model.cpu import calibrate

    m = calibrate.machine()
    path = calibrate.cache_file()
    if recalibrate and path.exists():
        path.unlink()
    load, cores = calibrate.busy()
    loaded = None
    if model is not None:
        from ..model.predictor import LotusPredictor

        try:
            pred = LotusPredictor.from_pretrained(
                model, device="cpu", dtype="fp32", processing_res=processing_res, kind=output_kind
            )
        except LotusError as e:
            fail(e)
        loaded = {"model": pred.source, **pred.engine.choices.__dict__, "weights_gb": pred.weight_bytes() / 1e9}
    recorded = calibrate.cached()
    from ..model import backends

    engines = list(backends.recorded().values())  # --backend auto's choices (docs/onnx.md)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "machine": m.__dict__,
                    "mkldnn": torch.backends.mkldnn.is_available(),
                    "busy_load": load,
                    "cache": str(path),
                    "calibrations": recorded,
                    "backends": engines,
                    "model": loaded,
                },
                default=list,
            )
        )
        return
    _row("CPU", m.cpu)
    _row("flags", "  ".join(f"{f} {'yes' if f in m.flags else 'no'}" for f in calibrate.FLAGS))
    _row("kernels", f"{m.isa} (flags above are those the kernels may use)")
    _row("cores", cores)
    _row("torch", f"{m.torch} (oneDNN {'yes' if torch.backends.mkldnn.is_available() else 'no'})")
    counts = calibrate.thread_candidates()
    _row(
        "threads",
        f"{m.threads} now; "
        + (
            f"a model's calibration times {' and '.join(map(str, counts))} threads"
            if len(counts) > 1
            else "set by " + "/".join(calibrate.THREAD_VARS)
            if not counts
            else "one per core, the only candidate (OMP_NUM_THREADS sets another)"
        ),
    )
    if load is not None:
        say(
            f"the machine is busy (load {load:.1f} on {cores} cores): choices made now follow the rule, untimed; "
            "run `lotus doctor --recalibrate -m MODEL` when it is quiet",
            "yellow",
        )
    _row("calibration cache", path)
    if loaded:
        typer.echo(f"\n{loaded['model']} ({loaded['weights_gb']:.2f} GB of weights):")
        _describe(loaded)
    others = [
        r for r in recorded if not loaded or r.get("size") != list(loaded["size"]) or r.get("times") != loaded["times"]
    ]
    if others:
        typer.echo(f"\nrecorded on this machine ({len(others)}):")
        for r in others:
            _describe(r)
            typer.echo("")
    elif not loaded:
        typer.echo(
            "\nnothing recorded yet: the first prediction of a model calibrates it (a few seconds), or run "
            "`lotus doctor -m MODEL`"
        )
    if engines:
        typer.echo(f"\n--backend auto's choices ({backends.cache_file()}):")
        for r in engines:
            s = r.get("seconds", {})
            typer.echo(
                f"  {r.get('model')} at {r.get('size')} px: {r.get('backend')} "
                f"(torch {s.get('torch')} s, onnxruntime {s.get('onnxruntime')} s; {r.get('when')})"
            )
