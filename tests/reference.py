"""The reference Lotus inference (arXiv 2409.18124, Sec. 3; the authors' pipeline), with diffusers components.

Deliberately independent of lotus_cli: it loads every component itself, runs the text encoder on every
call, draws the image latent as a posterior sample from torch's global RNG and resizes back with
nearest-exact, as the paper's reference code does (fp32, no autocast).
"""

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


def load(folder):
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    return unet, vae, tok, te


@torch.no_grad()
def reference_predict(components, rgb: np.ndarray, *, processing_res: int, seed: int, posterior_seed: int):
    """Returns the decoded prediction [3, H, W] in [0, 1] at the input size (before channel mean)."""
    unet, vae, tok, te = components
    H, W = rgb.shape[:2]
    x = torch.tensor(rgb.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)  # step 1
    x = x / 127.5 - 1.0
    f = min(processing_res / W, processing_res / H)  # step 2
    x = F.interpolate(x, size=(int(H * f), int(W * f)), mode="bilinear", align_corners=False, antialias=True)
    ids = tok("", padding="do_not_pad", return_tensors="pt").input_ids  # step 3: [BOS, EOS]
    prompt = te(ids).last_hidden_state  # [1, 2, D]
    s = torch.tensor([[1.0, 0.0]])  # step 4
    task_emb = torch.cat([torch.sin(s), torch.cos(s)], dim=-1)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = x.shape[-2] // factor, x.shape[-1] // factor
    generator = torch.Generator("cpu").manual_seed(seed)
    g = unet.config.in_channels == 8
    noise = torch.randn((1, 4, h, w), generator=generator) if g else None  # step 7, drawn before the encode
    torch.manual_seed(posterior_seed)  # the reference samples the posterior from the global RNG
    latent = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor  # step 6
    unet_in = torch.cat([latent, noise], dim=1) if g else latent
    pred = unet(unet_in, 999, encoder_hidden_states=prompt, class_labels=task_emb).sample  # step 5, 8
    y = vae.decode(pred / vae.config.scaling_factor).sample
    y = torch.clamp(y / 2 + 0.5, 0, 1)
    y = F.interpolate(y, size=(H, W), mode="nearest-exact")  # step 9
    return y[0]


def as_depth(y):
    return y.mean(dim=0).numpy()


def as_normal(y):
    n = (y * 2 - 1).permute(1, 2, 0).numpy()
    return n / np.linalg.norm(n, axis=-1, keepdims=True)
