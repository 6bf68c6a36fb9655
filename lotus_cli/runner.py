"""The batch engine: stream items through the shared predictor with reading and writing overlapped.

Reading (a small thread pool, bounded look-ahead) and writing (one thread) run beside the model, so
the predictor does not wait on I/O. Images are grouped by processing size into batches of up to
``batch_size``; a bucket is flushed when full, or the oldest when too many images wait. One bad input
never stops the batch: it becomes a failed ``ItemResult`` and the run goes on. Nothing here prints;
``on_result`` is told about every item as it finishes.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import __version__, sinks, visualize
from .errors import LotusError
from .geometry import NORMAL_FRAMES
from .predictor import LotusPredictor, PredictOptions, Prediction, processing_size
from .sources import DEFAULT_MAX_PIXELS, Item, read_image


@dataclass
class ItemResult:
    item: Item
    status: str  # "done" | "skipped" | "failed"
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    frames: int = 1

    def record(self, kind: str | None = None) -> dict:
        """A JSON-able summary (one NDJSON line in --json mode)."""
        return {"input": str(self.item.path), "key": self.item.key, "status": self.status, "kind": kind,
                "outputs": self.outputs, "frames": self.frames if self.status != "skipped" else 0,
                "seconds": round(self.seconds, 4), "error": self.error}


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[ItemResult] = field(default_factory=list)

    def add(self, r: ItemResult) -> None:
        setattr(self, r.status, getattr(self, r.status) + 1)
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


@dataclass(frozen=True)
class OutputSpec:
    out_dir: Path
    formats: tuple[str, ...] = sinks.DEFAULT_FORMATS
    style: sinks.Style = sinks.Style()
    skip_existing: bool = False


def run_images(predictor: LotusPredictor, items: Iterable[Item], output: OutputSpec,
               opts: PredictOptions = PredictOptions(), *, max_pixels: int = DEFAULT_MAX_PIXELS,
               on_result: Callable[[ItemResult], None] = lambda r: None, readers: int = 2,
               predict: Callable[[list[np.ndarray], PredictOptions], list[Prediction]] | None = None,
               kind: str | None = None) -> Summary:
    """Predict every item and write its outputs; returns the counts. ``predict`` replaces
    ``predictor.predict_batch`` (e.g. ensembles, tiling) and ``kind`` the kind of map it returns; a
    Prediction's ``extra`` goes into the sidecar and its ``layers`` are written beside the map."""
    summary = Summary()
    predict = predict or predictor.predict_batch
    kind = kind or predictor.kind
    t_start = time.perf_counter()

    def report(r: ItemResult) -> None:
        summary.add(r)
        on_result(r)

    todo = []
    for item in items:
        paths = sinks.output_paths(output.out_dir, item.key, output.formats)
        if output.skip_existing and sinks.outputs_exist(paths):
            report(ItemResult(item, "skipped", {k: str(v) for k, v in paths.items()}))
        else:
            todo.append((item, paths))

    base_record = {**predictor.describe(), "lotus_cli": __version__, **axes_record(predictor, opts),
                   "options": {"processing_res": opts.processing_res, "resample": opts.resample,
                               "latent": opts.latent, "seed": opts.seed if predictor.family == "g" else None}}
    with ThreadPoolExecutor(readers, thread_name_prefix="lotus-read") as read_pool, \
            ThreadPoolExecutor(1, thread_name_prefix="lotus-write") as write_pool:
        reads: deque[tuple[Item, dict, Future]] = deque()
        writes: deque[Future] = deque()
        pending = iter(todo)
        lookahead = max(4, 2 * opts.batch_size)

        def refill():
            while len(reads) < lookahead:
                nxt = next(pending, None)
                if nxt is None:
                    return
                reads.append((*nxt, read_pool.submit(read_image, nxt[0].path, max_pixels)))

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
                    report(ItemResult(item, "failed", error=f"{item.path}: prediction failed ({_brief(e)})"))
                return
            model_s = (time.perf_counter() - t0) / len(batch)
            for (item, paths, rgb), pred in zip(batch, preds):
                record = {**base_record, "input": str(item.path), "key": item.key,
                          "input_size": [int(rgb.shape[1]), int(rgb.shape[0])],
                          "processing_size": [pred.processing_size[1], pred.processing_size[0]],
                          "seconds": round(model_s, 4), **pred.extra}
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
                report(ItemResult(item, "failed", error=f"{item.path}: cannot read ({_brief(e)})"))
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


def _write(item: Item, paths: dict, pred: Prediction, kind: str, record: dict, style: sinks.Style,
           seconds: float) -> ItemResult:
    try:
        sinks.write_outputs(paths, pred.map, kind, record, style, pred.layers)
    except LotusError as e:
        return ItemResult(item, "failed", error=f"{item.path}: {e}", seconds=seconds)
    except OSError as e:
        return ItemResult(item, "failed", error=f"{item.path}: cannot write outputs ({e.strerror or e})", seconds=seconds)
    return ItemResult(item, "done", {k: str(v) for k, v in paths.items()}, seconds=seconds)


def _brief(e: BaseException) -> str:
    if isinstance(e, LotusError):  # our own errors already say what and how to fix it
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------- videos

_END = object()


@dataclass(frozen=True)
class VideoSpec:
    """How to treat a clip: which frames, and temporal alignment of affine-invariant depth."""

    select: object = None  # video.FrameSelect; None = every frame
    stabilize: bool = True
    queue: int = 4  # frames buffered between decoder, model and encoder


def frame_name(index: int, time_s: float) -> str:
    """Per-frame file stem: zero-padded index (sorts in order) and the timestamp in seconds."""
    return f"{index:06d}_{time_s:010.3f}s"


def run_video(predictor: LotusPredictor, item: Item, output: OutputSpec, opts: PredictOptions = PredictOptions(),
              spec: VideoSpec = VideoSpec(), *, on_frame: Callable[[int, int | None], None] = lambda i, n: None,
              predict: Callable[[list[np.ndarray], PredictOptions], list[Prediction]] | None = None,
              kind: str | None = None) -> ItemResult:
    """Stream one clip: decode (thread) -> predict in batches (this thread) -> encode (thread).

    Writes ``<key>.mp4`` (colour map, H.264, the sampled frame rate, original size), per-frame maps in
    ``<key>/`` for png16/npy, and ``<key>.json``. Frames decoded before damage are processed and written;
    the error names the frame index. On KeyboardInterrupt the current frames are finished and the video
    is closed so that it plays, then the interrupt propagates.
    """
    import queue
    import threading

    from .video import ClipRange, FrameSelect, Stabilizer, open_video

    t_start = time.perf_counter()
    select = spec.select or FrameSelect()
    base = output.out_dir / item.key
    paths = {"mp4": base.with_name(base.name + ".mp4"), "json": base.with_name(base.name + ".json")}
    frame_formats = [f for f in output.formats if f in ("png16", "npy")]
    if output.skip_existing and all(p.is_file() for p in paths.values()):
        return ItemResult(item, "skipped", {k: str(v) for k, v in paths.items()})
    try:
        info, frames = open_video(item.path, select)
    except LotusError as e:
        return ItemResult(item, "failed", error=str(e))
    expected = info.expected_frames(select)
    predict = predict or predictor.predict_batch
    kind = kind or predictor.kind
    depth_like = kind != "normal"
    # 16-bit frames: [0, 1] maps as they are; an angular spread (degrees) over 0..90
    top = 90.0 if (kind == "uncertainty" and predictor.task == "normal") else 1.0
    stabilizer = Stabilizer() if (spec.stabilize and kind in ("disparity", "depth")) else None
    clip_range = ClipRange()
    q_in: queue.Queue = queue.Queue(spec.queue)
    q_out: queue.Queue = queue.Queue(spec.queue)
    errors: list[str] = []
    tiling: dict = {}  # the first prediction's tiling plan (the same for every frame) for the clip's sidecar
    stop = threading.Event()

    def decode():
        try:
            for fr in frames:
                while not stop.is_set():
                    try:
                        q_in.put(fr, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except LotusError as e:
            errors.append(str(e))
        except Exception as e:  # pragma: no cover - decoder bugs
            errors.append(f"{item.path}: decoding failed ({_brief(e)})")
        finally:
            q_in.put(_END)

    stats = {"frames": 0, "change_raw": [], "change_out": [], "fits": []}
    writer_box: dict = {}

    def encode():
        from .video import VideoWriter

        prev_raw = prev_out = None
        try:
            while True:
                got = q_out.get()
                if got is _END:
                    return
                fr, raw = got
                # alignment and colouring run here, beside the model, not in its thread
                value, fit = stabilizer(raw) if stabilizer is not None else (raw, None)
                if fit is not None:
                    stats["fits"].append([round(fit[0], 6), round(fit[1], 6)])
                vrange = clip_range.update(value) if depth_like else None
                if "video" not in writer_box:
                    writer_box["video"] = VideoWriter(paths["mp4"], info.width, info.height, info.fps)
                if depth_like:
                    rgb = visualize.colorize_depth(value, kind, output.style.cmap, vrange)
                    if prev_raw is not None:
                        stats["change_raw"].append(float(np.abs(raw - prev_raw).mean()))
                        stats["change_out"].append(float(np.abs(value - prev_out).mean()))
                    prev_raw, prev_out = raw, value
                else:
                    rgb = visualize.normal_to_rgb(value)
                writer_box["video"].write(rgb)
                for fmt in frame_formats:
                    _write_frame(base / (frame_name(fr.index, fr.time) + sinks.SUFFIXES[fmt]), fmt, value, kind, top)
                stats["frames"] += 1
        except Exception as e:
            errors.append(f"{item.path}: writing outputs failed ({_brief(e)})")
            stop.set()
            while q_out.get() is not _END:  # keep the producer unblocked
                pass
        finally:
            if "video" in writer_box:
                writer_box["video"].close()

    dec = threading.Thread(target=decode, name="lotus-decode", daemon=True)
    enc = threading.Thread(target=encode, name="lotus-encode", daemon=True)
    dec.start()
    enc.start()
    interrupted = False
    seen = 0
    try:
        done = False
        while not done and not stop.is_set():
            batch = []
            while len(batch) < opts.batch_size:
                fr = q_in.get()
                if fr is _END:
                    done = True
                    break
                batch.append(fr)
            if not batch:
                break
            preds = predict([f.rgb for f in batch], opts)
            if preds and not tiling and "tiling" in preds[0].extra:
                tiling["tiling"] = preds[0].extra["tiling"]
            for fr, pred in zip(batch, preds):
                q_out.put((fr, pred.map))
                seen += 1
                on_frame(seen, expected)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:
        errors.append(f"{item.path}: prediction failed at frame {seen} ({_brief(e)})")
    finally:
        stop.set()
        q_out.put(_END)
        enc.join()
        while dec.is_alive():  # unblock a decoder waiting on a full queue
            try:
                q_in.get_nowait()
            except queue.Empty:
                pass
            dec.join(0.05)
    seconds = time.perf_counter() - t_start
    record = {**predictor.describe(), "lotus_cli": __version__, **axes_record(predictor, opts),
              **tiling,
              "input": str(item.path), "key": item.key,
              "kind": kind, "meaning": sinks.meaning(kind),
              "video": {"frames": stats["frames"], "fps": info.fps, "source_fps": info.source_fps,
                        "time_range": [info.start, info.start + stats["frames"] / info.fps], "size": [info.width,
                        info.height], "codec_in": info.codec, "file": paths["mp4"].name},
              "options": {"processing_res": opts.processing_res, "resample": opts.resample, "latent": opts.latent,
                          "seed": opts.seed if predictor.family == "g" else None, "stabilize": stabilizer is not None},
              "seconds": round(seconds, 3), "error": errors[0] if errors else None, "interrupted": interrupted}
    if depth_like:
        record["colour_range"] = {"first": clip_range.first, "last": (clip_range.lo, clip_range.hi),
                                  "method": "robust 1-99 percentiles, adapting 2% per frame", "colormap": output.style.cmap}
        record["temporal_change"] = {
            "raw": float(np.mean(stats["change_raw"])) if stats["change_raw"] else None,
            "output": float(np.mean(stats["change_out"])) if stats["change_out"] else None,
            "measure": "mean absolute frame-to-frame change of the map",
        }
        if stabilizer is not None:
            record["stabilize_fits"] = stats["fits"]
    if frame_formats:
        record["frames_folder"] = item.key
        record["frame_maps"] = {f: (f"value = png / 65535 * {top:g} (clipped)" if f == "png16" and depth_like else
                                    "n = png / 65535 * 2 - 1" if f == "png16" else "raw float32") for f in frame_formats}
    outputs = {}
    if stats["frames"]:
        sinks.write_json(paths["json"], record)
        outputs = {"mp4": str(paths["mp4"]), "json": str(paths["json"])}
        if frame_formats:
            outputs["frames"] = str(base)
    if interrupted:
        raise KeyboardInterrupt
    status = "failed" if errors else "done"
    return ItemResult(item, status, outputs, errors[0] if errors else None, seconds, stats["frames"])


def _write_frame(path: Path, fmt: str, value: np.ndarray, kind: str, top: float = 1.0) -> None:
    """One frame's map: npy raw; png16 normals as (n + 1) / 2, other maps as value / top (clipped)."""
    if fmt == "npy":
        sinks.write_npy(path, value.astype(np.float32, copy=False))
    elif kind == "normal":
        sinks.write_bytes(path, sinks.encode_png(visualize.normal_to_uint16(value)))
    else:
        sinks.write_bytes(path, sinks.encode_png(visualize.encode16(value, 0.0, top)))


# ---------------------------------------------------------------------------------- raw frame pipes

RAW_OUTPUTS = ("f32", "u16", "rgb")


def parse_size(spec: str) -> tuple[int, int]:
    """'640x360' -> (640, 360)."""
    from .errors import UsageError

    try:
        w, h = (int(v) for v in spec.lower().split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise UsageError(f"--raw {spec!r}: expected WIDTHxHEIGHT, e.g. 640x360")


def run_raw(predictor: LotusPredictor, stdin, stdout, size: tuple[int, int], opts: PredictOptions = PredictOptions(),
            out: str = "f32", *, stabilize: bool = True, cmap: str = "Spectral",
            predict: Callable[[list[np.ndarray], PredictOptions], list[Prediction]] | None = None) -> int:
    """Raw RGB24 frames of ``size`` (W, H) on ``stdin`` -> raw maps on ``stdout``, frame by frame.

    Output per frame: ``f32`` float32 little-endian [H, W] depth or [H, W, 3] normals; ``u16``
    uint16 little-endian of the [0, 1] depth (or (n + 1) / 2) times 65535; ``rgb`` uint8 colour map /
    normal RGB [H, W, 3] (one colour range for the stream). Depth is stabilised across frames unless
    ``stabilize`` is False. ``predict`` replaces ``predictor.predict_batch`` (tiling). Returns the number
    of frames; a short last frame raises InputError.
    """
    from .errors import InputError
    from .video import ClipRange, Stabilizer

    w, h = size
    nbytes = w * h * 3
    depth_like = predictor.task != "normal"
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
                raise InputError(f"stdin: frame {count + len(batch)} has {len(buf)} of {nbytes} bytes",
                                 f"send whole rgb24 frames of {w}x{h}")
            batch.append(np.frombuffer(buf, np.uint8).reshape(h, w, 3).copy())
        if not batch:
            return count
        for pred in (predict or predictor.predict_batch)(batch, opts):
            value = stabilizer(pred.map)[0] if stabilizer is not None else pred.map
            if out == "f32":
                data = value.astype("<f4")
            elif out == "u16":
                data = (visualize.normal_to_uint16(value) if not depth_like
                        else visualize.encode16(value, 0.0, 1.0)).astype("<u2")
            elif depth_like:
                data = visualize.colorize_depth(value, predictor.kind, cmap, clip_range.update(value))
            else:
                data = visualize.normal_to_rgb(value)
            stdout.write(np.ascontiguousarray(data).tobytes())
            count += 1
        stdout.flush()
