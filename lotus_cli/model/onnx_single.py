"""One fused ONNX graph of a Lotus prediction (``lotus export onnx --single``): RGB in [0, 1] -> the map.

``lotus.onnx`` chains the three graphs of ``onnx_export`` (VAE encoder, UNet at t = 999, VAE decoder) and
the map's last step, so that a runtime feeds one tensor and reads the map:

* input ``rgb`` [B, 3, H, W] float32, RGB in [0, 1] (x / 255); for a G model also ``noise``
  [B, 4, H/f, W/f], standard normal, as the UNet graph takes it;
* output ``map``: depth (the model's kind: disparity, depth) [B, 1, H, W] in [0, 1], the mean of the
  decoder's three channels; normals [B, 3, H, W], unit vectors (2 * decoded - 1 normalised per pixel,
  x left, y up, z toward the camera), as ``LotusPredictor.finish`` makes them at the graph's size.

Resizing to the image's own size stays outside the graph (the manifest says how). ``onnx_export.export``
writes it with ``single=True`` and ``onnx_export.run_single`` runs it; the manifest (``lotus-onnx.json``)
describes it as it does the three graphs. This module imports nothing of ``onnx_export``, which builds
``Single`` of its own graph modules.
"""

from __future__ import annotations

import numpy as np
import torch

from .predictor import LotusPredictor

NAME = "lotus"  # lotus.onnx


class Single(torch.nn.Module):
    """``onnx_export``'s three graph modules chained, and the map's last step for ``task``. The UNet is
    ``denoiser``: its nodes' names start with ``/denoiser/`` (``onnx_fp16`` keeps the rest fp32)."""

    def __init__(self, encoder: torch.nn.Module, denoiser: torch.nn.Module, decoder: torch.nn.Module, task: str):
        super().__init__()
        self.task = task
        self.encoder, self.denoiser, self.decoder = encoder, denoiser, decoder

    def forward(self, rgb, noise=None):
        latent = self.encoder(rgb * 2 - 1)  # [0, 1] -> [-1, 1]: x / 255 * 2 - 1 = x / 127.5 - 1
        decoded = self.decoder(self.denoiser(latent, noise))  # [B, 3, H, W] in [0, 1]
        if self.task == "normal":
            n = decoded * 2 - 1
            return n / n.norm(dim=1, keepdim=True).clamp_min(1e-6)  # as LotusPredictor.finish
        return decoded.mean(dim=1, keepdim=True)


def inputs(pred: LotusPredictor) -> list[str]:
    return ["rgb", "noise"] if pred.family == "g" else ["rgb"]


def example(pred: LotusPredictor, res: int) -> tuple:
    """The inputs the graph is traced with: a ``res`` x ``res`` image (and noise for a G model)."""
    f, c = pred.latent_factor, pred.latent_channels
    rgb = torch.zeros(1, 3, res, res)
    return (rgb, torch.zeros(1, c, res // f, res // f)) if pred.family == "g" else (rgb,)


def axes(pred: LotusPredictor) -> dict:
    """Dynamic axes: the noise's height and width are the latent's, not the image's."""
    image = {0: "batch", 2: "height", 3: "width"}
    out = {"rgb": image, "map": image}
    return out | ({"noise": {0: "batch", 2: "latent_height", 3: "latent_width"}} if pred.family == "g" else {})


def describe(manifest: dict, pred: LotusPredictor, res: int, dynamic: bool, entry: dict) -> dict:
    """Turn the three-graph manifest ``onnx_export`` built into the single graph's (``entry``: its files and
    bytes): pipeline, graphs, input and output (model, versions, opset and size_multiple are the same)."""
    f, c = pred.latent_factor, pred.latent_channels
    b, hw = ("B", ("H", "W")) if dynamic else (1, (res, res))
    lat = [b, c, f"H/{f}" if dynamic else res // f, f"W/{f}" if dynamic else res // f]
    ins = [{"name": "rgb", "shape": [b, 3, *hw], "dtype": "float32", "meaning": "RGB in [0, 1] (x / 255)"}]
    if pred.family == "g":
        ins.append(
            {
                "name": "noise",
                "shape": lat,
                "dtype": "float32",
                "meaning": "standard normal noise; lotus draws it as torch.Generator('cpu').manual_seed(seed)"
                " .randn(latent shape), seed 0 by default",
            }
        )
    depth = pred.task == "depth"
    meaning = (
        f"{pred.kind} in [0, 1]: the mean of the VAE decoder's 3 channels"
        if depth
        else "unit normals: 2 * decoded - 1 normalised per pixel; x left, y up, z toward the camera"
    )
    manifest["pipeline"] = [NAME]
    manifest["graphs"] = {
        NAME: {
            **entry,
            "inputs": ins,
            "outputs": [{"name": "map", "shape": [b, 1 if depth else 3, *hw], "dtype": "float32", "meaning": meaning}],
            "contains": "vae_encoder (posterior mean x scaling factor), unet (t = 999, task switch [1, 0], empty "
            "prompt folded in), vae_decoder, then the map's last step",
        }
    }
    manifest["input"] = {
        "image": "uint8 RGB, HWC -> NCHW float32, x / 255 (range [0, 1])",
        "resize": manifest["input"]["resize"],
    }
    manifest["output"] = f"map is the {'depth' if depth else 'normal'} map at the graph's size ({meaning}); resize it "
    manifest["output"] += "to the image's size (bilinear" + (")" if depth else ", then normalise again)")
    manifest["output"] += f"; kind {pred.kind}"
    return manifest


def as_map(out: np.ndarray) -> np.ndarray:
    """The graph's map [1, C, H, W] laid out as ``LotusPredictor.finish`` returns it: [H, W] or [H, W, 3]."""
    return out[0, 0] if out.shape[1] == 1 else out[0].transpose(1, 2, 0)
