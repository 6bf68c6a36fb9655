"""Many processes, GPUs and machines: shards of the work list, and the work of one worker.

Three ways to spread one `lotus depth|normal|uncertainty` command (README "Many GPUs and machines"):

* ``--shard K/N``: process K of N (0-based) takes the inputs whose output key hashes to K. The hash is
  of the key alone (BLAKE2b), so a file's shard never depends on which other files exist: adding files
  to the folder does not move finished work to another shard. For Slurm arrays, Kubernetes indexed
  Jobs, hand-launched processes.
* ``torchrun``: RANK / WORLD_SIZE give the shard and LOCAL_RANK the device (cuda:LOCAL_RANK when CUDA
  exists, else the CPU). With ``--shard K/N`` as well, rank r of W takes shard K*W + r of N*W (a Slurm
  array of torchrun jobs).
* ``--engine ray`` (lotus_cli/ray_engine.py): a Ray Data pipeline over a fixed pool of predictor actors.

Every worker writes only its own items' outputs, with the runner's atomic writes and sidecars
(lotus_cli.runner), and scaled-out runs resume: an item is not computed again exactly when the runner's
--skip-existing would keep its outputs (``Reuse``: its sidecar, written last, says its run completed with
the same model and output-changing options, and its files exist); otherwise it is redone and says why.
No torch import at module level (``lotus --help`` stays fast).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from . import sinks
from .errors import ModelError, UsageError
from .sources import Item, is_video

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str) -> Shard:
    """'3/8' -> Shard(3, 8); K is 0-based."""
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        k, n = -1, 0
    if n < 1 or not 0 <= k < n:
        raise UsageError(
            f"--shard {spec!r}: expected K/N with 0 <= K < N",
            "e.g. --shard 0/4 .. --shard 3/4; in a Slurm array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
        )
    return Shard(k, n)


def env_rank(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, or None outside a multi-process launch."""
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank = int(environ["RANK"])
        return rank, world, int(environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise UsageError(
            f"WORLD_SIZE is set but RANK / LOCAL_RANK are not integers ({e})",
            "launch with torchrun, or unset WORLD_SIZE",
        ) from e


def resolve_shard(spec: str | None, environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard of this process: --shard, torchrun's rank, both combined, or None (everything)."""
    shard = parse_shard(spec) if spec else None
    ranks = env_rank(environ)
    if ranks is None:
        return shard
    rank, world, _ = ranks
    if shard is None:
        return Shard(rank, world)
    return Shard(shard.index * world + rank, shard.count * world)


def shard_of(key: str, count: int) -> int:
    """The shard (0 .. count-1) an output key belongs to; stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select(items: Iterable[Item], shard: Shard | None) -> list[Item]:
    """The items of ``shard`` (all of them for None), in their given order."""
    items = list(items)
    if shard is None or shard.count == 1:
        return items
    return [i for i in items if shard_of(i.key, shard.count) == shard.index]


def worker_device(device: str, environ: Mapping[str, str] = os.environ) -> str:
    """--device for this process: under torchrun, ``auto`` becomes cuda:LOCAL_RANK (or cpu without CUDA)."""
    ranks = env_rank(environ)
    if device != "auto" or ranks is None:
        return device
    import torch  # only under torchrun; deciding needs to know whether CUDA exists

    return f"cuda:{ranks[2]}" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------ one worker's job


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to build its predictor and write outputs; picklable (Ray ships it).

    ``make_predict(predictor)`` returns the batch function the runner calls (tiling, ensembles) or None
    for ``predictor.predict_batch``; it must be a module-level function or a partial of one.
    """

    model: object  # registry name, hub id, folder or models.ModelRef
    task: str
    output: object  # runner.OutputSpec (local folder; remote outputs are staged there)
    opts: object  # predictor.PredictOptions
    video: object  # runner.VideoSpec
    device: str = "auto"
    dtype: str = "auto"
    max_pixels: int = 100_000_000
    kind: str | None = None
    make_predict: Callable | None = None
    predict_options: dict | None = None  # the replacement predict's output-changing options (tiling, ensembles)


def load(job: Job):
    """(predictor, predict function) for ``job``, on ``job.device``."""
    from . import models
    from .predictor import LotusPredictor

    ref = job.model if isinstance(job.model, models.ModelRef) else models.resolve(job.model, job.task)
    predictor = LotusPredictor.from_pretrained(models.fetch(ref), device=job.device, dtype=job.dtype)
    return predictor, (job.make_predict(predictor) if job.make_predict else None)


def output_names(item: Item, formats: tuple[str, ...]) -> tuple[str, list[str]]:
    """(sidecar, the other files that must exist) of ``item``'s outputs, as paths below the output folder
    or URL ('a/x.json', ['a/x.png', ...]): an image's maps, or a clip's mp4 (the sidecar vouches for its
    per-frame maps)."""
    if is_video(item.path):
        return f"{item.key}.json", [f"{item.key}.mp4"]
    paths = sinks.output_paths(Path(), item.key, formats)
    return paths.pop("json").as_posix(), [p.as_posix() for p in paths.values()]


def checkpoint_facts(job: Job) -> tuple[str, str, str, str]:
    """(family "g"/"d", task, label, map kind) of ``job``'s model, as its predictor would report them, read from
    the checkpoint's files without loading it (family: unet/config.json's in_channels, 8 for G, 4 for D)."""
    from . import models

    ref = models.fetch(job.model if isinstance(job.model, models.ModelRef) else models.resolve(job.model, job.task))
    try:
        channels = json.loads((ref.folder / "unet" / "config.json").read_text())["in_channels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"{ref.folder}/unet/config.json: unreadable ({e})", "pass a folder in the hub layout (unet/, vae/, ...)"
        ) from e
    return ("g" if channels == 8 else "d"), ref.entry.task, ref.label, job.kind or ref.entry.kind


def predictor_facts(predictor, job: Job) -> tuple[str, str, str, str]:
    """``checkpoint_facts`` of a loaded predictor."""
    return predictor.family, predictor.task, predictor.describe()["model"], job.kind or predictor.kind


class Reuse:
    """Whether an item's existing outputs stay, decided exactly as the runner decides under skip_existing
    (``runner.made_with`` and ``sinks.reuse_verdict``), in the local output folder or at a remote --out.

    ``facts()`` gives (family, task, model label, kind) (``checkpoint_facts`` / ``predictor_facts``); it is
    asked once, when the first sidecar is to be compared, so a first run neither reads the checkpoint
    nor imports torch here. Calling it with an item gives (keep, why it is redone or None).
    """

    def __init__(self, job: Job, outputs, facts: Callable[[], tuple[str, str, str, str]]):
        self.job, self.outputs, self.facts = job, outputs, facts
        self._made: dict[bool, dict] = {}

    def expected(self, video: bool) -> dict:
        if video not in self._made:
            # the runner imports torch: only once there is an earlier output to judge
            from .runner import made_with

            family, task, model, kind = self.facts()
            made = made_with(
                family,
                task,
                model,
                kind,
                self.job.output,
                self.job.opts,
                self.job.video if video else None,
                self.job.predict_options,
            )
            self._made[video] = vars(made)
        return self._made[video]

    def __call__(self, item: Item) -> tuple[bool, str | None]:
        sidecar, files = output_names(item, self.job.output.formats)
        expected = functools.partial(self.expected, is_video(item.path))
        if self.outputs:
            return self.outputs.reusable(sidecar, files, expected)
        root = self.job.output.out_dir
        return sinks.reusable_at(root / sidecar, [root / f for f in files], expected)


def process(predictor, predict, items: list[Item], job: Job, on_result: Callable, read=None) -> None:
    """Predict and write ``items`` (images in batches, then each video whole) with the runner.

    ``on_result(ItemResult)`` is told about each item. Items finished meanwhile (by an earlier attempt
    of a retried task) are reported as ``done`` with their outputs, not written again. ``read``: the
    runner's image reader, replaced (run_images).
    """
    from .runner import ItemResult, run_images, run_video

    output = replace(job.output, skip_existing=True)

    def report(r: ItemResult) -> None:
        on_result(replace(r, status="done") if r.status == "skipped" else r)

    images = [i for i in items if not is_video(i.path)]
    if images:
        run_images(
            predictor,
            images,
            output,
            job.opts,
            max_pixels=job.max_pixels,
            on_result=report,
            predict=predict,
            kind=job.kind,
            predict_options=job.predict_options,
            read=read,
        )
    for item in items:
        if is_video(item.path):
            report(
                run_video(
                    predictor,
                    item,
                    output,
                    job.opts,
                    job.video,
                    predict=predict,
                    kind=job.kind,
                    predict_options=job.predict_options,
                )
            )


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
    from . import remote

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
    from . import remote, sources
    from .runner import ItemResult, Summary

    scale.check()
    shard = resolve_shard(scale.shard, environ)
    job = replace(job, device=worker_device(job.device, environ))
    outputs = remote.Outputs(remote.normalise(out)) if remote.is_url(out) else None
    if outputs:
        outputs.check()
        job = replace(job, output=replace(job.output, out_dir=outputs.staging))
    else:
        job = replace(job, output=replace(job.output, out_dir=Path(remote.normalise(out))))
        sinks.check_out_dir(job.output.out_dir)
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
    from . import remote
    from .errors import LotusError
    from .runner import ItemResult

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
