"""The training loop on Hugging Face accelerate (the reference's launcher).

``train(opts)`` runs on every process of `accelerate launch` / `torchrun` (or alone): it loads the base
(SD2 or a Lotus checkpoint), performs the surgery, and optimises the UNet only (VAE and text encoder frozen;
the empty-prompt embedding is computed once) with AdamW, gradient clipping and, as asked, mixed precision,
gradient checkpointing and accumulation. Each optimiser step sees ``batch_size x processes x grad_accum``
samples. A step's data and random numbers depend only on (seed, step), so a resumed run and an N-process run
follow the same loss curve as an uninterrupted single-process run. It writes:

    OUT/log.jsonl                      one record per logged step: step, loss, loss_anno, loss_rgb, lr, seconds
    OUT/checkpoints/step-NNNNNNN/      accelerate state (model, optimiser, RNG) + trainer_state.json
    OUT/validation/step-NNNNNNN.png    rgb | prediction | ground truth of the validation samples
    OUT/final/                         the trained model in the hub layout, loadable by every `lotus` command
    OUT/tensorboard/                   when tensorboard is installed
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..evaluate import metrics as M
from ..io.atomic import write_json
from ..io.visualize import colorize_depth, normal_to_rgb
from ..model import registry, weights
from ..model.predictor import LotusPredictor
from . import data as D
from .options import STATE_FILE, StepOptions, TrainOptions, checkpoint_dirs, find_checkpoint
from .step import annotation, draw, loss_mask, predict_latent, training_loss
from .surgery import to_lotus

LOG_FILE = "log.jsonl"


@dataclass
class Run:
    """What a finished run hands back."""

    final: Path
    steps: int
    losses: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    evaluation: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- loading


def load_base(base: str, task: str, family: str, seed: int):
    """(folder, UNet in fp32 after surgery, frozen VAE, empty-prompt embedding [1, T, D])."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = registry.fetch(registry.resolve(base)).folder  # any task: a depth model may start a normal one
    weights._quiet_transformers()
    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", torch_dtype=torch.float32, use_safetensors=True
    )
    unet = to_lotus(unet, family, seed)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, use_safetensors=True)
    vae.eval().requires_grad_(False)
    return folder, unet, vae, weights.empty_prompt_embedding(folder)


# ------------------------------------------------------------------------------------------- loop


def _local_draws(opts: TrainOptions, step: int, micro: int, world: int, rank: int, latent_shape):
    """The step's random numbers for the GLOBAL batch, sliced to this process's rows (so N processes draw
    exactly what one process with the whole batch draws)."""
    g = torch.Generator("cpu").manual_seed((opts.seed * 1_000_003 + step) * 1009 + micro)
    b = opts.batch_size
    big = draw(b * world, latent_shape, opts.step, g)
    rows = [slice(rank * b, (rank + 1) * b)]
    if opts.step.detail_preserver:
        rows.append(slice(world * b + rank * b, world * b + (rank + 1) * b))
    pick = lambda t: None if t is None else torch.cat([t[r] for r in rows])  # noqa: E731
    one = lambda t: None if t is None else t[rows[0]]  # noqa: E731
    return type(big)(pick(big.image_eps), one(big.anno_eps), one(big.target_eps), pick(big.noise), pick(big.t))


@dataclass
class _Parts:
    """Everything a run holds: the accelerator, models, optimiser, data and where it starts."""

    acc: object
    base_folder: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    prompt: torch.Tensor
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    start: int


def _setup(opts: TrainOptions) -> _Parts:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(opts.out)
    trackers = "tensorboard" if _has_tensorboard() else None
    # accelerate treats several processes as CPU data parallel (gloo) only when told the run is on the CPU
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(
        mixed_precision=opts.mixed_precision,
        log_with=trackers,
        cpu=multi_cpu,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )
    datasets = [D.open_data(spec, opts.size) for spec in opts.data]
    plan = D.BatchPlan(
        tuple(len(d) for d in datasets),
        opts.mix or tuple(1.0 for _ in datasets),
        opts.batch_size * acc.num_processes,
        opts.seed,
        opts.flip,
    )
    folder, unet, vae, prompt = load_base(opts.base, opts.step.task, opts.step.family, opts.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opts.mixed_precision, torch.float32)
    vae.to(acc.device, weight_dtype)  # frozen: kept in the low precision, as the reference does
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    unet, optimizer = acc.prepare(unet, optimizer)
    start = 0
    if opts.resume:
        ckpt = find_checkpoint(out, opts.resume)
        acc.load_state(str(ckpt))
        start = json.loads((ckpt / STATE_FILE).read_text())["step"]
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_options.json", asdict(opts))
        if trackers:
            acc.init_trackers("lotus")
    source = D.StepBatches(datasets, plan, opts.grad_accum, acc.process_index, acc.num_processes, opts.step.task)
    loader = torch.utils.data.DataLoader(
        source,
        batch_size=None,
        num_workers=opts.num_workers,
        sampler=range(start * opts.grad_accum, opts.steps * opts.grad_accum),
    )
    return _Parts(acc, folder, unet, vae, prompt.to(acc.device), optimizer, loader, start)


def _micro_step(p: _Parts, opts: TrainOptions, batch: dict, step: int, micro: int) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns [total, anno, rgb] losses (float32 [3])."""
    acc, vae = p.acc, p.vae
    batch = {key: v.to(acc.device) for key, v in batch.items()}
    anno = annotation(batch, opts.step)  # [b, 3, H, W] in [-1, 1]
    f = weights.latent_factor(vae.config)
    h, w = batch["rgb"].shape[-2:]
    draws = _local_draws(
        opts, step, micro, acc.num_processes, acc.process_index, (vae.config.latent_channels, h // f, w // f)
    )
    last = micro == opts.grad_accum - 1
    # gradients meet (all-reduce) on the last micro-batch only
    with acc.no_sync(p.unet) if not last else contextlib.nullcontext(), acc.autocast():
        losses = training_loss(
            p.unet,
            vae,
            p.prompt,
            batch["rgb"].to(vae.dtype),
            anno.to(vae.dtype),
            loss_mask(batch, opts.step),
            opts.step,
            draws,
        )
        acc.backward(losses.total / opts.grad_accum)
    return torch.stack([losses.total.detach(), losses.anno, losses.rgb]).float()


def train(opts: TrainOptions, callback: Callable[[str, dict], None] | None = None) -> Run:
    """Run (or resume) training; ``callback(event, record)`` gets "start", "log", "checkpoint", "validation",
    "evaluation" and "done" events on the main process (the CLI draws progress from them)."""
    p = _setup(opts)
    acc, out = p.acc, Path(opts.out)
    say = (callback or (lambda event, record: None)) if acc.is_main_process else (lambda event, record: None)
    run = Run(out / "final", opts.steps)
    say(
        "start",
        {
            "start": p.start,
            "steps": opts.steps,
            "processes": acc.num_processes,
            "device": str(acc.device),
            "global_batch": opts.batch_size * acc.num_processes * opts.grad_accum,
            "family": opts.step.family,
        },
    )
    val = _validation_set(opts) if acc.is_main_process and opts.val_data else None
    if val is not None and p.start == 0:
        run.validation.append(_validate(acc, p.unet, p.vae, p.prompt, val, opts, 0, say))
    tally, t0 = [], time.perf_counter()
    for k, batch in enumerate(p.loader, start=p.start * opts.grad_accum):
        step, micro = divmod(k, opts.grad_accum)
        tally.append(_micro_step(p, opts, batch, step, micro))
        if micro < opts.grad_accum - 1:
            continue
        acc.clip_grad_norm_(p.unet.parameters(), opts.max_grad_norm)
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        done = step + 1
        mean = acc.reduce(torch.stack(tally).mean(0), reduction="mean").tolist()  # over micro-batches, processes
        tally = []
        record = {
            "step": done,
            "loss": mean[0],
            "loss_anno": mean[1],
            "loss_rgb": mean[2],
            "lr": opts.lr,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if acc.is_main_process:
            run.losses.append(record)
            if done % opts.log_every == 0 or done == opts.steps:
                _append_jsonl(out / LOG_FILE, record)
                if acc.trackers:
                    acc.log({key: record[key] for key in ("loss", "loss_anno", "loss_rgb")}, step=done)
            say("log", record)
        if done % opts.checkpoint_every == 0 and done < opts.steps:
            _checkpoint(acc, out, done, opts.keep_checkpoints, say)
        if opts.val_every and done % opts.val_every == 0 and done < opts.steps and acc.is_main_process:
            if val is not None:
                run.validation.append(_validate(acc, p.unet, p.vae, p.prompt, val, opts, done, say))
            run.evaluation += _benchmark(acc, p.unet, p.vae, p.prompt, opts, done, say)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if val is not None:
            run.validation.append(_validate(acc, p.unet, p.vae, p.prompt, val, opts, opts.steps, say))
        run.evaluation += _benchmark(acc, p.unet, p.vae, p.prompt, opts, opts.steps, say)
        save_final(acc.unwrap_model(p.unet), p.base_folder, p.prompt, opts, run.final)
        say("done", {"final": str(run.final), "steps": opts.steps})
    acc.wait_for_everyone()
    acc.end_training()
    return run


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _checkpoint(acc, out: Path, step: int, keep: int, say) -> None:
    path = out / "checkpoints" / f"step-{step:07d}"
    acc.save_state(str(path))
    if acc.is_main_process:
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        say("checkpoint", {"step": step, "path": str(path)})
    acc.wait_for_everyone()


# ------------------------------------------------------------------------------------- validation


@torch.no_grad()
def evaluate_samples(predictor, samples: list[dict], sopts: StepOptions, image: Path | None = None) -> dict:
    """Predict each sample with ``predictor``'s own steps (encode the posterior mean, G noise seed = sample
    index, denoise, decode, finish at the sample's size) and score it: depth, AbsRel and delta1 after
    least-squares scale and shift in the model's kind (disparity or depth); normals, the mean angle in
    degrees. Models trained with ``timesteps`` > 1 or eps prediction are sampled with DDIM
    (step.predict_latent) between encode and decode. ``error`` is AbsRel or the mean angle. With ``image``,
    writes rows of rgb | prediction | ground truth there."""
    scores, rows = [], []
    for i, s in enumerate(samples):
        z = predictor.encode(predictor.to_tensor(s["rgb"]))  # [1, 4, h, w], posterior mean
        noise = predictor.noise([i], tuple(z.shape[-2:])) if predictor.family == "g" else None
        if sopts.timesteps == 1 and sopts.prediction == "x0":
            x0 = predictor.denoise(z, noise)  # [1, 4, h, w]
        else:
            x0 = predict_latent(predictor.unet, z, predictor.prompt_embedding, sopts, noise)
        pred = predictor.finish(predictor.decode(x0), s["rgb"].shape[:2])  # [H, W] or unit normals [H, W, 3]
        valid = s["valid"]
        if sopts.task == "normal":
            scores.append({"error": float(M.angular_error(pred, s["normal"])[valid].mean())})
            rows.append([s["rgb"], normal_to_rgb(pred), normal_to_rgb(s["normal"])])
            continue
        gt = s["depth"].astype(np.float64)
        ok = valid & (gt > 0)
        aligned = M.align_depth(pred, gt, ok, sopts.kind, (float(gt[ok].min()), float(gt[ok].max())))
        m = M.depth_metrics(aligned.depth, gt, ok)
        scores.append({"error": m["abs_rel"], "abs_rel": m["abs_rel"], "delta1": m["delta1"]})
        rows.append([s["rgb"], colorize_depth(pred, sopts.kind), colorize_depth(np.where(ok, gt, np.nan), "depth")])
    if image is not None and rows:
        from PIL import Image

        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)).save(image)
    return {k: float(np.mean([sc[k] for sc in scores])) for k in scores[0]}


def _predictor(acc, unet, vae, prompt, opts: TrainOptions, step: int):
    """The model as it is now, as a LotusPredictor that borrows the modules: the UNet keeps training afterwards
    and the VAE keeps encoding its batches, so neither may change (no bf16 cast of an fp16 VAE that overflows,
    no in-place SiLU: LotusPredictor ``borrowed``)."""
    entry = registry.ModelEntry(
        name=f"{opts.name or Path(opts.out).name}@{step}",
        repo_id=str(opts.out),
        task=opts.step.task,
        family=opts.step.family,
        kind=opts.step.kind,
    )
    return LotusPredictor(
        acc.unwrap_model(unet),
        vae,
        prompt,
        entry,
        acc.device,
        vae.dtype,
        source=f"{opts.out} step {step}",
        borrowed=True,
    )


def _validation_set(opts: TrainOptions) -> list[dict]:
    ds = D.open_data(opts.val_data, opts.size, "--val-data")
    samples = [ds.load(i) for i in range(min(opts.val_samples, len(ds)))]
    for s in samples:
        if s.get(opts.step.task) is None:
            raise UsageError(f"--val-data {opts.val_data}: sample {s.get('key')} has no {opts.step.task} map")
    return samples


def _validate(acc, unet, vae, prompt, samples: list[dict], opts: TrainOptions, step: int, say) -> dict:
    predictor = _predictor(acc, unet, vae, prompt, opts, step)
    predictor.unet.eval()
    with acc.autocast():  # under mixed precision the VAE holds fp16/bf16 weights, the UNet fp32 ones
        record = evaluate_samples(predictor, samples, opts.step, Path(opts.out) / "validation" / f"step-{step:07d}.png")
    predictor.unet.train()
    record["step"] = step
    if acc.trackers:
        acc.log({f"val_{k}": v for k, v in record.items() if k != "step"}, step=step)
    say("validation", record)
    _append_jsonl(Path(opts.out) / "validation.jsonl", record)
    return record


def _benchmark(acc, unet, vae, prompt, opts: TrainOptions, step: int, say) -> list[dict]:
    """The evaluation protocol (`lotus eval`) on ``opts.eval_data`` with the model as it is now; one record
    per dataset, appended to OUT/eval.jsonl. Single-step x0 models only (what the predictor runs)."""
    if not opts.eval_data:
        return []
    if opts.step.prediction != "x0" or opts.step.timesteps != 1:
        say("evaluation", {"step": step, "skipped": "benchmarks run single-step x0 models only"})
        return []
    from ..evaluate import datasets as ED
    from ..evaluate import run as R

    predictor = _predictor(acc, unet, vae, prompt, opts, step)
    eopts = R.EvalOptions(task=opts.step.task, max_samples=opts.eval_max_samples)
    records = []
    predictor.unet.eval()
    try:
        for name, path in ED.parse_pairs(list(opts.eval_data), "--eval-data"):
            with acc.autocast():
                result = R.evaluate(ED.open_dataset(opts.step.task, name, path), R.ModelSource(predictor), eopts)
            record = {
                "step": step,
                "dataset": name,
                "evaluated": result.evaluated,
                "failed": len(result.failed),
                "metrics": result.metrics,
            }
            records.append(record)
            say("evaluation", record)
            _append_jsonl(Path(opts.out) / "eval.jsonl", record)
    finally:
        predictor.unet.train()
    return records


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ saving


def save_final(unet, base_folder: Path, prompt: torch.Tensor, opts: TrainOptions, dest: Path) -> Path:
    """The trained model as a checkpoint folder in the hub layout: unet/ (fp32 safetensors), vae/,
    text_encoder/, tokenizer/ copied from the base, scheduler/, model_index.json, lotus.json (task, kind,
    family) and the cached empty-prompt embedding."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.to(torch.float32).save_pretrained(tmp / "unet", safe_serialization=True)
    for sub in ("vae", "text_encoder", "tokenizer"):
        if (base_folder / sub).is_dir():
            shutil.copytree(base_folder / sub, tmp / sub)
    prediction_type = "epsilon" if opts.step.prediction == "eps" else "sample"
    DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    ).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": f"Lotus{opts.step.family.upper()}Pipeline",
        "lotus_task": opts.step.task,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    meta = {
        "task": opts.step.task,
        "kind": opts.step.kind,
        "name": opts.name or dest.parent.name,
        "family": opts.step.family,
        "licence": "derived from the base model's licence",
        "note": f"trained with lotus train from {opts.base}: {opts.steps} steps, prediction "
        f"{opts.step.prediction}, timesteps {opts.step.timesteps}, detail preserver "
        f"{opts.step.detail_preserver}, norm {opts.step.norm}",
    }
    (tmp / registry.METADATA_FILE).write_text(json.dumps(meta, indent=2))
    save_file({"embedding": prompt.detach().float().cpu().contiguous()}, str(tmp / registry.EMBEDDING_FILE))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
