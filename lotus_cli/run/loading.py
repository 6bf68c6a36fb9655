"""Loading the shared predictor for a run, and compiling it where that pays, reported through events."""

from __future__ import annotations

from ..io.sources import is_video
from ..model import backends, registry
from ..model.compile import compile_predictor
from ..model.predictor import LotusPredictor
from .events import Reporter


def load_predictor(
    model,
    task: str | None,
    device: str,
    dtype: str,
    reporter: Reporter = Reporter(),
    kind: str | None = None,
    processing_res: int = 768,
    backend: str | None = "torch",
) -> LotusPredictor:
    """Resolve ``model`` (name, hub id, folder or a resolved ModelRef), fetch it (a first download shows the hub's
    own progress bars), load it while ``reporter`` shows it is busy, and note what was loaded and where it runs.
    ``kind``: the stated output kind (--output-kind) of a checkpoint whose metadata says nothing;
    ``processing_res``: what the CPU fast paths are calibrated for; ``backend``: torch, onnxruntime, auto or
    None, what auto recorded (model/backends.py; an ONNX export folder as ``model`` runs on onnxruntime).
    Raises ModelError."""
    ref = model if isinstance(model, registry.ModelRef) else backends.resolve_model(model, task, kind)
    ref = registry.fetch(ref)
    registry.check_known(ref, task)
    with reporter.busy(f"loading {ref.label} ..."):
        predictor = backends.load(ref, backend, device, dtype, processing_res, note=reporter.note)
    for w in predictor.warnings:
        reporter.warning(w)
    described = predictor.describe()
    engine = f"{described['backend']} ({described['onnx_provider']})" if "onnx_provider" in described else "torch"
    reporter.note(
        f"model {predictor.source} ({predictor.task}, {predictor.kind} from {predictor.entry.source}, "
        f"Lotus-{predictor.family.upper()}) on {predictor.device} in {str(predictor.dtype).replace('torch.', '')}"
        f" with {engine}"
    )
    return predictor


def compile_for_run(predictor: LotusPredictor, mode: str, items, reporter: Reporter) -> None:
    """--compile for a run over ``items`` (None: a pipe of unknown length): compile where it pays, and note what
    was done (or, when it was asked for with ``on``, why not). ONNX Runtime's graphs have no modules to compile."""
    if predictor.unet is None:
        return
    stream = items is None or any(is_video(i.path) for i in items)  # a video or a pipe: long, length unknown
    ok, reason = compile_predictor(predictor, mode, n_items=None if stream else len(items), is_video=stream)
    if ok:
        reporter.note(reason)
    elif mode == "on":
        reporter.warning(reason)
