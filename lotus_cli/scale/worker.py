"""The work of one worker: its ``Job`` (picklable: Ray ships it), its predictor, and the reuse decision.

Every worker writes only its own items' outputs, with the runner's atomic writes and sidecars, and
scaled-out runs resume: an item is not computed again exactly when ``--skip-existing`` would keep its
outputs (``Reuse``); otherwise it is redone and says why.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ModelError
from ..io.outputs import output_paths
from ..io.sidecar import reusable_at
from ..io.sources import Item, is_video
from ..model import backends, registry
from ..run.clip import run_video
from ..run.images import run_images
from ..run.made import made_with
from ..run.results import ItemResult


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to build its predictor and write outputs; picklable (Ray ships it).

    ``make_predict(predictor)`` returns the batch function the runner calls (tiling, ensembles) or None
    for ``predictor.predict_batch``; it must be a module-level function or a partial of one.
    """

    model: object  # registry name, hub id, folder or registry.ModelRef
    task: str
    output: object  # run.made.OutputSpec (local folder; remote outputs are staged there)
    opts: object  # predictor.PredictOptions
    video: object  # run.made.VideoSpec
    device: str = "auto"
    dtype: str = "auto"
    max_pixels: int = 100_000_000
    kind: str | None = None
    make_predict: Callable | None = None
    predict_options: dict | None = None  # the replacement predict's output-changing options (tiling, ensembles)
    backend: str | None = None  # torch | onnxruntime | auto | None (model/backends.py): each worker resolves its own


def load(job: Job):
    """(predictor, predict function) for ``job``, on ``job.device``, calibrated (and its fp16 VAE probed) at the
    run's processing resolution."""
    ref = job.model if isinstance(job.model, registry.ModelRef) else registry.resolve(job.model, job.task)
    predictor = backends.load(registry.fetch(ref), job.backend, job.device, job.dtype, job.opts.processing_res)
    return predictor, (job.make_predict(predictor) if job.make_predict else None)


def output_names(item: Item, formats: tuple[str, ...]) -> tuple[str, list[str]]:
    """(sidecar, the other files that must exist) of ``item``'s outputs, as paths below the output folder
    or URL ('a/x.json', ['a/x.png', ...]): an image's maps, or a clip's mp4 (the sidecar vouches for its
    per-frame maps)."""
    if is_video(item.path):
        return f"{item.key}.json", [f"{item.key}.mp4"]
    paths = output_paths(Path(), item.key, formats)
    return paths.pop("json").as_posix(), [p.as_posix() for p in paths.values()]


def checkpoint_facts(job: Job) -> tuple[str, str, str, str]:
    """(family "g"/"d", task, label, map kind) of ``job``'s model, as its predictor would report them, read from
    the checkpoint's files without loading it (family: unet/config.json's in_channels, 8 for G, 4 for D)."""
    ref = registry.fetch(
        job.model if isinstance(job.model, registry.ModelRef) else registry.resolve(job.model, job.task)
    )
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
    (``made.made_with`` and ``reuse_verdict``), in the local output folder or at a remote --out.

    ``facts()`` gives (family, task, model label, kind) (``checkpoint_facts`` / ``predictor_facts``); it is
    asked once, when the first sidecar is to be compared, so a first run neither reads the checkpoint
    nor imports torch here. Calling it with an item gives (keep, why it is redone or None).
    """

    def __init__(self, job: Job, outputs, facts: Callable[[], tuple[str, str, str, str]]):
        self.job, self.outputs, self.facts = job, outputs, facts
        self._made: dict[bool, dict] = {}

    def expected(self, video: bool) -> dict:
        if video not in self._made:
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

    def published(self, item: Item) -> bool:
        """Whether ``item``'s outputs are already at the remote --out (an earlier attempt of a retried task
        published them meanwhile), so they are done, not redone. Always False for a local folder."""
        return bool(self.outputs) and self(item)[0]

    def __call__(self, item: Item) -> tuple[bool, str | None]:
        sidecar, files = output_names(item, self.job.output.formats)
        expected = functools.partial(self.expected, is_video(item.path))
        if self.outputs:
            return self.outputs.reusable(sidecar, files, expected)
        root = self.job.output.out_dir
        return reusable_at(root / sidecar, [root / f for f in files], expected)


def process(predictor, predict, items: list[Item], job: Job, on_result: Callable, read=None) -> None:
    """Predict and write ``items`` (images in batches, then each video whole) with the runner.

    ``on_result(ItemResult)`` is told about each item. Items finished meanwhile (by an earlier attempt
    of a retried task) are reported as ``done`` with their outputs, not written again. ``read``: the
    runner's image reader, replaced (run_images).
    """
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
