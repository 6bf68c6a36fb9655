"""Random-weight Lotus checkpoints in the real hub folder layout, and ray-cast scenes of known geometry.

Model weights cannot be downloaded everywhere (CI, air-gapped machines), so tests, benchmarks and the
training debug preset build checkpoints here and load them through exactly the code path that loads
released weights (`lotus --model PATH`). ``size="full"`` gives the real SD2 / Lotus architecture
(868M-parameter UNet, 84M VAE) for speed and memory measurements; ``size="tiny"`` gives a model of a
few hundred thousand parameters that runs in milliseconds. ``render_scene`` draws a room of planes and
spheres whose depth and normals are exact; ``write_synthetic_dataset`` saves such scenes in the training
folder format (lotus_cli/train/data.py), which the debug preset trains on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..geometry.camera import convert_normals
from .weights import LOTUS_CLASS_EMBED

# Stable Diffusion 2 (stabilityai/stable-diffusion-2-base) component configs; Lotus adds the projection
# class embedding and, for the G family, an 8-channel conv_in.
SD2_UNET = dict(
    sample_size=64,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
)
SD2_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
SD2_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
    vocab_size=49408,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
TINY_UNET = dict(
    sample_size=16,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    # attention only at the lower resolution, so a tiny model stays cheap at 768 px
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    use_linear_projection=True,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32, 32),  # 4 pixels per latent cell (8 in SD2)
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.18215,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=32,
    vocab_size=64,
    bos_token_id=62,
    eos_token_id=63,
    pad_token_id=1,
)

SIZES = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "full": (SD2_UNET, SD2_VAE, SD2_TEXT)}


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A CLIP BPE tokenizer with single-character tokens; BOS/EOS sit at the end as in CLIP's vocab."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["!", "<|unk|>"] + chars + [c + "</w>" for c in chars]
    tokens = tokens[: vocab_size - 2]
    tokens += [f"<|pad{i}|>" for i in range(vocab_size - 2 - len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )


def build_checkpoint(
    path: str | Path,
    *,
    family: str = "d",
    task: str = "depth",
    size: str = "tiny",
    seed: int = 0,
    components: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
) -> Path:
    """Save a random Lotus checkpoint (family "g" or "d") in the hub layout under ``path``.

    The folder has unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json, like the
    released ``jingheya/lotus-*`` repos; weights are safetensors. ``task`` only goes into
    model_index.json (as a hint, the way real repos name their pipeline class); the loader decides G vs
    D from ``unet.config.in_channels``.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if family not in ("g", "d"):
        raise ValueError(f"family must be 'g' or 'd', not {family!r}")
    unet_cfg, vae_cfg, text_cfg = SIZES[size]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if "unet" in components:
        unet = UNet2DConditionModel(in_channels=8 if family == "g" else 4, **unet_cfg, **LOTUS_CLASS_EMBED)
        unet.save_pretrained(path / "unet", safe_serialization=True)
        del unet
    if "vae" in components:
        AutoencoderKL(**vae_cfg).save_pretrained(path / "vae", safe_serialization=True)
    if "text_encoder" in components:
        CLIPTextModel(CLIPTextConfig(**text_cfg)).save_pretrained(path / "text_encoder", safe_serialization=True)
    if "tokenizer" in components:
        _write_tokenizer(path / "tokenizer", text_cfg["vocab_size"])
    if "scheduler" in components:
        DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample"
        ).save_pretrained(path / "scheduler")
    index = {
        # Real repos name classes that exist nowhere; the loader must not depend on this.
        "_class_name": f"Lotus{family.upper()}Pipeline",
        "_diffusers_version": "0.28.0",
        "lotus_task": task,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


# ------------------------------------------------------------------------------------ synthetic scenes


def render_scene(height: int, width: int, seed: int) -> dict:
    """A ray-cast scene of known geometry: a floor, a back wall, a side wall and two spheres, Lambert-shaded
    with a checker texture. Returns rgb uint8 [H, W, 3], depth float32 [H, W] (z, metres), normal float32
    [H, W, 3] (Lotus frame), all exact; nothing is invalid (callers may mask)."""
    rng = np.random.default_rng(seed)
    f = 0.9 * width
    u = (np.arange(width) - (width - 1) / 2) / f
    v = (np.arange(height) - (height - 1) / 2) / f
    d = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((height, width))), -1)  # rays, OpenCV, z = 1
    best = np.full((height, width), np.inf)
    normal = np.zeros((height, width, 3))
    albedo = np.zeros((height, width, 3))
    planes = [
        ((0.0, -1.0, 0.0), rng.uniform(0.6, 1.4)),  # floor below the camera (OpenCV y points down)
        ((0.0, 0.0, -1.0), rng.uniform(4.0, 8.0)),  # back wall facing the camera
        ((rng.choice([-1.0, 1.0]) * np.cos(0.3), 0.0, -np.sin(0.3)), rng.uniform(1.5, 3.0)),
    ]  # side wall
    for n, dist in planes:  # plane n . p = -dist, unit normal n facing the camera at the origin
        n = np.asarray(n)
        t = -dist / np.where(np.abs(d @ n) > 1e-9, d @ n, np.nan)
        _hit(best, normal, albedo, t, np.broadcast_to(n, normal.shape), rng.uniform(0.3, 0.9, 3))
    for _ in range(2):
        centre = np.array([rng.uniform(-1, 1), rng.uniform(-0.3, 0.6), rng.uniform(2.5, 4.5)])
        r = rng.uniform(0.3, 0.8)
        b = d @ centre
        disc = b**2 - (d * d).sum(-1) * (centre @ centre - r**2)
        t = (b - np.sqrt(np.where(disc >= 0, disc, np.nan))) / (d * d).sum(-1)
        _hit(best, normal, albedo, t, (t[..., None] * d - centre) / r, rng.uniform(0.3, 0.9, 3))
    p = best[..., None] * d
    checker = ((np.floor(p[..., 0] * 2) + np.floor(p[..., 1] * 2) + np.floor(p[..., 2] * 2)) % 2) * 0.25 + 0.75
    light = np.array([0.4, -0.6, -0.7]) / np.linalg.norm([0.4, -0.6, -0.7])  # toward the light, OpenCV frame
    shade = 0.25 + 0.75 * np.clip(normal @ light, 0, 1)
    rgb = np.clip(albedo * (shade * checker)[..., None] * 255, 0, 255).astype(np.uint8)
    return dict(
        rgb=rgb, depth=best.astype(np.float32), normal=convert_normals(normal.astype(np.float32), "lotus", "opencv")
    )


def _hit(best, normal, albedo, t, n, colour) -> None:
    closer = np.isfinite(t) & (t > 1e-3) & (t < best)
    best[closer] = t[closer]
    normal[closer] = n[closer]
    albedo[closer] = colour


def write_synthetic_dataset(
    root: str | Path, count: int, size: tuple[int, int] = (32, 32), seed: int = 0, holes: bool = True
) -> Path:
    """``count`` rendered scenes in the generic folder format under ``root`` (depth npy metres, normals npy
    in the Lotus frame, and with ``holes`` a mask png with one invalid rectangle per image)."""
    from PIL import Image

    root = Path(root)
    for sub in ("rgb", "depth", "normal", "mask"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        s = render_scene(*size, seed=seed * 100_003 + i)
        key = f"{i:05d}"
        Image.fromarray(s["rgb"]).save(root / "rgb" / f"{key}.png")
        np.save(root / "depth" / f"{key}.npy", s["depth"])
        np.save(root / "normal" / f"{key}.npy", s["normal"])
        if holes:
            rng = np.random.default_rng([seed, i])
            mask = np.full(size, 255, np.uint8)
            y, x = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
            mask[y : y + size[0] // 6 + 1, x : x + size[1] // 6 + 1] = 0
            Image.fromarray(mask).save(root / "mask" / f"{key}.png")
    (root / "lotus_data.json").write_text(json.dumps({"normal_frame": "lotus", "note": "synthetic scenes"}))
    return root
