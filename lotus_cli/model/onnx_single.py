"""One fused ONNX graph of a Lotus prediction (``lotus export onnx --single``): RGB in [0, 1] -> the map.

``lotus.onnx`` chains the three graphs of ``onnx_export`` (VAE encoder, UNet at t = 999, VAE decoder) and
the map's last step, so that a runtime feeds one tensor and reads the map:

* input ``rgb`` [B, 3, H, W] float32, RGB in [0, 1] (x / 255); for a G model also ``noise``
  [B, 4, H/f, W/f], standard normal, as the UNet graph takes it;
* output ``map``: depth (the model's kind: disparity, depth) [B, 1, H, W] in [0, 1], the mean of the
  decoder's three channels; normals [B, 3, H, W], unit vectors (2 * decoded - 1 normalised per pixel,
  x left, y up, z toward the camera), as ``LotusPredictor.finish`` makes them at the graph's size.

Resizing to the image's own size stays outside the graph (the manifest says how). ``onnx_export.export``
writes it with ``single=True``; the manifest (``lotus-onnx.json``) describes it as it does the three graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .predictor import LotusPredictor

NAME = "lotus"  # lotus.onnx


class _Single(torch.nn.Module):
    def __init__(self, pred: LotusPredictor):
        from .onnx_export import _Decoder, _Encoder, _UNet

        super().__init__()
        self.task, self.family = pred.task, pred.family
        self.encoder = _Encoder(pred.vae, pred.scaling_factor)
        self.denoiser = _UNet(pred.unet, pred.prompt_embedding, pred.family)
        self.decoder = _Decoder(pred.vae, pred.scaling_factor)

    def forward(self, rgb, noise=None):
        latent = self.encoder(rgb * 2 - 1)  # [0, 1] -> [-1, 1]: x / 255 * 2 - 1 = x / 127.5 - 1
        decoded = self.decoder(self.denoiser(latent, noise))  # [B, 3, H, W] in [0, 1]
        if self.task == "normal":
            n = decoded * 2 - 1
            return n / n.norm(dim=1, keepdim=True).clamp_min(1e-6)  # as LotusPredictor.finish
        return decoded.mean(dim=1, keepdim=True)


def inputs(pred: LotusPredictor) -> list[str]:
    return ["rgb", "noise"] if pred.family == "g" else ["rgb"]


def export_graph(onnx, pred: LotusPredictor, out_dir: Path, res: int, dynamic: bool) -> dict:
    """``lotus.onnx`` (and ``lotus.onnx.data`` over 2 GB) in ``out_dir``, checked; its manifest entry."""
    from .onnx_export import _export

    f, c = pred.latent_factor, pred.latent_channels
    rgb, noise = torch.zeros(1, 3, res, res), torch.zeros(1, c, res // f, res // f)
    image_axes = {0: "batch", 2: "height", 3: "width"}
    axes = {"rgb": image_axes, "map": image_axes, "noise": {0: "batch", 2: "latent_height", 3: "latent_width"}}
    return _export(
        onnx, _Single(pred), (rgb, noise) if pred.family == "g" else (rgb,), Path(out_dir) / f"{NAME}.onnx",
        inputs(pred), ["map"], dynamic, axes={k: v for k, v in axes.items() if k in (*inputs(pred), "map")},
    )  # fmt: skip


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


def run_single(out_dir: Path, image: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] at a size the graph takes -> ``lotus.onnx``'s map [1, 1 or 3, H, W] with ONNX
    Runtime's CPU provider. ``noise`` [1, 4, H/f, W/f] for a G model."""
    from .onnx_export import require_onnx

    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(Path(out_dir) / f"{NAME}.onnx"), opts, providers=["CPUExecutionProvider"])
    feeds = {"rgb": (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]}
    if noise is not None:
        feeds["noise"] = noise.astype(np.float32)
    (out,) = session.run(None, feeds)
    return out


def as_map(out: np.ndarray) -> np.ndarray:
    """The graph's map [1, C, H, W] laid out as ``LotusPredictor.finish`` returns it: [H, W] or [H, W, 3]."""
    return out[0, 0] if out.shape[1] == 1 else out[0].transpose(1, 2, 0)
