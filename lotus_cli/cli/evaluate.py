"""`lotus eval depth|normal`: the paper's evaluation protocol on benchmark sets, for Lotus or any predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import LotusError, UsageError
from . import app, console, escape, fail, load_predictor, say

eval_app = typer.Typer(help="Score a model (or anyone's saved predictions) on the paper's benchmarks.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

Datasets = Annotated[list[str], typer.Option(
    "--dataset", "-d", help="NAME=PATH, repeatable. Depth: nyuv2, kitti, scannet, eth3d, diode (Marigold's tar "
    "or its unpacked folder, split list beside it). Normal: nyuv2, scannet, ibims, sintel, oasis (DSINE's "
    "dsine_eval/<name> folder).", show_default=False)]
Splits = Annotated[Optional[list[str]], typer.Option(
    "--split", help="NAME=FILE, repeatable: the split list of a dataset when it is not beside the data.",
    show_default=False)]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name, hub id or checkpoint folder "
                                              "(default: depth-d / normal-d).", show_default=False)]
Predictions = Annotated[Optional[Path], typer.Option(
    "--predictions", help="Score precomputed maps instead of a model: DIR/<key>.npy or 16-bit .png per sample "
    "(in DIR/<dataset>/ when that exists); key = the RGB path in the split list without extension.",
    show_default=False)]
Alignment = Annotated[str, typer.Option("--alignment", help="Depth: auto (disparity for disparity models and "
                                        "sidecars that say so, else depth), depth, disparity or none (metric).")]
MaxSamples = Annotated[Optional[int], typer.Option("--max-samples", help="Only the first N samples of each split.",
                                                   show_default=False)]
Save = Annotated[bool, typer.Option("--save-predictions", help="Also write each raw prediction to "
                                    "OUT/predictions/<dataset>/<key>.npy (re-score later with --predictions).")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Write results.json and per_sample.csv here.",
                                             show_default=False)]
Device = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (fp16 on CUDA/MPS, fp32 on CPU), fp32, fp16, bf16.")]
ProcRes = Annotated[Optional[int], typer.Option(
    "--processing-res", help="Override every dataset's processing resolution (default: native, 768 for ETH3D, "
    "640 for DIODE; 0 = native).", show_default=False)]
Seed = Annotated[int, typer.Option("--seed", help="Noise seed for G models.")]

DEPTH_COLUMNS = (("abs_rel", "AbsRel %", 100), ("sq_rel", "SqRel", 1), ("rmse", "RMSE", 1),
                 ("rmse_log", "RMSElog", 1), ("log10", "log10", 1), ("delta1", "δ1 %", 100),
                 ("delta2", "δ2 %", 100), ("delta3", "δ3 %", 100), ("i_rmse", "iRMSE", 1), ("silog", "SILog", 1))
NORMAL_COLUMNS = (("mean", "mean°", 1), ("median", "median°", 1), ("rmse", "RMSE°", 1), ("a5", "<5° %", 100),
                  ("a7_5", "<7.5° %", 100), ("a11_25", "<11.25° %", 100), ("a22_5", "<22.5° %", 100),
                  ("a30", "<30° %", 100))


@eval_app.command("depth")
def eval_depth(dataset: Datasets, model: Model = None, predictions: Predictions = None, split: Splits = None,
               alignment: Alignment = "auto", max_samples: MaxSamples = None, save_predictions: Save = False,
               out: Out = None, device: Device = "auto", dtype: Dtype = "auto", processing_res: ProcRes = None,
               seed: Seed = 0):
    """Depth benchmarks: scale-and-shift alignment, then AbsRel, δ1-3 and more, averaged over images."""
    _eval("depth", dataset, model, predictions, split, alignment, max_samples, save_predictions, out, device,
          dtype, processing_res, seed)


@eval_app.command("normal")
def eval_normal(dataset: Datasets, model: Model = None, predictions: Predictions = None, split: Splits = None,
                max_samples: MaxSamples = None, save_predictions: Save = False, out: Out = None,
                device: Device = "auto", dtype: Dtype = "auto", processing_res: ProcRes = None, seed: Seed = 0):
    """Normal benchmarks: angular error in degrees pooled over all valid pixels (mean, median, < 11.25°...)."""
    _eval("normal", dataset, model, predictions, split, "auto", max_samples, save_predictions, out, device,
          dtype, processing_res, seed)


def _eval(task, dataset, model, predictions, split, alignment, max_samples, save, out, device, dtype, res, seed):
    from .. import models
    from ..evaluate import datasets as D
    from ..evaluate import run as R
    from ..sinks import check_out_dir

    try:
        if model and predictions:
            raise UsageError("--model and --predictions exclude each other", "score a model or a folder, not both")
        if save and (out is None or predictions is not None):
            raise UsageError("--save-predictions needs --out and a model", "add --out DIR, drop --predictions")
        opts = R.EvalOptions(task, alignment, max_samples, res, seed, out / "predictions" if save else None)
        pairs = D.parse_pairs(dataset, "--dataset")
        if not pairs:
            raise UsageError("no --dataset given", "e.g. --dataset nyuv2=/data/eval/nyuv2")
        splits = {D.spec_for(task, n).name: p for n, p in D.parse_pairs(split, "--split")}
        specs = [D.spec_for(task, n) for n, _ in pairs]  # unknown names fail before anything is read
        twice = sorted({s.name for s in specs if [t.name for t in specs].count(s.name) > 1})
        if twice:
            raise UsageError(f"--dataset {', '.join(twice)} given more than once", "give each dataset once")
        if out is not None:
            check_out_dir(out)
        source = R.FolderSource(predictions, task) if predictions else None
        ref = None if predictions else models.resolve(model, task)  # a bad name fails before any reading
    except LotusError as e:
        fail(e)
    opened, errors = _open(task, pairs, specs, splits)
    if not opened:
        raise typer.Exit(1)
    if source is None:
        source = R.ModelSource(load_predictor(ref, None, device, dtype))
    results = []
    try:
        for ds in opened:
            results.append(_run_one(ds, source, opts))
            ds.store.close()
    except LotusError as e:
        fail(e)
    _table(task, results, source)
    code = 1 if errors or any(r.failed for r in results) else 0
    if out is not None:
        try:
            rj, rc = R.write_outputs(out, task, source, opts, results, errors)
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

    with Progress(TextColumn(f"{escape(ds.spec.title)}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console(), transient=True) as bar:
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
    if any(r.paper for r in results):
        say("paper: the Lotus paper's figure for this checkpoint (Tables 1-2)", "dim")
