"""The one shared Lotus predictor: a single x0-prediction step of a Stable Diffusion 2 UNet.

Inference, as in the paper (arXiv 2409.18124, Sec. 3-4) and its reference code, for an RGB image of H x W:

1. scale to [-1, 1]; resize so the long side is ``processing_res`` (bilinear, antialias, truncating
   the short side); no padding;
2. encode with the VAE: posterior mean (ours, deterministic) or a posterior sample (reference);
3. G only: concatenate per-image noise AFTER the image latent (8 channels); D: the latent alone;
4. one UNet call at t = 999 with the cached empty-prompt embedding and the task switch [1, 0];
5. the output is the clean annotation latent: decode, clamp(y/2 + 1/2, 0, 1);
6. resize back to H x W (bilinear, or the reference's nearest-exact); depth = channel mean,
   normal = 2 * rgb - 1 normalised to unit length.

The predictor takes and returns arrays; it never sees a path. Noise is drawn per image from
``torch.Generator("cpu").manual_seed(seed)`` in the latent size, so an image's result never depends on
the batch it shares or the images before it, and for a batch of one it is the reference's first draw.
How the UNet and VAE run on this device (memory format, packed weights, strips, memory trims) is the
``cpu`` package's business (docs/performance.md); what they compute is the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..errors import InputError, UsageError
from ..geometry.camera import NORMAL_FRAMES, convert_normals
from . import cpu, gpu, registry, weights
from .cpu import cpu_has_native_bf16

TIMESTEP = 999
ANNOTATION = (1.0, 0.0)  # task switch: predict the annotation
RECONSTRUCTION = (0.0, 1.0)  # task switch: reconstruct the input (detail preserver, training only)
# The posterior sample (``latent="sample"``) draws from its own generator, seeded seed + this offset, so
# that it is reproducible and independent of the G noise stream.
POSTERIOR_SEED_OFFSET = 7919


@dataclass(frozen=True)
class PredictOptions:
    """How to run the predictor; validated once, before any work."""

    processing_res: int = 768  # long side fed to the model; 0 = native size
    resample: str = "bilinear"  # back to the input size: "bilinear" (ours) or "nearest" (reference)
    latent: str = "mean"  # image latent: "mean" of the VAE posterior (ours) or "sample" (reference)
    seed: int = 0  # G noise seed; the same field for every image of a given size
    batch_size: int = 1
    frame: str = "lotus"  # normals' camera frame (geometry.NORMAL_FRAMES)

    def __post_init__(self):
        if self.processing_res < 0:
            raise UsageError(f"processing_res must be >= 0, not {self.processing_res}", "0 keeps the native size")
        if self.resample not in ("bilinear", "nearest"):
            raise UsageError(f"resample must be bilinear or nearest, not {self.resample!r}")
        if self.latent not in ("mean", "sample"):
            raise UsageError(f"latent must be mean or sample, not {self.latent!r}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, not {self.batch_size}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"seed must be in 0 .. 2**63-1, not {self.seed}")
        if self.frame not in NORMAL_FRAMES:
            raise UsageError(f"frame must be one of {', '.join(NORMAL_FRAMES)}, not {self.frame!r}")


@dataclass
class Prediction:
    """One image's result. ``map``: depth [H, W] float32 in [0, 1], or normal [H, W, 3] float32 unit
    vectors (x left, y up, z toward the camera)."""

    map: np.ndarray
    processing_size: tuple[int, int]  # (h, w) fed to the VAE
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # goes into the sidecar
    layers: dict = field(default_factory=dict)  # further maps to write: {name: (array, kind)}


@dataclass
class Prepared:
    """An image made into the model's input ahead of the predictor, e.g. by a pipeline's CPU stage (Ray
    engine): ``x`` float32 [3, h, w] in [-1, 1] at the processing size for ``processing_res``, exactly what
    ``predict_batch`` would compute from the uint8 image, and ``size`` (H, W), the image's own. Made by
    ``prepare``; ``shape`` is the image's, so callers that look at an image's size take either."""

    x: np.ndarray
    size: tuple[int, int]
    processing_res: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.size, 3)


def prepare(rgb: np.ndarray, processing_res: int) -> Prepared:
    """uint8 RGB [H, W, 3] -> its Prepared model input: the predictor's own scaling and resize."""
    h, w = rgb.shape[:2]
    with torch.inference_mode():
        x = LotusPredictor.resize(LotusPredictor.to_tensor(rgb), processing_size(h, w, processing_res))
    return Prepared(x[0].numpy(), (h, w), processing_res)


@dataclass(frozen=True)
class EnsembleOptions:
    """Several predictions of one image: ``samples`` noise draws (G; seeds seed, seed+1, ...) and, with
    ``tta="flip"``, the same again on the mirrored image (the only ensemble a D model has)."""

    samples: int = 8
    tta: str = "none"  # "none" | "flip"

    def __post_init__(self):
        if self.samples < 1:
            raise UsageError(f"samples must be >= 1, not {self.samples}")
        if self.tta not in ("none", "flip"):
            raise UsageError(f"tta must be none or flip, not {self.tta!r}")


# ------------------------------------------------------------------------------------ device, dtype


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda, then mps, then cpu. ``cuda:N`` must be a device this process sees, and becomes the current
    CUDA device (what cuDNN, Triton and CUDA graphs use when they are not told)."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown --device {name!r}", "use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here", "use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None:
        gpu.check_cuda_index(
            dev.index,
            f"--device {name}",
            "visible GPUs count from cuda:0 (a Ray worker sees its own as cuda:0): use --device cuda or auto",
        )
        torch.cuda.set_device(dev)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available here", "use --device cpu or auto")
    return dev


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """auto: fp16 on CUDA and MPS, fp32 on CPUs. Never autocast: on a CPU without native bf16, bf16
    convolutions run many times slower than fp32. Returns (dtype, warning or None)."""
    name = (name or "auto").lower()
    if name == "auto":
        return (torch.float16 if device.type in ("cuda", "mps") else torch.float32), None
    if name not in _DTYPES:
        raise UsageError(f"unknown --dtype {name!r}", "use auto, fp32, fp16 or bf16")
    dtype = _DTYPES[name]
    warning = None
    if device.type == "cpu" and dtype == torch.float16:
        warning = "fp16 on a CPU is very slow and no more exact; fp32 is the CPU default"
    elif device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        warning = "this CPU has no native bf16: bf16 will be far slower than fp32"
    return dtype, warning


def task_embedding(switch: Sequence[float] = ANNOTATION, batch: int = 1, device=None, dtype=torch.float32):
    """The task switch s as class_labels: [sin s0, sin s1, cos s0, cos s1], shape [batch, 4]."""
    s = torch.tensor([list(switch)], dtype=torch.float32)  # [1, 2]
    emb = torch.cat([torch.sin(s), torch.cos(s)], dim=-1)  # [1, 4]
    return emb.repeat(batch, 1).to(device=device, dtype=dtype)


def processing_size(height: int, width: int, processing_res: int) -> tuple[int, int]:
    """(h, w) with the longer side = processing_res, by truncation as the reference does; 0 = native."""
    if processing_res == 0:
        return height, width
    f = min(processing_res / width, processing_res / height)
    return max(1, int(height * f)), max(1, int(width * f))


def noise_for(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The G noise for one image: the first draw of a CPU generator seeded with ``seed``. [1, C, h, w]."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(seed)))


# --------------------------------------------------------------------------------------- predictor


def unflip(m: np.ndarray, task: str) -> np.ndarray:
    """The map of a horizontally mirrored image, mirrored back: [H, W] or [H, W, 3] (normals, any frame)."""
    m = m[:, ::-1].copy()
    if task == "normal":
        m[..., 0] *= -1  # mirrored normals point the other way in x (in every frame)
    return m


def ensemble_stats(task: str, maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, str]:
    """(mean, spread, statistic) of N predictions of one image, each [H, W] (depth) or [H, W, 3] (normals).

    Depth: the mean and the standard deviation of the [0, 1] maps. Normals: the normalised mean direction and
    the RMS angle in degrees between each sample and it. Both float32 [H, W(, 3)] and [H, W]."""
    stack = np.stack(maps)  # [N, H, W] or [N, H, W, 3]
    if task == "normal":
        mean = stack.mean(0)
        mean /= np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-6)
        cos = np.clip((stack * mean).sum(-1), -1.0, 1.0)
        spread = np.sqrt((np.degrees(np.arccos(cos)) ** 2).mean(0))
        statistic = "RMS angle in degrees between each sample's normal and the mean direction"
    else:
        mean, spread = stack.mean(0), stack.std(0)
        statistic = "standard deviation of the [0, 1] maps"
    return mean.astype(np.float32), spread.astype(np.float32), statistic


class LotusPredictor:
    """A loaded Lotus checkpoint ready to predict; load once per process and share it.

    Attributes: ``task`` ("depth"/"normal"), ``kind`` ("disparity"/"depth"/"normal"), ``family``
    ("g"/"d", from unet.config.in_channels), ``device``, ``dtype``, ``latent_factor`` (pixels per latent
    cell, read from the VAE config), ``entry`` (registry metadata), ``warnings`` (for the caller to show).
    """

    def __init__(
        self,
        unet,
        vae,
        prompt_embedding: torch.Tensor,
        entry: registry.ModelEntry,
        device: torch.device,
        dtype: torch.dtype,
        *,
        channels_last: bool | None = None,
        pack_weights: bool | None = None,
        processing_res: int = 768,
        source: str = "",
        borrowed: bool = False,
    ):
        """``borrowed``: the modules are someone else's (a model in training): the predictor runs them as they
        are, changing nothing about them (no layout, packing, in-place SiLU or dtype cast); an fp16 VAE that
        overflows on an item is redone on a copy."""
        self.unet, self.vae, self.entry = unet, vae, entry
        self.device, self.dtype, self.source = device, dtype, source
        self.family = "g" if unet.config.in_channels == 8 else "d"
        self.task, self.kind = entry.task, entry.kind
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_factor = weights.latent_factor(vae.config)
        self.latent_channels = int(vae.config.latent_channels)
        self.prompt_embedding = prompt_embedding.to(device=device, dtype=dtype)  # [1, T, D]
        self.warnings: list[str] = []
        # How the modules run here (None: as measured on this machine at processing_res); pack_weights=False
        # keeps plain modules (training, torch.compile).
        self.engine = cpu.prepare(
            unet,
            vae,
            device,
            dtype,
            channels_last=channels_last,
            pack_weights=pack_weights,
            processing_res=processing_res,
            borrowed=borrowed,
        )
        self.channels_last = self.engine.channels_last
        self.packed = self.engine.packed  # packed modules are inference-only
        # An SD VAE in fp16 can overflow to inf/NaN at large sizes while the UNet is fine: probed once at
        # the largest processing size (a square of processing_res), the VAE then runs in bf16 (or fp32)
        # and the UNet keeps fp16 (gpu.py). Other dtypes: the VAE runs in the model's dtype. Every batch is
        # checked again after encode and decode (``_checked``): native size (0) has no size to probe at load,
        # tiles run at --tile-res and images differ from the probe.
        self.vae_dtype = dtype
        self._fallback = None  # the VAE in gpu.fallback_dtype, made at the first item fp16 overflows on
        self._collect: set[int] | None = None  # redone_rows' set while one is open
        self.vae_redone = 0  # items (batch rows) whose VAE pass was redone in the fallback dtype so far
        if dtype == torch.float16 and processing_res > 0 and not borrowed:
            size = (processing_res, processing_res)
            self.vae_dtype, why = gpu.vae_dtype_for(vae, dtype, size, channels_last=self.engine.vae_channels_last)
            if why:
                vae.to(self.vae_dtype)
                self.warnings.append(why)

    @property
    def strip_rows(self) -> int:
        """Output rows per strip in the VAE's high-resolution stages; 0 = diffusers' modules throughout."""
        return self.engine.strip_rows

    @strip_rows.setter
    def strip_rows(self, rows: int) -> None:
        self.engine.strip_rows = rows

    def weight_bytes(self) -> int:
        """Bytes of weights the UNet and VAE hold."""
        return self.engine.weight_bytes()

    @classmethod
    def from_pretrained(
        cls,
        spec: str | Path | registry.ModelRef | None = None,
        *,
        task: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        channels_last: bool | None = None,
        pack_weights: bool | None = None,
        processing_res: int = 768,
        kind: str | None = None,
    ) -> LotusPredictor:
        """Resolve ``spec`` (registry name, hub id, folder or a resolved ModelRef), fetch it if needed
        (download with a progress bar on first use) and load it. ``kind`` states the output kind of a
        checkpoint whose metadata does not (see registry.resolve); one that nothing describes is refused.
        ``channels_last``/``pack_weights``: None = what this machine was measured to run fastest at
        ``processing_res`` (docs/performance.md); ``pack_weights=False`` gives plain diffusers modules."""
        ref = registry.fetch(spec if isinstance(spec, registry.ModelRef) else registry.resolve(spec, task, kind))
        registry.check_known(ref, task)
        dev = resolve_device(device)
        dt, warning = resolve_dtype(dtype, dev)
        # The embedding first: where it is not cached yet, the text encoder it loads (1.4 GB for SD2) is freed
        # before the UNet and VAE load, so a first run peaks no higher than the next ones
        emb = weights.empty_prompt_embedding(ref.folder)
        cpu.release_memory()
        unet, vae = weights.load_unet_vae(ref.folder, dt, dev)
        pred = cls(
            unet,
            vae,
            emb,
            ref.entry,
            dev,
            dt,
            channels_last=channels_last,
            pack_weights=pack_weights,
            processing_res=processing_res,
            source=ref.label,
        )
        if warning:
            pred.warnings.append(warning)
        if ref.entry.family and ref.entry.family != pred.family:
            pred.warnings.append(
                f"{ref.label}: registry says family {ref.entry.family.upper()}, weights say "
                f"{pred.family.upper()} (in_channels {unet.config.in_channels}); using the weights"
            )
        return pred

    # -- the steps, each usable on its own (uncertainty, tiling and training reuse them) -------------

    @staticmethod
    def to_tensor(rgb: np.ndarray) -> torch.Tensor:
        """uint8 RGB [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1] (x / 127.5 - 1)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected uint8 RGB [H, W, 3], got {rgb.dtype} {rgb.shape}")
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).float()
        return x / 127.5 - 1.0

    @staticmethod
    def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """[B, C, H, W] -> [B, C, *size]; bilinear with antialias (as torchvision's resize), or nearest-exact."""
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest-exact")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    def encode(self, x: torch.Tensor, latent: str = "mean", seeds: Sequence[int] | None = None) -> torch.Tensor:
        """[B, 3, h, w] in [-1, 1] -> scaled image latent [B, 4, h//f, w//f] (f = latent_factor). Rows the VAE
        gives inf/NaN for in fp16 are redone in the fallback dtype (``redone_rows`` tells which); raises
        InputError when a row stays non-finite."""
        moments = self.engine.encode(x.to(self.device, self.vae_dtype))
        dist = DiagonalGaussianDistribution(self._checked(moments, x, "encode"))
        if latent == "sample":
            eps = torch.cat([noise_for(s + POSTERIOR_SEED_OFFSET, (1, *dist.mean.shape[1:])) for s in seeds])
            z = dist.mean + dist.std * eps.to(self.device, dist.mean.dtype)  # as DiagonalGaussianDistribution.sample
        else:
            z = dist.mean
        return (z * self.scaling_factor).to(self.dtype)  # the UNet's dtype (the VAE's may differ: fp16 overflow)

    def denoise(
        self, image_latent: torch.Tensor, noise: torch.Tensor | None = None, switch: Sequence[float] = ANNOTATION
    ) -> torch.Tensor:
        """One x0-prediction step. image_latent [B, 4, h, w]; noise [B, 4, h, w] for G, None for D.
        Returns the predicted clean latent [B, 4, h, w]."""
        b = image_latent.shape[0]
        if self.family == "g":
            if noise is None:
                raise ValueError("a G model needs noise")
            unet_in = torch.cat([image_latent, noise.to(image_latent)], dim=1)  # [B, 8, h, w], image first
        else:
            unet_in = image_latent  # [B, 4, h, w]
        out = self.unet(
            self.engine.fmt(unet_in, "unet"),
            torch.tensor(TIMESTEP, device=self.device),
            encoder_hidden_states=self.prompt_embedding.expand(b, -1, -1),  # [B, 2, D]
            class_labels=task_embedding(switch, b, self.device, self.dtype),  # [B, 4]
        ).sample
        return out  # [B, 4, h, w]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Predicted latent [B, 4, h, w] -> float32 [B, 3, h*f, w*f] in [0, 1]. Rows checked as ``encode``'s."""
        z = latent / self.scaling_factor
        y = self.engine.decode(z.to(self.vae_dtype), self.latent_factor)  # [B, 3, H, W]
        return (self._checked(y, z, "decode").float() / 2 + 0.5).clamp(0, 1)

    @contextlib.contextmanager
    def redone_rows(self):
        """While open, collects into the set it gives the batch rows whose encode or decode was redone in the
        fallback dtype (fp16 overflow): the items whose sidecar says so."""
        rows: set[int] = set()
        outer, self._collect = getattr(self, "_collect", None), rows
        try:
            yield rows
        finally:
            self._collect = outer

    def _checked(self, out: torch.Tensor, inp: torch.Tensor, stage: str) -> torch.Tensor:
        """``out`` of the VAE's ``stage`` ("encode" or "decode") for input ``inp`` [B, ...], with every row
        that holds inf/NaN redone by the VAE in the fallback dtype (fp16 VAEs only: bf16, else fp32). Raises
        InputError naming the stage at fault (the VAE, or the UNet for a non-finite latent) when a row
        cannot be made finite, rather than letting clamp() turn NaN into a map."""
        finite = torch.isfinite(out).flatten(1).all(1)  # [B]
        if bool(finite.all()):
            return out
        bad = (~finite).nonzero().flatten()
        size = "x".join(str(v * (self.latent_factor if stage == "decode" else 1)) for v in inp.shape[-1:-3:-1])
        if stage == "decode" and not bool(torch.isfinite(inp[bad]).all()):
            raise InputError(
                f"the UNet gave inf/NaN in {gpu.dtype_name(self.dtype)} at {size} px",
                "run it with --dtype fp32 (or bf16 on a GPU that has it)",
            )
        fallback = self._fallback_vae()
        if fallback is not None:
            vae, dtype = fallback
            x = self.engine.fmt(inp[bad].to(self.device, dtype))
            # autocast (a training's validation) would run the fallback in fp16 again
            off = torch.autocast(self.device.type, enabled=False) if self.device.type in ("cuda", "cpu") else None
            with off or contextlib.nullcontext():
                redo = vae.encode(x).latent_dist.parameters if stage == "encode" else vae.decode(x).sample
            if not bool(torch.isfinite(redo.to(out.dtype)).all()):  # beyond fp16's range: the batch goes up to fp32
                out = out.float()
            out = out.index_put((bad,), redo.to(out.dtype))  # not in place: out may be an inference tensor
            if bool(torch.isfinite(out[bad]).all()):
                self.vae_redone += len(bad)
                if getattr(self, "_collect", None) is not None:
                    self._collect.update(bad.tolist())
                return out
        tried = gpu.dtype_name(self.vae_dtype) + (f" and {gpu.dtype_name(fallback[1])}" if fallback else "")
        raise InputError(
            f"the VAE gave inf/NaN in {tried} at {size} px ({stage})",
            "run it with --dtype fp32, or a smaller --processing-res",
        )

    def _fallback_vae(self):
        """(VAE, dtype): a copy of the VAE in ``gpu.fallback_dtype`` for the rows fp16 overflows on, made once
        and kept (about 170 MB in bf16 for SD2's); None unless the VAE runs in fp16."""
        if self.vae_dtype != torch.float16:
            return None
        if self._fallback is None:
            dtype = gpu.fallback_dtype(self.device)
            with torch.device("meta"):
                vae = type(self.vae).from_config(self.vae.config)
            vae.load_state_dict(self.vae.state_dict(), assign=True)  # shares the weights until the cast
            vae.to(self.device, dtype).eval().requires_grad_(False)
            if self.engine.vae_channels_last:
                vae.to(memory_format=torch.channels_last)
            for mine, theirs in zip(vae.modules(), self.vae.modules()):
                if isinstance(mine, torch.nn.SiLU):
                    mine.inplace = theirs.inplace
            self._fallback = (vae, dtype)
        return self._fallback

    def fallback_note(self) -> dict:
        """The sidecar's record of an item whose VAE pass ran in the fallback dtype (``extra``)."""
        dtype = gpu.dtype_name(self._fallback[1]) if self._fallback else "?"
        return {
            "vae_fallback": {
                "dtype": dtype,
                "reason": f"the VAE gave inf/NaN in {gpu.dtype_name(self.vae_dtype)} on this item: redone in {dtype}",
            }
        }

    def noise(self, seeds: Sequence[int], latent_hw: tuple[int, int]) -> torch.Tensor:
        """Per-image G noise [B, 4, h, w]: image i gets the first draw of Generator(seeds[i])."""
        return torch.cat([noise_for(s, (1, self.latent_channels, *latent_hw)) for s in seeds])

    def finish(
        self, decoded: torch.Tensor, size: tuple[int, int], resample: str = "bilinear", frame: str = "lotus"
    ) -> np.ndarray:
        """Decoded [1, 3, h, w] in [0, 1] -> the task's map at ``size`` (depth [H, W] / normal [H, W, 3],
        normals in camera frame ``frame``, Lotus's own by default)."""
        if not gpu.resizes_on(decoded.device):  # MPS before torch 2.7: no antialiased resize there
            decoded = decoded.cpu()
        y = self.resize(decoded, size, resample)[0]  # [3, H, W]
        if self.task == "normal":
            n = y * 2 - 1
            n = n / n.norm(dim=0, keepdim=True).clamp_min(1e-6)  # unit vectors; x left, y up, z to camera
            n = n.permute(1, 2, 0).cpu().numpy().astype(np.float32)
            return n if frame == "lotus" else convert_normals(n, frame)
        return y.mean(dim=0).cpu().numpy().astype(np.float32)

    # -- the whole prediction ----------------------------------------------------------------------------

    @torch.inference_mode()
    def predict_batch(
        self, images: Sequence[np.ndarray | Prepared], opts: PredictOptions = PredictOptions()
    ) -> list[Prediction]:
        """Predict for uint8 RGB images [H, W, 3] (or their ``Prepared`` inputs) that share one processing
        size (see ``processing_size``).

        Each image gets seed ``opts.seed``: noise depends on the seed and the latent size only.
        """
        t0 = time.perf_counter()
        sizes = [im.shape[:2] for im in images]
        proc = {processing_size(h, w, opts.processing_res) for h, w in sizes}
        if len(proc) != 1:
            raise ValueError(f"predict_batch needs images of one processing size, got {sorted(proc)}")
        proc_hw = proc.pop()
        if any(isinstance(im, Prepared) and im.processing_res != opts.processing_res for im in images):
            raise ValueError(f"an image was prepared for another processing_res than {opts.processing_res}")
        # one way to the model input, whether a pipeline's CPU stage prepared it already or not
        ready = [im if isinstance(im, Prepared) else prepare(im, opts.processing_res) for im in images]
        x = torch.cat([torch.from_numpy(r.x)[None] for r in ready])  # [B, 3, h, w]
        seeds = [opts.seed] * len(images)
        with self.redone_rows() as redone:
            z = self.encode(x, opts.latent, seeds)  # [B, 4, h/f, w/f]
            noise = self.noise(seeds, tuple(z.shape[-2:])) if self.family == "g" else None
            decoded = self.decode(self.denoise(z, noise))  # [B, 3, f*(h//f), f*(w//f)]
        maps = [self.finish(decoded[i : i + 1], sizes[i], opts.resample, opts.frame) for i in range(len(images))]
        per_image = (time.perf_counter() - t0) / len(images)
        return [
            Prediction(m, proc_hw, per_image, self.fallback_note() if i in redone else {}) for i, m in enumerate(maps)
        ]

    def predict(self, image: np.ndarray, opts: PredictOptions = PredictOptions()) -> Prediction:
        return self.predict_batch([image], opts)[0]

    @torch.inference_mode()
    def predict_ensemble(
        self, image: np.ndarray, opts: PredictOptions = PredictOptions(), eopts: EnsembleOptions = EnsembleOptions()
    ) -> Prediction:
        """Uncertainty (paper Sec. 4.4): the per-pixel spread of several predictions of one image.

        The image latent is encoded once per view and shared by all noise samples, which run through
        the UNet and decoder in batches of ``opts.batch_size``. Sample k uses seed ``opts.seed + k``.
        Returns map = spread ([H, W] float32: depth, the standard deviation of the [0, 1] maps; normals,
        the RMS angle in degrees between each sample and the mean direction) and layers["mean"] = the
        mean prediction (normals: the normalised mean), in the model's kind.
        """
        seeds = self.ensemble_seeds(opts, eopts)
        t0 = time.perf_counter()
        size = image.shape[:2]
        proc_hw = processing_size(*size, opts.processing_res)
        x = self.resize(self.to_tensor(image), proc_hw)  # [1, 3, h, w]
        views = [x, x.flip(-1)] if eopts.tta == "flip" else [x]
        maps = []
        before = self.vae_redone
        for flipped, view in enumerate(views):
            z = self.encode(view, opts.latent, [opts.seed])  # [1, 4, h/f, w/f], shared by the samples
            for i in range(0, len(seeds), opts.batch_size):
                chunk = seeds[i : i + opts.batch_size]
                zb = z.expand(len(chunk), -1, -1, -1)  # [n, 4, h/f, w/f]
                noise = self.noise(chunk, tuple(z.shape[-2:])) if self.family == "g" else None
                decoded = self.decode(self.denoise(zb, noise))  # [n, 3, h', w']
                for j in range(len(chunk)):
                    m = self.finish(decoded[j : j + 1], size, opts.resample, opts.frame)
                    maps.append(unflip(m, self.task) if flipped else m)
        extra = self.fallback_note() if self.vae_redone != before else {}
        return self.ensemble_prediction(maps, seeds, eopts, proc_hw, time.perf_counter() - t0, **extra)

    def ensemble_seeds(self, opts: PredictOptions, eopts: EnsembleOptions) -> list[int]:
        """The noise seeds of an ensemble (``opts.seed + k``; one for a D model, whose only views are
        flips). Raises UsageError for a D model without test-time augmentation: its samples would agree."""
        if self.family == "d" and eopts.tta == "none":
            raise UsageError(
                f"{self.source} is a Lotus-D model: it takes no noise, so its samples would all agree",
                "use a G model (depth-g, normal-g) or add --tta flip",
            )
        return [opts.seed + k for k in range(eopts.samples)] if self.family == "g" else [opts.seed]

    def ensemble_prediction(
        self,
        maps: Sequence[np.ndarray],
        seeds: list[int],
        eopts: EnsembleOptions,
        proc_hw: tuple[int, int],
        seconds: float,
        **extra,
    ) -> Prediction:
        """The ensemble's Prediction from its maps (every view and seed, in the model's kind): map = spread,
        layers["mean"], and the statistic and seeds in extra["uncertainty"] beside any further ``extra``."""
        mean, spread, statistic = ensemble_stats(self.task, maps)
        extra["uncertainty"] = {
            "statistic": statistic,
            "samples": len(maps),
            "noise_samples": len(seeds),
            "tta": eopts.tta,
            "seeds": seeds if self.family == "g" else None,
        }
        return Prediction(spread, proc_hw, seconds, extra, {"mean": (mean, self.kind)})

    def describe(self) -> dict:
        """Metadata for sidecars."""
        return {
            "model": self.source,
            "model_name": self.entry.name,
            "task": self.task,
            "kind": self.kind,
            "kind_source": self.entry.source,
            "family": self.family,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "backend": "torch",  # what ran the model's steps (onnx_runtime.OnnxPredictor: onnxruntime)
            **({"vae_dtype": str(self.vae_dtype).replace("torch.", "")} if self.vae_dtype != self.dtype else {}),
        }
