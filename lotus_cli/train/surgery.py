"""Model surgery: Stable Diffusion 2's UNet -> a Lotus UNet (paper Sec. 4; docs/training.md).

Two changes, both exact functions of the SD2 weights apart from the new embedding:

* a projection class embedding (Linear(4, T)-SiLU-Linear(T, T), T = time-embedding width), new and
  randomly initialised, whose output diffusers adds to the timestep embedding; it carries the task switch;
* for the G family, conv_in takes 8 channels (image latent first, then the noisy target): the old 4-channel
  kernel repeated along the input channels and halved, bias copied, so that feeding the same latent in both
  halves gives exactly the old convolution.

A released Lotus UNet already has both and passes through unchanged (continue training from it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ModelError
from ..model.weights import LOTUS_CLASS_EMBED, is_lotus_unet


def add_class_embedding(unet, seed: int = 0):
    """A copy of ``unet`` (an SD2 UNet2DConditionModel without class embedding) with the 4-input projection
    class embedding; every other weight is copied, the new MLP drawn from torch's default init with ``seed``."""
    from diffusers import UNet2DConditionModel

    if is_lotus_unet(unet):
        return unet
    if unet.config.class_embed_type is not None:
        raise ModelError(
            f"the base UNet already has a class embedding of type {unet.config.class_embed_type!r}",
            "start from stabilityai/stable-diffusion-2-base or a Lotus checkpoint",
        )
    config = {**dict(unet.config), **LOTUS_CLASS_EMBED}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = UNet2DConditionModel.from_config(config)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise ModelError(f"unexpected UNet layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return new.to(dtype=next(unet.parameters()).dtype)


def widen_conv_in(unet):
    """Make ``unet`` take 8 input channels (G): kernel [C, 4, k, k] -> cat([w, w], dim=1) / 2, bias copied.
    Changes ``unet`` in place and returns it; a UNet that already takes 8 channels is returned as is."""
    old = unet.conv_in
    if old.in_channels == 8:
        return unet
    if old.in_channels != 4:
        raise ModelError(f"conv_in takes {old.in_channels} channels; Lotus widens a 4-channel SD2 conv_in to 8")
    new = torch.nn.Conv2d(
        8, old.out_channels, old.kernel_size, old.stride, old.padding, device=old.weight.device, dtype=old.weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(torch.cat([old.weight, old.weight], dim=1) * 0.5)  # [C, 8, k, k]
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=8)
    return unet


def to_lotus(unet, family: str, seed: int = 0):
    """SD2 or Lotus UNet -> a Lotus UNet of ``family`` ("g": 8 input channels, "d": 4)."""
    if family not in ("g", "d"):
        raise ValueError(f"family must be 'g' or 'd', not {family!r}")
    unet = add_class_embedding(unet, seed)
    if family == "g":
        return widen_conv_in(unet)
    if unet.config.in_channels != 4:
        raise ModelError(
            f"the base UNet takes {unet.config.in_channels} input channels; a D model takes 4",
            "train a D model from SD2 or a Lotus-D checkpoint, or pass --family g",
        )
    return unet


def build_tiny_base(
    path,
    seed: int = 0,
    fit_images=None,
    fit_steps: int = 400,
    progress: Callable[[int, int, float], None] | None = None,
):
    """A random tiny Stable-Diffusion-2-like base (no class embedding, 4-channel conv_in) in the hub layout,
    for the debug preset and tests: surgery then runs exactly as on the real SD2 base.

    A random VAE does not reconstruct anything (decode(encode(x)) is unrelated to x), so a model trained on
    its latents could not be judged by its decoded maps. With ``fit_images`` ([N, 3, H, W] in [-1, 1]: the
    training images and annotations) the VAE is first fitted as an autoencoder for ``fit_steps`` steps, and
    its scaling factor set to 1 / std of the latents, as SD's was; ``progress`` is passed to ``fit_vae``."""
    import shutil
    from pathlib import Path

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..model.synthetic import TINY_UNET, build_checkpoint

    path = Path(path)
    build_checkpoint(path, family="d", seed=seed, components=("vae", "text_encoder", "tokenizer", "scheduler"))
    torch.manual_seed(seed)
    if (path / "unet").exists():
        shutil.rmtree(path / "unet")
    UNet2DConditionModel(in_channels=4, **TINY_UNET).save_pretrained(path / "unet", safe_serialization=True)
    if fit_images is not None:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        fit_vae(vae, fit_images, fit_steps, seed, progress=progress)
        shutil.rmtree(path / "vae")
        vae.save_pretrained(path / "vae", safe_serialization=True)
    return path


def fit_vae(
    vae,
    images: torch.Tensor,
    steps: int,
    seed: int = 0,
    batch: int = 16,
    progress: Callable[[int, int, float], None] | None = None,
) -> None:
    """Fit ``vae`` in place to reconstruct ``images`` [N, 3, H, W] in [-1, 1] from posterior samples (MSE plus
    a small KL term, which keeps the posterior std small as in SD's VAE); then scaling_factor = 1 / std(latents).
    ``progress(step, steps, loss)`` is called after every step (step = 1 .. steps)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    vae.train()
    for k in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(k + 1, steps, loss.item())
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(images[:64]).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
