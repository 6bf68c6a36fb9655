"""The options of `lotus depth`, `lotus normal` and `lotus uncertainty` that no other command takes, and
``PREDICT_OPTIONS``: the table of every option the three share (adding one of their options is one entry
there; ``options.with_options`` adds the table to each command's signature). No heavy imports here."""

from __future__ import annotations

from typing import Annotated

from .options import (
    Device,
    Dtype,
    End,
    Fps,
    Json,
    MaxFrames,
    MaxPixels,
    Model,
    Out,
    OutputKind,
    ProcRes,
    Seed,
    Skip,
    Start,
    flag,
    option,
)

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
Stabilize = Annotated[
    bool,
    flag(
        "--stabilize/--no-stabilize",
        help="Videos and pipes: fit each frame's scale "
        "and shift to a running reference on stable pixels, so a surface keeps its value "
        "across frames.",
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
Projection = Annotated[
    str,
    option(
        "--projection",
        help="perspective (a camera's image), equirect (a 360-degree equirectangular panorama: predicted as six "
        "overlapping cube views, merged without seams; docs/panoramas.md), or auto (equirect for a 2:1 image "
        "whose XMP says GPano:ProjectionType equirectangular; the sidecar says which rule decided).",
    ),
]
Backend = Annotated[
    str | None,
    option(
        "--backend",
        help="What runs the model: torch, onnxruntime (the ONNX graphs: a --model export folder, or one exported "
        "once into lotus-cli's cache; fp32, CPU or CUDA provider), or auto (the one measured faster on this "
        "machine for this model and --processing-res, measured once and cached; torch without onnxruntime). "
        "Default: what auto recorded for this machine, model and size, else torch. docs/onnx.md.",
        show_default=False,
    ),
]
Task = Annotated[str, option("--task", "-t", help="depth or normal.")]
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
    "projection": (Projection, "perspective"),
    "backend": (Backend, None),
    "shard": (ShardOpt, None),
    "engine": (EngineOpt, "local"),
    "ray_address": (RayAddress, None),
    "workers": (Workers, 1),
    "gpus_per_worker": (GpusPerWorker, 0.0),
    "cpus_per_worker": (CpusPerWorker, 1.0),
}
SCALE_OPTIONS = ("shard", "engine", "ray_address", "workers", "gpus_per_worker", "cpus_per_worker")
