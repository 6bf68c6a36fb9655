"""Which engine runs a prediction's model steps: torch (``LotusPredictor``) or ONNX Runtime (``OnnxPredictor``).

``torch`` runs ``LotusPredictor``; ``onnxruntime`` runs the exported graphs (an export folder given as
--model, or a dynamic export made once into lotus-cli's cache); ``auto`` takes the one measured faster on this
machine for this model at this processing size. That measurement is a calibration like the CPU layouts'
(cpu/calibrate.py): made once, on first use, and remembered in ``backends.json`` beside ``calibration.json``
in lotus-cli's cache folder (``lotus doctor`` shows both). It is not cheap: it needs the cached export (for a
full-size model, minutes and a few GB once) and one timed prediction with each engine, so a run measures only
where ``auto`` is asked for. Without a --backend (``None``) a run takes what ``auto`` recorded for this
machine, model and size, and torch where nothing is recorded: ONNX Runtime becomes a machine's default only
where it was measured faster there (docs/onnx.md). Without onnxruntime both are torch, ``auto`` with a note.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import LotusError, UsageError
from ..io.atomic import write_json
from ..io.cache import cache_dir
from . import cpu, onnx_export, onnx_runtime, registry
from .predictor import LotusPredictor, PredictOptions

BACKENDS = ("torch", "onnxruntime", "auto")
CACHE_VERSION = 1
CALIBRATION_RES = 512  # the side timed for --processing-res 0 (native size), whose sizes vary
TIMED_CALLS = 2  # each engine's time: the best of these after a warm-up (the other engineers' load is noise)


def check(
    backend: str | None, model, *, dtype: str = "auto", latent: str = "mean", compile_mode: str = "off"
) -> str | None:
    """The backend to load: ``backend``, or torch for ``auto`` and the default (``None``: what ``auto``
    recorded) where the other options need torch (another dtype, --latent sample, --compile on). UsageError
    naming the flag for a --backend they cannot run with."""
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"--backend must be {', '.join(BACKENDS)}, not {backend!r}")
    export = onnx_runtime.is_export(model)
    if export and backend == "torch":
        raise UsageError(f"--model {model} is an ONNX export (lotus-onnx.json)", "add --backend onnxruntime")
    if backend == "onnxruntime" or export:
        flag = "--backend onnxruntime" if backend == "onnxruntime" else f"--model {model} (ONNX graphs)"
        if dtype.lower() not in ("auto", "fp32", "float32"):
            raise UsageError(f"{flag} runs the fp32 graphs, not --dtype {dtype}", "drop --dtype or use --backend torch")
        if latent != "mean":
            raise UsageError(f"{flag} takes --latent mean only (the encoder gives the mean)", "use --backend torch")
        if compile_mode == "on":
            raise UsageError(f"--compile on compiles torch modules; {flag} runs none", "drop --compile")
    elif backend in ("auto", None) and (
        dtype.lower() not in ("auto", "fp32", "float32") or latent != "mean" or compile_mode == "on"
    ):
        return "torch"
    return backend


def resolve_model(spec, task: str | None, kind: str | None = None) -> registry.ModelRef:
    """``registry.resolve``, which also takes an ONNX export folder (its manifest's model)."""
    if onnx_runtime.is_export(spec):
        ref = onnx_runtime.export_ref(spec)
        if task is not None:
            registry.check_task(ref, task)
        return ref
    return registry.resolve(spec, task, kind)


def load(
    ref: registry.ModelRef,
    backend: str | None,
    device: str,
    dtype: str,
    processing_res: int = 768,
    note: Callable[[str], None] = lambda s: None,
):
    """The predictor of ``ref`` on the engine ``backend`` asks for (``auto``: ``choose``; ``None``:
    ``recorded_choice``); an export folder always on ONNX Runtime."""
    if onnx_runtime.is_export(ref.folder) or backend == "onnxruntime":
        return onnx_runtime.load(ref, device, note)
    if backend == "auto" and choose(ref, device, processing_res, note) == "onnxruntime":
        return onnx_runtime.load(ref, device, note)
    if backend is None and recorded_choice(ref, device, processing_res, note) == "onnxruntime":
        return onnx_runtime.load(ref, device, note)
    return LotusPredictor.from_pretrained(ref, device=device, dtype=dtype, processing_res=processing_res)


# ------------------------------------------------------------------------------------------ calibration


def cache_file() -> Path:
    return cache_dir() / "backends.json"


def calibration_key(ref: registry.ModelRef, device: str, processing_res: int) -> str:
    """The key of a backend choice: this machine (CPU, usable flags, threads, torch and onnxruntime), the model
    (label and files, as its cached export's key) and the device and processing size."""
    m = cpu.machine()
    try:
        ort = importlib.metadata.version("onnxruntime")  # not an import: that takes a second and more
    except importlib.metadata.PackageNotFoundError:
        ort = None
    ident = [m.cpu, m.flags, m.isa, m.threads, m.torch, ort, onnx_runtime.export_key(ref), device, processing_res]
    return hashlib.sha256(repr(ident).encode()).hexdigest()[:24]


def recorded() -> dict:
    """{key: record} of the backend choices made on this machine; {} when none or unreadable."""
    try:
        data = json.loads(cache_file().read_text())
        return data["entries"] if data.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def record(key: str, entry: dict) -> None:
    """Add ``entry`` under ``key``; a cache that cannot be written costs the next run a calibration."""
    entries = recorded()
    entries[key] = entry
    try:
        write_json(cache_file(), {"version": CACHE_VERSION, "entries": entries})
    except (OSError, LotusError):
        pass


def choose(ref: registry.ModelRef, device: str, processing_res: int, note: Callable[[str], None]) -> str:
    """--backend auto: the engine recorded faster for this model, machine, device and size, else measured now
    (and recorded). torch where onnxruntime is missing or the device is not a CPU (ONNX Runtime's GPU
    providers are not measured here)."""
    try:
        onnx_export.require_onnx()
    except UsageError:
        note("--backend auto: torch (onnx and onnxruntime are not installed: pip install 'lotus-cli[onnx]')")
        return "torch"
    if (device or "auto").lower() not in ("cpu", "auto") or torch.cuda.is_available():
        note("--backend auto: torch (only CPUs are calibrated; --backend onnxruntime runs its GPU providers)")
        return "torch"
    ref = registry.fetch(ref)
    key = calibration_key(ref, device, processing_res)
    entry = recorded().get(key)
    if entry is None:
        entry = measure(ref, processing_res, note)
        record(key, entry)
    s = entry["seconds"]
    note(f"--backend auto: {entry['backend']} (torch {s['torch']:.2f} s, onnxruntime {s['onnxruntime']:.2f} s "
         f"at {entry['size']} px, measured {entry['when']})")  # fmt: skip
    return entry["backend"]


def recorded_choice(ref: registry.ModelRef, device: str, processing_res: int, note: Callable[[str], None]) -> str:
    """No --backend: what ``choose`` recorded for this model, machine, device and size, else torch; it never
    measures (a run pays no calibration it did not ask for)."""
    wins = [e for e in recorded().values() if e.get("backend") == "onnxruntime"]  # a JSON read: most runs end here
    if not wins or (device or "auto").lower() not in ("cpu", "auto") or torch.cuda.is_available():
        return "torch"
    if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")):
        return "torch"
    entry = recorded().get(calibration_key(registry.fetch(ref), device, processing_res))
    if entry is None or entry.get("backend") != "onnxruntime":
        return "torch"
    s = entry["seconds"]
    note(f"backend: onnxruntime, which --backend auto measured faster here (torch {s['torch']:.2f} s, onnxruntime "
         f"{s['onnxruntime']:.2f} s at {entry['size']} px, {entry['when']}); --backend torch runs torch")  # fmt: skip
    return "onnxruntime"


def measure(ref: registry.ModelRef, processing_res: int, note: Callable[[str], None]) -> dict:
    """Time a prediction of ``onnx_export.test_image`` at the processing size (best of ``TIMED_CALLS`` after a
    warm-up) with torch's predictor as a run loads it, then with ONNX Runtime's over the cached export; the
    faster wins."""
    res = processing_res or CALIBRATION_RES
    note(f"--backend auto: timing torch and ONNX Runtime for {ref.label} at {res} px, once ...")
    image = onnx_export.test_image(res, res)
    opts = PredictOptions(processing_res=res)
    seconds = {}
    for name in ("torch", "onnxruntime"):
        if name == "torch":
            pred = LotusPredictor.from_pretrained(ref, device="cpu", dtype="fp32", processing_res=res)
        else:
            pred = onnx_runtime.load(ref, "cpu", note)
        pred.predict(image, opts)  # the warm-up: oneDNN and ONNX Runtime pick their kernels on a first call
        seconds[name] = round(min(pred.predict(image, opts).seconds for _ in range(TIMED_CALLS)), 3)
        del pred
        cpu.release_memory()
    return {
        "backend": min(seconds, key=seconds.get),
        "seconds": seconds,
        "size": res,
        "model": ref.label,
        "machine": {"cpu": cpu.machine().cpu, "flags": list(cpu.machine().flags)},
        "when": time.strftime("%Y-%m-%d"),
    }
