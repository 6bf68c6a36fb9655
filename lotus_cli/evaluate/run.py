"""The evaluation loop: a dataset, a source of predictions (a Lotus model or a folder of maps), the metrics.

Per sample: load RGB + ground truth (``datasets``), get the prediction (model at the dataset's
processing resolution, or the file named after the sample's key), align it (depth), measure it
(``metrics``), and keep a per-sample record. A sample that fails (missing or malformed file) is recorded
with its error and the run goes on. Depth figures are per-image means; normal figures are pooled over
every valid pixel of the dataset.

Predictions folder (``--predictions DIR``). For a sample with key ``k`` (its RGB path without extension,
e.g. ``test/kitchen_0004/rgb_0001``), in ``DIR/<dataset>/`` if that folder exists, else in ``DIR``:

* where ``k.json``, a sidecar of `lotus depth|normal`, lists outputs: the first of them in the order npy,
  exr, png16, png (raw values first), decoded as the sidecar notes (a png16's range). A sidecar whose run
  did not finish, of another kind than the task (an uncertainty map), or listing no file that is there, fails
  the sample with that reason: a map it does not list (an x.npy left by an earlier run with another model
  or other formats) is never read in its place.
* otherwise the first of these that exists: ``k.npy`` or ``k.exr`` (float [H, W] depth, or [H, W, 3]
  normals; EXR: channel Z, or R, G, B), ``k.16bit.png`` / ``k.png`` (16-bit or 8-bit; depth: grey, any
  affine encoding; normals: RGB, n = png / max * 2 - 1), then the reference tools' names (Marigold:
  ``<dir>/pred_<id>.npy``; Lotus normals: ``<scene>_<id>_norm.png``). An EXR's own header (``lotus:kind``,
  ``lotus:normal_frame``), or a sidecar without an outputs list ({"kind": "disparity"}), says what it is.

Normals are scored in the Lotus/DSINE frame (x left, y up, z toward the camera): maps whose sidecar or EXR
header names another ``normal_frame`` (`lotus normal --frame opengl|opencv`) are converted to it; maps that
say nothing are taken as in it. A map of another size is resized (bilinear) to the ground truth's, except a
KITTI map of the uncropped frame, which is cropped like the image. ``--save-predictions`` writes
``<out>/predictions/<dataset>/k.npy`` in exactly this layout, so a run can be re-scored without the model.
The alignment of a folder's maps (``auto``): "disparity" or "depth", as the sidecar (or the EXR header)
of the first map says; a later map that says otherwise fails its sample. Maps that say nothing (e.g.
Marigold's outputs) need the alignment stated, since scoring disparity as depth is silently wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import InputError, LotusError, UsageError
from ..geometry.camera import NORMAL_FRAMES, convert_normals
from ..io.formats import DEPTH_KINDS, FORMATS, READ_ORDER, a_map_of, get_format, read_stored
from ..io.sidecar import read_record, vouched
from . import metrics as M
from .datasets import Dataset, Item, Sample, kitti_benchmark_crop

# The paper's Tables 1 and 2 (arXiv 2409.18124) for the released checkpoints it reports: fractions for
# AbsRel and the shares, degrees for angles.
PAPER = {
    ("depth-d-v2-0-disparity", "nyuv2"): {"abs_rel": 0.051, "delta1": 0.971},
    ("depth-d-v2-0-disparity", "kitti"): {"abs_rel": 0.081, "delta1": 0.931},
    ("depth-d-v2-0-disparity", "eth3d"): {"abs_rel": 0.061, "delta1": 0.970},
    ("depth-d-v2-0-disparity", "scannet"): {"abs_rel": 0.055, "delta1": 0.965},
    ("normal-g-v1-1", "nyuv2"): {"mean": 16.9, "a11_25": 0.591},
    ("normal-g-v1-1", "scannet"): {"mean": 15.3, "a11_25": 0.640},
    ("normal-g-v1-1", "ibims"): {"mean": 17.5, "a11_25": 0.661},
    ("normal-g-v1-1", "sintel"): {"mean": 35.2, "a11_25": 0.199},
}
ALIGNMENT_CHOICES = ("auto", *M.ALIGNMENTS)


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate; validated once, before any work."""

    task: str  # "depth" | "normal"
    alignment: str = "auto"  # auto | depth | disparity | none (depth only)
    max_samples: int | None = None  # the first N samples of each split
    processing_res: int | None = None  # None = each dataset's own (native, 768 for ETH3D, 640 for DIODE)
    seed: int = 0  # G models' noise seed
    save_predictions: Path | None = None  # folder: <it>/<dataset>/<key>.npy

    def __post_init__(self):
        if self.task not in ("depth", "normal"):
            raise UsageError(f"task must be depth or normal, not {self.task!r}")
        if self.alignment not in ALIGNMENT_CHOICES:
            raise UsageError(f"--alignment must be one of {', '.join(ALIGNMENT_CHOICES)}, not {self.alignment!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"--max-samples must be >= 1, not {self.max_samples}")
        if self.processing_res is not None and self.processing_res < 0:
            raise UsageError(f"--processing-res must be >= 0, not {self.processing_res}", "0 keeps the native size")


# ------------------------------------------------------------------------------------------ sources


class ModelSource:
    """Predictions from a loaded LotusPredictor."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.kind = predictor.kind
        self.label = predictor.source
        self.name = predictor.entry.name

    def predict(self, ds: Dataset, item: Item, opts: EvalOptions) -> np.ndarray:
        from ..model.predictor import PredictOptions

        res = processing_res(ds, opts)
        return self.predictor.predict(item.rgb, PredictOptions(processing_res=res, seed=opts.seed)).map

    def alignment(self, ds: Dataset) -> str:
        return "disparity" if self.kind == "disparity" else "depth"

    def alignment_source(self, ds: Dataset) -> str:
        return f"model output kind ({self.kind}, from its {self.predictor.entry.source})"

    def describe(self) -> dict:
        return {"model": self.predictor.describe()}


@dataclass(frozen=True)
class Found:
    """A sample's prediction file and what is known about it before reading: ``note`` is its sidecar's note
    on the file (``outputs[format]``), ``kind`` and ``frame`` the sidecar's (None: it says nothing, or there
    is none; an EXR's header may still say), ``said_by`` names the sidecar for messages."""

    path: Path
    note: dict | None = None
    kind: str | None = None
    frame: str | None = None
    said_by: str | None = None


class FolderSource:
    """Precomputed maps named after the samples (module doc)."""

    def __init__(self, root: Path, task: str):
        if not root.is_dir():
            raise UsageError(f"--predictions {root}: no such folder", "pass the folder holding <key>.npy files")
        self.root, self.task = root, task
        self.kind = task if task == "normal" else None
        self.label = str(root)
        self.name = None
        self._alignment: dict[str, tuple[str | None, str | None]] = {}  # dataset -> (kind, what said so)

    def folder(self, ds: Dataset) -> Path:
        sub = self.root / ds.name
        return sub if sub.is_dir() else self.root

    def locate(self, ds: Dataset, s: Sample) -> Found | None:
        """The sample's prediction (module doc), None when there is none; InputError when its sidecar lists
        outputs and none of them can be read in good faith."""
        base = self.folder(ds)
        side = base / f"{s.key}.json"
        record = read_record(side)
        if record is not None and isinstance(record.get("outputs"), dict):
            listed = [
                (fmt, record["outputs"][fmt])
                for fmt in READ_ORDER
                if isinstance(record["outputs"].get(fmt), dict) and record["outputs"][fmt].get("file")
            ]
            for _, note in listed:
                path = side.parent / str(note["file"])
                if path.is_file():
                    vouched(path)  # refuses an unfinished run's files
                    return Found(path, note, record.get("kind"), record.get("normal_frame"), f"sidecar {side}")
            present = [base / f"{s.key}{get_format(f).suffix}" for f in READ_ORDER]
            present = [p.name for p in present if p.is_file()]
            if present:
                names = ", ".join(str(n["file"]) for _, n in listed) or "no map"
                raise InputError(
                    f"{side}: lists {names}, not {', '.join(present)} beside it (left by another run)",
                    "rerun lotus on the input, or remove the files its sidecar does not list",
                )
            return None
        names = [f"{s.key}{get_format(f).suffix}" for f in READ_ORDER] + legacy_names(ds, s)
        for n in names:
            if (base / n).is_file():
                if record is None:
                    return Found(base / n)
                kind = record.get("kind") if isinstance(record.get("kind"), str) else None
                return Found(base / n, None, kind, record.get("normal_frame"), f"sidecar {side}")
        return None

    def find(self, ds: Dataset, s: Sample) -> Path | None:
        """The path ``locate`` reads for the sample (None: none, or one that would be refused)."""
        try:
            found = self.locate(ds, s)
        except InputError:
            return None
        return found.path if found is not None else None

    def predict(self, ds: Dataset, item: Item, opts: EvalOptions) -> np.ndarray:
        found = self.locate(ds, item.sample)
        if found is None:
            raise InputError(
                f"{self.folder(ds)}: no prediction for {item.sample.key}",
                f"expected {item.sample.key}.npy (or .exr, .16bit.png, .png) there",
            )
        pred, kind, said_by = read_found(found, self.task)
        if self.task == "depth" and opts.alignment == "auto" and kind is not None:
            want, how = self._said_alignment(ds)
            if want is not None and kind != want:
                raise InputError(
                    f"{found.path}: a {kind} map ({said_by}), but this run aligns {want} maps (from {how})",
                    "score depth and disparity maps in separate runs, or state --alignment",
                )
        return pred

    def _said_alignment(self, ds: Dataset) -> tuple[str | None, str | None]:
        """(kind, what says so) of the first sample whose map says it is disparity or depth, cached."""
        if ds.name not in self._alignment:
            said = (None, None)
            for s in ds.samples[:20]:
                try:
                    found = self.locate(ds, s)
                except InputError:
                    continue
                if found is None:
                    continue
                kind, source = found.kind, found.said_by
                if kind is None and found.path.suffix.lower() == FORMATS["exr"].suffix:
                    kind, source = exr_kind(found.path), f"EXR header of {found.path}"
                if kind is not None:
                    said = (kind, source) if kind in DEPTH_KINDS else (None, None)
                    break
            self._alignment[ds.name] = said
        return self._alignment[ds.name]

    def alignment(self, ds: Dataset) -> str | None:
        """ "disparity" or "depth" as the first map's sidecar (or EXR header) says; None when nothing says."""
        return self._said_alignment(ds)[0]

    def alignment_source(self, ds: Dataset) -> str:
        return str(self._said_alignment(ds)[1])

    def describe(self) -> dict:
        return {"predictions": str(self.root)}


def exr_kind(path: Path) -> str | None:
    """The ``lotus:kind`` attribute of an EXR's header (None: none, or unreadable)."""
    try:
        _, notes, _ = read_stored(path)
    except (OSError, ValueError):
        return None
    kind = notes.get("kind")
    return kind if isinstance(kind, str) else None


def legacy_names(ds: Dataset, s: Sample) -> list[str]:
    """The reference tools' own prediction names for a sample (Marigold depth, Lotus normals)."""
    p = PurePosixPath(s.rgb)
    if ds.task == "depth":
        stem = p.stem.split("_")[1] if ds.name == "nyuv2" and "_" in p.stem else p.stem
        return [(p.parent / f"pred_{stem}.npy").as_posix()]
    scene = p.parts[0] if len(p.parts) > 1 else ""
    return [f"{scene}_{p.stem.removesuffix('_img')}_norm.png"]


def read_prediction(path: Path, task: str, note: dict | None = None) -> np.ndarray:
    """A prediction file -> depth [H, W] or normals [H, W, 3] float32, read through the format registry
    (module doc for the encodings: PNGs as [0, 1], normals as n = png / max * 2 - 1, npy and EXR as stored;
    ``note``: its sidecar's note on the file, for a png16's range). Normals in Lotus's frame (an EXR header's
    ``normal_frame`` converted); a map whose EXR header says it is of another kind than ``task`` is refused."""
    return read_found(Found(path, note), task)[0]


def read_found(found: Found, task: str) -> tuple[np.ndarray, str | None, str | None]:
    """(values as ``read_prediction`` gives them, the map's kind, what said so) for a located prediction: the
    sidecar's kind and normal frame, else the EXR header's, are checked against ``task`` and applied."""
    path = found.path
    if task == "depth" and found.note and "colormap" in found.note:
        raise InputError(
            f"{path}: a colour-mapped picture ({found.said_by}), not depth values",
            "write the maps with --format npy, exr or png16",
        )
    try:
        stored, notes, fmt = read_stored(path)
        a = (fmt or FORMATS["png"]).decode(stored, task, found.note)
    except (OSError, ValueError) as e:
        raise InputError(
            f"{path}: not a readable prediction ({e})", "write float32 .npy or .exr, or 16-bit PNG maps"
        ) from e
    kind, frame, said_by = found.kind, found.frame, found.said_by
    if kind is None and isinstance(notes.get("kind"), str):
        kind, said_by = notes["kind"], "its EXR header"
    if frame is None and isinstance(notes.get("normal_frame"), str):
        frame = notes["normal_frame"]
    allowed = DEPTH_KINDS if task == "depth" else ("normal",)
    if kind is not None and kind not in allowed:
        raise InputError(
            f"{path}: {said_by} says it is {a_map_of(kind)}, not a {task} prediction",
            f"pass the {' or '.join(allowed)} maps of `lotus {task}`",
        )
    a = np.squeeze(a)
    if not np.isfinite(a).all():
        raise InputError(f"{path}: {int((~np.isfinite(a)).sum())} non-finite values", "write finite maps")
    want = 2 if task == "depth" else 3
    if a.ndim != want or (task == "normal" and a.shape[-1] != 3):
        raise InputError(f"{path}: shape {a.shape}, not {'[H, W]' if want == 2 else '[H, W, 3]'}")
    if task == "normal" and frame is not None and frame != "lotus":
        if frame not in NORMAL_FRAMES:
            raise InputError(
                f"{path}: normal_frame {frame!r} ({said_by or 'its EXR header'}) is not one of "
                f"{', '.join(NORMAL_FRAMES)}",
                "write normals with `lotus normal --frame lotus|opengl|opencv`",
            )
        a = convert_normals(a.astype(np.float32), "lotus", frame)
    return a, kind, said_by


def fit_to(pred: np.ndarray, shape: tuple[int, int], ds: Dataset) -> tuple[np.ndarray, str | None]:
    """The prediction at the ground truth's size: KITTI full frames cropped, anything else resized."""
    if pred.shape[:2] == tuple(shape):
        return pred, None
    if ds.task == "depth" and ds.spec.crop == "kitti" and pred.shape[0] >= shape[0] and pred.shape[1] >= shape[1]:
        return kitti_benchmark_crop(pred), "cropped"
    import cv2

    out = cv2.resize(pred, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return out, f"resized from {pred.shape[1]}x{pred.shape[0]}"


def processing_res(ds: Dataset, opts: EvalOptions) -> int:
    if opts.processing_res is not None:
        return opts.processing_res
    return ds.spec.processing_res if ds.task == "depth" else 0


# --------------------------------------------------------------------------------------------- loop


@dataclass
class DatasetResult:
    """One dataset's outcome: ``metrics`` (per-image means for depth, pooled for normals), ``records``
    (one per sample, failures included with ``error``), the paper's figures when known."""

    dataset: dict
    task: str
    alignment: str | None
    processing_res: int | None
    alignment_source: str | None = None  # --alignment, the model's output kind, or the maps' sidecar
    records: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    paper: dict | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] != "ok"]

    @property
    def evaluated(self) -> int:
        return len(self.records) - len(self.failed)

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "task": self.task,
            "alignment": self.alignment,
            "alignment_source": self.alignment_source,
            "processing_res": self.processing_res,
            "evaluated": self.evaluated,
            "failed": len(self.failed),
            "metrics": self.metrics,
            "paper": self.paper,
            "seconds": round(self.seconds, 3),
            "failures": [{"key": r["key"], "error": r["error"]} for r in self.failed],
        }


def resolve_alignment(ds: Dataset, source, opts: EvalOptions) -> tuple[str | None, str | None]:
    """(alignment, where it came from) of a depth dataset's predictions; (None, None) for normals. Raises
    UsageError when ``opts.alignment`` is auto and nothing says whether a folder's maps are depth or disparity."""
    if ds.task != "depth":
        return None, None
    if opts.alignment != "auto":
        return opts.alignment, "--alignment"
    alignment = source.alignment(ds)
    if alignment is None:
        raise UsageError(
            f"--alignment auto: nothing says whether the maps in {source.folder(ds)} are depth or "
            "disparity (no lotus sidecar beside them)",
            "state it: --alignment disparity (1 = near), depth (0 = near) or none (metric)",
        )
    return alignment, source.alignment_source(ds)


def evaluate(
    ds: Dataset, source, opts: EvalOptions, on_sample: Callable[[int, int, dict], None] | None = None
) -> DatasetResult:
    """Evaluate ``source`` (ModelSource or FolderSource) on ``ds``; ``on_sample(i, n, record)`` after each."""
    t0 = time.perf_counter()
    depth = ds.task == "depth"
    alignment, how = resolve_alignment(ds, source, opts)
    res = processing_res(ds, opts) if isinstance(source, ModelSource) else None
    result = DatasetResult(ds.describe(), ds.task, alignment, res, how, paper=PAPER.get((source.name, ds.name)))
    samples = ds.samples[: opts.max_samples] if opts.max_samples else ds.samples
    acc = M.NormalAccumulator()
    for i, s in enumerate(samples):
        t1 = time.perf_counter()
        try:
            item = ds.load(s)
            pred = source.predict(ds, item, opts)
            if opts.save_predictions is not None:
                from ..io.atomic import write_npy

                write_npy(opts.save_predictions / ds.name / f"{s.key}.npy", pred.astype(np.float32))
            pred, note = fit_to(pred, item.gt.shape[:2], ds)
            record = score_depth(ds, item, pred, alignment) if depth else score_normal(item, pred, acc)
            record.update({"key": s.key, "status": "ok", "error": None, "note": note})
        except (LotusError, ValueError) as e:
            if isinstance(e, LotusError) and e.exit_code == 2:  # the run itself is wrong (a missing package,
                raise  # an unwritable --out): stop
            record = {"key": s.key, "status": "failed", "error": str(e)}
        record["seconds"] = round(time.perf_counter() - t1, 4)
        result.records.append(record)
        if on_sample:
            on_sample(i, len(samples), record)
    ok = [r for r in result.records if r["status"] == "ok"]
    result.metrics = M.average(ok) if depth else acc.result()
    result.seconds = time.perf_counter() - t0
    return result


def score_depth(ds: Dataset, item: Item, pred: np.ndarray, alignment: str) -> dict:
    if not item.valid.any():
        raise InputError(f"{ds.store.where(item.sample.gt)}: no valid ground-truth pixel")
    a = M.align_depth(pred, item.gt, item.valid, alignment, ds.spec.depth_range, ds.spec.alignment_max_res)
    return {
        **M.depth_metrics(a.depth, item.gt, item.valid),
        "scale": a.scale,
        "shift": a.shift,
        "valid_pixels": int(item.valid.sum()),
    }


def score_normal(item: Item, pred: np.ndarray, acc: M.NormalAccumulator) -> dict:
    if not item.valid.any():
        raise InputError(f"{item.sample.gt}: no valid ground-truth pixel")
    errors = M.angular_error(pred[item.valid], item.gt[item.valid])  # only the scored pixels
    acc.add(errors)
    return {**M.normal_image_metrics(errors), "valid_pixels": int(errors.size)}


# ------------------------------------------------------------------------------------------ outputs


def metric_keys(task: str) -> tuple[str, ...]:
    return M.DEPTH_METRICS if task == "depth" else M.NORMAL_METRICS


def results_record(
    task: str, source, opts: EvalOptions, results: list[DatasetResult], dataset_errors: dict[str, str]
) -> dict:
    return {
        "task": task,
        **source.describe(),
        "alignment": opts.alignment,
        "max_samples": opts.max_samples,
        "processing_res": opts.processing_res,
        "seed": opts.seed,
        "units": {
            "depth": "abs_rel, delta*: fractions; rmse: metres; silog: 100 x log units",
            "normal": "mean, median, rmse: degrees; a*: fractions of pixels below the angle",
        },
        "datasets": {r.dataset["name"]: r.to_json() for r in results},
        "dataset_errors": dataset_errors,
    }


def per_sample_csv(task: str, results: list[DatasetResult]) -> bytes:
    import csv
    import io

    extra = ("scale", "shift") if task == "depth" else ()
    cols = ["dataset", "key", "status", *metric_keys(task), *extra, "valid_pixels", "seconds", "note", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        for rec in r.records:
            w.writerow({"dataset": r.dataset["name"], **rec})
    return buf.getvalue().encode()


def write_outputs(
    out: Path, task: str, source, opts: EvalOptions, results: list[DatasetResult], dataset_errors: dict[str, str]
) -> tuple[Path, Path]:
    """results.json and per_sample.csv in ``out`` (atomic writes)."""
    from ..io.atomic import write_bytes, write_json

    rj, rc = out / "results.json", out / "per_sample.csv"
    write_bytes(rc, per_sample_csv(task, results))
    write_json(rj, results_record(task, source, opts, results, dataset_errors))
    return rj, rc
