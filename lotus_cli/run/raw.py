"""Raw pipes: rgb24 frames on stdin -> one map per frame on stdout (``--raw WxH``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..errors import InputError, LotusError, UsageError
from ..geometry.align import Stabilizer
from ..io.formats import FORMATS, Style
from ..io.video import ClipRange
from ..model.fallbacks import predict_items
from ..model.predictor import LotusPredictor, Prediction, PredictOptions

RAW_OUTPUTS = ("f32", "u16", "rgb")


def parse_size(spec: str) -> tuple[int, int]:
    """'640x360' -> (640, 360)."""
    try:
        w, h = (int(v) for v in spec.lower().split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise UsageError(f"--raw {spec!r}: expected WIDTHxHEIGHT, e.g. 640x360")


def run_raw(
    predictor: LotusPredictor,
    stdin,
    stdout,
    size: tuple[int, int],
    opts: PredictOptions = PredictOptions(),
    out: str = "f32",
    *,
    stabilize: bool = True,
    cmap: str = "Spectral",
    predict: Callable[[list[np.ndarray], PredictOptions], list[Prediction]] | None = None,
) -> int:
    """Raw RGB24 frames of ``size`` (W, H) on ``stdin`` -> raw maps on ``stdout``, frame by frame.

    Output per frame: ``f32`` float32 little-endian [H, W] depth or [H, W, 3] normals; ``u16``
    uint16 little-endian of the [0, 1] depth (or (n + 1) / 2) times 65535; ``rgb`` uint8 colour map /
    normal RGB [H, W, 3] (one colour range for the stream). Depth is stabilised across frames unless
    ``stabilize`` is False. ``predict`` replaces ``predictor.predict_batch`` (tiling). Returns the number
    of frames; a short last frame raises InputError.
    """
    w, h = size
    nbytes = w * h * 3
    depth_like = predictor.task != "normal"
    kind, style = predictor.kind, Style(cmap=cmap)
    stabilizer = Stabilizer() if stabilize and depth_like else None
    clip_range = ClipRange()
    count = 0
    while True:
        batch = []
        while len(batch) < opts.batch_size:
            buf = stdin.read(nbytes)
            if not buf:
                break
            if len(buf) != nbytes:
                raise InputError(
                    f"stdin: frame {count + len(batch)} has {len(buf)} of {nbytes} bytes",
                    f"send whole rgb24 frames of {w}x{h}",
                )
            batch.append(np.frombuffer(buf, np.uint8).reshape(h, w, 3).copy())
        if not batch:
            return count
        for pred in (predict or functools.partial(predict_items, predictor))(batch, opts):
            if isinstance(pred, LotusError):  # a frame no try could predict: the pipe stops with its reason
                raise pred
            value = stabilizer(pred.map)[0] if stabilizer is not None else pred.map
            if out == "f32":  # the npy format's values
                data = FORMATS["npy"].pixels(value, kind, style)[0].astype("<f4")
            elif out == "u16":  # a 16-bit frame of a clip: [0, 1] over 0..65535
                data = FORMATS["png16"].pixels(value, kind, replace(style, vrange=(0.0, 1.0)))[0].astype("<u2")
            else:  # as a clip's mp4 frame: one colour range for the stream
                vrange = clip_range.update(value) if depth_like else None
                data = FORMATS["png"].pixels(value, kind, replace(style, vrange=vrange))[0]
            stdout.write(np.ascontiguousarray(data).tobytes())
            count += 1
        stdout.flush()
