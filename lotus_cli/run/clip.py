"""Videos as a small job: decode (thread) -> predict (the caller's thread) -> encode (thread) -> record.

Bounded queues between the parts keep memory flat whatever the clip's length; depth is aligned frame to
frame and coloured with one range for the clip.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import LotusError, brief
from ..geometry.align import Stabilizer
from ..io.atomic import write_json
from ..io.formats import FORMATS, Style, get_format
from ..io.outputs import spread_unit, write_map
from ..io.sidecar import reusable, sidecar
from ..io.sources import Item
from ..io.video import ClipRange, Frame, FrameSelect, VideoInfo, VideoWriter, open_video
from ..model.fallbacks import predict_items
from ..model.predictor import LotusPredictor, Prediction, PredictOptions
from .made import OutputSpec, VideoSpec, axes_record, made_with, stabilizes
from .results import ItemResult

_END = object()


def frame_name(index: int, time_s: float) -> str:
    """Per-frame file stem: zero-padded index (sorts in order) and the timestamp in seconds."""
    return f"{index:06d}_{time_s:010.3f}s"


class ClipEncoder:
    """The encode part of a video job: per frame, temporal alignment (depth), one colour range for the clip,
    a frame of the mp4 (coloured as the png format colours a map) and the per-frame maps of the formats
    that have them (png16 / npy / exr, in ``<key>/`` named by ``frame_name``); then its sidecar sections."""

    def __init__(
        self,
        base: Path,
        key: str,
        info: VideoInfo,
        kind: str,
        style: Style,
        formats: tuple[str, ...],
        stabilize: bool,
        top: float,
        about: dict,
    ):
        self.base, self.key, self.info, self.kind, self.about = base, key, info, kind, about
        self.mp4 = base.with_name(base.name + ".mp4")
        self.style = style
        # 16-bit frames share one fixed range: [0, 1] maps as they are, an angular spread over 0..top degrees
        self.frame_style = replace(style, vrange=(0.0, top))
        self.formats = [f for f in formats if get_format(f).per_frame]
        self.depth_like = kind != "normal"
        self.stabilizer = Stabilizer() if stabilize else None
        self.clip_range = ClipRange()
        self.writer: VideoWriter | None = None
        self.frames = 0
        self.notes: dict[str, dict] = {}
        self.change_raw: list[float] = []
        self.change_out: list[float] = []
        self.fits: list[list[float]] = []
        self.prev: tuple[np.ndarray, np.ndarray] | None = None

    def write(self, fr: Frame, raw: np.ndarray) -> None:
        value, fit = self.stabilizer(raw) if self.stabilizer is not None else (raw, None)
        if fit is not None:
            self.fits.append([round(fit[0], 6), round(fit[1], 6)])
        style = replace(self.style, vrange=self.clip_range.update(value)) if self.depth_like else self.style
        if self.writer is None:
            self.writer = VideoWriter(self.mp4, self.info.width, self.info.height, self.info.fps)
        self.writer.write(FORMATS["png"].pixels(value, self.kind, style)[0])
        if self.depth_like:
            if self.prev is not None:
                self.change_raw.append(float(np.abs(raw - self.prev[0]).mean()))
                self.change_out.append(float(np.abs(value - self.prev[1]).mean()))
            self.prev = raw, value
        for fmt in self.formats:
            path = self.base / (frame_name(fr.index, fr.time) + get_format(fmt).suffix)
            note = write_map(path, fmt, value, self.kind, self.frame_style, self.about)
            self.notes.setdefault(fmt, note)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def outputs(self) -> dict:
        """The sidecar's ``outputs``: the mp4 and, per frame format, the folder and the first frame's note."""
        outputs = {"mp4": {"file": self.mp4.name, **FORMATS["png"].settings(self.kind, self.style)}}
        for fmt in self.formats:
            note = {k: v for k, v in self.notes.get(fmt, {}).items() if k != "shape"}
            if fmt == "png16" and self.depth_like:
                note["clipped"] = True  # values outside the clip's fixed range are clipped
            outputs[fmt] = {"folder": self.key, "files": f"<index>_<seconds>s{get_format(fmt).suffix}", **note}
        return outputs

    def sections(self) -> dict:
        """Sidecar sections on colour and temporal consistency (depth-like maps)."""
        if not self.depth_like:
            return {}
        out = {
            "colour_range": {
                "first": self.clip_range.first,
                "last": (self.clip_range.lo, self.clip_range.hi),
                "method": "robust 1-99 percentiles, adapting 2% per frame",
                "colormap": self.style.cmap,
            },
            "temporal_change": {
                "raw": float(np.mean(self.change_raw)) if self.change_raw else None,
                "output": float(np.mean(self.change_out)) if self.change_out else None,
                "measure": "mean absolute frame-to-frame change of the map",
            },
        }
        if self.stabilizer is not None:
            out["stabilize_fits"] = self.fits
        return out


class VideoJob:
    """One clip, streamed: decode (thread) -> predict in batches (the caller's thread) -> encode (thread) ->
    record. Bounded queues between the parts keep memory flat whatever the clip's length.

    Writes ``<key>.mp4`` (colour map, H.264, the sampled frame rate, original size), per-frame maps in
    ``<key>/`` for the formats that have them, and ``<key>.json``. Frames decoded before damage are
    processed and written; the error names the frame index. On KeyboardInterrupt the frames in flight are
    finished and the mp4 is closed so that it plays, the sidecar records the interruption, then the
    interrupt propagates.
    """

    def __init__(
        self,
        predictor: LotusPredictor,
        item: Item,
        output: OutputSpec,
        opts: PredictOptions,
        spec: VideoSpec,
        predict=None,
        kind: str | None = None,
        on_frame: Callable[[int, int | None], None] = lambda i, n: None,
        predict_options: dict | None = None,
    ):
        self.predictor, self.item, self.output, self.opts, self.spec = predictor, item, output, opts, spec
        # out of memory: the batch again frame by frame, never in tiles (the frames of a clip stay alike)
        self.predict = predict or functools.partial(predict_items, predictor, predict=predictor.predict_batch)
        self.kind = kind or predictor.kind
        self.on_frame = on_frame
        self.model = predictor.describe()
        self.made = made_with(
            predictor.family, predictor.task, self.model.get("model"), self.kind, output, opts, spec, predict_options
        )
        self.options = self.made.options
        self.base = output.out_dir / item.key
        self.paths = {
            "mp4": self.base.with_name(self.base.name + ".mp4"),
            "json": self.base.with_name(self.base.name + ".json"),
        }
        self.q_in: queue.Queue = queue.Queue(spec.queue)
        self.q_out: queue.Queue = queue.Queue(spec.queue)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.plans: dict = {}  # the first prediction's tiling or panorama plan (the same for every frame)
        self.seen = 0

    def reusable(self) -> tuple[bool, str | None]:
        return reusable(self.paths["json"], [self.paths["mp4"]], **vars(self.made))

    def run(self) -> ItemResult:
        t_start = time.perf_counter()
        redone = None
        if self.output.skip_existing:
            keep, redone = self.reusable()
            if keep:
                return ItemResult(self.item, "skipped", {k: str(v) for k, v in self.paths.items()}, kind=self.kind)
        try:
            info, frames = open_video(self.item.path, self.spec.select or FrameSelect())
        except LotusError as e:
            return ItemResult(
                self.item, "failed", error=str(e), redone=redone, kind=self.kind, backend=self.model.get("backend")
            )
        self.paths["json"].unlink(missing_ok=True)  # an earlier run's sidecar must not vouch for what this one replaces
        top = 90.0 if (self.kind == "uncertainty" and self.predictor.task == "normal") else 1.0
        # what every frame file says of itself; an ensemble's statistic joins it with the first prediction
        self.about = {"model": self.model.get("model"), **axes_record(self.predictor, self.opts)}
        encoder = ClipEncoder(
            self.base,
            self.item.key,
            info,
            self.kind,
            self.output.style,
            self.output.formats,
            stabilizes(self.spec, self.kind),
            top,
            self.about,
        )
        dec = threading.Thread(target=self._decode, args=(frames,), name="lotus-decode", daemon=True)
        enc = threading.Thread(target=self._encode, args=(encoder,), name="lotus-encode", daemon=True)
        dec.start()
        enc.start()
        interrupted = None  # Ctrl-C, or SIGTERM raised as one (cli/report.py): raised again once the clip is closed
        try:
            self._predict(info.expected_frames(self.spec.select or FrameSelect()))
        except KeyboardInterrupt as e:
            interrupted = e
        except Exception as e:
            self.errors.append(f"{self.item.path}: prediction failed at frame {self.seen} ({brief(e)})")
        finally:
            self._finish(dec, enc)
        seconds = time.perf_counter() - t_start
        outputs = {}
        if encoder.frames:
            write_json(self.paths["json"], self.record(info, encoder, seconds, interrupted is not None))
            outputs = {"mp4": str(self.paths["mp4"]), "json": str(self.paths["json"])}
            if encoder.formats:
                outputs["frames"] = str(self.base)
        if interrupted is not None:
            raise interrupted
        error = self.errors[0] if self.errors else None
        status = "failed" if error else "done"
        backend = self.model.get("backend")
        return ItemResult(
            self.item, status, outputs, error, seconds, encoder.frames, redone, self.kind, backend=backend
        )

    # -- the parts ------------------------------------------------------------------------------------

    def _decode(self, frames) -> None:
        """Thread: frames -> q_in, waiting on a full queue only while the job runs; _END last."""
        try:
            for fr in frames:
                while not self.stop.is_set():
                    try:
                        self.q_in.put(fr, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except LotusError as e:
            self.errors.append(str(e))
        except Exception as e:  # pragma: no cover - decoder bugs
            self.errors.append(f"{self.item.path}: decoding failed ({brief(e)})")
        finally:
            self.q_in.put(_END)

    def _predict(self, expected: int | None) -> None:
        """This thread: batches of q_in -> the model -> q_out, until the decoder ends or the job stops."""
        done = False
        while not done and not self.stop.is_set():
            batch = []
            while len(batch) < self.opts.batch_size:
                fr = self.q_in.get()
                if fr is _END:
                    done = True
                    break
                batch.append(fr)
            if not batch:
                return
            preds = self.predict([f.rgb for f in batch], self.opts)
            failed = next((p for p in preds if isinstance(p, LotusError)), None)
            if failed is not None:  # a frame no try could predict (out of memory alone and in tiles): the clip stops
                raise failed
            for plan in ("tiling", "panorama"):  # the first prediction's plan: the same for every frame
                if preds and plan not in self.plans and plan in preds[0].extra:
                    self.plans[plan] = preds[0].extra[plan]
            if preds and "uncertainty" in preds[0].extra and "statistic" not in self.about:
                spread = {
                    "statistic": preds[0].extra["uncertainty"]["statistic"],
                    "unit": spread_unit(self.predictor.task),
                }
                self.about.update(spread)  # before the frame is queued: the encoder reads it when writing
            for fr, pred in zip(batch, preds):
                self.q_out.put((fr, pred.map))
                self.seen += 1
                self.on_frame(self.seen, expected)

    def _encode(self, encoder: ClipEncoder) -> None:
        """Thread: q_out -> the encoder (alignment and colouring run here, beside the model); on a write
        error the job stops and the queue is drained so the model's thread never blocks."""
        try:
            while (got := self.q_out.get()) is not _END:
                encoder.write(*got)
        except Exception as e:
            self.errors.append(f"{self.item.path}: writing outputs failed ({brief(e)})")
            self.stop.set()
            while self.q_out.get() is not _END:
                pass
        finally:
            encoder.close()

    def _finish(self, dec: threading.Thread, enc: threading.Thread) -> None:
        """Stop the decoder, let the encoder finish the frames in flight and close the mp4."""
        self.stop.set()
        self.q_out.put(_END)
        enc.join()
        while dec.is_alive():  # unblock a decoder waiting on a full queue
            try:
                self.q_in.get_nowait()
            except queue.Empty:
                pass
            dec.join(0.05)

    def record(self, info: VideoInfo, encoder: ClipEncoder, seconds: float, interrupted: bool) -> dict:
        """The clip's sidecar."""
        video = {
            "frames": encoder.frames,
            "fps": info.fps,
            "source_fps": info.source_fps,
            "time_range": [info.start, info.start + encoder.frames / info.fps],
            "size": [info.width, info.height],
            "codec_in": info.codec,
            "file": self.paths["mp4"].name,
        }
        sections = {**axes_record(self.predictor, self.opts), **self.plans, "video": video, **encoder.sections()}
        if encoder.formats:
            sections["frames_folder"] = self.item.key
        return sidecar(
            self.kind,
            model=self.model,
            options=self.options,
            input=str(self.item.path),
            key=self.item.key,
            outputs=encoder.outputs(),
            error=self.errors[0] if self.errors else None,
            interrupted=interrupted,
            seconds=seconds,
            **sections,
        )


def run_video(
    predictor: LotusPredictor,
    item: Item,
    output: OutputSpec,
    opts: PredictOptions = PredictOptions(),
    spec: VideoSpec = VideoSpec(),
    *,
    on_frame: Callable[[int, int | None], None] = lambda i, n: None,
    predict: Callable[[list[np.ndarray], PredictOptions], list[Prediction]] | None = None,
    kind: str | None = None,
    predict_options: dict | None = None,
) -> ItemResult:
    """Stream one clip through a ``VideoJob`` (its doc says what is written); ``predict``, ``kind`` and
    ``predict_options`` as for ``run_images``. Raises KeyboardInterrupt after closing the outputs."""
    return VideoJob(predictor, item, output, opts, spec, predict, kind, on_frame, predict_options).run()
