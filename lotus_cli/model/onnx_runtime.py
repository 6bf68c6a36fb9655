"""ONNX Runtime as the predictor's engine: the exported graphs (onnx_export.py) run a Lotus prediction's encode,
UNet and decode steps (arXiv 2409.18124, Sec. 3-4) in place of torch's modules, inside the same batch engine.

``OnnxPredictor`` is a ``LotusPredictor`` whose ``encode`` / ``denoise`` / ``decode`` call three ONNX Runtime
sessions; everything around them is the torch predictor's own code: the scaling to [-1, 1], the resize to the
processing size, the per-image seeded G noise (``noise``), the resize back and the map (``finish``), tiling,
ensembles and their statistics. So a map matches torch's within float rounding (1e-4 in fp32) at every size the
graphs take. The graphs come from an export folder (``lotus-onnx.json``) or from ``cached_export``: a dynamic
export made once into lotus-cli's cache folder, keyed by the model's files, whose graphs take every size
(``onnx_export.export(any_size=True)``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, UsageError
from ..io.cache import cache_dir
from . import cpu, onnx_export, registry
from .predictor import ANNOTATION, LotusPredictor

STEPS = ("vae_encoder", "unet", "vae_decoder")  # the three graphs the backend runs, as the manifest's pipeline

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # preferred first where installed


def require_onnxruntime():
    """The onnxruntime module, or a UsageError naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise UsageError(
            "--backend onnxruntime needs onnxruntime (not installed)", "pip install 'lotus-cli[onnx]'"
        ) from e
    return onnxruntime


def providers(device: str, available: Sequence[str]) -> list:
    """ONNX Runtime's execution providers for ``--device``: the CPU's for cpu (and auto without a GPU); TensorRT
    then CUDA (as installed), with the CPU's after them, for cuda / cuda:N (and auto where torch sees a GPU and
    the installed onnxruntime can use it). UsageError for mps, or cuda with a CPU-only onnxruntime."""
    name = (device or "auto").lower()
    gpus = [p for p in GPU_PROVIDERS if p in available]
    if name == "mps":
        raise UsageError("--backend onnxruntime runs on a CPU or a CUDA GPU, not mps", "use --backend torch on mps")
    if name.startswith("cuda") or (name == "auto" and gpus and torch.cuda.is_available()):
        if not gpus:
            raise UsageError(
                f"--device {device}: this onnxruntime has no CUDA provider (it has {', '.join(available)})",
                "pip install onnxruntime-gpu, or use --device cpu (or --backend torch)",
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        return [(p, {"device_id": index}) for p in gpus] + [CPU]
    return [CPU]


class OnnxPredictor(LotusPredictor):
    """A ``LotusPredictor`` whose three model steps run as ONNX Runtime sessions over an export folder.

    fp32 only (the graphs' dtype); ``device`` stays the CPU (tensors go in and out of the sessions as numpy
    arrays, whatever provider runs them). ``size_multiple``: a side the graphs take must be a multiple of it
    (1: any); a fixed-size export takes only its own size and batch 1 (batches run row by row)."""

    def __init__(self, folder: Path, manifest: dict, entry: registry.ModelEntry, source: str, device: str = "cpu"):
        ort = require_onnxruntime()
        self.folder, self.manifest, self.entry, self.source = Path(folder), manifest, entry, source
        self.task, self.kind = entry.task, entry.kind
        self.family = manifest["model"]["family"]
        latent = manifest["graphs"]["vae_encoder"]["outputs"][0]["shape"]  # [B, C, h, w]: ints, or "H/8" strings
        image = manifest["graphs"]["vae_encoder"]["inputs"][0]["shape"]  # [B, 3, H, W]
        self.latent_channels = int(latent[1])
        self.latent_factor = int(str(latent[2]).split("/")[1]) if manifest["dynamic"] else image[2] // latent[2]
        self.dynamic, self.size_multiple = bool(manifest["dynamic"]), int(manifest["size_multiple"])
        self.fixed = None if self.dynamic else (int(image[2]), int(image[3]))
        self.device, self.dtype, self.vae_dtype = torch.device("cpu"), torch.float32, torch.float32
        self.warnings, self.vae_redone, self._fallback, self._collect = [], 0, None, None
        self.unet = self.vae = None  # no torch modules: compile and CPU layouts do not apply
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # its graph-optimisation notices are not ours to show
        # ONNX Runtime's memory arena stays on: without it a full-size 512 px prediction peaked at 5.7 GB instead of
        # 9.0 GB but took 1.49x torch's time instead of 0.87x (docs/performance.md, 2026-12-07)
        self.providers = providers(device, ort.get_available_providers())
        self.sessions = {
            name: ort.InferenceSession(str(self.folder / f"{name}.onnx"), opts, providers=self.providers)
            for name in manifest["pipeline"]
        }
        self.provider = self.sessions["unet"].get_providers()[0]

    def weight_bytes(self) -> int:
        """Bytes of the graphs' files (their weights), what tiling's memory budget counts."""
        return sum(g["bytes"] for g in self.manifest["graphs"].values())

    def _run(self, name: str, **feeds: torch.Tensor) -> torch.Tensor:
        """One session over a batch (row by row for a fixed-size export, whose batch is 1)."""
        arrays = {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in feeds.items()}
        n = len(next(iter(arrays.values())))
        rows = [arrays] if self.dynamic else [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(n)]
        return torch.from_numpy(np.concatenate([self.sessions[name].run(None, r)[0] for r in rows]))

    def check_size(self, h: int, w: int) -> None:
        """InputError (this image only) for a processing size the graphs cannot take."""
        if self.fixed is not None and (h, w) != self.fixed:
            took = f"only {self.fixed[1]}x{self.fixed[0]} px (a fixed-size export)"
        elif h % self.size_multiple or w % self.size_multiple:
            took = f"sides that are multiples of {self.size_multiple} px"
        else:
            return
        raise InputError(
            f"the ONNX graphs in {self.folder} take {took}, not {w}x{h}",
            "export with --dynamic, use a --processing-res they take, or use --backend torch",
        )

    def encode(self, x: torch.Tensor, latent: str = "mean", seeds: Sequence[int] | None = None) -> torch.Tensor:
        """[B, 3, h, w] in [-1, 1] -> the scaled posterior mean [B, 4, h//f, w//f] (the graph's only output)."""
        if latent != "mean":
            raise UsageError("--latent sample needs the VAE posterior's spread, which the ONNX encoder does not give")
        self.check_size(*x.shape[-2:])
        return self._run("vae_encoder", image=x)

    def denoise(
        self, image_latent: torch.Tensor, noise: torch.Tensor | None = None, switch: Sequence[float] = ANNOTATION
    ) -> torch.Tensor:
        """One x0-prediction step at the annotation switch folded into the graph: [B, 4, h, w] -> [B, 4, h, w]."""
        if tuple(switch) != ANNOTATION:
            raise UsageError("the ONNX UNet has the annotation task switch folded in", "use --backend torch")
        if self.family == "g":
            if noise is None:
                raise ValueError("a G model needs noise")
            return self._run("unet", latent=image_latent, noise=noise)
        return self._run("unet", latent=image_latent)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Predicted latent [B, 4, h, w] -> float32 [B, 3, h*f, w*f] in [0, 1]."""
        y = self._run("vae_decoder", latent=latent)
        if not bool(torch.isfinite(y).all()):
            raise InputError("ONNX Runtime's VAE decoder gave inf/NaN", "use --backend torch")
        return y

    def describe(self) -> dict:
        """The torch predictor's metadata, with the backend, its provider and the graphs' folder."""
        return {
            **super().describe(),
            "backend": "onnxruntime",
            "onnx_provider": self.provider,
            "onnx_graphs": str(self.folder),
        }


def is_export(spec) -> bool:
    """Whether ``spec`` (a --model value) names an ONNX export folder (one holding lotus-onnx.json)."""
    return spec is not None and (Path(str(spec)).expanduser() / onnx_export.MANIFEST).is_file()


def export_ref(folder) -> registry.ModelRef:
    """The ModelRef of an export folder: its manifest's model (label, task, kind, licence), so that sidecars
    and --skip-existing name the model the graphs were made from, with ``folder`` where the graphs are."""
    folder = Path(str(folder)).expanduser().resolve()
    m = onnx_export.read_manifest(folder)["model"]
    entry = registry.ModelEntry(
        m.get("model_name") or folder.name,
        m.get("model") or str(folder),
        m["task"],
        family=m.get("family"),
        kind=m["kind"],
        licence=m.get("licence", "unknown"),
        source=onnx_export.MANIFEST,
    )
    return registry.ModelRef(entry, repo_id=m.get("model") or str(folder), folder=folder)


def export_key(ref: registry.ModelRef) -> str:
    """The cached export's key: the model's label and files (a hub snapshot's folder names its revision; a
    local folder's weights are known by size and time), and the exporter's opset and torch."""
    unet = Path(ref.folder) / "unet" / "diffusion_pytorch_model.safetensors"
    stat = unet.stat() if unet.is_file() else None
    ident = [ref.label, str(Path(ref.folder).resolve()), stat and (stat.st_size, stat.st_mtime_ns)]
    ident += [onnx_export.OPSET, torch.__version__]
    return hashlib.sha256(repr(ident).encode()).hexdigest()[:16]


def cached_export(ref: registry.ModelRef, note: Callable[[str], None] = lambda s: None) -> Path:
    """The folder of ``ref``'s dynamic any-size export in lotus-cli's cache, made now (and said so through
    ``note``) where there is none: a fetched torch checkpoint is loaded in fp32 once and exported."""
    folder = cache_dir() / "onnx" / f"{ref.entry.name.replace('/', '--')}-{export_key(ref)}"
    if (folder / onnx_export.MANIFEST).is_file():
        return folder
    onnx_export.require_onnx()
    note(f"making the ONNX graphs of {ref.label} once, into {folder} (minutes for a full-size model) ...")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    pred = onnx_export.load(ref)
    try:
        onnx_export.export(pred, tmp, res=2 * onnx_export.size_multiple(pred), dynamic=True, any_size=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        del pred
        cpu.release_memory()
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load(ref: registry.ModelRef, device: str = "cpu", note: Callable[[str], None] = lambda s: None) -> OnnxPredictor:
    """The ONNX Runtime predictor of ``ref``: an export folder's graphs (``export_ref``), or a checkpoint's
    cached export, made on first use."""
    require_onnxruntime()
    ref = registry.fetch(ref)
    folder = ref.folder if is_export(ref.folder) else cached_export(ref, note)
    manifest = onnx_export.read_manifest(folder)
    if manifest.get("pipeline") != list(STEPS):  # a --single export: one graph, no steps to run in tiles
        raise UsageError(
            f"--model {folder}: a single-graph export (lotus.onnx), not the three graphs the backend runs",
            "export without --single (lotus export onnx --any-size), or run lotus.onnx with onnx_export.run_single",
        )
    return OnnxPredictor(folder, manifest, ref.entry, ref.label, device)
