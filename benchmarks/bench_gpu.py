"""Lotus on a GPU: ours in fp16 and bf16 against the authors' sequence in fp16, in one run, one table.

    python benchmarks/bench_gpu.py                          # CUDA, full-size Lotus-G with random weights, 768 px
    python benchmarks/bench_gpu.py --checkpoint DIR         # a checkpoint folder (hub layout), e.g. real weights
    python benchmarks/bench_gpu.py --compile                # adds ours fp16 compiled with CUDA graphs
    python benchmarks/bench_gpu.py --device cpu --size tiny # the script itself, end to end, on a CPU (CI)

Rows: ours (LotusPredictor: cached prompt, channels-last, SDPA attention) in fp32 (the accuracy baseline),
fp16 and bf16; with --compile, ours fp16 with the UNet compiled by inductor with CUDA graphs
("reduce-overhead") at the fixed processing size; the authors' sequence with fp16 weights (text encoder
on every call, NCHW, diffusers' modules as they are). Columns: s/image at batch 1, images/s at batch 1, 4
and 8, peak GPU memory (torch.cuda.max_memory_allocated, per row), and the max difference of the depth map
from ours in fp32. Every row samples the posterior and the G noise from the same CPU generators and
resizes back with nearest-exact, so the rows differ by arithmetic only. Then the VAE alone in fp16 at the
probe sizes: whether it gives inf/NaN, and the dtype lotus_cli.model.gpu.vae_dtype_for chooses.

Without CUDA it stops with exit code 2 unless --device cpu is given; it exits 3 if the GPU was not used.
The whole run is kept under --budget seconds (default 450: 7.5 min on one H100): rows that would not fit
are skipped and named. Random weights time the same as real ones but say nothing about fp16 overflow of
the real VAE: pass --checkpoint with real weights for that.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 0


def fail(code: int, message: str):
    print(f"bench_gpu: {message}", file=sys.stderr)
    raise SystemExit(code)


def image(res: int, k: int = 0):
    import numpy as np

    rng = np.random.default_rng(k)
    yy, xx = np.mgrid[0:res, 0:res] / res
    base = np.stack([xx, yy, 1 - xx * yy], -1) * 200 + rng.normal(0, 20, (res, res, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f}"
    return "-"


# ------------------------------------------------------------------------------- the two sides


class Ours:
    """LotusPredictor in ``dtype``, configured for this device."""

    def __init__(self, folder, device, dtype: str, compile_unet: bool = False):
        from lotus_cli.model.predictor import LotusPredictor, PredictOptions

        self.pred = LotusPredictor.from_pretrained(
            str(folder), task="depth", device=str(device), dtype=dtype, channels_last=True
        )
        if device.type == "cuda":
            self.pred.strip_rows = 0  # row strips save CPU RSS; on a GPU they only add kernel launches
        self.note = ""
        if compile_unet:
            from lotus_cli.model import compile as lc

            ok, self.note = lc.compile_predictor(self.pred, "on", vae=False, cuda_graphs=device.type == "cuda")
            if not ok:
                raise RuntimeError(self.note)
        self.opts = lambda res, b: PredictOptions(
            processing_res=res, resample="nearest", latent="sample", seed=SEED, batch_size=b
        )

    def run(self, images, res):
        return [p.map for p in self.pred.predict_batch(images, self.opts(res, len(images)))]

    def check(self):
        from lotus_cli.model import compile as lc

        return lc.compile_status(self.pred)


class Reference:
    """The authors' inference sequence (paper's reference code, as tests/reference.py restates it) with
    every component's weights in ``dtype`` on ``device``: the text encoder on every call, a posterior
    sample, NCHW, nearest-exact back to the input size. The posterior and noise draws come from the
    same seeded CPU generators as ours, so the two differ by arithmetic only."""

    def __init__(self, folder, device, dtype):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device, self.dtype, self.torch = device, dtype, torch
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device).eval()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).to(device).eval()
        self.tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).to(device).eval()

    def run(self, images, res):
        import numpy as np
        import torch
        import torch.nn.functional as F

        from lotus_cli.model.predictor import POSTERIOR_SEED_OFFSET

        dev, dt = self.device, self.dtype
        with torch.inference_mode():
            H, W = images[0].shape[:2]
            x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() for im in images]) / 127.5 - 1
            f = min(res / W, res / H)
            x = F.interpolate(x, size=(int(H * f), int(W * f)), mode="bilinear", align_corners=False, antialias=True)
            ids = self.tok("", padding="do_not_pad", return_tensors="pt").input_ids.to(dev)
            prompt = self.te(ids).last_hidden_state.expand(len(images), -1, -1)  # [B, 2, D]
            s = torch.tensor([[1.0, 0.0]])
            task = torch.cat([torch.sin(s), torch.cos(s)], -1).repeat(len(images), 1).to(dev, dt)  # [B, 4]
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            h, w = x.shape[-2] // factor, x.shape[-1] // factor
            noise = torch.cat(
                [torch.randn((1, 4, h, w), generator=torch.Generator("cpu").manual_seed(SEED)) for _ in images]
            ).to(dev, dt)
            dist = self.vae.encode(x.to(dev, dt)).latent_dist
            eps = torch.cat(
                [
                    torch.randn(
                        (1, 4, h, w), generator=torch.Generator("cpu").manual_seed(SEED + POSTERIOR_SEED_OFFSET)
                    )
                    for _ in images
                ]
            ).to(dev, dt)
            latent = (dist.mean + dist.std * eps) * self.vae.config.scaling_factor
            pred = self.unet(torch.cat([latent, noise], 1), 999, encoder_hidden_states=prompt, class_labels=task).sample
            y = (self.vae.decode(pred / self.vae.config.scaling_factor).sample.float() / 2 + 0.5).clamp(0, 1)
            y = F.interpolate(y, size=(H, W), mode="nearest-exact")
            return [m for m in y.mean(1).cpu().numpy().astype(np.float32)]

    def check(self):
        return None


# ------------------------------------------------------------------------------------- measuring


def measure(name, make, device, res, batches, repeats, baseline):
    """One row: load, warm up each batch size once, then time ``repeats`` calls per batch size."""
    import numpy as np

    reset_peak(device)
    side = make()
    row = {"name": name, "per_batch": {}}
    depth = None
    for b in batches:
        imgs = [image(res, k) for k in range(b)]
        out = side.run(imgs, res)  # warm-up: kernel selection, allocator, compilation for this shape
        if b == 1:
            depth = out[0]
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            side.run(imgs, res)
            sync(device)
            times.append(time.perf_counter() - t0)
        row["per_batch"][b] = statistics.median(times)
    failed = side.check()
    if failed:
        fail(4, f"{name}: {failed}")
    row["peak"] = peak_gb(device)
    row["depth"] = depth
    row["diff"] = float(np.abs(depth - baseline).max()) if baseline is not None and depth is not None else 0.0
    row["finite"] = bool(np.isfinite(depth).all()) if depth is not None else True
    del side
    reset_peak(device)
    return row


def vae_rows(folder, device, sizes):
    """The VAE alone in fp16 at each size: finite or not, and the dtype vae_dtype_for picks."""
    import torch
    from diffusers import AutoencoderKL

    from lotus_cli.model.gpu import vae_dtype_for, vae_finite

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float16).to(device).eval()
    rows = []
    for s in sizes:
        ok = vae_finite(vae, torch.float16, (s, s), channels_last=True)
        chosen, _ = vae_dtype_for(vae, torch.float16, (s, s), channels_last=True)
        rows.append((s, ok, str(chosen).replace("torch.", "")))
    del vae
    reset_peak(device)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (only when given explicitly)")
    ap.add_argument("--size", choices=("full", "tiny"), default="full", help="architecture when building")
    ap.add_argument("--checkpoint", help="a Lotus-G checkpoint folder (hub layout) instead of building one")
    ap.add_argument("--res", type=int, help="processing size in px (default 768; tiny: 64)")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per batch size, after a warm-up")
    ap.add_argument("--vae-sizes", help="VAE fp16 probe sizes in px (default 768,1024; tiny: 64,96)")
    ap.add_argument("--compile", action="store_true", help="add ours fp16 compiled with CUDA graphs")
    ap.add_argument("--budget", type=float, default=450, help="seconds the whole run may take")
    args = ap.parse_args()

    import torch

    if not args.device.startswith("cpu") and not torch.cuda.is_available():
        fail(
            2,
            f"CUDA is not available here (torch {torch.__version__}, device {args.device!r}); "
            "this benchmark measures a GPU. Run it with --device cpu only to check the script itself.",
        )
    device = torch.device(args.device)
    if device.type not in ("cuda", "cpu"):
        fail(2, f"--device {args.device}: use cuda, cuda:N or cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baseline stays fp32
        torch.backends.cudnn.allow_tf32 = False
    tiny = args.size == "tiny" and not args.checkpoint
    res = args.res or (64 if tiny else 768)
    vae_sizes = [int(s) for s in (args.vae_sizes or ("64,96" if tiny else "768,1024")).split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    work = tempfile.TemporaryDirectory(prefix="lotus-bench-gpu-")
    folder = args.checkpoint
    if folder is None:
        from lotus_cli.model.synthetic import build_checkpoint

        folder = str(Path(work.name) / "lotus-depth-g-v2-1-disparity")
        t0 = time.perf_counter()
        build_checkpoint(folder, family="g", task="depth", size=args.size)
        print(f"built random {args.size} Lotus-G checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    os.environ.setdefault("LOTUS_CACHE", str(Path(work.name) / "lotus-cache"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {res} px, batches {batches}, median of {args.repeats}", flush=True)

    rows, skipped = [], []
    t0 = time.perf_counter()
    base = measure("ours fp32", lambda: Ours(folder, device, "fp32"), device, res, batches, args.repeats, None)
    rows.append(base)
    plan = [("ours fp16", lambda: Ours(folder, device, "fp16")), ("ours bf16", lambda: Ours(folder, device, "bf16"))]
    if args.compile:
        plan.append(("ours fp16 compiled", lambda: Ours(folder, device, "fp16", compile_unet=True)))
    plan.append(("reference fp16", lambda: Reference(folder, device, torch.float16)))
    last = time.perf_counter() - t0  # the fp32 row's time: loading plus the timed calls
    for label, make in plan:
        # a row costs at most about twice the last one; a compiled one also compiles per batch size
        cost = 2 * last + (60 * len(batches) if "compiled" in label else 0)
        if time.perf_counter() - T0 + cost > args.budget:
            skipped.append(label)
            continue
        t0 = time.perf_counter()
        rows.append(measure(label, make, device, res, batches, args.repeats, base["depth"]))
        last = time.perf_counter() - t0
        print(f"  {label}: {last:.0f} s", flush=True)
    vae = vae_rows(folder, device, vae_sizes)

    if device.type == "cuda" and not all(float(r["peak"]) > 0 for r in rows):
        fail(3, "the GPU was not used: a row allocated no CUDA memory")
    print()
    head = f"{'':22}{f's/image {res}px':>15}" + "".join(f"{f'img/s b={b}':>11}" for b in batches)
    print(head + f"{'peak GPU GB':>13}{'max |d - fp32|':>16}")
    for r in rows:
        cells = "".join(f"{(b / r['per_batch'][b]) if b in r['per_batch'] else float('nan'):>11.2f}" for b in batches)
        diff = f"{r['diff']:.2e}" if r["finite"] else "non-finite"
        print(f"{r['name']:22}{r['per_batch'][1]:>15.3f}{cells}{r['peak']:>13}{diff:>16}")
    for s, ok, chosen in vae:
        print(f"{f'VAE fp16 {s}px':22}{'finite' if ok else 'inf/NaN':>15}   VAE dtype chosen: {chosen}")
    for label in skipped:
        print(f"{label:22}skipped: would not fit the {args.budget:.0f} s budget")
    print(f"total {time.perf_counter() - T0:.0f} s")
    work.cleanup()


if __name__ == "__main__":
    main()
