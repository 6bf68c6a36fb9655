"""Training speed on this CPU (the debug preset) and, on paper, the memory/time plan of the paper's recipe.

    python benchmarks/bench_train.py              # debug preset: 100 trainer steps vs bare steps; full plan
    python benchmarks/bench_train.py --steps 300

1. CPU: the debug preset (tiny base, 32 x 32 synthetic scenes, batch 4, Lotus-G with detail preserver, one
   thread) through `lotus_cli.train.trainer.train`, against a baseline in the same run: the bare step (loss,
   backward, AdamW) on one fixed batch, no data loading, logging or accelerate. Prints steps/s of both and
   their ratio (the trainer's overhead).
2. Plan for the full recipe (batch 16 per GPU at 576 x 768, detail preserver -> 32 UNet rows, 8 GPUs, 20k
   steps, fp16 mixed precision, gradient checkpointing), from numbers measured here without a GPU: the
   parameter count of the real SD2/Lotus UNet and the FLOPs and saved activations of one UNet row at the
   72 x 96 latent, all on torch's meta device (shapes only, no memory, no compute); optimiser-state bytes
   follow from AdamW with fp32 master weights. GPU throughput is an ASSUMPTION, printed as such.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GB = 1e9
ASSUMED_GPU_TFLOPS = 312.0  # A100 dense fp16/bf16 tensor-core peak
ASSUMED_UTILISATION = 0.40  # typical for SD-UNet fine-tuning with checkpointing (an assumption, not a measurement)


def cpu_speed(steps: int) -> dict:
    from lotus_cli.model.synthetic import write_synthetic_dataset
    from lotus_cli.train import data as D
    from lotus_cli.train.debug import autoencoder_images
    from lotus_cli.train.options import StepOptions, TrainOptions
    from lotus_cli.train.step import annotation, draw, loss_mask, training_loss
    from lotus_cli.train.surgery import build_tiny_base
    from lotus_cli.train.trainer import load_base, train

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = write_synthetic_dataset(root / "data", 64, (32, 32), seed=1)
    base = build_tiny_base(root / "base", fit_images=autoencoder_images(D.FolderData(data)), fit_steps=20)
    opts = TrainOptions(
        base=str(base),
        out=root / "run",
        data=(f"folder={data}",),
        steps=steps,
        batch_size=4,
        lr=1e-3,
        checkpoint_every=10**9,
        log_every=10**9,
    )
    t0 = time.perf_counter()
    run = train(opts)
    loop = run.losses[-1]["seconds"]  # first step to last, excluding loading and the final save
    total = time.perf_counter() - t0
    _, unet, vae, prompt = load_base(str(base), "depth", "g", 0)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    batch = D.StepBatches([D.FolderData(data)], D.BatchPlan((64,), (1.0,), 4), 1)[0]
    sopts = StepOptions()
    anno = annotation(batch, sopts)
    d = draw(4, (4, 8, 8), sopts, torch.Generator().manual_seed(0))
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = training_loss(unet, vae, prompt, batch["rgb"], anno, loss_mask(batch, sopts), sopts, d).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    bare = time.perf_counter() - t1
    return {
        "steps": steps,
        "trainer_steps_per_s": (steps - 1) / loop,
        "bare_steps_per_s": steps / bare,
        "trainer_wall_s": total,
    }


def full_plan(batch: int = 16, gpus: int = 8, steps: int = 20_000, hw: tuple[int, int] = (576, 768)) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from lotus_cli.model.synthetic import SD2_UNET, SD2_VAE
    from lotus_cli.model.weights import LOTUS_CLASS_EMBED

    h, w = hw[0] // 8, hw[1] // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=8, **SD2_UNET, **LOTUS_CLASS_EMBED)
        vae = AutoencoderKL(**SD2_VAE)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())

    def row(checkpointing: bool) -> tuple[float, float]:
        """(forward FLOPs, bytes of activations saved for backward) of one UNet row in fp32."""
        params = {id(p) for p in unet.parameters()}
        seen, saved = set(), [0]

        def pack(x):
            base = x._base if x._base is not None else x
            if id(x) not in seen and id(base) not in params:
                seen.add(id(x))
                saved[0] += x.numel() * x.element_size()
            return x

        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        with (
            torch.device("meta"),
            FlopCounterMode(display=False) as fc,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x),
        ):
            unet(
                torch.randn(1, 8, h, w),
                torch.tensor([999]),
                encoder_hidden_states=torch.randn(1, 2, 1024),
                class_labels=torch.randn(1, 4),
            )
        return fc.get_total_flops(), saved[0]

    fwd, act_plain = row(False)
    _, act_ckpt = row(True)
    with torch.device("meta"), FlopCounterMode(display=False) as fc:
        vae.encode(torch.randn(1, 3, *hw))
    enc = fc.get_total_flops()
    rows = 2 * batch  # detail preserver: annotation + reconstruction rows
    # fp16 autocast halves most saved activations; fp32 master weights + grads + AdamW m, v = 16 B / parameter
    state = 16 * n_unet + 2 * n_vae
    act16_ckpt, act16_plain = act_ckpt / 2 * rows, act_plain / 2 * rows
    flops_step = rows * fwd * 4 + 2 * batch * enc  # fwd + bwd (2x) + recompute (1x); VAE encodes rgb and annotation
    seconds = flops_step / (ASSUMED_GPU_TFLOPS * 1e12 * ASSUMED_UTILISATION)
    return {
        "unet_params": n_unet,
        "vae_params": n_vae,
        "latent": (h, w),
        "rows_per_gpu": rows,
        "unet_fwd_tflop_per_row": fwd / 1e12,
        "vae_encode_tflop_per_image": enc / 1e12,
        "saved_act_gb_per_row_fp32": act_plain / GB,
        "saved_act_gb_per_row_fp32_ckpt": act_ckpt / GB,
        "weights_grads_adam_gb": state / GB,
        "per_gpu_gb_ckpt": (state + act16_ckpt) / GB,
        "per_gpu_gb_no_ckpt": (state + act16_plain) / GB,
        "tflop_per_gpu_step": flops_step / 1e12,
        "step_s": seconds,
        "hours": seconds * steps / 3600,
        "gpu_hours": seconds * steps * gpus / 3600,
        "images_seen": batch * gpus * steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    cpu = cpu_speed(args.steps)
    print(f"debug preset on this CPU (1 thread, batch 4 of 32x32, Lotus-G + detail preserver, {cpu['steps']} steps):")
    print(
        f"  trainer      {cpu['trainer_steps_per_s']:.1f} steps/s  "
        f"(wall {cpu['trainer_wall_s']:.1f} s incl. loading and saving)"
    )
    print(f"  bare step    {cpu['bare_steps_per_s']:.1f} steps/s  (baseline: loss + backward + AdamW, one fixed batch)")
    print(f"  ratio        {cpu['trainer_steps_per_s'] / cpu['bare_steps_per_s']:.2f} (trainer / bare)")
    p = full_plan()
    print("\nplan for the paper's recipe: batch 16/GPU at 576x768, 8 GPUs, 20k steps, fp16 autocast, AdamW")
    print(
        f"  UNet parameters            {p['unet_params'] / 1e6:.1f} M "
        f"(measured; VAE {p['vae_params'] / 1e6:.1f} M, frozen, fp16)"
    )
    print(
        f"  latent                     {p['latent'][0]}x{p['latent'][1]}; {p['rows_per_gpu']} UNet rows per GPU "
        "(detail preserver doubles 16)"
    )
    print(f"  UNet forward               {p['unet_fwd_tflop_per_row']:.3f} TFLOP per row (measured, meta device)")
    print(f"  VAE encode                 {p['vae_encode_tflop_per_image']:.3f} TFLOP per image (measured)")
    print(
        f"  saved activations / row    {p['saved_act_gb_per_row_fp32']:.2f} GB fp32 plain, "
        f"{p['saved_act_gb_per_row_fp32_ckpt']:.2f} GB with gradient checkpointing (measured)"
    )
    print(f"  weights+grads+AdamW        {p['weights_grads_adam_gb']:.1f} GB (16 B per UNet parameter, fp32 master)")
    print(
        f"  per-GPU memory, ckpt       ~{p['per_gpu_gb_ckpt']:.1f} GB "
        "(+ CUDA context, workspace ~2-4 GB): fits 40/80 GB"
    )
    print(f"  per-GPU memory, no ckpt    ~{p['per_gpu_gb_no_ckpt']:.0f} GB: does not fit; checkpointing is required")
    attn = 5 * (p["latent"][0] * p["latent"][1]) ** 2 * 2  # SD2's 5 heads at the highest resolution, fp16
    print(
        f"  attention caveat           the meta-device count uses the math attention path; one 72x96 attention "
        f"map is 5 x {p['latent'][0] * p['latent'][1]}^2 x 2 B = {attn / GB:.2f} GB per row "
        f"({attn * p['rows_per_gpu'] / GB:.0f} GB for {p['rows_per_gpu']} rows) unless flash / memory-efficient "
        "SDPA is used (torch's default on CUDA): the plan assumes it"
    )
    print(f"  compute per GPU step       {p['tflop_per_gpu_step']:.0f} TFLOP (4x forward with recompute + encodes)")
    print(
        f"  ASSUMED A100 {ASSUMED_GPU_TFLOPS:.0f} TFLOPS peak at {ASSUMED_UTILISATION:.0%} utilisation -> "
        f"{p['step_s']:.2f} s/step, {p['hours']:.1f} h for 20k steps ({p['gpu_hours']:.0f} GPU-hours), "
        f"{p['images_seen'] / 1e6:.2f} M images seen (~{p['images_seen'] / 39e3:.0f} epochs of 39K Hypersim)"
    )


if __name__ == "__main__":
    main()
