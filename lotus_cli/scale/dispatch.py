"""Many processes, GPUs and machines: which engine runs a command's share of the work.

``predict`` is `lotus depth|normal|uncertainty`: in this process (``run.predict``), or spread three ways
(docs: "Many GPUs and machines"): ``--shard K/N`` and torchrun (``shard.py``), and ``--engine ray``
(``ray_engine.py``), a Ray Data pipeline over a fixed pool of predictor actors. URL inputs and ``--out``
URLs come this way too (``io/remote.py``). Every scaled-out run resumes: an item whose outputs
``--skip-existing`` would keep is skipped, any other is redone, and its result says why.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from ..errors import LotusError, UsageError
from ..io import remote, sources
from ..io.atomic import check_out_dir
from ..io.sources import Item
from ..model import onnx_runtime, registry
from ..run import predict as local
from ..run.events import Reporter
from ..run.loading import load_predictor
from ..run.results import ItemResult, Summary
from .options import Scale
from .shard import env_rank, resolve_shard, select, worker_device
from .worker import Job, Reuse, checkpoint_facts, predictor_facts, process


def predict(
    request: local.PredictRequest,
    scale: Scale = Scale(),
    reporter: Reporter = Reporter(),
    stdin=None,
    stdout=None,
    environ: Mapping[str, str] = os.environ,
) -> Summary:
    """Run ``request`` as ``scale`` says: in this process unless a shard, torchrun, the Ray engine or a URL
    asks for more (``wanted``). Raises UsageError / ModelError before any input is read."""
    if request.raw is not None or not wanted(scale, request.inputs, request.out, environ):
        return local.predict(request, reporter, stdin, stdout)
    p = local.plan(request)
    r = request
    if onnx_runtime.is_export(r.model):  # workers read the checkpoint's own files (family, task) to resume
        raise UsageError(
            f"--model {r.model} is an ONNX export folder, which a scaled-out run (--shard, --engine ray, torchrun or "
            "URLs) does not take",
            "pass the checkpoint it was made from, with --backend onnxruntime",
        )
    job = Job(
        p.ref,
        r.task,
        p.output,
        p.opts,
        p.video,
        r.device,
        r.dtype,
        r.max_pixels,
        p.kind,
        local.predict_factory(p),
        p.predict_options,
        r.backend,
    )
    return dispatch(job, list(r.inputs), r.out or p.output.out_dir, scale, reporter, environ=environ)


def wanted(scale: Scale, inputs: Iterable[str], out, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a command needs this module: a shard, torchrun, the Ray engine, or URLs."""

    def url(spec) -> bool:  # file:// too: it is read as the local path it names
        return remote.is_url(spec) or remote.normalise(spec) != str(spec)

    return bool(
        scale != Scale() or env_rank(environ) or (out is not None and url(out)) or any(url(i) for i in inputs or ())
    )


def dispatch(
    job: Job,
    inputs: list[str],
    out,
    scale: Scale,
    reporter: Reporter = Reporter(),
    *,
    exts: tuple[str, ...] = sources.MEDIA_EXTS,
    environ: Mapping[str, str] = os.environ,
) -> Summary:
    """Run ``job`` over this process's share of ``inputs``; returns the counts of this share.

    ``out``: local folder or URL; it is never read as input (it may sit inside an input folder). Inputs that
    cannot be used are failed results; a share with no inputs is a success with nothing done (a Slurm array
    task whose shard is empty), while a listing with nothing in it at all is a UsageError. The local engine
    loads its model here (``run.loading``, which notes what it loaded); Ray workers load their own.
    """
    scale.check()
    if not isinstance(job.model, registry.ModelRef):
        job = replace(job, model=registry.resolve(job.model, job.task))
    shard = resolve_shard(scale.shard, environ)
    job = replace(job, device=worker_device(job.device, environ))
    if scale.engine == "ray" and job.device.startswith("cuda:") and job.device != "cuda:0":
        raise UsageError(
            f"--device {job.device} with --engine ray: each actor sees only its own GPU, as cuda:0",
            "use --device auto (or cuda) and --gpus-per-worker",
        )
    outputs = remote.Outputs(remote.normalise(out)) if remote.is_url(out) else None
    if outputs:
        outputs.check()
        job = replace(job, output=replace(job.output, out_dir=outputs.staging))
    else:
        job = replace(job, output=replace(job.output, out_dir=Path(remote.normalise(out))))
        check_out_dir(job.output.out_dir)
    if not inputs:
        raise UsageError("no inputs given", "pass files, folders, globs, or - to read paths from stdin")
    with reporter.busy(f"{job.task}: listing inputs"):
        items, problems, staged = _list(inputs, exts, job.output.out_dir, outputs, reporter)
    if not items and not problems:
        raise UsageError("no usable inputs", "pass image or video files, or folders that hold them")
    summary = Summary(out=remote.normalise(out))
    redone: dict[str, str] = {}  # key -> why its outputs are not kept (the runner says it too for local ones)
    kind = job.kind or job.model.entry.kind  # as the predictor will report it
    bar = None

    def report(r: ItemResult) -> None:
        r = replace(r, redone=r.redone or redone.get(r.item.key), kind=kind, input=staged.url(r.item))
        summary.add(r)
        reporter.result(r)
        if bar is not None:
            bar.advance()

    for problem in problems:
        report(ItemResult.unusable(problem))
    reuse = Reuse(job, outputs, functools.cache(functools.partial(checkpoint_facts, job)))
    todo = []
    for item in select(items, shard):
        keep, why = reuse(item)
        if keep:
            report(ItemResult(item, "skipped"))
            continue
        if why is not None:
            redone[item.key] = why
        todo.append(item)
    if not todo:
        return summary
    bar = reporter.progress(job.task, len(todo))
    try:
        if scale.engine == "ray":
            from . import ray_engine  # Ray is an extra, imported only when asked for

            ray_engine.run(job, todo, scale, staged, outputs, report)
        else:
            predictor = load_predictor(job.model, job.task, job.device, job.dtype, reporter, backend=job.backend)
            batch = job.make_predict(predictor) if job.make_predict else None
            run_items(predictor, batch, todo, job, staged, outputs, report)
    except KeyboardInterrupt:
        _report_finished(todo, summary, reuse, report)
        raise
    return summary


def _report_finished(todo: list[Item], summary: Summary, reuse: Reuse, report: Callable) -> None:
    """On Ctrl-C or SIGTERM: a record for every input of ``todo`` whose outputs are complete but whose result
    had not come back (a Ray actor's finished rows the driver had not read yet), judged as a rerun judges."""
    reported = summary.keys
    for item in todo:
        if item.key not in reported and reuse(item)[0]:
            report(ItemResult(item, "done"))


def _list(inputs: list[str], exts, out_dir: Path, outputs, reporter: Reporter):
    """(items, problems, staged remote inputs) of local paths and URLs; the output folder is never listed."""
    local_inputs = [remote.normalise(i) for i in inputs if not remote.is_url(i)]
    exclude = () if outputs else (out_dir,)
    items, problems = (
        sources.expand(local_inputs, exts=exts, exclude=exclude, on_warning=reporter.warning)
        if local_inputs
        else ([], [])
    )
    urls = [i for i in inputs if remote.is_url(i)]
    staged = remote.Inputs({})
    if urls:
        more, more_problems, staged = remote.expand(urls, exts, exclude=(outputs.url,) if outputs else ())
        items, problems = items + more, problems + more_problems
    return items, problems, staged


def run_items(
    predictor, predict, items: list[Item], job: Job, staged, outputs, report: Callable, chunk: int = 16
) -> None:
    """``process`` in chunks, fetching remote inputs just before their chunk and publishing remote
    outputs as each item finishes; items that an earlier attempt published meanwhile are reported done."""

    def publish(r) -> None:
        report(outputs.publish(r) if outputs else r)

    reuse = Reuse(job, outputs, functools.partial(predictor_facts, predictor, job))
    for start in range(0, len(items), chunk):
        ready = []
        for item in items[start : start + chunk]:
            if reuse.published(item):
                report(ItemResult(item, "done"))
                continue
            try:
                url = staged.url(item)
                if url:
                    remote.fetch(url, item.path)
                ready.append(item)
            except LotusError as e:
                report(ItemResult(item, "failed", error=str(e)))
        if ready:
            process(predictor, predict, ready, job, publish)
