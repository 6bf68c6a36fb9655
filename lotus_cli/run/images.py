"""Images through the shared predictor, with reading and writing overlapped.

Reading (a small thread pool, bounded look-ahead) and writing (one thread) run beside the model, so the
predictor does not wait on I/O. Images are grouped by processing size into batches of up to
``batch_size``; a bucket is flushed when full, or the oldest when too many images wait. One bad input
never stops the batch: it becomes a failed ``ItemResult`` and the run goes on. Nothing here prints;
``on_result`` is told about every item as it finishes. With ``skip_existing`` an output is kept only when
its sidecar says its run completed with the same model and options, otherwise it is redone and
``ItemResult.redone`` says why.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..errors import LotusError, brief
from ..io.formats import Style
from ..io.outputs import output_paths, write_outputs
from ..io.sidecar import reusable, sidecar
from ..io.sources import DEFAULT_MAX_PIXELS, Item, read_image
from ..model.fallbacks import predict_items
from ..model.predictor import LotusPredictor, Prediction, PredictOptions, Prepared, processing_size
from .made import OutputSpec, axes_record, made_with
from .results import ItemResult, Summary


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
    """Predict every item and write its outputs; returns the counts. ``predict(images, opts)`` gives one
    result per image, a Prediction or the LotusError that fails it alone (default: the plain prediction with
    its out-of-memory fallbacks, ``model.fallbacks.predict_items``; ``run.predict.make_predict`` builds the
    tiled and ensemble ones), ``kind`` the kind of map it returns and
    ``predict_options`` its output-changing options (e.g. {"tile": ..., "samples": ...}: recorded in the
    sidecar and compared by ``skip_existing``); a Prediction's ``extra`` goes into the sidecar and its
    ``layers`` are written beside the map. ``read`` replaces reading an item's file (``read_image``), e.g.
    with an image a pipeline's CPU stage decoded (and, as ``Prepared``, resized) already."""
    read = read or (lambda item: read_image(item.path, max_pixels))
    summary = Summary()
    predict = predict or functools.partial(predict_items, predictor)
    kind = kind or predictor.kind
    t_start = time.perf_counter()
    model = predictor.describe()
    made = made_with(predictor.family, predictor.task, model.get("model"), kind, output, opts, None, predict_options)
    options = made.options
    redone: dict[str, str] = {}

    lock = threading.Lock()

    def report(r: ItemResult) -> None:  # from this thread and the writer's
        with lock:
            r.redone, r.kind, r.backend = redone.get(r.item.key), kind, model.get("backend")
            summary.add(r)
            on_result(r)

    def write_and_report(*args) -> None:
        # the writer reports each item as its sidecar lands: a signal, taken by the main thread, cannot come
        # between an item's outputs and its report, so a stopped run reports every input it finished
        report(_write(*args))

    todo = []
    for item in items:
        paths = output_paths(output.out_dir, item.key, output.formats)
        if output.skip_existing:
            keep, why = reusable(paths["json"], [p for f, p in paths.items() if f != "json"], **vars(made))
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
                writes.popleft().result()  # raises what reporting raised (a closed stdout)

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
                if isinstance(pred, LotusError):  # this image alone (out of memory in every try, a bad map)
                    report(ItemResult(item, "failed", error=f"{item.path}: {pred}", seconds=model_s))
                    continue
                record = sidecar(
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
                writes.append(
                    write_pool.submit(write_and_report, item, paths, pred, kind, record, output.style, model_s)
                )

        try:
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
        finally:  # on Ctrl-C too: the writes under way finish (and report) before the interrupt goes on
            drain_writes(block=True)
    summary.seconds = time.perf_counter() - t_start
    return summary


def _write(
    item: Item, paths: dict, pred: Prediction, kind: str, record: dict, style: Style, seconds: float
) -> ItemResult:
    try:
        write_outputs(paths, pred.map, kind, record, style, pred.layers)
    except LotusError as e:
        return ItemResult(item, "failed", error=f"{item.path}: {e}", seconds=seconds)
    except OSError as e:
        return ItemResult(
            item, "failed", error=f"{item.path}: cannot write outputs ({e.strerror or e})", seconds=seconds
        )
    except Exception as e:  # an encoder's or library's own failure is this item's, never the batch's end
        return ItemResult(item, "failed", error=f"{item.path}: writing outputs failed ({brief(e)})", seconds=seconds)
    return ItemResult(item, "done", {k: str(v) for k, v in paths.items()}, seconds=seconds)
