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

from . import __version__, sinks
from .errors import LotusError
from .predictor import LotusPredictor, PredictOptions, Prediction, processing_size
from .sources import DEFAULT_MAX_PIXELS, Item, read_image


@dataclass
class ItemResult:
    item: Item
    status: str  # "done" | "skipped" | "failed"
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def record(self) -> dict:
        """A JSON-able summary (one NDJSON line in --json mode)."""
        return {"input": str(self.item.path), "key": self.item.key, "status": self.status,
                "outputs": self.outputs, "seconds": round(self.seconds, 4), "error": self.error}


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


@dataclass(frozen=True)
class OutputSpec:
    out_dir: Path
    formats: tuple[str, ...] = sinks.DEFAULT_FORMATS
    style: sinks.Style = sinks.Style()
    skip_existing: bool = False


def run_images(predictor: LotusPredictor, items: Iterable[Item], output: OutputSpec,
               opts: PredictOptions = PredictOptions(), *, max_pixels: int = DEFAULT_MAX_PIXELS,
               on_result: Callable[[ItemResult], None] = lambda r: None, readers: int = 2,
               predict: Callable[[list[np.ndarray], PredictOptions], list[Prediction]] | None = None) -> Summary:
    """Predict every item and write its outputs; returns the counts. ``predict`` replaces
    ``predictor.predict_batch`` (e.g. tiled prediction); a Prediction's ``extra`` goes into the sidecar."""
    summary = Summary()
    predict = predict or predictor.predict_batch
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

    base_record = {**predictor.describe(), "lotus_cli": __version__,
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
                writes.append(write_pool.submit(_write, item, paths, pred.map, predictor.kind, record,
                                                output.style, model_s))

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


def _write(item: Item, paths: dict, value: np.ndarray, kind: str, record: dict, style: sinks.Style,
           seconds: float) -> ItemResult:
    try:
        sinks.write_outputs(paths, value, kind, record, style)
    except LotusError as e:
        return ItemResult(item, "failed", error=f"{item.path}: {e}", seconds=seconds)
    except OSError as e:
        return ItemResult(item, "failed", error=f"{item.path}: cannot write outputs ({e.strerror or e})", seconds=seconds)
    return ItemResult(item, "done", {k: str(v) for k, v in paths.items()}, seconds=seconds)


def _brief(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
