"""`lotus export onnx`: the graphs of a prediction as ONNX files with their manifest (docs/onnx.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import LotusError, UsageError
from .application import app
from .options import flag
from .report import fail, say

export_app = typer.Typer(help="Export a model for other runtimes (ONNX).", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Registry name, hub id (owner/name) or local checkpoint folder."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the .onnx files and lotus-onnx.json.")],
    res: Annotated[
        int, typer.Option("--res", help="Side of the square image the graphs take, and are validated at (px).")
    ] = 512,
    dynamic: Annotated[
        bool, flag("--dynamic", help="Free batch, height and width (multiples of the manifest's size_multiple).")
    ] = False,
    any_size: Annotated[
        bool,
        flag(
            "--any-size",
            help="With --dynamic (implied): graphs that take every height and width, as lotus's own runs make them "
            "(e.g. 432 px at --processing-res 768), and match torch at each; not with --single.",
        ),
    ] = False,
    fp16: Annotated[
        bool,
        flag("--fp16", help="UNet weights and activations in fp16 (inputs and outputs stay float32), for TensorRT."),
    ] = False,
    fp16_vae: Annotated[
        bool, flag("--fp16-vae", help="With --fp16: the VAE in fp16 too (SD2's VAE can overflow fp16).")
    ] = False,
    single: Annotated[
        bool, flag("--single", help="One graph, lotus.onnx: RGB in [0, 1] to the map (and noise for G models).")
    ] = False,
) -> None:
    """VAE encoder, UNet (t = 999, task switch and empty prompt folded in) and VAE decoder in fp32 (or one
    fused graph with --single; fp16 with --fp16), checked with onnx.checker and compared with the torch
    predictor under ONNX Runtime (CPU)."""
    from ..model import onnx_export

    try:
        onnx_export.require_onnx()
        if fp16_vae and not fp16:
            raise UsageError("--fp16-vae needs --fp16", "add --fp16")
        if any_size and single:
            raise UsageError("--any-size makes the three graphs; lotus.onnx takes multiples of 64 px", "drop --single")
        say(f"loading {model}", "dim")
        pred = onnx_export.load(model, res)
        manifest = onnx_export.export(
            pred, out, res, dynamic or any_size, any_size, fp16=fp16, fp16_vae=fp16_vae, single=single
        )
    except LotusError as e:
        fail(e)
    sizes = ", ".join(f"{name} {g['bytes'] / 1e6:.1f} MB ({g['weights']})" for name, g in manifest["graphs"].items())
    v = manifest["validation"]
    say(f"wrote {out / onnx_export.MANIFEST} and {sizes} in {manifest['export_seconds']:.1f} s")
    if v.get("ran") is False:  # fp16 graphs ONNX Runtime's CPU provider could not run: not validated
        say(f"ONNX Runtime (CPU) could not run the fp16 graphs, so they are not validated: {v['error']}", "yellow")
        return
    against = "torch fp32" if manifest["precision"] == "fp16" else "torch"
    bound = "reported, no tolerance for fp16" if v["tolerance"] is None else f"tolerance {v['tolerance']:.0e}"
    say(f"ONNX Runtime vs {against} at {res} x {res}: max |diff| of the map {v['max_abs_diff_map']:.1e} ({bound})")
