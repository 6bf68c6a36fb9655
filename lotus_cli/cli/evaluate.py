"""`lotus eval depth|normal`: the paper's evaluation protocol on benchmark sets, for Lotus or any predictions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from ..errors import LotusError, UsageError
from .application import app
from .options import (
    Alignment,
    Datasets,
    Device,
    Dtype,
    EvalModel,
    EvalOut,
    EvalProcRes,
    EvalSeed,
    MaxSamples,
    NormalOutputKind,
    OutputKind,
    Predictions,
    SavePredictions,
    Splits,
)
from .report import Report, console, escape, fail, say

eval_app = typer.Typer(
    help="Score a model (or anyone's saved predictions) on the paper's benchmarks.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")

DEPTH_COLUMNS = (
    ("abs_rel", "AbsRel %", 100),
    ("sq_rel", "SqRel", 1),
    ("rmse", "RMSE", 1),
    ("rmse_log", "RMSElog", 1),
    ("log10", "log10", 1),
    ("delta1", "δ1 %", 100),
    ("delta2", "δ2 %", 100),
    ("delta3", "δ3 %", 100),
    ("i_rmse", "iRMSE", 1),
    ("silog", "SILog", 1),
)
NORMAL_COLUMNS = (
    ("mean", "mean°", 1),
    ("median", "median°", 1),
    ("rmse", "RMSE°", 1),
    ("a5", "<5° %", 100),
    ("a7_5", "<7.5° %", 100),
    ("a11_25", "<11.25° %", 100),
    ("a22_5", "<22.5° %", 100),
    ("a30", "<30° %", 100),
)


@dataclass(frozen=True)
class EvalArgs:
    """The options of one `lotus eval depth|normal` call, as given on the command line (a new flag: a field
    here with its default, a parameter of the commands, a keyword in their call to ``_eval``)."""

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


@eval_app.command("depth")
def eval_depth(
    dataset: Datasets,
    model: EvalModel = None,
    output_kind: OutputKind = None,
    predictions: Predictions = None,
    split: Splits = None,
    alignment: Alignment = "auto",
    max_samples: MaxSamples = None,
    save_predictions: SavePredictions = False,
    out: EvalOut = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    processing_res: EvalProcRes = None,
    seed: EvalSeed = 0,
):
    """Depth benchmarks: scale-and-shift alignment, then AbsRel, δ1-3 and more, averaged over images."""
    _eval(
        EvalArgs(
            "depth",
            tuple(dataset),
            model,
            output_kind,
            predictions,
            tuple(split or ()),
            alignment,
            max_samples,
            save_predictions,
            out,
            device,
            dtype,
            processing_res,
            seed,
        )
    )


@eval_app.command("normal")
def eval_normal(
    dataset: Datasets,
    model: EvalModel = None,
    output_kind: NormalOutputKind = None,
    predictions: Predictions = None,
    split: Splits = None,
    max_samples: MaxSamples = None,
    save_predictions: SavePredictions = False,
    out: EvalOut = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    processing_res: EvalProcRes = None,
    seed: EvalSeed = 0,
):
    """Normal benchmarks: angular error in degrees pooled over all valid pixels (mean, median, < 11.25°...)."""
    _eval(
        EvalArgs(
            "normal",
            tuple(dataset),
            model,
            output_kind,
            predictions,
            tuple(split or ()),
            "auto",
            max_samples,
            save_predictions,
            out,
            device,
            dtype,
            processing_res,
            seed,
        )
    )


def _eval(a: EvalArgs) -> None:
    from ..evaluate import datasets as D
    from ..evaluate import run as R
    from ..io.atomic import check_out_dir
    from ..model import registry

    try:
        if a.model and a.predictions:
            raise UsageError("--model and --predictions exclude each other", "score a model or a folder, not both")
        registry.check_output_kind(a.output_kind, a.task)
        if a.output_kind and a.predictions:
            raise UsageError("--output-kind describes a model", "with --predictions, use --alignment")
        if a.save_predictions and (a.out is None or a.predictions is not None):
            raise UsageError("--save-predictions needs --out and a model", "add --out DIR, drop --predictions")
        opts = R.EvalOptions(
            a.task,
            a.alignment,
            a.max_samples,
            a.processing_res,
            a.seed,
            a.out / "predictions" if a.save_predictions else None,
        )
        pairs = D.parse_pairs(list(a.datasets), "--dataset")
        if not pairs:
            raise UsageError("no --dataset given", "e.g. --dataset nyuv2=/data/eval/nyuv2")
        splits = {D.spec_for(a.task, n).name: p for n, p in D.parse_pairs(list(a.splits), "--split")}
        specs = [D.spec_for(a.task, n) for n, _ in pairs]  # unknown names fail before anything is read
        twice = sorted({s.name for s in specs if [t.name for t in specs].count(s.name) > 1})
        if twice:
            raise UsageError(f"--dataset {', '.join(twice)} given more than once", "give each dataset once")
        if a.out is not None:
            check_out_dir(a.out)
        source = R.FolderSource(a.predictions, a.task) if a.predictions else None
        # a bad name, or a checkpoint that says nothing about its output, fails before any reading
        ref = None if a.predictions else registry.resolve(a.model, a.task, a.output_kind)
    except LotusError as e:
        fail(e)
    opened, errors = _open(a.task, pairs, specs, splits)
    if not opened:
        raise typer.Exit(1)
    try:
        for ds in opened if source is not None else ():
            R.resolve_alignment(ds, source, opts)  # maps that do not say what they are need --alignment
    except LotusError as e:
        fail(e)
    if source is None:
        from ..run.loading import load_predictor

        try:
            source = R.ModelSource(load_predictor(ref, a.task, a.device, a.dtype, Report()))
        except LotusError as e:
            fail(e)
    results = []
    try:
        for ds in opened:
            results.append(_run_one(ds, source, opts))
            ds.store.close()
    except LotusError as e:
        fail(e)
    _table(a.task, results, source)
    code = 1 if errors or any(r.failed for r in results) else 0
    if a.out is not None:
        try:
            rj, rc = R.write_outputs(a.out, a.task, source, opts, results, errors)
        except LotusError as e:
            fail(e)
        say(f"wrote {rj} and {rc}", "dim")
    raise typer.Exit(code)


def _open(task, pairs, specs, splits):
    from ..evaluate import datasets as D

    opened, errors = [], {}
    for (name, path), spec in zip(pairs, specs):
        try:
            ds = D.open_dataset(task, name, path, splits.get(spec.name))
        except LotusError as e:
            if e.exit_code == 2:
                fail(e)
            say(f"error: {e}", "red")
            errors[spec.name] = str(e)
            continue
        extra = f", {ds.skipped} listed without ground truth" if ds.skipped else ""
        say(f"{spec.title}: {len(ds.samples)} samples from {ds.store.label}{extra}", "dim")
        opened.append(ds)
    return opened, errors


def _run_one(ds, source, opts):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..evaluate.run import evaluate

    with Progress(
        TextColumn(f"{escape(ds.spec.title)}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console(),
        transient=True,
    ) as bar:
        total = min(len(ds.samples), opts.max_samples or len(ds.samples))
        task_id = bar.add_task("eval", total=total)

        def on_sample(i, n, record):
            if record["status"] != "ok":
                bar.console.print(f"[yellow]skipped {escape(record['key'])}: {escape(record['error'])}[/]")
            bar.advance(task_id)

        return evaluate(ds, source, opts, on_sample)


def _table(task, results, source):
    """Metrics as rows, datasets as columns (fits a terminal with five datasets); the paper's figure for
    this checkpoint, when known, in brackets beside ours."""
    from rich.table import Table

    cols = DEPTH_COLUMNS if task == "depth" else NORMAL_COLUMNS
    table = Table(title=f"lotus eval {escape(task)}: {escape(source.label)}", title_justify="left")
    table.add_column("metric", no_wrap=True)
    for r in results:
        head = r.dataset["title"] + (f" ({r.alignment})" if r.alignment else "")
        n = f"n={r.evaluated}" + (f", {len(r.failed)} failed" if r.failed else "")
        table.add_column(f"{escape(head)}\n{n}", justify="right")
    for key, label, f in cols:
        cells = []
        for r in results:
            cell = f"{r.metrics[key] * f:.{2 if f == 100 else 3}f}" if key in r.metrics else "-"
            if r.paper and key in r.paper:
                cell += f" [dim](paper {r.paper[key] * f:.1f})[/]"
            cells.append(cell)
        table.add_row(label, *cells)
    console().print(table)
    for r in results:
        if r.alignment:
            say(f"{r.dataset['title']}: {r.alignment} alignment (from {r.alignment_source})", "dim")
    if any(r.paper for r in results):
        say("paper: the Lotus paper's figure for this checkpoint (Tables 1-2)", "dim")
