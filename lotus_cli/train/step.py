"""One Lotus training step and its loss, exactly as LOTUS_FACTS.md "Training protocol" states.

For a batch of B images (rgb [B, 3, H, W] in [-1, 1], annotation [B, 3, H, W] in [-1, 1], valid [B, 1, H, W]):

1. latents: z_img = VAE(rgb), z_anno = VAE(annotation), each ``mean + std * eps`` (the reference's posterior
   sample; ``latent="mean"`` drops the eps) times the scaling factor; [B, 4, h, w], h = H / f;
2. targets = [z_anno, z_img] (2B; the second half is the detail preserver, task switch [0, 1]); without the
   detail preserver only z_anno (B); conditions = z_img for every row;
3. G: noisy = sqrt(abar_t) * target + sqrt(1 - abar_t) * noise with SD's scaled-linear schedule, t = 999
   (or one of ``timesteps`` evenly spaced steps), UNet input = [condition, noisy] (image first, 8 channels);
   D: UNet input = the condition, t = 999;
4. the UNet output is the clean target (x0-prediction) or the noise (``prediction="eps"``, G only);
5. loss = MSE over valid latent cells of the annotation rows (a cell is valid only if all its f x f pixels
   are: the invalid mask is max-pooled) + MSE over all reconstruction rows, weighted 1 : 1.

Every random number of a step comes from ``draw`` in a fixed order, so a step is a pure function of the
model, the batch and one generator: resuming and data-parallel training reproduce it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..predictor import ANNOTATION, RECONSTRUCTION, TIMESTEP, task_embedding

NORMALISATIONS = {  # name -> output kind of the trained model
    "trunc_disparity": "disparity",  # 1/depth, 2% / 98% quantiles -> -1 / +1, clipped (the v2 models)
    "trunc_depth": "depth",  # depth, 2% / 98% quantiles -> -1 / +1, clipped (Marigold; the v1-0 models)
    "disparity": "disparity",  # 1/depth, min / max -> -1 / +1
    "depth": "depth",  # depth, min / max -> -1 / +1
}
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class StepOptions:
    """What one step does (the paper's Table 3 ablations are these fields); validated once."""

    task: str = "depth"  # "depth" | "normal"
    family: str = "g"  # "g" (noise input, 8 channels) | "d" (image latent only)
    prediction: str = "x0"  # "x0" (Lotus) | "eps" (standard diffusion; G only)
    timesteps: int = 1  # 1 = single step t = 999 (Lotus); N = N evenly spaced steps, DDIM at evaluation (G)
    detail_preserver: bool = True
    norm: str = "trunc_disparity"  # depth normalisation, a key of NORMALISATIONS
    latent: str = "sample"  # "sample" (reference: posterior sample) | "mean"

    def __post_init__(self):
        checks = [
            (self.task in ("depth", "normal"), f"--task must be depth or normal, not {self.task!r}"),
            (self.family in ("g", "d"), f"--family must be g or d, not {self.family!r}"),
            (self.prediction in ("x0", "eps"), f"--prediction must be x0 or eps, not {self.prediction!r}"),
            (1 <= self.timesteps <= NUM_TRAIN_TIMESTEPS, f"--timesteps must be in 1..1000, not {self.timesteps}"),
            (self.norm in NORMALISATIONS, f"--norm must be one of {', '.join(NORMALISATIONS)}, not {self.norm!r}"),
            (self.latent in ("sample", "mean"), f"--latent must be sample or mean, not {self.latent!r}"),
            (self.family == "g" or self.prediction == "x0", "--prediction eps needs --family g (D has no noise)"),
            (self.family == "g" or self.timesteps == 1, "--timesteps > 1 needs --family g (D has no noise)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def kind(self) -> str:
        """Output kind of the trained model: "disparity", "depth" or "normal"."""
        return "normal" if self.task == "normal" else NORMALISATIONS[self.norm]


# ------------------------------------------------------------------------------------ schedule


@lru_cache(maxsize=1)
def alphas_cumprod() -> torch.Tensor:
    """abar_t, t = 0..999, of SD's scaled-linear schedule (betas 0.00085 .. 0.012), float64 [1000]."""
    from diffusers import DDPMScheduler

    s = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear")
    return s.alphas_cumprod.to(torch.float64)


def train_timesteps(n: int) -> torch.Tensor:
    """N evenly spaced steps ending at 999 ("trailing" spacing), descending; [999] for N = 1. int64 [N]."""
    return torch.tensor([TIMESTEP - round(k * NUM_TRAIN_TIMESTEPS / n) for k in range(n)], dtype=torch.int64)


# ---------------------------------------------------------------------------------- annotations


def _quantiles(v: torch.Tensor, q: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    if v.numel() > 8_000_000:  # torch.quantile's input limit: a fixed stride subsample is plenty
        v = v[:: v.numel() // 4_000_000 + 1]
    lo, hi = torch.quantile(v, torch.tensor(q, dtype=v.dtype, device=v.device))
    return lo, hi


def depth_annotation(depth: torch.Tensor, valid: torch.Tensor, norm: str = "trunc_disparity") -> torch.Tensor:
    """Depth [B, 1, H, W] metres (valid [B, 1, H, W] bool) -> annotation [B, 3, H, W] in [-1, 1], one
    channel repeated; per image. Disparity norms map near to +1, depth norms map near to -1. 0 off ``valid``."""
    out = torch.zeros_like(depth)
    for i in range(depth.shape[0]):
        m = valid[i] & (depth[i] > 0)
        if not m.any():
            continue
        v = depth[i].double()
        v = 1.0 / v.clamp_min(1e-12) if NORMALISATIONS[norm] == "disparity" else v
        q = (0.02, 0.98) if norm.startswith("trunc_") else (0.0, 1.0)
        lo, hi = _quantiles(v[m], q)
        a = ((v - lo) / (hi - lo).clamp_min(1e-12) * 2 - 1).clamp(-1, 1)
        out[i] = torch.where(m, a, torch.zeros_like(a)).to(out.dtype)
    return out.repeat(1, 3, 1, 1)


def normal_annotation(normal: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Normals [B, 3, H, W] (Lotus frame: x left, y up, z toward the camera) -> [-1, 1]; 0 off ``valid``."""
    n = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return torch.where(valid, n.clamp(-1, 1), torch.zeros_like(n))


def annotation(batch: dict, opts: StepOptions) -> torch.Tensor:
    if opts.task == "normal":
        return normal_annotation(batch["normal"], batch["valid"])
    return depth_annotation(batch["depth"], batch["valid"], opts.norm)


def latent_valid(valid: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel validity [B, 1, H, W] -> latent-cell validity [B, 1, H/f, W/f]: valid only if all f x f are."""
    invalid = F.max_pool2d((~valid).float(), kernel_size=factor, stride=factor)
    return invalid == 0


# ---------------------------------------------------------------------------------------- step


@dataclass
class Draws:
    """The random numbers of one step. image_eps, anno_eps [B, 4, h, w] (posterior samples); noise
    [R, 4, h, w] (G; R = 2B with the detail preserver, else B) or None; t [R] int64 time-steps."""

    image_eps: torch.Tensor | None
    anno_eps: torch.Tensor | None
    noise: torch.Tensor | None
    t: torch.Tensor


def draw(b: int, latent_shape: tuple[int, int, int], opts: StepOptions, generator: torch.Generator) -> Draws:
    """Draw, in this order: image eps, annotation eps (if ``latent="sample"``), noise (G), time-step indices."""
    rows = 2 * b if opts.detail_preserver else b
    shape = (b, *latent_shape)
    image_eps = anno_eps = noise = None
    if opts.latent == "sample":
        image_eps = torch.randn(shape, generator=generator)
        anno_eps = torch.randn(shape, generator=generator)
    if opts.family == "g":
        noise = torch.randn((rows, *latent_shape), generator=generator)
    steps = train_timesteps(opts.timesteps)
    t = steps[torch.randint(0, len(steps), (rows,), generator=generator)]
    return Draws(image_eps, anno_eps, noise, t)


def encode(vae, x: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> scaled latent [B, 4, h, w]: posterior mean (+ std * eps)."""
    dist = vae.encode(x).latent_dist
    z = dist.mean if eps is None else dist.mean + dist.std * eps.to(dist.mean)
    return z * vae.config.scaling_factor


@dataclass
class Losses:
    total: torch.Tensor
    anno: torch.Tensor
    rgb: torch.Tensor


def training_loss(unet, vae, prompt: torch.Tensor, rgb: torch.Tensor, anno: torch.Tensor, valid: torch.Tensor,
                  opts: StepOptions, draws: Draws) -> Losses:
    """The loss of one step (module doc). prompt [1, T, D] empty-prompt embedding; rgb, anno [B, 3, H, W] in
    [-1, 1]; valid [B, 1, H, W] bool. The VAE is frozen (no gradient); the UNet gets the gradient."""
    b = rgb.shape[0]
    dev = rgb.device
    with torch.no_grad():
        z_img = encode(vae, rgb, draws.image_eps)  # [B, 4, h, w]
        z_anno = encode(vae, anno, draws.anno_eps)  # [B, 4, h, w]
    switch = [task_embedding(ANNOTATION, b, dev)]
    targets, cond = [z_anno], [z_img]
    if opts.detail_preserver:
        targets.append(z_img)
        cond.append(z_img)
        switch.append(task_embedding(RECONSTRUCTION, b, dev))
    target, cond = torch.cat(targets), torch.cat(cond)  # [R, 4, h, w]
    rows = target.shape[0]
    t = draws.t.to(dev)
    if opts.family == "g":
        noise = draws.noise.to(target)
        abar = alphas_cumprod().to(dev)[t].float().view(-1, 1, 1, 1)
        noisy = abar.sqrt() * target + (1 - abar).sqrt() * noise
        unet_in = torch.cat([cond, noisy], dim=1)  # [R, 8, h, w], image first
    else:
        noise, unet_in = None, cond  # [R, 4, h, w]
    pred = unet(unet_in, t, encoder_hidden_states=prompt.to(dev).expand(rows, -1, -1),
                class_labels=torch.cat(switch)).sample.float()  # [R, 4, h, w]
    goal = (noise if opts.prediction == "eps" else target).float()
    factor = rgb.shape[-1] // z_img.shape[-1]
    mask = latent_valid(valid, factor).expand(-1, pred.shape[1], -1, -1)  # [B, 4, h, w]
    sq = (pred[:b] - goal[:b]) ** 2
    anno_loss = (sq * mask).sum() / mask.sum().clamp_min(1)
    rgb_loss = F.mse_loss(pred[b:], goal[b:]) if opts.detail_preserver else torch.zeros((), device=dev)
    return Losses(anno_loss + rgb_loss, anno_loss.detach(), rgb_loss.detach())


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict_latent(unet, z_img: torch.Tensor, prompt: torch.Tensor, opts: StepOptions,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """The clean annotation latent [B, 4, h, w] for image latents [B, 4, h, w], as inference does it: D, one
    call at t = 999; G, start from ``noise`` at t = 999 and, for ``timesteps`` > 1, DDIM (eta 0) through the
    training steps; eps predictions are turned into x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    b, dev = z_img.shape[0], z_img.device
    kw = dict(encoder_hidden_states=prompt.to(dev).expand(b, -1, -1), class_labels=task_embedding(ANNOTATION, b, dev))
    if opts.family == "d":
        return unet(z_img, torch.full((b,), TIMESTEP, device=dev), **kw).sample
    abars = alphas_cumprod().to(dev)
    steps = train_timesteps(opts.timesteps).tolist()
    x = noise.to(z_img)
    for k, t in enumerate(steps):
        a = abars[t].float()
        out = unet(torch.cat([z_img, x], dim=1), torch.full((b,), t, device=dev), **kw).sample
        if opts.prediction == "eps":
            eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
        else:
            x0, eps = out, (x - a.sqrt() * out) / (1 - a).sqrt()
        if k + 1 < len(steps):
            a_next = abars[steps[k + 1]].float()
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x0
