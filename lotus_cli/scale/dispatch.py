"""Many processes, GPUs and machines: which engine runs a command's share of the work.

Three ways to spread one `lotus depth|normal|uncertainty` command (docs: "Many GPUs and machines"):
``--shard K/N`` and torchrun (``shard.py``), and ``--engine ray`` (``ray_engine.py``): a Ray Data
pipeline over a fixed pool of predictor actors. URL inputs and ``--out`` URLs come this way too
(``io/remote.py``). No torch import at module level (``lotus --help`` stays fast).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UsageError
from ..io.atomic import check_out_dir
from ..io.sources import Item
from .shard import env_rank, parse_shard, resolve_shard, select, worker_device
from .worker import Job, Reuse, checkpoint_facts, predictor_facts, process

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Scale:
    """How to spread the work: the command-line options of README "Many GPUs and machines"."""

    shard: str | None = None
    engine: str = "local"
    ray_address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    def check(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.engine == "local" and (
            self.ray_address or self.workers != 1 or self.gpus_per_worker or self.cpus_per_worker != 1
        ):
            raise UsageError("--ray-address, --workers, --gpus-per-worker and --cpus-per-worker need --engine ray")
        if self.workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise UsageError("--workers must be >= 1, --gpus-per-worker >= 0 and --cpus-per-worker > 0")
        if self.shard:
            parse_shard(self.shard)


def wanted(scale: Scale, inputs: Iterable[str], out, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a command needs this module: a shard, torchrun, the Ray engine, or URLs."""
    from ..io import remote

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
    *,
    exts: tuple[str, ...],
    on_result: Callable,
    on_problem: Callable,
    load_predictor: Callable,
    on_warning: Callable[[str], None] = lambda text: None,
    environ: Mapping[str, str] = os.environ,
):
    """Run ``job`` over this process's share of ``inputs``; returns the runner's Summary.

    ``out``: local folder or URL; it is never read as input (it may sit inside an input folder). An item
    whose outputs the runner would keep under skip_existing is skipped; any other is redone, and its
    ``ItemResult.redone`` says why when it had outputs. ``on_result(ItemResult, input_name)`` hears of
    every item (input_name is the URL of a remote input); ``on_problem(InputError)`` of each input that
    cannot be used; ``on_warning(text)`` of symlink loops in local folder walks.
    ``load_predictor(model, task, device, dtype)`` loads the model of the local engine (the CLI's, which
    says what it loaded); Ray workers load their own.
    """
    from ..io import remote, sources
    from ..run.results import ItemResult, Summary

    scale.check()
    shard = resolve_shard(scale.shard, environ)
    job = replace(job, device=worker_device(job.device, environ))
    outputs = remote.Outputs(remote.normalise(out)) if remote.is_url(out) else None
    if outputs:
        outputs.check()
        job = replace(job, output=replace(job.output, out_dir=outputs.staging))
    else:
        job = replace(job, output=replace(job.output, out_dir=Path(remote.normalise(out))))
        check_out_dir(job.output.out_dir)
    local = [remote.normalise(i) for i in inputs if not remote.is_url(i)]
    exclude = () if outputs else (job.output.out_dir,)
    items, problems = sources.expand(local, exts=exts, exclude=exclude, on_warning=on_warning) if local else ([], [])
    urls = [i for i in inputs if remote.is_url(i)]
    staged = remote.Inputs({})
    if urls:
        more, more_problems, staged = remote.expand(urls, exts, exclude=(outputs.url,) if outputs else ())
        items, problems = items + more, problems + more_problems
    for p in problems:
        on_problem(p)
    summary = Summary()
    redone: dict[str, str] = {}  # key -> why its outputs are not kept (the runner says it too for local ones)

    def report(r) -> None:
        if r.redone is None and r.item.key in redone:
            r = replace(r, redone=redone[r.item.key])
        summary.add(r)
        on_result(r, staged.url(r.item) or str(r.item.path))

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
    if scale.engine == "ray":
        from . import ray_engine

        ray_engine.run(job, todo, scale, staged, outputs, report)
    else:
        predictor = load_predictor(job.model, job.task, job.device, job.dtype)
        run_items(
            predictor, job.make_predict(predictor) if job.make_predict else None, todo, job, staged, outputs, report
        )
    return summary


def run_items(
    predictor, predict, items: list[Item], job: Job, staged, outputs, report: Callable, chunk: int = 16
) -> None:
    """``process`` in chunks, fetching remote inputs just before their chunk and publishing remote
    outputs as each item finishes; items whose outputs at a remote --out the runner would keep (published
    meanwhile, e.g. by an earlier attempt) are reported done, not redone."""
    from ..errors import LotusError
    from ..io import remote
    from ..run.results import ItemResult

    def publish(r) -> None:
        report(outputs.publish(r) if outputs else r)

    reuse = Reuse(job, outputs, functools.partial(predictor_facts, predictor, job))

    for start in range(0, len(items), chunk):
        ready = []
        for item in items[start : start + chunk]:
            url = staged.url(item)
            if outputs and reuse(item)[0]:
                report(ItemResult(item, "done"))
                continue
            try:
                if url:
                    remote.fetch(url, item.path)
                ready.append(item)
            except LotusError as e:
                report(ItemResult(item, "failed", error=str(e)))
        if ready:
            process(predictor, predict, ready, job, publish)
