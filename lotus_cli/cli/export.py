"""`lotus export onnx`: the graphs of a prediction as ONNX files with their manifest (docs/onnx.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import LotusError
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
) -> None:
    """VAE encoder, UNet (t = 999, task switch and empty prompt folded in) and VAE decoder in fp32, checked
    with onnx.checker and compared with the torch predictor under ONNX Runtime (CPU)."""
    from ..model import onnx_export

    try:
        onnx_export.require_onnx()
        say(f"loading {model}", "dim")
        pred = onnx_export.load(model, res)
        manifest = onnx_export.export(pred, out, res=res, dynamic=dynamic)
    except LotusError as e:
        fail(e)
    sizes = ", ".join(f"{name} {g['bytes'] / 1e6:.1f} MB" for name, g in manifest["graphs"].items())
    v = manifest["validation"]
    say(f"wrote {out / onnx_export.MANIFEST} and {sizes} in {manifest['export_seconds']:.1f} s")
    say(
        f"ONNX Runtime vs torch at {res} x {res}: max |diff| of the map {v['max_abs_diff_map']:.1e} "
        f"(tolerance {v['tolerance']:.0e})"
    )
