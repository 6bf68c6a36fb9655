"""ONNX graphs of a Lotus prediction (arXiv 2409.18124, Sec. 3-4): VAE encoder, one UNet step, VAE decoder.

The three graphs compute exactly ``LotusPredictor``'s encode, denoise and decode steps in fp32:

* ``vae_encoder.onnx``: image [B, 3, H, W] in [-1, 1] (RGB, x / 127.5 - 1) -> the posterior mean times the
  VAE's scaling factor, latent [B, 4, H/f, W/f] (f = pixels per latent cell, 8 for SD2);
* ``unet.onnx``: latent (and, for a G model, noise of the same shape, concatenated after it) -> the
  predicted clean latent, at t = 999 with the task switch [1, 0] and the empty-prompt embedding folded in;
* ``vae_decoder.onnx``: latent -> clamp(decode(z / scaling factor) / 2 + 1/2, 0, 1), [B, 3, H, W].

``lotus-onnx.json`` beside them is the contract for whoever runs them: inputs, shapes, normalisation, what
each output means and how a map is made of the decoder's output (``finish``). The export is checked with
``onnx.checker`` and run with ONNX Runtime's CPU provider against the torch predictor on a test image.
onnx and onnxruntime are imported here only (the ``onnx`` extra).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import OutputError, UsageError
from ..io.atomic import write_json
from .predictor import ANNOTATION, TIMESTEP, LotusPredictor, PredictOptions, task_embedding

MANIFEST = "lotus-onnx.json"
OPSET = 17
EXPORTER = "torch.onnx.export, TorchScript exporter (dynamo=False): the dynamo exporter needs onnxscript"
TOLERANCE = 1e-4  # fp32 map, ONNX Runtime vs torch
TWO_GB = 2**31  # protobuf's limit on one file: larger graphs keep their weights in external data


def require_onnx():
    """(onnx, onnxruntime), or a UsageError naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UsageError(
            f"ONNX export needs onnx and onnxruntime ({e.name} is missing)", "pip install 'lotus-cli[onnx]'"
        ) from e
    return onnx, onnxruntime


class _Encoder(torch.nn.Module):
    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean * self.scaling_factor


class _UNet(torch.nn.Module):
    def __init__(self, unet, prompt_embedding: torch.Tensor, family: str):
        super().__init__()
        self.unet, self.family = unet, family
        self.register_buffer("prompt", prompt_embedding.float(), persistent=False)  # [1, T, D]
        self.register_buffer("switch", task_embedding(ANNOTATION), persistent=False)  # [1, 4]

    def forward(self, latent, noise=None):
        b = latent.shape[0]
        x = torch.cat([latent, noise], dim=1) if self.family == "g" else latent  # image first, as denoise()
        t = torch.tensor(TIMESTEP, dtype=torch.int64)
        return self.unet(
            x, t, encoder_hidden_states=self.prompt.expand(b, -1, -1), class_labels=self.switch.expand(b, -1)
        ).sample


class _Decoder(torch.nn.Module):
    def __init__(self, vae, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, latent):
        return (self.vae.decode(latent / self.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def size_multiple(pred: LotusPredictor) -> int:
    """Pixels an image side must be a multiple of: one latent cell per UNet level below the top, so that
    the UNet's upsampling meets its skip connections (64 for SD2: 8 px per cell, 8 cells)."""
    return pred.latent_factor * 2 ** (len(pred.unet.config.block_out_channels) - 1)


def test_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 RGB [h, w, 3] validation image: smooth ramps plus seeded noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 200
    return np.clip(base + np.random.default_rng(seed).normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _export(onnx, module, args, path: Path, names_in, names_out, dynamic: bool, axes: dict | None = None) -> dict:
    """One graph to ``path`` (weights over 2 GB into ``path``.data), checked; returns its manifest entry.
    ``axes``: the dynamic axes' names per input and output (default: batch, height, width for all)."""
    axes = (axes or {n: {0: "batch", 2: "height", 3: "width"} for n in (*names_in, *names_out)}) if dynamic else None
    weight_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / path.name  # the exporter may spread a large model over many files: gathered below
        # the tracer's notes on Python branches over shapes: each is constant for the sizes the manifest allows
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                module, args, str(raw), dynamo=False, opset_version=OPSET, input_names=list(names_in),
                output_names=list(names_out), dynamic_axes=axes, do_constant_folding=True,
            )  # fmt: skip
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)  # a previous export's weights, which onnx would append to
        if weight_bytes >= TWO_GB:
            model = onnx.load(str(raw))
            onnx.save_model(model, str(path), save_as_external_data=True, location=data.name)
            data.chmod(path.stat().st_mode & 0o777)  # onnx writes it owner-only: readable as the graph is
        else:
            shutil.move(str(raw), str(path))
    onnx.checker.check_model(str(path))  # by path: a graph with external data is checked with its weights
    files = [path.name] + ([data.name] if weight_bytes >= TWO_GB else [])
    return {"files": files, "bytes": sum((path.parent / f).stat().st_size for f in files)}


def export(
    pred: LotusPredictor,
    out_dir: Path,
    res: int = 512,
    dynamic: bool = False,
    any_size: bool = False,
    *,
    fp16: bool = False,
    fp16_vae: bool = False,
    single: bool = False,
) -> dict:
    """Write the three graphs and ``lotus-onnx.json`` of a predictor loaded in fp32 on the CPU with plain
    modules (``load``) into ``out_dir``; validate them; return the manifest. ``res``: the side of the
    square image the graphs take (and are validated at); with ``dynamic`` batch, height and width are free
    (multiples of ``size_multiple``). ``any_size`` (with ``dynamic``): the UNet is traced at a latent size that
    is not a multiple of its levels' halvings, so its upsamplers take their sizes from the skip connections as
    diffusers does for such sizes; a size-2n target is what the default doubling gives, so the graphs take
    every height and width (the encoder floors as torch's VAE does) and match torch at each (size_multiple 1).
    Raises OutputError when ONNX Runtime disagrees beyond 1e-4 (fp32).

    ``single``: one graph ``lotus.onnx`` from RGB in [0, 1] to the map instead (``onnx_single``; not with
    ``any_size``). ``fp16``: the UNet (with ``fp16_vae`` the VAE too) converted to fp16 with float32 inputs
    and outputs (``onnx_fp16``); its difference from torch's fp32 map is reported, only a non-finite map fails."""
    onnx, ort = require_onnx()
    if pred.dtype != torch.float32 or pred.device.type != "cpu" or pred.packed or pred.channels_last:
        raise UsageError("ONNX export needs the fp32 CPU predictor with plain modules", "load it with onnx_export.load")
    multiple = size_multiple(pred)
    if res <= 0 or res % multiple:
        raise UsageError(
            f"--res {res} is not a positive multiple of {multiple} px",
            f"use e.g. {512 // multiple * multiple or multiple}",
        )
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out_dir}: {e.strerror}", "choose a writable --out") from e
    for m in pred.vae.modules():  # the exporter traces an in-place SiLU as well, but plain is its common path
        if isinstance(m, torch.nn.SiLU):
            m.inplace = False
    f, c = pred.latent_factor, pred.latent_channels
    image = torch.zeros(1, 3, res, res)
    latent = torch.zeros(1, c, res // f, res // f)
    # the UNet traced where diffusers forwards the skips' sizes
    odd = any_size and dynamic and res // f > 1 and not single
    unet_latent = torch.zeros(1, c, res // f - 1, res // f - 1) if odd else latent
    t0 = time.perf_counter()
    if single:
        from . import onnx_single

        module = onnx_single.Single(
            _Encoder(pred.vae, pred.scaling_factor), _UNet(pred.unet, pred.prompt_embedding, pred.family),
            _Decoder(pred.vae, pred.scaling_factor), pred.task,
        )  # fmt: skip
        graphs = {
            onnx_single.NAME: _export(onnx, module, onnx_single.example(pred, res), out_dir / "lotus.onnx",
                                      onnx_single.inputs(pred), ["map"], dynamic, onnx_single.axes(pred)),
        }  # fmt: skip
    else:
        graphs = {
        "vae_encoder": _export(onnx, _Encoder(pred.vae, pred.scaling_factor), (image,), out_dir / "vae_encoder.onnx",
                               ["image"], ["latent"], dynamic),
        "unet": _export(onnx, _UNet(pred.unet, pred.prompt_embedding, pred.family),
                        (unet_latent, unet_latent) if pred.family == "g" else (unet_latent,), out_dir / "unet.onnx",
                        ["latent", "noise"] if pred.family == "g" else ["latent"], ["prediction"], dynamic),
        "vae_decoder": _export(onnx, _Decoder(pred.vae, pred.scaling_factor), (latent,), out_dir / "vae_decoder.onnx",
                               ["latent"], ["decoded"], dynamic),
        }  # fmt: skip
    precision = {name: "fp32" for name in graphs}
    if fp16:
        from . import onnx_fp16

        precision = onnx_fp16.convert(onnx, out_dir, graphs, vae=fp16_vae, limit=TWO_GB)
    three = dict.fromkeys(("vae_encoder", "unet", "vae_decoder"), {}) if single else graphs
    manifest = _manifest(pred, three, res, dynamic, 1 if odd else multiple, ort)
    if odd:
        manifest["input"]["resize"] = manifest["input"]["resize"].replace(" that are multiples of 1 px", "")
    if single:
        onnx_single.describe(manifest, pred, res, dynamic, graphs[onnx_single.NAME])
    if fp16:
        onnx_fp16.describe(manifest, precision, fp16_vae)
    else:
        manifest["precision"] = "fp32"
        for g in manifest["graphs"].values():
            g["weights"] = "fp32"
    manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
    manifest["validation"] = validate(pred, out_dir, manifest, res, res)
    write_json(out_dir / MANIFEST, manifest)
    v = manifest["validation"]
    if fp16:
        if v["ran"] and not v["finite"]:
            raise OutputError(
                f"{out_dir}: the fp16 graphs give a map with inf or NaN under ONNX Runtime",
                "export without --fp16-vae, or without --fp16: lotus-onnx.json has the validation",
            )
    elif v["max_abs_diff_map"] > TOLERANCE:
        raise OutputError(
            f"{out_dir}: ONNX Runtime's map differs from torch's by {v['max_abs_diff_map']:.2e} (> {TOLERANCE})",
            "report it with lotus-onnx.json: the graphs were written but are not trusted",
        )
    return manifest


def _manifest(pred: LotusPredictor, graphs: dict, res: int, dynamic: bool, multiple: int, ort) -> dict:
    import diffusers
    import onnx

    from .. import __version__

    f, c = pred.latent_factor, pred.latent_channels
    hw = ("H", "W") if dynamic else (res, res)
    lat = ["B" if dynamic else 1, c, f"H/{f}" if dynamic else res // f, f"W/{f}" if dynamic else res // f]
    img = ["B" if dynamic else 1, 3, *hw]
    latent_io = {"name": "latent", "shape": lat, "dtype": "float32"}
    unet_in = [{**latent_io, "meaning": "the encoder's output"}]
    if pred.family == "g":
        unet_in.append({"name": "noise", "shape": lat, "dtype": "float32",
                        "meaning": "standard normal noise; lotus draws it as torch.Generator('cpu').manual_seed(seed)"
                                   " .randn(latent shape), seed 0 by default"})  # fmt: skip
    return {
        "format": "lotus-onnx/1",
        "model": {
            **{k: v for k, v in pred.describe().items() if k in ("model", "model_name", "task", "kind", "family")},
            "licence": pred.entry.licence,
        },  # fmt: skip
        "pipeline": ["vae_encoder", "unet", "vae_decoder"],
        "input": {
            "image": "uint8 RGB, HWC -> NCHW float32, x / 127.5 - 1 (range [-1, 1])",
            "resize": f"long side to {res} px (bilinear, antialias) as lotus does; the graphs take "
            + (f"any height and width that are multiples of {multiple} px" if dynamic else f"{res} x {res} exactly"),
        },
        "graphs": {
            "vae_encoder": {
                **graphs["vae_encoder"],
                "inputs": [{"name": "image", "shape": img, "dtype": "float32", "meaning": "x / 127.5 - 1"}],
                "outputs": [{**latent_io, "meaning": f"VAE posterior mean times {pred.scaling_factor}"}],
            },
            "unet": {
                **graphs["unet"],
                "inputs": unet_in,
                "outputs": [
                    {
                        "name": "prediction",
                        "shape": lat,
                        "dtype": "float32",
                        "meaning": f"clean annotation latent (x0) at t = {TIMESTEP}, task switch [1, 0], "
                        "empty prompt (both folded in)",
                    }
                ],
            },
            "vae_decoder": {
                **graphs["vae_decoder"],
                "inputs": [{**latent_io, "meaning": "the unet's prediction"}],
                "outputs": [
                    {
                        "name": "decoded",
                        "shape": img,
                        "dtype": "float32",
                        "meaning": f"clamp(decode(z / {pred.scaling_factor}) / 2 + 0.5, 0, 1)",
                    }
                ],
            },
        },  # fmt: skip
        "output": (
            "depth map = mean of decoded's 3 channels, in [0, 1]; resize to the image's size (bilinear)"
            if pred.task == "depth"
            else "normal = 2 * decoded - 1, normalised to unit length per pixel; x left, y up, z toward the camera"
        )
        + f"; kind {pred.kind}",
        "dynamic": dynamic,
        "size_multiple": multiple,
        "opset": OPSET,
        "exporter": EXPORTER,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "diffusers": diffusers.__version__,
            "lotus-cli": __version__,
        },  # fmt: skip
    }


def run_graphs(out_dir: Path, image: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] at a size the graphs take -> the decoder's output [1, 3, H, W] in [0, 1], with
    ONNX Runtime's CPU provider. ``noise`` [1, 4, H/f, W/f] for a G model."""
    _, ort = require_onnx()
    out_dir = Path(out_dir)
    if not (out_dir / "vae_encoder.onnx").exists() and (out_dir / "lotus.onnx").exists():
        raise UsageError(f"{out_dir} holds one graph (lotus.onnx, --single), not three", "run it with run_single")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # its constant-folding notices are not ours to show

    def session(name):
        return ort.InferenceSession(str(out_dir / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])

    x = (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
    (latent,) = session("vae_encoder").run(None, {"image": x})
    feeds = {"latent": latent}
    if noise is not None:
        feeds["noise"] = noise.astype(np.float32)
    (pred,) = session("unet").run(None, feeds)
    (decoded,) = session("vae_decoder").run(None, {"latent": pred})
    return decoded


def run_single(out_dir: Path, image: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] at a size the graph takes -> the map of ``lotus.onnx`` (``single``), [1, 1, H, W]
    depth or [1, 3, H, W] normals, with ONNX Runtime's CPU provider. ``noise`` [1, 4, H/f, W/f] for G."""
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(Path(out_dir) / "lotus.onnx"), opts, providers=["CPUExecutionProvider"])
    feeds = {"rgb": (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]}
    if noise is not None:
        feeds["noise"] = noise.astype(np.float32)
    return session.run(None, feeds)[0]


def validate(pred: LotusPredictor, out_dir: Path, manifest: dict, h: int, w: int) -> dict:
    """Run the graphs (or ``lotus.onnx``) on ``test_image(h, w)`` and compare with the torch predictor's
    fp32 map (seed 0). fp16 graphs: no tolerance; whether the map is finite, and whether ONNX Runtime's CPU
    provider could run them at all (``ran``, ``error``), reported instead of failing the export."""
    from . import onnx_fp16, onnx_single

    fp16 = manifest.get("precision") == "fp16"
    image = test_image(h, w)
    noise = pred.noise([0], (h // pred.latent_factor, w // pred.latent_factor)).numpy() if pred.family == "g" else None
    out = {"image": f"onnx_export.test_image({h}, {w}), seed 0", "provider": "CPUExecutionProvider"}
    t0 = time.perf_counter()
    try:
        if manifest["pipeline"] == [onnx_single.NAME]:
            got = onnx_single.as_map(run_single(out_dir, image, noise))
        else:
            got = pred.finish(torch.from_numpy(run_graphs(out_dir, image, noise)), (h, w))
    except Exception as e:  # noqa: BLE001 - fp16 graphs ONNX Runtime's CPU provider cannot run: reported
        if not fp16:
            raise
        error = " ".join(str(e).split())[:500]
        return {**out, "ran": False, "error": f"{type(e).__name__}: {error}", "max_abs_diff_map": None}
    seconds = time.perf_counter() - t0
    want = pred.predict(image, PredictOptions(processing_res=max(h, w), seed=0)).map
    diff = float(np.abs(got - want).max())  # NaN where got has NaN
    out |= {"max_abs_diff_map": diff if np.isfinite(diff) else None, "tolerance": None if fp16 else TOLERANCE}
    if fp16:
        out |= {"ran": True, "finite": bool(np.isfinite(got).all()), "reference": "torch fp32"}
        out["note"] = onnx_fp16.CPU_NOTE
    return out | {"onnxruntime_seconds": round(seconds, 3)}


def load(model: str | Path, res: int = 512) -> LotusPredictor:
    """The predictor an export needs: fp32 on the CPU, plain diffusers modules (no packing, NCHW)."""
    return LotusPredictor.from_pretrained(
        model, device="cpu", dtype="fp32", channels_last=False, pack_weights=False, processing_res=res
    )


def read_manifest(out_dir: Path) -> dict:
    """The ``lotus-onnx.json`` of an export folder."""
    path = Path(out_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable ONNX export manifest ({e})", "run lotus export onnx first") from e
