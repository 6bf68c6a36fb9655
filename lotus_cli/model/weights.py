"""Loading a checkpoint's weights: the UNet and VAE (safetensors only, never pickles) and the cached
empty-prompt embedding (the text encoder runs once per checkpoint, then is freed)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import ModelError
from ..io.cache import cache_dir
from .registry import EMBEDDING_FILE, check_layout


def latent_factor(vae_config) -> int:
    """Image pixels per latent cell side of a VAE (8 for Stable Diffusion 2; tiny test models differ), from its
    config (a diffusers config or the parsed vae/config.json): it halves the image once per level after the
    first."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def pixels_per_latent(folder: Path) -> int:
    """Image pixels per latent cell of a checkpoint's VAE (8 for Stable Diffusion 2), from vae/config.json
    without loading weights: the VAE halves the image once per level after the first. It is also the
    smallest side the VAE encodes (its stride-2 convolutions need two rows at every level)."""
    try:
        return latent_factor(json.loads((folder / "vae" / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"{folder}/vae/config.json: unreadable ({e})", "pass a folder in the hub layout (unet/, vae/, ...)"
        ) from e


def _embedding_key(folder: Path) -> str:
    """Identity of the text encoder + tokenizer files; hub blobs are content-addressed, so their real
    paths already change with their contents, and local edits change size or mtime."""
    h = hashlib.sha256()
    for name in (
        "text_encoder/model.safetensors",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "tokenizer/tokenizer_config.json",
    ):
        f = folder / name
        if f.exists():
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


def empty_prompt_embedding(folder: Path):
    """The text encoder's last hidden state for the EMPTY prompt, tokenised without padding.

    Returns a float32 CPU tensor [1, 2, D] (tokens BOS, EOS). A 77-token padded prompt gives different
    results, so this is the reference's exact conditioning. It is constant per checkpoint: read from the
    checkpoint's own ``lotus_empty_prompt.safetensors`` or lotus-cli's cache; otherwise computed once with
    the text encoder, which is then freed, and cached.
    """
    from safetensors.torch import load_file, save_file

    own = folder / EMBEDDING_FILE
    if own.is_file():
        return load_file(own)["embedding"].float()
    cached = cache_dir() / "embeddings" / f"{_embedding_key(folder)}.safetensors"
    if cached.is_file():
        try:
            return load_file(cached)["embedding"].float()
        except Exception:  # a damaged cache entry is recomputed, never fatal
            pass
    emb = compute_empty_prompt_embedding(folder)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        save_file({"embedding": emb.contiguous()}, str(tmp))
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs recomputation next time
    return emb


def compute_empty_prompt_embedding(folder: Path):
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    for sub in ("text_encoder", "tokenizer"):
        if not (folder / sub).is_dir():
            raise ModelError(
                f"{folder} has no {sub}/ and no cached empty-prompt embedding",
                "use a complete checkpoint folder (hub layout)",
            )
    _quiet_transformers()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32, use_safetensors=True)
    ids = tokenizer("", padding="do_not_pad", truncation=True, return_tensors="pt").input_ids  # [1, 2]
    with torch.inference_mode():
        emb = encoder(ids)[0].float().clone()  # [1, 2, D]
    del encoder
    return emb


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def read_safetensors(path: Path, dtype=None) -> dict:
    """A .safetensors file as {name: CPU tensor}, read tensor by tensor with plain reads, no mmap.

    safetensors' own loader maps the file; the mapped pages then count in the process's memory beside
    any converted copy (fp16 -> fp32, channels-last), up to twice the weights at the peak. Plain reads
    keep the peak at the weights plus one tensor. Floating tensors are cast to ``dtype`` when given.
    """
    import struct

    import torch

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=getattr(torch, _ST_DTYPES[info["dtype"]]))
            view = t.reshape(-1).view(torch.uint8).numpy()
            if view.nbytes != end - start:
                raise ValueError(f"{path}: tensor {name} has {end - start} bytes, expected {view.nbytes}")
            f.seek(base + start)
            if f.readinto(memoryview(view)) != view.nbytes:
                raise ValueError(f"{path}: truncated at tensor {name}")
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            out[name] = t
    return out


def _load_component(cls, folder: Path, sub: str, dtype):
    """Build a diffusers model from its config on the meta device and assign the weights read by
    ``read_safetensors``; fall back to diffusers' own loader for layouts this does not cover (old key
    names, sharded files)."""
    import torch

    weights = folder / sub / "diffusion_pytorch_model.safetensors"
    try:
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(folder / sub))
        model.load_state_dict(read_safetensors(weights, dtype), strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise ValueError("tensors left on the meta device")
        return model.to(dtype)
    except (RuntimeError, ValueError, KeyError):
        return cls.from_pretrained(folder, subfolder=sub, torch_dtype=dtype, use_safetensors=True)


# What makes an SD2 UNet a Lotus UNet (besides G's 8-channel conv_in): a projection class embedding of the
# 4-number task switch.
LOTUS_CLASS_EMBED = dict(class_embed_type="projection", projection_class_embeddings_input_dim=4)


def is_lotus_unet(unet) -> bool:
    cfg = unet.config
    return all(getattr(cfg, k, None) == v for k, v in LOTUS_CLASS_EMBED.items())


def load_unet_vae(folder: Path, dtype, device):
    """The UNet and VAE of a Lotus checkpoint, in eval mode on ``device`` in ``dtype``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    check_layout(folder)
    _quiet_transformers()
    dtype = dtype or torch.float32
    try:
        unet = _load_component(UNet2DConditionModel, folder, "unet", dtype)
        vae = _load_component(AutoencoderKL, folder, "vae", dtype)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load {folder}: {str(e).splitlines()[0]}",
            "re-download with `lotus models pull NAME` or check the folder",
        ) from e
    cfg = unet.config
    if not is_lotus_unet(unet):
        raise ModelError(
            f"{folder}/unet is not a Lotus UNet (no 4-input projection class embedding)",
            "pass a Lotus checkpoint; plain Stable Diffusion weights go through `lotus train`",
        )
    if cfg.in_channels not in (4, 8):
        raise ModelError(f"{folder}/unet has {cfg.in_channels} input channels; Lotus uses 8 (G) or 4 (D)")
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        unet.to(device)
        vae.to(device)
    return unet, vae
