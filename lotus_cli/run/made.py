"""Where and how maps are written (``OutputSpec``, ``VideoSpec``) and what an item's outputs are made with
(``Made``): the options a sidecar records and a rerun compares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..geometry.camera import NORMAL_FRAMES
from ..io.formats import DEFAULT_FORMATS, DEPTH_KINDS, FORMATS, Style, get_format
from ..io.sidecar import format_settings
from ..io.video import FrameSelect
from ..model.predictor import LotusPredictor, PredictOptions


def axes_record(predictor: LotusPredictor, opts: PredictOptions) -> dict:
    """The sidecar's statement of the normals' camera frame (empty for depth)."""
    if predictor.task != "normal":
        return {}
    return {"normal_frame": opts.frame, "axes": NORMAL_FRAMES[opts.frame][1]}


def image_options(family: str, task: str, opts: PredictOptions, predict_options: dict | None = None) -> dict:
    """The options that change an image's (or a frame's) map, as its sidecar records them and a rerun
    compares them, for a model of ``family`` ("g"/"d") and ``task``; ``predict_options``: those of a
    replacement ``predict`` (tiling, ensembles)."""
    options = {
        "processing_res": opts.processing_res,
        "resample": opts.resample,
        "latent": opts.latent,
        "seed": opts.seed if family == "g" else None,
    }
    if task == "normal":
        options["frame"] = opts.frame
    return {**options, **(predict_options or {})}


@dataclass(frozen=True)
class OutputSpec:
    """Where and how maps are written. ``style``: colour map, and EXR's ``exr_half`` / ``exr_compression``
    (formats.Style). ``skip_existing``: keep an item's outputs when its sidecar says they are complete and
    were made with the same model and options (else redo it and say why)."""

    out_dir: Path
    formats: tuple[str, ...] = DEFAULT_FORMATS
    style: Style = Style()
    skip_existing: bool = False


@dataclass(frozen=True)
class VideoSpec:
    """How to treat a clip: which frames, and temporal alignment of affine-invariant depth."""

    select: FrameSelect | None = None  # None = every frame
    stabilize: bool = True
    queue: int = 4  # frames buffered between decoder, model and encoder


@dataclass(frozen=True)
class Made:
    """What an item's outputs are made with, as its sidecar records it: what ``skip_existing`` compares
    (``vars(made)`` are ``reusable``'s keyword arguments)."""

    model: str | None  # ModelRef.label, as predictor.describe()["model"]
    kind: str
    options: dict
    settings: dict[str, dict]


def made_with(
    family: str,
    task: str,
    model: str | None,
    kind: str,
    output: OutputSpec,
    opts: PredictOptions,
    video: VideoSpec | None = None,
    predict_options: dict | None = None,
) -> Made:
    """The ``Made`` of an image (``video`` None) or a clip under ``video``, from what a checkpoint says without
    loading it (``family`` "g"/"d", ``task``, label ``model``, map ``kind``) and the run's options. The
    runner, and the scaled-out driver before any model loads (lotus_cli.scale), decide with this."""
    if video is None:
        return Made(
            model,
            kind,
            image_options(family, task, opts, predict_options),
            format_settings(output.formats, kind, output.style),
        )
    frame_formats = [f for f in output.formats if get_format(f).per_frame]
    return Made(
        model,
        kind,
        video_options(family, task, opts, video, kind, predict_options),
        {
            "mp4": FORMATS["png"].settings(kind, output.style),
            **format_settings(frame_formats, kind, output.style),
        },
    )


def video_options(
    family: str, task: str, opts: PredictOptions, spec: VideoSpec, kind: str, predict_options: dict | None = None
) -> dict:
    """``image_options`` plus the clip's: frame selection and whether depth is stabilised."""
    select = spec.select or FrameSelect()
    return {
        **image_options(family, task, opts, predict_options),
        "fps": select.fps,
        "start": select.start,
        "end": select.end,
        "max_frames": select.max_frames,
        "stabilize": stabilizes(spec, kind),
    }


def stabilizes(spec: VideoSpec, kind: str) -> bool:
    return spec.stabilize and kind in DEPTH_KINDS
