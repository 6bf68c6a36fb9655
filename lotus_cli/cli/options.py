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
Format = Annotated[
    str,
    option(
        "--format",
        "-f",
        help="Comma list of png (colour map), png16 (16-bit), "
        "npy (raw float32), exr (OpenEXR float32: depth in Z, normals in R,G,B), or all. A "
        "JSON sidecar is always written.",
    ),
]
ExrHalf = Annotated[
    bool,
    flag(
        "--exr-half",
        help="EXR maps in 16-bit half floats (about 3 significant digits, half the size) instead of float32.",
    ),
]
ExrCompression = Annotated[
    str,
    option(
        "--exr-compression",
        help="EXR compression: zip (lossless), zips, piz, rle, none; lossy: pxr24, b44, b44a, dwaa, dwab.",
    ),
]
Compile = Annotated[
    str,
    option(
        "--compile",
        help="torch.compile the model (inductor; on a CPU it needs a C++ "
        "compiler): off, on, or auto (models up to 256 MB: full-size Lotus ran slower compiled on a CPU; "
        "then videos, and runs of 40+ same-size images, 12+ once compiled code is cached). "
        "The first run per processing size spends minutes "
        "compiling; the result is cached in ~/.cache/lotus/inductor. Falls back to eager "
        "with one line when compiling is impossible.",
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
        help="Write one JSON record per finished input on stdout (input, outputs, "
        "kind, frames, seconds, status, error); nothing else goes to stdout.",
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
Resample = Annotated[
    str, option("--resample", help="Back to the input size: bilinear, or nearest (the reference's nearest-exact).")
]
Latent = Annotated[
    str,
    option(
        "--latent",
        help="Image latent: mean of the VAE posterior (deterministic), or sample (the reference's posterior sample).",
    ),
]
Seed = Annotated[
    int,
    option(
        "--seed",
        help="Noise seed for G models; the same seed gives the same result for an image whatever the batch or order.",
    ),
]
Batch = Annotated[int, option("--batch-size", "-b", help="Images of the same processing size per model call.")]
Cmap = Annotated[
    str, option("--cmap", help="Matplotlib colour map of the depth PNGs and videos (near is warm with Spectral).")
]
SpreadCmap = Annotated[str, option("--cmap", help="Colour map of the spread (bright = uncertain).")]
Frame = Annotated[
    str,
    option(
        "--frame",
        help="Camera frame of the normals written: lotus (x left, y up, z toward "
        "the camera), opengl (x right, y up, z toward the camera; Blender) or opencv (x right, "
        "y down, z forward).",
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
Stabilize = Annotated[
    bool,
    flag(
        "--stabilize/--no-stabilize",
        help="Videos and pipes: fit each frame's scale "
        "and shift to a running reference on stable pixels, so a surface keeps its value "
        "across frames.",
    ),
]

# ---------------------------------------------------------------------------------------- raw pipes

Raw = Annotated[
    str | None,
    option(
        "--raw",
        help="Pipe mode: read raw RGB24 frames of WIDTHxHEIGHT from stdin "
        "and write raw maps to stdout (see --raw-out); no files, so no inputs, --out "
        "or --json.",
        show_default=False,
    ),
]
RawOut = Annotated[
    str,
    option(
        "--raw-out",
        help="Pipe mode output per frame: f32 (float32 map), u16 (uint16, [0,1] x 65535) or rgb (colour map, rgb24).",
    ),
]
SpreadRawOut = Annotated[
    str,
    option(
        "--raw-out", help="Pipe mode output per frame: f32 (the float32 spread [H, W]; the only one for uncertainty)."
    ),
]

# ------------------------------------------------------------------------------------------- tiling

Tile = Annotated[
    str | None,
    option(
        "--tile",
        help="High-resolution inputs: a global pass at --processing-res "
        "for the layout plus overlapping tiles for detail, blended seam-free at full "
        "resolution. auto (tile size from the image size and --max-memory; no tiles "
        "when the global pass sees nearly every pixel) or the tile side in input "
        "pixels. Off by default.",
        show_default=False,
    ),
]
Overlap = Annotated[
    float, option("--overlap", help="With --tile: fraction of a tile shared with each neighbour (0 .. 0.5).")
]
TileRes = Annotated[
    int | None,
    option(
        "--tile-res",
        help="With --tile: long side of a tile as fed to the model (default: --processing-res, or 768 when that is 0).",
        show_default=False,
    ),
]
MaxMemory = Annotated[
    str,
    option(
        "--max-memory",
        help="With --tile: memory budget for the weights plus one batch "
        "of tiles, e.g. 6G; auto = the weights plus half the free device memory.",
    ),
]

# -------------------------------------------------------------------------------------- uncertainty

Samples = Annotated[
    int,
    option(
        "--samples",
        "-n",
        help="Noise samples of the G model (seeds seed, seed+1, ...), at least 2; they run as batches of --batch-size.",
    ),
]
Tta = Annotated[
    str,
    option(
        "--tta",
        help="Test-time augmentation: none, or flip (also the mirrored image; the only ensemble a D model has).",
    ),
]
Task = Annotated[str, option("--task", "-t", help="depth or normal.")]

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


# ------------------------------------------- many processes and machines (README "Many GPUs and machines")

ShardOpt = Annotated[
    str | None,
    option(
        "--shard",
        help="Process share K/N of the inputs (0-based K), by a stable "
        "hash of each output key: for Slurm arrays and hand-launched processes. "
        "Under torchrun, RANK/WORLD_SIZE shard by themselves.",
        show_default=False,
    ),
]
EngineOpt = Annotated[
    str,
    option(
        "--engine",
        help="local (this process), or ray (a Ray Data pipeline over --workers "
        "predictor actors; needs the ray extra of lotus-cli).",
    ),
]
RayAddress = Annotated[
    str | None,
    option(
        "--ray-address",
        help="With --engine ray: the cluster to join (auto = "
        "the one `ray start` runs here); default: start a local one.",
        show_default=False,
    ),
]
Workers = Annotated[int, option("--workers", help="With --engine ray: predictor actors (one model each).")]
GpusPerWorker = Annotated[float, option("--gpus-per-worker", help="With --engine ray: GPUs per actor.")]
CpusPerWorker = Annotated[float, option("--cpus-per-worker", help="With --engine ray: CPUs per actor.")]


# ----------------------------------------------------- the options of depth, normal and uncertainty

# name -> (option, default): run.predict.PredictRequest's fields, plus --json and scale.options.Scale's
PREDICT_OPTIONS = {
    "out": (Out, None),
    "model": (Model, None),
    "output_kind": (OutputKind, None),
    "fmt": (Format, "png,png16"),
    "exr_half": (ExrHalf, False),
    "exr_compression": (ExrCompression, "zip"),
    "processing_res": (ProcRes, 768),
    "resample": (Resample, "bilinear"),
    "latent": (Latent, "mean"),
    "seed": (Seed, 0),
    "batch_size": (Batch, 1),
    "device": (Device, "auto"),
    "dtype": (Dtype, "auto"),
    "cmap": (Cmap, "Spectral"),
    "skip_existing": (Skip, False),
    "max_pixels": (MaxPixels, 100_000_000),
    "json": (Json, False),
    "fps": (Fps, None),
    "start": (Start, None),
    "end": (End, None),
    "max_frames": (MaxFrames, None),
    "stabilize": (Stabilize, True),
    "raw": (Raw, None),
    "raw_out": (RawOut, "f32"),
    "frame": (Frame, "lotus"),
    "tile": (Tile, None),
    "overlap": (Overlap, 0.25),
    "tile_res": (TileRes, None),
    "max_memory": (MaxMemory, "auto"),
    "compile_mode": (Compile, "off"),
    "shard": (ShardOpt, None),
    "engine": (EngineOpt, "local"),
    "ray_address": (RayAddress, None),
    "workers": (Workers, 1),
    "gpus_per_worker": (GpusPerWorker, 0.0),
    "cpus_per_worker": (CpusPerWorker, 1.0),
}
SCALE_OPTIONS = ("shard", "engine", "ray_address", "workers", "gpus_per_worker", "cpus_per_worker")


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
