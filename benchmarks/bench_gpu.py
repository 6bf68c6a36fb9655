"""Lotus on a GPU: exactly what `lotus depth` runs there, its variants, and the authors' pipeline, in one run.

    python benchmarks/bench_gpu.py --out bench-gpu                       # the one command (docs/gpus.md)
    python benchmarks/bench_gpu.py --out bench-gpu --checkpoint depth-g  # real weights: fp16 overflow too
    python benchmarks/bench_gpu.py --out bench-gpu --compile             # adds ours compiled with CUDA graphs
    python benchmarks/bench_gpu.py --device cpu --size tiny --out x      # the script itself, on a CPU (CI)

Rows, each a fresh load of the same weights (a full-size Lotus-G with random weights unless --checkpoint):

* "lotus depth": the predictor exactly as `lotus depth` loads it on this device (``--dtype auto``: fp16 on
  CUDA and MPS, fp32 on a CPU; the device's own layout, no row strips off the CPU, the VAE probed at the
  processing size) and called with the command's defaults (posterior mean, bilinear back to the input);
* "ours fp32": the same in fp32, the accuracy baseline; "ours fp16" where auto is not fp16 (a CPU);
* "ours bf16" where the device runs bf16 natively (Ampere and later; CPUs);
* CUDA only, the choices to make from this run: "fp16 channels-last" (tensor cores usually prefer it) and
  "fp16 cudnn.benchmark" (cuDNN picks its convolution algorithms by timing them); with --compile,
  "fp16 compiled" (the UNet by inductor with CUDA graphs, warmed up 3 times so the graphs are captured);
* "reference fp16": the authors' sequence with every component in fp16 (the text encoder on every call,
  NCHW, diffusers' modules as they are).

Per row: seconds per image at batch 1 and images/s at each of --batches (median of --repeats timed calls
after warm-ups), the memory the weights hold after loading and the peak during the predictions only (load
and probe excluded), and the max difference of the depth map from ours in fp32 in one extra call with the
reference's options (a posterior sample, nearest-exact back), so every row differs by arithmetic only. Then
the VAE alone in fp16 at --vae-sizes: finite or not, and the dtype the predictor picks there.

Writes OUT/bench_gpu.json (the environment: GPU, capability, memory, driver, torch, CUDA, cuDNN; every row)
and OUT/bench_gpu.md (the table, also printed). Without CUDA it stops with exit code 2 unless --device cpu
or mps is given; it exits 3 if the GPU was not used, 4 if a compiled row fell back to eager. The whole run
is kept under --budget seconds (default 540): rows that would not fit are skipped and named.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 0
GB = 1e9


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
    elif device.type == "mps":
        torch.mps.synchronize()


def allocated(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GB
    if device.type == "mps":
        return torch.mps.current_allocated_memory() / GB
    return None


def reset_peak(device):
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        torch.mps.empty_cache()


def peak(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    return None  # MPS keeps no peak; a CPU's is the process's RSS, which bench_predictor measures


def environment(device) -> dict:
    """What ran it: the GPU and its driver, torch and the libraries (for the JSON and the table's head)."""
    import diffusers
    import torch

    env = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(p.total_memory / GB, 1))
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    elif device.type == "mps":
        env.update(gpu="Apple MPS", macos=platform.mac_ver()[0])
    return env


# ------------------------------------------------------------------------------- the two sides


class Ours:
    """LotusPredictor as `lotus depth` loads it (run/loading.py): from_pretrained at the processing size with
    the given --dtype, nothing else fixed; ``channels_last`` / ``compile_unet`` for the variant rows."""

    def __init__(self, folder, device, dtype: str, res: int, channels_last=None, compile_unet=False):
        from lotus_cli.model.predictor import LotusPredictor, PredictOptions

        self.pred = LotusPredictor.from_pretrained(
            str(folder), task="depth", device=str(device), dtype=dtype, processing_res=res, channels_last=channels_last
        )
        self.note = ""
        if compile_unet:
            from lotus_cli.model import compile as lc

            ok, self.note = lc.compile_predictor(self.pred, "on", vae=False, cuda_graphs=device.type == "cuda")
            if not ok:
                raise RuntimeError(self.note)
        self.cli = lambda b: PredictOptions(processing_res=res, batch_size=b)  # `lotus depth`'s defaults
        self.same = PredictOptions(processing_res=res, resample="nearest", latent="sample", seed=SEED)

    def run(self, images):
        return [p.map for p in self.pred.predict_batch(images, self.cli(len(images)))]

    def compare(self, img):
        """The map with the reference's options, for the accuracy column."""
        return self.pred.predict_batch([img], self.same)[0].map

    def facts(self) -> dict:
        p = self.pred
        return {
            "dtype": str(p.dtype).replace("torch.", ""),
            "vae_dtype": str(p.vae_dtype).replace("torch.", ""),
            "unet_layout": p.engine.choices.unet,
            "vae_layout": p.engine.choices.vae,
            "strip_rows": p.strip_rows,
            "warnings": list(p.warnings),
            "compiled": self.note or None,
        }

    def check(self):
        from lotus_cli.model import compile as lc

        return lc.compile_status(self.pred)


class Reference:
    """The authors' inference sequence (paper's reference code, as tests/reference.py restates it) with
    every component's weights in ``dtype`` on ``device``: the text encoder on every call, a posterior
    sample, NCHW, nearest-exact back to the input size. The posterior and noise draws come from the
    same seeded CPU generators as ours, so the two differ by arithmetic only."""

    def __init__(self, folder, device, dtype, res):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device, self.dtype, self.res = device, dtype, res
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device).eval()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).to(device).eval()
        self.tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).to(device).eval()
        self.torch = torch

    def run(self, images):
        import numpy as np
        import torch
        import torch.nn.functional as F

        from lotus_cli.model.predictor import POSTERIOR_SEED_OFFSET

        dev, dt, res = self.device, self.dtype, self.res
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

    def compare(self, img):
        return self.run([img])[0]

    def facts(self) -> dict:
        return {"dtype": str(self.dtype).replace("torch.", ""), "unet_layout": "nchw", "vae_layout": "nchw"}

    def check(self):
        return None


# ------------------------------------------------------------------------------------- measuring


def measure(name, make, device, res, batches, repeats, baseline, warmups=1, cudnn_benchmark=False):
    """One row: load (not timed, not in the peak), then per batch size ``warmups`` calls and ``repeats`` timed
    ones; then one call with the reference's options for the accuracy column."""
    import numpy as np
    import torch

    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        reset_peak(device)
        t0 = time.perf_counter()
        side = make()
        sync(device)
        row = {"name": name, "load_seconds": round(time.perf_counter() - t0, 1), **side.facts()}
        row["weights_gb"] = allocated(device)
        reset_peak(device)  # the peak of the predictions, not of loading and the fp16 probe
        row["seconds_per_call"], row["images_per_second"] = {}, {}
        for b in batches:
            imgs = [image(res, k) for k in range(b)]
            for _ in range(warmups):  # kernel selection, the allocator's cache, compilation and graph capture
                side.run(imgs)
            times = []
            for _ in range(repeats):
                sync(device)
                t = time.perf_counter()
                side.run(imgs)
                sync(device)
                times.append(time.perf_counter() - t)
            row["seconds_per_call"][b] = statistics.median(times)
            row["images_per_second"][b] = b / statistics.median(times)
        row["peak_gb"] = peak(device)
        failed = side.check()
        if failed:
            fail(4, f"{name}: {failed}")
        depth = side.compare(image(res, 0))
    finally:
        torch.backends.cudnn.benchmark = False
    row["finite"] = bool(np.isfinite(depth).all())
    row["max_diff_vs_fp32"] = float(np.abs(depth - baseline).max()) if baseline is not None else 0.0
    del side
    reset_peak(device)
    return row, depth


def vae_rows(folder, device, sizes):
    """The VAE alone in fp16 at each size: finite or not, and the dtype the predictor's probe picks there."""
    import torch
    from diffusers import AutoencoderKL

    from lotus_cli.model.gpu import vae_dtype_for, vae_finite

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float16).to(device).eval()
    rows = []
    for s in sizes:
        ok = vae_finite(vae, torch.float16, (s, s))
        chosen, _ = vae_dtype_for(vae, torch.float16, (s, s))
        rows.append({"size": s, "fp16_finite": ok, "vae_dtype": str(chosen).replace("torch.", "")})
    del vae
    reset_peak(device)
    return rows


def table(env: dict, res: int, batches: list[int], rows: list[dict], vae: list[dict], skipped: list[str]) -> str:
    """The markdown table of the run."""
    head = ", ".join(f"{k} {env[k]}" for k in ("gpu", "capability", "driver", "torch", "cuda", "cudnn") if env.get(k))
    lines = [
        f"{head or env['device']}; {res} px; median of the timed calls",
        "",
        "| row | dtype (VAE) | layout | s/image b=1 | "
        + " | ".join(f"img/s b={b}" for b in batches)
        + " | weights GB | peak GB | max abs diff vs fp32 |",
        "|---|---|---|---:|" + "---:|" * len(batches) + "---:|---:|---:|",
    ]

    def gb(v):
        return "-" if v is None else f"{v:.2f}"

    for r in rows:
        dt = r["dtype"] + (f" ({r['vae_dtype']})" if r.get("vae_dtype", r["dtype"]) != r["dtype"] else "")
        lay = r["unet_layout"] if r["unet_layout"] == r["vae_layout"] else f"{r['unet_layout']} / {r['vae_layout']}"
        diff = f"{r['max_diff_vs_fp32']:.2e}" if r["finite"] else "non-finite"
        cells = " | ".join(f"{r['images_per_second'][b]:.2f}" for b in batches)
        lines.append(
            f"| {r['name']} | {dt} | {lay} | {r['seconds_per_call'][batches[0]] / batches[0]:.3f} | {cells} "
            f"| {gb(r['weights_gb'])} | {gb(r['peak_gb'])} | {diff} |"
        )
    lines.append("")
    for v in vae:
        state = "finite" if v["fp16_finite"] else "inf/NaN"
        lines.append(f"VAE fp16 at {v['size']} px: {state}; VAE dtype chosen: {v['vae_dtype']}")
    for label in skipped:
        lines.append(f"{label}: skipped, would not fit the time budget")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-gpu", help="folder for bench_gpu.json and bench_gpu.md")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, mps, or cpu (only when given explicitly)")
    ap.add_argument("--size", choices=("full", "tiny"), default="full", help="architecture when building")
    ap.add_argument("--checkpoint", help="a Lotus-G checkpoint: folder (hub layout) or registry name, e.g. depth-g")
    ap.add_argument("--res", type=int, help="processing size in px (default 768; tiny: 64)")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per batch size, after the warm-ups")
    ap.add_argument("--vae-sizes", help="VAE fp16 probe sizes in px (default 768,1024; tiny: 64,96)")
    ap.add_argument("--compile", action="store_true", help="add ours fp16 compiled with CUDA graphs")
    ap.add_argument("--budget", type=float, default=540, help="seconds the whole run may take")
    args = ap.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(
            2,
            f"CUDA is not available here (torch {torch.__version__}, device {args.device!r}); "
            "this benchmark measures a GPU. Run it with --device cpu only to check the script itself.",
        )
    device = torch.device(args.device)
    if device.type not in ("cuda", "cpu", "mps"):
        fail(2, f"--device {args.device}: use cuda, cuda:N, mps or cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baseline stays fp32, as `lotus` leaves it
        torch.backends.cudnn.allow_tf32 = False
    tiny = args.size == "tiny" and not args.checkpoint
    res = args.res or (64 if tiny else 768)
    vae_sizes = [int(s) for s in (args.vae_sizes or ("64,96" if tiny else "768,1024")).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    work = tempfile.TemporaryDirectory(prefix="lotus-bench-gpu-")
    os.environ.setdefault("LOTUS_CACHE", str(Path(work.name) / "lotus-cache"))
    folder = args.checkpoint
    if folder is None:
        from lotus_cli.model.synthetic import build_checkpoint

        folder = str(Path(work.name) / "lotus-depth-g-v2-1-disparity")
        t0 = time.perf_counter()
        build_checkpoint(folder, family="g", task="depth", size=args.size)
        print(f"built random {args.size} Lotus-G checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    elif not Path(folder).is_dir():  # a registry name or hub id: fetched (downloaded on first use)
        from lotus_cli.model import registry

        folder = str(registry.fetch(registry.resolve(folder, "depth")).folder)
    env = environment(device)
    print(", ".join(f"{k} {v}" for k, v in env.items() if v), flush=True)
    print(f"{res} px, batches {batches}, median of {args.repeats}", flush=True)

    from lotus_cli.model.gpu import bf16_supported
    from lotus_cli.model.predictor import resolve_dtype

    auto = str(resolve_dtype("auto", device)[0]).replace("torch.", "")
    # the comparison that matters first: a tight budget skips variants, not the authors' pipeline
    plan = [
        ("lotus depth", lambda: Ours(folder, device, "auto", res), {}),
        ("reference fp16", lambda: Reference(folder, device, torch.float16, res), {}),
    ]
    if auto != "float16":
        plan.append(("ours fp16", lambda: Ours(folder, device, "fp16", res), {}))
    if bf16_supported(device):
        plan.append(("ours bf16", lambda: Ours(folder, device, "bf16", res), {}))
    if device.type == "cuda":
        plan.append(("fp16 channels-last", lambda: Ours(folder, device, "fp16", res, channels_last=True), {}))
        plan.append(("fp16 cudnn.benchmark", lambda: Ours(folder, device, "fp16", res), {"cudnn_benchmark": True}))
    if args.compile:
        compiled = lambda: Ours(folder, device, "fp16", res, compile_unet=True)  # noqa: E731
        plan.append(("fp16 compiled", compiled, {"warmups": 3}))

    rows, skipped = [], []
    t0 = time.perf_counter()
    base, base_depth = measure(
        "ours fp32", lambda: Ours(folder, device, "fp32", res), device, res, batches, args.repeats, None
    )
    rows.append(base)
    last = time.perf_counter() - t0  # the fp32 row's time: loading plus the timed calls
    print(f"  ours fp32: {last:.0f} s", flush=True)
    for label, make, kw in plan:
        # a row costs at most about the fp32 one; a compiled one also compiles per batch size
        cost = last + (60 * len(batches) if "compiled" in label else 0)
        if time.perf_counter() - T0 + cost > args.budget:
            skipped.append(label)
            continue
        t0 = time.perf_counter()
        row, _ = measure(label, make, device, res, batches, args.repeats, base_depth, **kw)
        rows.append(row)
        print(f"  {label}: {time.perf_counter() - t0:.0f} s", flush=True)
    vae = vae_rows(folder, device, vae_sizes)

    if device.type == "cuda" and not all((r["peak_gb"] or 0) > 0 for r in rows):
        fail(3, "the GPU was not used: a row allocated no CUDA memory")
    fp16 = [r for r in rows if r["dtype"] == "float16" and r["name"] != "reference fp16"]
    fastest = {b: max(fp16, key=lambda r: r["images_per_second"][b])["name"] for b in batches} if fp16 else {}
    text = table(env, res, batches, rows, vae, skipped)
    record = {
        "environment": env,
        "checkpoint": args.checkpoint or f"random {args.size} Lotus-G",
        "processing_res": res,
        "batches": batches,
        "repeats": args.repeats,
        "rows": rows,
        "vae_fp16": vae,
        "skipped": skipped,
        "fastest_fp16": fastest,
        "total_seconds": round(time.perf_counter() - T0, 1),
    }
    (out / "bench_gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "bench_gpu.md").write_text(text)
    print()
    print(text)
    print(f"fastest fp16 per batch size: {fastest}")
    print(f"total {time.perf_counter() - T0:.0f} s; wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.md'}")
    work.cleanup()


if __name__ == "__main__":
    main()
