"""Random-weight Lotus checkpoints in the real hub folder layout.

Model weights cannot be downloaded everywhere (CI, air-gapped machines), so tests, benchmarks and the
training debug preset build checkpoints here and load them through exactly the code path that loads
released weights (`lotus --model PATH`). ``size="full"`` gives the real SD2 / Lotus architecture
(868M-parameter UNet, 84M VAE) for speed and memory measurements; ``size="tiny"`` gives a model of a
few hundred thousand parameters that runs in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from .models import LOTUS_CLASS_EMBED

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
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>"})
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
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type="sample").save_pretrained(path / "scheduler")
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

