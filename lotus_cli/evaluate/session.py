"""`lotus eval depth|normal` as a library call: every option checked before anything is read, then each
benchmark set opened, scored (``run.evaluate``) and written, reporting through a ``Reporter``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LotusError, UsageError
from ..io.atomic import check_out_dir
from ..model import registry
from ..run.events import Reporter
from ..run.loading import load_predictor
from . import datasets as D
from . import run as R


@dataclass(frozen=True)
class EvalRequest:
    """The options of one `lotus eval depth|normal` call (defaults: the commands')."""

    task: str
    datasets: tuple[str, ...] = ()
    model: str | None = None
    output_kind: str | None = None
    predictions: Path | None = None
    splits: tuple[str, ...] = ()
    alignment: str = "auto"
    max_samples: int | None = None
    save_predictions: bool = False
    out: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    processing_res: int | None = None
    seed: int = 0


@dataclass
class Scores:
    """What a session scored: per-dataset results, the sets that could not be opened ({name: error}), the
    source of predictions (its ``label`` names it), and the files written under ``--out``."""

    results: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    source: object = None
    written: tuple[Path, ...] = ()

    @property
    def exit_code(self) -> int:
        return 1 if self.errors or any(r.failed for r in self.results) else 0


def score(r: EvalRequest, reporter: Reporter = Reporter()) -> Scores:
    """Score ``r``'s model (or folder of predictions) on its benchmark sets. A set that cannot be opened is
    reported and left out (a usage error ends the session); a sample that fails is recorded in its results."""
    opts, pairs, specs, splits, source, ref = _plan(r)
    scores = Scores()
    opened = []
    for (name, path), spec in zip(pairs, specs):
        try:
            ds = D.open_dataset(r.task, name, path, splits.get(spec.name))
        except LotusError as e:
            if e.exit_code == 2:
                raise
            reporter.warning(str(e))
            scores.errors[spec.name] = str(e)
            continue
        extra = f", {ds.skipped} listed without ground truth" if ds.skipped else ""
        reporter.note(f"{spec.title}: {len(ds.samples)} samples from {ds.store.label}{extra}")
        opened.append(ds)
    if not opened:
        return scores
    for ds in opened if source is not None else ():
        R.resolve_alignment(ds, source, opts)  # maps that do not say what they are need --alignment
    if source is None:
        source = R.ModelSource(load_predictor(ref, r.task, r.device, r.dtype, reporter))
    scores.source = source
    for ds in opened:
        total = min(len(ds.samples), opts.max_samples or len(ds.samples))
        bar = reporter.progress(ds.spec.title, total)

        def on_sample(i, n, record, bar=bar):
            if record["status"] != "ok":
                reporter.warning(f"skipped {record['key']}: {record['error']}")
            bar.advance()

        scores.results.append(R.evaluate(ds, source, opts, on_sample))
        bar.close()
        ds.store.close()
    if r.out is not None:
        scores.written = R.write_outputs(r.out, r.task, source, opts, scores.results, scores.errors)
    return scores


def _plan(r: EvalRequest):
    """(options, dataset pairs, their specs, splits, folder source or None, model ref or None); UsageError for
    options that cannot apply, before anything is read."""
    if r.model and r.predictions:
        raise UsageError("--model and --predictions exclude each other", "score a model or a folder, not both")
    registry.check_output_kind(r.output_kind, r.task)
    if r.output_kind and r.predictions:
        raise UsageError("--output-kind describes a model", "with --predictions, use --alignment")
    if r.save_predictions and (r.out is None or r.predictions is not None):
        raise UsageError("--save-predictions needs --out and a model", "add --out DIR, drop --predictions")
    saved = r.out / "predictions" if r.save_predictions else None
    opts = R.EvalOptions(r.task, r.alignment, r.max_samples, r.processing_res, r.seed, saved)
    pairs = D.parse_pairs(list(r.datasets), "--dataset")
    if not pairs:
        raise UsageError("no --dataset given", "e.g. --dataset nyuv2=/data/eval/nyuv2")
    splits = {D.spec_for(r.task, n).name: p for n, p in D.parse_pairs(list(r.splits), "--split")}
    specs = [D.spec_for(r.task, n) for n, _ in pairs]  # unknown names fail before anything is read
    twice = sorted({s.name for s in specs if [t.name for t in specs].count(s.name) > 1})
    if twice:
        raise UsageError(f"--dataset {', '.join(twice)} given more than once", "give each dataset once")
    if r.out is not None:
        check_out_dir(r.out)
    source = R.FolderSource(r.predictions, r.task) if r.predictions else None
    # a bad name, or a checkpoint that says nothing about its output, fails before any reading
    ref = None if r.predictions else registry.resolve(r.model, r.task, r.output_kind)
    return opts, pairs, specs, splits, source, ref
