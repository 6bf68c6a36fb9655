"""One Lotus training step and its loss, as the paper (arXiv 2409.18124, Sec. 4) and the authors' train
scripts do it (docs/training.md).

For a batch of B images (rgb [B, 3, H, W] in [-1, 1], annotation [B, 3, H, W] in [-1, 1], loss mask
[B, 1, H, W]):

1. latents are posterior samples ``mean + std * eps`` times the scaling factor ([B, 4, h, w], h = H / f),
   each drawn independently as the authors' two ``latent_dist.sample()`` calls draw them: one per condition
   row (the annotation row's and the reconstruction row's image latents differ), one for the annotation and
   one for the reconstruction target; ``latent="mean"`` drops every eps;
2. targets = [z_anno, z_img'] (2B; the second half is the detail preserver, task switch [0, 1]); without the
   detail preserver only z_anno (B); conditions = an image latent per row;
3. G: noisy = sqrt(abar_t) * target + sqrt(1 - abar_t) * noise with SD's scaled-linear schedule, t = 999
   (or one of ``timesteps`` evenly spaced steps), UNet input = [condition, noisy] (image first, 8 channels);
   D: UNet input = the condition, t = 999;
4. the UNet output is the clean target (x0-prediction) or the noise (``prediction="eps"``, G only);
5. loss = MSE over the latent cells of the annotation rows inside the loss mask (a cell counts only if all
   its f x f pixels do: the outside is max-pooled) + MSE over all reconstruction rows, weighted 1 : 1. The
   loss mask is ``loss_mask``: depth, valid pixels plus sky; normals, valid pixels with a normal.

Every random number of a step comes from ``draw`` in a fixed order, so a step is a pure function of the
model, the batch and one generator: resuming and data-parallel training reproduce it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..model.gpu import float64_device
from ..model.predictor import ANNOTATION, RECONSTRUCTION, TIMESTEP, task_embedding
from .options import NORMALISATIONS, NUM_TRAIN_TIMESTEPS, StepOptions

# ------------------------------------------------------------------------------------ schedule


@lru_cache(maxsize=1)
def alphas_cumprod() -> torch.Tensor:
    """abar_t, t = 0..999, of SD's scaled-linear schedule (betas 0.00085 .. 0.012), float64 [1000]."""
    from diffusers import DDPMScheduler

    s = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return s.alphas_cumprod.to(torch.float64)


def abar_at(t: torch.Tensor, device) -> torch.Tensor:
    """abar at time-steps ``t`` [N] (int64, any device), float32 [N] on ``device``: looked up in float64 on the
    CPU and rounded once, the numbers the device would compute, without float64 on it (MPS has none)."""
    return alphas_cumprod()[t.cpu()].float().to(device)


def train_timesteps(n: int) -> torch.Tensor:
    """N evenly spaced steps ending at 999 ("trailing" spacing), descending; [999] for N = 1. int64 [N]."""
    return torch.tensor([TIMESTEP - round(k * NUM_TRAIN_TIMESTEPS / n) for k in range(n)], dtype=torch.int64)


# ---------------------------------------------------------------------------------- annotations


def _quantiles(v: torch.Tensor, q: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    if v.numel() > 8_000_000:  # torch.quantile's input limit: a fixed stride subsample is plenty
        v = v[:: v.numel() // 4_000_000 + 1]
    lo, hi = torch.quantile(v, torch.tensor(q, dtype=v.dtype, device=v.device))
    return lo, hi


RANGE_EPS = 1e-5  # added to the denominator of the normalisation range, as the authors' loaders do


def depth_annotation(depth: torch.Tensor, valid: torch.Tensor, norm: str = "trunc_disparity") -> torch.Tensor:
    """Depth [B, 1, H, W] metres (valid [B, 1, H, W] bool) -> annotation [B, 3, H, W] in [-1, 1], one
    channel repeated; per image, as the authors' loaders compute it: v = 1 / depth (disparity norms) or depth;
    lo, hi = its 2 % / 98 % quantiles (min / max for the untruncated norms) over the valid pixels with depth
    > 0; a = clip(2 (v - lo) / (hi - lo + 1e-5) - 1, -1, 1) on EVERY pixel. Disparity norms map near to +1,
    depth norms near to -1; a pixel without depth (0) becomes +1 (disparity, 1/0) or -1 (depth), the far sky
    -1 (disparity) or +1 (depth). An image with no valid pixel gives zeros."""
    out = torch.zeros_like(depth)
    where = float64_device(depth.device)  # float64 statistics: on the CPU for a device without float64
    for i in range(depth.shape[0]):
        d = torch.nan_to_num(depth[i].to(where, torch.float64), nan=0.0)
        m = valid[i].to(where) & (d > 0)
        if not m.any():
            continue
        v = 1.0 / d if NORMALISATIONS[norm] == "disparity" else d  # 1 / 0 = inf -> +1 after the clip
        q = (0.02, 0.98) if norm.startswith("trunc_") else (0.0, 1.0)
        lo, hi = _quantiles(v[m], q)
        out[i] = ((v - lo) / (hi - lo + RANGE_EPS) * 2 - 1).clamp(-1, 1).to(out.device, out.dtype)
    return out.repeat(1, 3, 1, 1)


def normal_annotation(normal: torch.Tensor) -> torch.Tensor:
    """Normals [B, 3, H, W] (Lotus frame: x left, y up, z toward the camera) -> unit vectors in [-1, 1];
    a zero vector (no normal) stays 0."""
    return (normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-6)).clamp(-1, 1)


def annotation(batch: dict, opts: StepOptions) -> torch.Tensor:
    """The batch's annotation [B, 3, H, W] in [-1, 1] for ``opts.task``."""
    if opts.task == "normal":
        return normal_annotation(batch["normal"])
    return depth_annotation(batch["depth"], batch["valid"], opts.norm)


def loss_mask(batch: dict, opts: StepOptions) -> torch.Tensor:
    """Pixels in the annotation loss [B, 1, H, W] bool: depth, valid pixels plus sky (the authors' mask);
    normals, valid pixels that have a normal (a zero vector is no target)."""
    if opts.task == "normal":
        return batch["valid"] & (batch["normal"].norm(dim=1, keepdim=True) > 0.5)
    sky = batch.get("sky")
    return batch["valid"] if sky is None else batch["valid"] | sky


def latent_valid(valid: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel validity [B, 1, H, W] -> latent-cell validity [B, 1, H/f, W/f]: valid only if all f x f are."""
    invalid = F.max_pool2d((~valid).float(), kernel_size=factor, stride=factor)
    return invalid == 0


# ---------------------------------------------------------------------------------------- step


@dataclass
class Draws:
    """The random numbers of one step, R = 2B rows with the detail preserver, else B. Posterior samples
    (None with ``latent="mean"``): image_eps [R, 4, h, w], one per condition row; anno_eps [B, 4, h, w];
    target_eps [B, 4, h, w] for the reconstruction target (None without the detail preserver). noise
    [R, 4, h, w] (G) or None; t [R] int64 time-steps."""

    image_eps: torch.Tensor | None
    anno_eps: torch.Tensor | None
    target_eps: torch.Tensor | None
    noise: torch.Tensor | None
    t: torch.Tensor


def draw(b: int, latent_shape: tuple[int, int, int], opts: StepOptions, generator: torch.Generator) -> Draws:
    """Draw, in this order: the conditions' image eps, annotation eps, reconstruction-target eps (if
    ``latent="sample"``), noise (G), time-step indices."""
    rows = 2 * b if opts.detail_preserver else b
    image_eps = anno_eps = target_eps = noise = None
    if opts.latent == "sample":
        image_eps = torch.randn((rows, *latent_shape), generator=generator)
        anno_eps = torch.randn((b, *latent_shape), generator=generator)
        if opts.detail_preserver:
            target_eps = torch.randn((b, *latent_shape), generator=generator)
    if opts.family == "g":
        noise = torch.randn((rows, *latent_shape), generator=generator)
    steps = train_timesteps(opts.timesteps)
    t = steps[torch.randint(0, len(steps), (rows,), generator=generator)]
    return Draws(image_eps, anno_eps, target_eps, noise, t)


def sample(vae, dist, eps: torch.Tensor | None, copies: int = 1) -> torch.Tensor:
    """``copies`` scaled latents of each image [copies * B, 4, h, w] from a VAE posterior of B images:
    mean + std * eps, eps [copies * B, 4, h, w] (the mean when ``eps`` is None)."""
    mean = dist.mean.repeat(copies, 1, 1, 1)
    z = mean if eps is None else mean + dist.std.repeat(copies, 1, 1, 1) * eps.to(mean)
    return z * vae.config.scaling_factor


@dataclass
class Losses:
    total: torch.Tensor
    anno: torch.Tensor
    rgb: torch.Tensor


def training_loss(
    unet,
    vae,
    prompt: torch.Tensor,
    rgb: torch.Tensor,
    anno: torch.Tensor,
    mask: torch.Tensor,
    opts: StepOptions,
    draws: Draws,
) -> Losses:
    """The loss of one step (module doc). prompt [1, T, D] empty-prompt embedding; rgb, anno [B, 3, H, W] in
    [-1, 1]; mask [B, 1, H, W] bool, the pixels in the annotation loss (``loss_mask``). The VAE is frozen (no
    gradient); the UNet gets the gradient."""
    b = rgb.shape[0]
    dev = rgb.device
    rows = 2 * b if opts.detail_preserver else b
    with torch.no_grad():
        image = vae.encode(rgb).latent_dist  # one encoding; its posterior is sampled once per use
        cond = sample(vae, image, draws.image_eps, rows // b)  # [R, 4, h, w]
        targets = [sample(vae, vae.encode(anno).latent_dist, draws.anno_eps)]  # [B, 4, h, w]
        if opts.detail_preserver:
            targets.append(sample(vae, image, draws.target_eps))  # [B, 4, h, w]
    target = torch.cat(targets)  # [R, 4, h, w]
    switch = [task_embedding(ANNOTATION, b, dev)] + [task_embedding(RECONSTRUCTION, b, dev)] * (rows // b - 1)
    t = draws.t.to(dev)
    if opts.family == "g":
        noise = draws.noise.to(target)
        abar = abar_at(draws.t, dev).view(-1, 1, 1, 1)  # draws.t: on the CPU, where they were drawn
        noisy = abar.sqrt() * target + (1 - abar).sqrt() * noise
        unet_in = torch.cat([cond, noisy], dim=1)  # [R, 8, h, w], image first
    else:
        noise, unet_in = None, cond  # [R, 4, h, w]
    pred = unet(
        unet_in, t, encoder_hidden_states=prompt.to(dev).expand(rows, -1, -1), class_labels=torch.cat(switch)
    ).sample.float()  # [R, 4, h, w]
    goal = (noise if opts.prediction == "eps" else target).float()
    factor = rgb.shape[-1] // cond.shape[-1]
    cells = latent_valid(mask, factor).expand(-1, pred.shape[1], -1, -1)  # [B, 4, h, w]
    sq = (pred[:b] - goal[:b]) ** 2
    anno_loss = (sq * cells).sum() / cells.sum().clamp_min(1)
    rgb_loss = F.mse_loss(pred[b:], goal[b:]) if opts.detail_preserver else torch.zeros((), device=dev)
    return Losses(anno_loss + rgb_loss, anno_loss.detach(), rgb_loss.detach())


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict_latent(
    unet, z_img: torch.Tensor, prompt: torch.Tensor, opts: StepOptions, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """The clean annotation latent [B, 4, h, w] for image latents [B, 4, h, w], as inference does it: D, one
    call at t = 999; G, start from ``noise`` at t = 999 and, for ``timesteps`` > 1, DDIM (eta 0) through the
    training steps; eps predictions are turned into x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    b, dev = z_img.shape[0], z_img.device
    kw = dict(encoder_hidden_states=prompt.to(dev).expand(b, -1, -1), class_labels=task_embedding(ANNOTATION, b, dev))
    if opts.family == "d":
        return unet(z_img, torch.full((b,), TIMESTEP, device=dev), **kw).sample
    steps = train_timesteps(opts.timesteps)
    abars = abar_at(steps, dev)  # [N] float32
    steps = steps.tolist()
    x = noise.to(z_img)
    for k, t in enumerate(steps):
        a = abars[k]
        out = unet(torch.cat([z_img, x], dim=1), torch.full((b,), t, device=dev), **kw).sample
        if opts.prediction == "eps":
            eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
        else:
            x0, eps = out, (x - a.sqrt() * out) / (1 - a).sqrt()
        if k + 1 < len(steps):
            a_next = abars[k + 1]
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x0
