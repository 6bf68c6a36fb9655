"""`lotus eval depth|normal`: the paper's evaluation protocol on benchmark sets, for Lotus or any predictions."""

from __future__ import annotations

import typer

from ..errors import LotusError
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
    from ..evaluate.session import EvalRequest

    _eval(
        EvalRequest(
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
    from ..evaluate.session import EvalRequest

    _eval(
        EvalRequest(
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


def _eval(request) -> None:
    """Score, then the table (and where the files went); exit 1 when a set or a sample failed."""
    from ..evaluate.session import score

    report = Report()
    try:
        with report.bars:
            scores = score(request, report)
    except LotusError as e:
        fail(e)
    if scores.source is not None:
        _table(request.task, scores.results, scores.source)
    if scores.written:
        say(f"wrote {' and '.join(map(str, scores.written))}", "dim")
    raise typer.Exit(scores.exit_code)


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
