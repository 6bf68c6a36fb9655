"""The CLI's vocabulary: each option shared by several commands, defined once, and the map from the
library's parameter names to these flags.

Commands import the ``Annotated`` types they take (``pointcloud(processing_res: ProcRes = 768)``), or take a
whole table of them with ``with_options`` (depth, normal and uncertainty share ``PREDICT_OPTIONS``: adding
one of their options is one entry there), and pass the values to the library's request object. Boolean
flags are plain flags (``flag``): no value is shown in ``--help``, because none is taken
(``--skip-existing true`` would read ``true`` as an input path).
The library raises errors about its own parameters (``processing_res must be >= 0``); ``cli_error``
rewrites the parameter into the flag (``--processing-res must be >= 0``) before the CLI prints it.
No heavy imports here: ``lotus --help`` must stay fast.
"""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path
from typing import Annotated

import typer

from ..errors import LotusError


def option(*names: str, help: str, **kw):
    """A value option; its default is shown unless ``show_default=False``."""
    return typer.Option(*names, help=help, **kw)


def flag(*names: str, help: str, **kw):
    """A boolean flag (``--x``, or ``--x/--no-x``) shown without a value type in --help."""
    return typer.Option(*names, help=help, metavar="", **kw)


# The library's parameter names (PredictOptions, EnsembleOptions, TileOptions, models.resolve, EvalOptions)
# and the flags that set them.
LIBRARY_FLAGS = {
    "processing_res": "--processing-res",
    "resample": "--resample",
    "latent": "--latent",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "frame": "--frame",
    "samples": "--samples",
    "tta": "--tta",
    "tile": "--tile",
    "overlap": "--overlap",
    "tile_res": "--tile-res",
    "max_memory": "--max-memory",
    "kind": "--output-kind",
    "alignment": "--alignment",
    "max_samples": "--max-samples",
}
_LEADING_PARAM = re.compile(r"^(" + "|".join(sorted(LIBRARY_FLAGS, key=len, reverse=True)) + r")\b(?!-)")


def cli_error(err: LotusError) -> LotusError:
    """``err`` with a leading library parameter name turned into its flag (the same error class and hint)."""
    message = _LEADING_PARAM.sub(lambda m: LIBRARY_FLAGS[m.group(1)], err.message, count=1)
    if message == err.message:
        return err
    mapped = type(err)(message, err.hint, subject=err.subject)
    mapped.__cause__ = err
    return mapped


# ------------------------------------------------------------------------------- inputs and outputs

Inputs = Annotated[
    list[str] | None,
    typer.Argument(
        help="Image or video files, folders (searched recursively, each real folder once; symlinked loops are "
        "named and skipped), globs, or - to read paths from stdin: one per line, surrounding spaces stripped, "
        "empty lines and lines starting with # skipped.",
        show_default=False,
    ),
]
Out = Annotated[
    Path | None,
    option(
        "--out",
        "-o",
        help="Output folder; the input tree is mirrored under it, "
        "and it is never read as input (even inside an input folder). "
        "Default: ./lotus-<command>.",
        show_default=False,
    ),
]
Skip = Annotated[
    bool,
    flag(
        "--skip-existing",
        help="Keep inputs whose outputs are complete and were made with the "
        "same model and options (resume an interrupted run); redo the others and say why.",
    ),
]
MaxPixels = Annotated[int, option("--max-pixels", help="Refuse images above this many pixels (0 = no limit).")]
Json = Annotated[
    bool,
    flag(
        "--json",
        help="Write one JSON record per finished input on stdout (input, key, status, kind, outputs, frames, "
        "seconds, error, redone: the same for every command); nothing else goes to stdout.",
    ),
]

# ------------------------------------------------------------------------------------------- model

Model = Annotated[
    str | None,
    option(
        "--model",
        "-m",
        help="Registry name (see `lotus models list`), hub id (owner/name) or local checkpoint folder.",
        show_default=False,
    ),
]
OutputKind = Annotated[
    str | None,
    option(
        "--output-kind",
        help="What a checkpoint without metadata (no lotus.json, not a registry model) outputs: "
        "disparity (1 = near) or depth (0 = near). Metadata that says otherwise wins with an error.",
        show_default=False,
    ),
]
NormalOutputKind = Annotated[
    str | None,
    option(
        "--output-kind",
        help="normal: state that a checkpoint without metadata (no lotus.json, not a registry model) predicts normals.",
        show_default=False,
    ),
]
Device = Annotated[str, option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")]
Dtype = Annotated[str, option("--dtype", help="auto (fp16 on CUDA/MPS, fp32 on CPU), fp32, fp16, bf16.")]

# --------------------------------------------------------------------------------------- prediction

ProcRes = Annotated[
    int,
    option(
        "--processing-res",
        help="Long side fed to the model, in pixels (0 = native "
        "size); at least the VAE's pixels per latent cell (8 for the released models).",
    ),
]
Seed = Annotated[
    int,
    option(
        "--seed",
        help="Noise seed for G models; the same seed gives the same result for an image whatever the batch or order.",
    ),
]

# ------------------------------------------------------------------------------------------ videos

Fps = Annotated[
    float | None,
    option(
        "--fps",
        help="Videos: resample to this many frames per second, by "
        "timestamp, never above the source rate (default: the source rate).",
        show_default=False,
    ),
]
Start = Annotated[float | None, option("--start", help="Videos: first second to process.", show_default=False)]
End = Annotated[float | None, option("--end", help="Videos: last second to process.", show_default=False)]
MaxFrames = Annotated[
    int | None, option("--max-frames", help="Videos: stop after this many frames.", show_default=False)
]

# ---------------------------------------------------------------------------------------- raw pipes


# --------------------------------------------------------------------------------------- evaluation

Datasets = Annotated[
    list[str],
    option(
        "--dataset",
        "-d",
        help="NAME=PATH, repeatable. Depth: nyuv2, kitti, scannet, eth3d, diode (Marigold's tar "
        "or its unpacked folder, split list beside it). Normal: nyuv2, scannet, ibims, sintel, oasis (DSINE's "
        "dsine_eval/<name> folder).",
        show_default=False,
    ),
]
Splits = Annotated[
    list[str] | None,
    option(
        "--split",
        help="NAME=FILE, repeatable: the split list of a dataset when it is not beside the data.",
        show_default=False,
    ),
]
EvalModel = Annotated[
    str | None,
    option(
        "--model",
        "-m",
        help="Registry name, hub id or checkpoint folder (default: depth-d / normal-d).",
        show_default=False,
    ),
]
Predictions = Annotated[
    Path | None,
    option(
        "--predictions",
        help="Score precomputed maps instead of a model: DIR/<key>.npy or 16-bit .png per sample "
        "(in DIR/<dataset>/ when that exists); key = the RGB path in the split list without extension.",
        show_default=False,
    ),
]
Alignment = Annotated[
    str,
    option(
        "--alignment",
        help="Depth: auto (disparity for disparity models and sidecars "
        "that say so, depth for depth ones; maps without a sidecar need it stated), "
        "depth, disparity or none (metric).",
    ),
]
MaxSamples = Annotated[
    int | None, option("--max-samples", help="Only the first N samples of each split.", show_default=False)
]
SavePredictions = Annotated[
    bool,
    flag(
        "--save-predictions",
        help="Also write each raw prediction to "
        "OUT/predictions/<dataset>/<key>.npy (re-score later with --predictions).",
    ),
]
EvalOut = Annotated[
    Path | None, option("--out", "-o", help="Write results.json and per_sample.csv here.", show_default=False)
]
EvalProcRes = Annotated[
    int | None,
    option(
        "--processing-res",
        help="Override every dataset's processing resolution (default: native, 768 for ETH3D, "
        "640 for DIODE; 0 = native).",
        show_default=False,
    ),
]
EvalSeed = Annotated[int, option("--seed", help="Noise seed for G models.")]


def with_options(table: dict, omit: tuple[str, ...] = (), **changed):
    """Decorator: a command's own parameters, then every option of ``table`` (but those in ``omit``) as
    keyword parameters of its signature, which Typer reads; the command receives them in ``**options``.
    ``changed[name]`` replaces one entry's default, or its whole ``(option, default)``."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        added = []
        for name, entry in table.items():
            if name in omit or name in signature.parameters:
                continue
            option, default = entry
            if name in changed:
                option, default = changed[name] if isinstance(changed[name], tuple) else (option, changed[name])
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=option))

        @functools.wraps(command)
        def with_shared(**kwargs):
            return command(**kwargs)

        with_shared.__signature__ = signature.replace(parameters=own + added)
        with_shared.__annotations__ = {p.name: p.annotation for p in own + added}
        return with_shared

    return decorate
