"""The batch engine: stream items through the shared predictor with reading and writing overlapped.

Reading (a small thread pool, bounded look-ahead) and writing (one thread) run beside the model, so
the predictor does not wait on I/O. Images are grouped by processing size into batches of up to
``batch_size``; a bucket is flushed when full, or the oldest when too many images wait. One bad input
never stops the batch: it becomes a failed ``ItemResult`` and the run goes on. Nothing here prints;
``on_result`` is told about every item as it finishes.

Videos run as a ``VideoJob``: decode (thread) -> predict (the caller's thread) -> encode (thread) -> record.
Raw pipes (``run_raw``) turn rgb24 frames on stdin into maps on stdout. Files are written through the
format registry (``formats``) and described by ``sinks.sidecar``; with ``skip_existing`` an output is kept
only when its sidecar says its run completed with the same model and options (``sinks.reusable``),
otherwise it is redone and ``ItemResult.redone`` says why.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import sinks
from .errors import InputError, LotusError, UsageError, brief
from .formats import DEPTH_KINDS, FORMATS, get_format
from .geometry import NORMAL_FRAMES
from .predictor import LotusPredictor, Prediction, PredictOptions, Prepared, processing_size
from .sources import DEFAULT_MAX_PIXELS, Item, read_image
from .video import ClipRange, Frame, FrameSelect, Stabilizer, VideoInfo, VideoWriter, open_video


@dataclass
class ItemResult:
    item: Item
    status: str  # "done" | "skipped" | "failed"
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    frames: int = 1
    redone: str | None = None  # why existing outputs were made again under skip_existing (None: they were not)

    def record(self, kind: str | None = None) -> dict:
        """A JSON-able summary (one NDJSON line in --json mode)."""
        return {
            "input": str(self.item.path),
            "key": self.item.key,
            "status": self.status,
            "kind": kind,
            "outputs": self.outputs,
            "frames": self.frames if self.status != "skipped" else 0,
            "seconds": round(self.seconds, 4),
            "error": self.error,
            "redone": self.redone,
        }


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    redone: int = 0  # of done and failed: items whose existing outputs were not kept (ItemResult.redone)
    seconds: float = 0.0
    failures: list[ItemResult] = field(default_factory=list)

    def add(self, r: ItemResult) -> None:
        setattr(self, r.status, getattr(self, r.status) + 1)
        self.redone += r.redone is not None
        if r.status == "failed":
            self.failures.append(r)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


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
    formats: tuple[str, ...] = sinks.DEFAULT_FORMATS
    style: sinks.Style = sinks.Style()
    skip_existing: bool = False


@dataclass(frozen=True)
class Made:
    """What an item's outputs are made with, as its sidecar records it: what ``skip_existing`` compares
    (``vars(made)`` are ``sinks.reusable``'s keyword arguments)."""

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
    runner, and the scaled-out driver before any model loads (lotus_cli.distributed), decide with this."""
    if video is None:
        return Made(
            model,
            kind,
            image_options(family, task, opts, predict_options),
            sinks.format_settings(output.formats, kind, output.style),
        )
    frame_formats = [f for f in output.formats if get_format(f).per_frame]
    return Made(
        model,
        kind,
        video_options(family, task, opts, video, kind, predict_options),
        {
            "mp4": FORMATS["png"].settings(kind, output.style),
            **sinks.format_settings(frame_formats, kind, output.style),
        },
    )


def run_images(
    predictor: LotusPredictor,
    items: Iterable[Item],
    output: OutputSpec,
    opts: PredictOptions = PredictOptions(),
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_result: Callable[[ItemResult], None] = lambda r: None,
    readers: int = 2,
    predict: Callable[[list[np.ndarray], PredictOptions], list[Prediction]] | None = None,
    kind: str | None = None,
    predict_options: dict | None = None,
    read: Callable[[Item], np.ndarray | Prepared] | None = None,
) -> Summary:
    """Predict every item and write its outputs; returns the counts. ``predict`` replaces
    ``predictor.predict_batch`` (e.g. ensembles, tiling), ``kind`` the kind of map it returns and
    ``predict_options`` its output-changing options (e.g. {"tile": ..., "samples": ...}: recorded in the
    sidecar and compared by ``skip_existing``); a Prediction's ``extra`` goes into the sidecar and its
    ``layers`` are written beside the map. ``read`` replaces reading an item's file (``read_image``), e.g.
    with an image a pipeline's CPU stage decoded (and, as ``Prepared``, resized) already."""
    read = read or (lambda item: read_image(item.path, max_pixels))
    summary = Summary()
    predict = predict or predictor.predict_batch
    kind = kind or predictor.kind
    t_start = time.perf_counter()
    model = predictor.describe()
    made = made_with(predictor.family, predictor.task, model.get("model"), kind, output, opts, None, predict_options)
    options = made.options
    redone: dict[str, str] = {}

    def report(r: ItemResult) -> None:
        r.redone = redone.get(r.item.key)
        summary.add(r)
        on_result(r)

    todo = []
    for item in items:
        paths = sinks.output_paths(output.out_dir, item.key, output.formats)
        if output.skip_existing:
            keep, why = sinks.reusable(paths["json"], [p for f, p in paths.items() if f != "json"], **vars(made))
            if keep:
                report(ItemResult(item, "skipped", {k: str(v) for k, v in paths.items()}))
                continue
            if why is not None:
                redone[item.key] = why
        todo.append((item, paths))
    with (
        ThreadPoolExecutor(readers, thread_name_prefix="lotus-read") as read_pool,
        ThreadPoolExecutor(1, thread_name_prefix="lotus-write") as write_pool,
    ):
        reads: deque[tuple[Item, dict, Future]] = deque()
        writes: deque[Future] = deque()
        pending = iter(todo)
        lookahead = max(4, 2 * opts.batch_size)

        def refill():
            while len(reads) < lookahead:
                nxt = next(pending, None)
                if nxt is None:
                    return
                reads.append((*nxt, read_pool.submit(read, nxt[0])))

        def drain_writes(block: bool):
            while writes and (block or writes[0].done()):
                report(writes.popleft().result())

        buckets: OrderedDict[tuple[int, int], list] = OrderedDict()
        waiting = 0

        def flush(size):
            nonlocal waiting
            batch = buckets.pop(size)
            waiting -= len(batch)
            t0 = time.perf_counter()
            try:
                preds = predict([b[2] for b in batch], opts)
            except Exception as e:  # e.g. out of memory: the batch fails, the run goes on
                for item, _, _ in batch:
                    report(ItemResult(item, "failed", error=f"{item.path}: prediction failed ({brief(e)})"))
                return
            model_s = (time.perf_counter() - t0) / len(batch)
            for (item, paths, rgb), pred in zip(batch, preds):
                record = sinks.sidecar(
                    kind,
                    model=model,
                    options=options,
                    input=str(item.path),
                    key=item.key,
                    seconds=model_s,
                    **axes_record(predictor, opts),
                    input_size=[int(rgb.shape[1]), int(rgb.shape[0])],
                    processing_size=[pred.processing_size[1], pred.processing_size[0]],
                    **pred.extra,
                )
                writes.append(write_pool.submit(_write, item, paths, pred, kind, record, output.style, model_s))

        refill()
        while reads:
            item, paths, fut = reads.popleft()
            refill()
            try:
                rgb = fut.result()
            except LotusError as e:
                report(ItemResult(item, "failed", error=str(e)))
                continue
            except Exception as e:  # pragma: no cover - decoder bugs
                report(ItemResult(item, "failed", error=f"{item.path}: cannot read ({brief(e)})"))
                continue
            size = processing_size(rgb.shape[0], rgb.shape[1], opts.processing_res)
            buckets.setdefault(size, []).append((item, paths, rgb))
            waiting += 1
            if len(buckets[size]) >= opts.batch_size:
                flush(size)
            elif waiting >= 2 * opts.batch_size:
                flush(next(iter(buckets)))
            drain_writes(block=False)
        while buckets:
            flush(next(iter(buckets)))
        drain_writes(block=True)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _write(
    item: Item, paths: dict, pred: Prediction, kind: str, record: dict, style: sinks.Style, seconds: float
) -> ItemResult:
    try:
        sinks.write_outputs(paths, pred.map, kind, record, style, pred.layers)
    except LotusError as e:
        return ItemResult(item, "failed", error=f"{item.path}: {e}", seconds=seconds)
    except OSError as e:
        return ItemResult(
            item, "failed", error=f"{item.path}: cannot write outputs ({e.strerror or e})", seconds=seconds
        )
    return ItemResult(item, "done", {k: str(v) for k, v in paths.items()}, seconds=seconds)


# ------------------------------------------------------------------------------------------- videos

_END = object()


@dataclass(frozen=True)
class VideoSpec:
    """How to treat a clip: which frames, and temporal alignment of affine-invariant depth."""

    select: FrameSelect | None = None  # None = every frame
    stabilize: bool = True
    queue: int = 4  # frames buffered between decoder, model and encoder


def frame_name(index: int, time_s: float) -> str:
    """Per-frame file stem: zero-padded index (sorts in order) and the timestamp in seconds."""
    return f"{index:06d}_{time_s:010.3f}s"


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
        "stabilize": _stabilizes(spec, kind),
    }


def _stabilizes(spec: VideoSpec, kind: str) -> bool:
    return spec.stabilize and kind in DEPTH_KINDS


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
        style: sinks.Style,
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
            note = sinks.write_map(path, fmt, value, self.kind, self.frame_style, self.about)
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
        self.predict = predict or predictor.predict_batch
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
        self.tiling: dict = {}  # the first prediction's tiling plan (the same for every frame)
        self.seen = 0

    def reusable(self) -> tuple[bool, str | None]:
        return sinks.reusable(self.paths["json"], [self.paths["mp4"]], **vars(self.made))

    def run(self) -> ItemResult:
        t_start = time.perf_counter()
        redone = None
        if self.output.skip_existing:
            keep, redone = self.reusable()
            if keep:
                return ItemResult(self.item, "skipped", {k: str(v) for k, v in self.paths.items()})
        try:
            info, frames = open_video(self.item.path, self.spec.select or FrameSelect())
        except LotusError as e:
            return ItemResult(self.item, "failed", error=str(e), redone=redone)
        self.paths["json"].unlink(missing_ok=True)  # an earlier run's sidecar must not vouch for what this one replaces
        top = 90.0 if (self.kind == "uncertainty" and self.predictor.task == "normal") else 1.0
        about = {"model": self.model.get("model"), **axes_record(self.predictor, self.opts)}
        encoder = ClipEncoder(
            self.base,
            self.item.key,
            info,
            self.kind,
            self.output.style,
            self.output.formats,
            _stabilizes(self.spec, self.kind),
            top,
            about,
        )
        dec = threading.Thread(target=self._decode, args=(frames,), name="lotus-decode", daemon=True)
        enc = threading.Thread(target=self._encode, args=(encoder,), name="lotus-encode", daemon=True)
        dec.start()
        enc.start()
        interrupted = False
        try:
            self._predict(info.expected_frames(self.spec.select or FrameSelect()))
        except KeyboardInterrupt:
            interrupted = True
        except Exception as e:
            self.errors.append(f"{self.item.path}: prediction failed at frame {self.seen} ({brief(e)})")
        finally:
            self._finish(dec, enc)
        seconds = time.perf_counter() - t_start
        outputs = {}
        if encoder.frames:
            sinks.write_json(self.paths["json"], self.record(info, encoder, seconds, interrupted))
            outputs = {"mp4": str(self.paths["mp4"]), "json": str(self.paths["json"])}
            if encoder.formats:
                outputs["frames"] = str(self.base)
        if interrupted:
            raise KeyboardInterrupt
        error = self.errors[0] if self.errors else None
        return ItemResult(self.item, "failed" if error else "done", outputs, error, seconds, encoder.frames, redone)

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
            if preds and not self.tiling and "tiling" in preds[0].extra:
                self.tiling["tiling"] = preds[0].extra["tiling"]
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
        sections = {**axes_record(self.predictor, self.opts), **self.tiling, "video": video, **encoder.sections()}
        if encoder.formats:
            sections["frames_folder"] = self.item.key
        return sinks.sidecar(
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


# ---------------------------------------------------------------------------------- raw frame pipes

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
    kind, style = predictor.kind, sinks.Style(cmap=cmap)
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
        for pred in (predict or predictor.predict_batch)(batch, opts):
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
