"""``--engine ray``: the work list as a Ray Data pipeline over a fixed pool of predictor actors.

Shape (docs/scale-out.md):

1. the driver lists the work (``dispatch.dispatch`` leaves out the items whose outputs the runner
   would keep; the others are redone, with the reason) and cuts it into units (``work_units``): each
   video alone (a video stays on one actor, so stabilisation and the clip colour range hold), images in
   runs of up to 16;
2. a CPU stage (Ray tasks on the CPUs the actors leave spare, up to one each) fetches remote inputs into
   the node's local cache and decodes each image, and resizes it to the model's input
   (``predictor.prepare``, the predictor's own arithmetic) unless tiling or an ensemble needs it whole;
   where the actors take every CPU there is no such stage and the actors decode, in the runner's reader
   threads, as one process does (remote inputs then need a spare quarter CPU, for fetching);
3. a fixed pool of ``--workers`` actors (``--gpus-per-worker`` GPUs and ``--cpus-per-worker`` CPUs
   each; Ray sets ``CUDA_VISIBLE_DEVICES`` so ``auto`` picks the actor's own GPU) each loads one
   predictor and runs ``worker.process`` on each unit with the decoded images -- the runner's
   batching by --batch-size, atomic writes and sidecars, overlapped as in one process; videos are
   decoded by their actor, frame by frame as they stream;
4. only small status rows (key, status, output paths, error) return; the driver reports each.

Faults: the actor pool restarts a dead actor and retries its unfinished unit on a live one (Ray
Data's actor defaults, max_restarts=-1 and max_task_retries=-1); a retried unit skips the items the
dead attempt finished (their sidecar says complete, made with this run's model and options), so nothing
is computed or written twice; writes are atomic, so nothing is half-written. A bad input is a failed row,
never a failed job.

Ray is imported only here, and this module only under ``--engine ray``. Tested with ray[data] 2.60
(``compute=ActorPoolStrategy``; no free-form remote args, which Ray drops in 2.64).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from ..errors import LotusError, UsageError, brief
from ..io.remote import Inputs, Outputs, fetch
from ..io.sources import Item, is_video, read_image
from ..model.predictor import prepare
from ..run.results import ItemResult
from .options import Scale
from .worker import Job, Reuse, load, predictor_facts, process

UNIT_IMAGES = 16  # images per actor call at most
STAGE_CPUS = 1.0  # per task of the CPU stage at most: one image decodes on one core
MIN_STAGE_CPUS = 0.25  # less spare than this: no CPU stage (fetching, network-bound, needs this much)


def connect(scale: Scale) -> bool:
    """Join the cluster at --ray-address, or start a local one (all of this machine's CPUs and GPUs).
    Returns whether this call connected (a caller's own ray.init is left alone)."""
    if ray.is_initialized():
        return False
    # "local": a fresh cluster for this run, never one that some other `ray start` left running here
    ray.init(
        address=scale.ray_address or "local",
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        configure_logging=True,
    )
    return True


def check_resources(scale: Scale, remote_inputs: bool) -> float:
    """Refuse a pool the cluster cannot hold (Ray would otherwise wait for it for ever, silently); returns
    the CPUs each task of the CPU stage gets (0: no stage, the actors decode)."""
    have = ray.cluster_resources()
    need_cpu = scale.workers * scale.cpus_per_worker
    need_gpu = scale.workers * scale.gpus_per_worker
    spare = have.get("CPU", 0) - need_cpu
    if spare < 0 or need_gpu > have.get("GPU", 0) or (remote_inputs and spare < MIN_STAGE_CPUS):
        need = f"{need_cpu + (MIN_STAGE_CPUS if remote_inputs else 0):g} CPUs"
        raise UsageError(
            f"--workers {scale.workers} x (--cpus-per-worker {scale.cpus_per_worker:g}, --gpus-per-worker "
            f"{scale.gpus_per_worker:g}) needs {need}{' (with fetching remote inputs)' if remote_inputs else ''} "
            f"and {need_gpu:g} GPUs; the Ray cluster has {have.get('CPU', 0):g} and {have.get('GPU', 0):g}",
            "use fewer workers or fewer resources per worker, or add nodes",
        )
    return min(STAGE_CPUS, spare) if spare >= MIN_STAGE_CPUS else 0.0


def _decode(batch: dict, job: Job, whole: bool) -> dict:
    """The CPU stage, on each work unit: fetch its remote inputs into this node's cache, decode its images
    (``read_image``) and, unless ``whole``, prepare them as the model's input (``predictor.prepare``). A
    failure becomes that item's error, worded as the runner words it. Adds the column ``images``: the
    unit's {key: decoded image}, pickled."""
    units, images = [], []
    for unit in batch["unit"]:
        entries, decoded = json.loads(unit), {}
        for e in entries:
            path = Path(e["path"])
            try:
                if e["url"]:
                    fetch(e["url"], path)
                if not is_video(path):
                    rgb = read_image(path, job.max_pixels)
                    decoded[e["key"]] = rgb if whole else prepare(rgb, job.opts.processing_res)
            except LotusError as err:
                e["error"] = str(err)
            except Exception as err:  # pragma: no cover - decoder bugs
                e["error"] = f"{path}: cannot read ({brief(err)})"
        units.append(json.dumps(entries))
        images.append(pickle.dumps(decoded, protocol=5))
    return {"unit": np.array(units, dtype=object), "images": np.array(images, dtype=object)}


class _Worker:
    """One pool actor: one predictor, reused for every batch it is given."""

    def __init__(self, job: Job, outputs: Outputs | None):
        self.job, self.outputs = job, outputs
        self.predictor, self.predict = load(job)
        self.reuse = Reuse(job, outputs, functools.partial(predictor_facts, self.predictor, job))

    def __call__(self, batch: dict) -> dict:
        rows: list[ItemResult] = []
        todo = []
        decoded = {k: v for blob in batch.get("images", ()) for k, v in pickle.loads(blob).items()}

        def read(item: Item):  # what the CPU stage decoded, else the file (no stage: the actor decodes)
            return decoded[item.key] if item.key in decoded else read_image(item.path, self.job.max_pixels)

        for e in (e for unit in batch["unit"] for e in json.loads(unit)):
            item = Item(Path(e["path"]), e["key"])
            if e["error"]:
                rows.append(ItemResult(item, "failed", error=e["error"]))
            elif self.reuse.published(item):
                rows.append(ItemResult(item, "done"))  # published by an earlier attempt of this unit
            else:
                todo.append(item)
        if todo:
            process(
                self.predictor,
                self.predict,
                todo,
                self.job,
                lambda r: rows.append(self.outputs.publish(r) if self.outputs else r),
                read,
            )
        return {
            "key": [r.item.key for r in rows],
            "status": [r.status for r in rows],
            "outputs": [json.dumps(r.outputs) for r in rows],
            "error": [r.error or "" for r in rows],
            "seconds": [r.seconds for r in rows],
            "frames": [r.frames for r in rows],
        }


def work_units(items: list[Item], staged: Inputs, workers: int, batch_size: int) -> list[list[dict]]:
    """The work cut into units, each one actor call and the unit retried after a worker dies: each video
    alone; images in runs long enough for the runner to overlap reading, the model and writing (up to
    UNIT_IMAGES), short enough that every worker gets several."""

    def entry(i: Item) -> dict:
        return {"path": str(i.path), "key": i.key, "url": staged.url(i) or "", "error": ""}

    images = [entry(i) for i in items if not is_video(i.path)]
    size = max(batch_size, min(UNIT_IMAGES, -(-len(images) // (4 * workers))))
    return [[entry(i)] for i in items if is_video(i.path)] + [images[k : k + size] for k in range(0, len(images), size)]


class _MainThreadOnly(io.TextIOBase):
    """A ``sys.stdout`` that passes the main thread's writes (the CLI's records) to ``data`` and every other
    thread's (Ray's notices, printed from its listener threads) to ``other``."""

    def __init__(self, data, other):
        self.data, self.other = data, other

    def write(self, text: str) -> int:
        return (self.data if threading.current_thread() is threading.main_thread() else self.other).write(text)

    def flush(self) -> None:
        self.data.flush()
        self.other.flush()


@contextmanager
def _stdout_kept_for_data():
    """--json keeps stdout for records, but Ray prints notices there (a dead worker's, from a listener
    thread; its C++ core writes to file descriptor 1). For the run, descriptor 1 points at stderr and
    only the main thread's writes reach the real stdout."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    saved = sys.stdout
    sys.stdout = _MainThreadOnly(open(real, "w", closefd=False), sys.stderr)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = saved
        os.dup2(real, 1)
        os.close(real)


def run(
    job: Job,
    items: list[Item],
    scale: Scale,
    staged: Inputs,
    outputs: Outputs | None,
    report: Callable[[ItemResult], None],
) -> None:
    """Process ``items`` on the Ray cluster; ``report`` hears of each as its status row arrives."""
    by_key = {i.key: i for i in items}
    with _stdout_kept_for_data():
        connected = connect(scale)
        try:
            for row in _pipeline(job, items, scale, staged, outputs).iter_rows():
                status, outputs_, error = str(row["status"]), json.loads(row["outputs"]), row["error"] or None
                item = by_key[str(row["key"])]
                report(ItemResult(item, status, outputs_, error, float(row["seconds"]), int(row["frames"])))
        finally:
            if connected:  # stops Ray's listener threads; shutdown prints the notices it held back to sys.stdout
                with redirect_stdout(sys.stderr):
                    ray.shutdown()


def _pipeline(job: Job, items: list[Item], scale: Scale, staged: Inputs, outputs: Outputs | None):
    """The Ray Data pipeline over ``items``' work units: the CPU stage where CPUs are spare, then the actor pool."""
    stage_cpus = check_resources(scale, any(staged.url(i) for i in items))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own progress from the status rows
    units = work_units(items, staged, scale.workers, job.opts.batch_size)
    # one block per unit, one unit per call: the unit is what a dead worker's retry redoes
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
    if stage_cpus:  # tiling and ensembles take the image whole; the plain predictor its prepared input
        whole = job.make_predict is not None
        ds = ds.map_batches(_decode, fn_args=(job, whole), batch_size=1, num_cpus=stage_cpus)
    return ds.map_batches(
        _Worker,
        fn_constructor_args=(job, outputs),
        batch_size=1,
        compute=ActorPoolStrategy(size=scale.workers),
        num_cpus=scale.cpus_per_worker,
        num_gpus=scale.gpus_per_worker or None,
    )
