"""The options of a training run and of its step, and its checkpoint folders: plain dataclasses validated
once, before any work, with no torch import, so that `lotus train` answers a bad option at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

STATE_FILE = "trainer_state.json"
DATASETS = ("folder", "hypersim", "vkitti")  # the --data formats (data.READERS reads each)

NORMALISATIONS = {  # name -> output kind of the trained model
    "trunc_disparity": "disparity",  # 1/depth, 2% / 98% quantiles -> -1 / +1, clipped (the v2 models)
    "trunc_depth": "depth",  # depth, 2% / 98% quantiles -> -1 / +1, clipped (Marigold; the v1-0 models)
    "disparity": "disparity",  # 1/depth, min / max -> -1 / +1
    "depth": "depth",  # depth, min / max -> -1 / +1
}
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class StepOptions:
    """What one step does (the paper's Table 3 ablations are these fields); validated once."""

    task: str = "depth"  # "depth" | "normal"
    family: str = "g"  # "g" (noise input, 8 channels) | "d" (image latent only)
    prediction: str = "x0"  # "x0" (Lotus) | "eps" (standard diffusion; G only)
    timesteps: int = 1  # 1 = single step t = 999 (Lotus); N = N evenly spaced steps, DDIM at evaluation (G)
    detail_preserver: bool = True
    norm: str = "trunc_disparity"  # depth normalisation, a key of NORMALISATIONS
    latent: str = "sample"  # "sample" (reference: posterior sample) | "mean"

    def __post_init__(self):
        checks = [
            (self.task in ("depth", "normal"), f"--task must be depth or normal, not {self.task!r}"),
            (self.family in ("g", "d"), f"--family must be g or d, not {self.family!r}"),
            (self.prediction in ("x0", "eps"), f"--prediction must be x0 or eps, not {self.prediction!r}"),
            (1 <= self.timesteps <= NUM_TRAIN_TIMESTEPS, f"--timesteps must be in 1..1000, not {self.timesteps}"),
            (self.norm in NORMALISATIONS, f"--norm must be one of {', '.join(NORMALISATIONS)}, not {self.norm!r}"),
            (self.latent in ("sample", "mean"), f"--latent must be sample or mean, not {self.latent!r}"),
            (self.family == "g" or self.prediction == "x0", "--prediction eps needs --family g (D has no noise)"),
            (self.family == "g" or self.timesteps == 1, "--timesteps > 1 needs --family g (D has no noise)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def kind(self) -> str:
        """Output kind of the trained model: "disparity", "depth" or "normal"."""
        return "normal" if self.task == "normal" else NORMALISATIONS[self.norm]


@dataclass(frozen=True)
class TrainOptions:
    """A training run (defaults: the paper's recipe per process); validated once, before any work."""

    base: str  # SD2 hub id / folder, or a Lotus checkpoint to continue from
    out: Path
    data: tuple[str, ...]  # NAME=PATH (hypersim, vkitti, folder) or PATH (folder format)
    step: StepOptions = field(default_factory=StepOptions)
    mix: tuple[float, ...] | None = None  # per-batch probabilities, one per --data (default: equal)
    steps: int = 20_000
    batch_size: int = 16  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 3e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 2000
    keep_checkpoints: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    seed: int = 0
    size: tuple[int, int] | None = None  # (H, W) for folder data
    flip: bool = True
    val_data: str | None = None
    val_every: int = 0  # steps; 0 = only at the start and the end (validation) / the end (evaluation)
    val_samples: int = 8
    eval_data: tuple[str, ...] = ()  # NAME=PATH benchmark sets of `lotus eval` (depth: nyuv2, kitti, ...)
    eval_max_samples: int | None = None
    log_every: int = 10
    num_workers: int = 0
    name: str = ""

    def __post_init__(self):
        if not self.data:
            raise UsageError("no training data", "pass --data NAME=PATH (hypersim, vkitti, folder), repeatable")
        if self.mix is not None and (len(self.mix) != len(self.data) or min(self.mix) < 0 or sum(self.mix) <= 0):
            raise UsageError(
                f"--mix {','.join(map(str, self.mix))}: give one non-negative weight per --data ({len(self.data)})"
            )
        for name, v in (
            ("--steps", self.steps),
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--checkpoint-every", self.checkpoint_every),
            ("--log-every", self.log_every),
        ):
            if v < 1:
                raise UsageError(f"{name} must be >= 1, not {v}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UsageError(f"--mixed-precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        for name, v in (
            ("--keep-checkpoints", self.keep_checkpoints),
            ("--val-samples", self.val_samples),
            ("--eval-max-samples", 1 if self.eval_max_samples is None else self.eval_max_samples),
        ):
            if v < 1:
                raise UsageError(f"{name} must be >= 1, not {v}")
        for name, v in (("--val-every", self.val_every), ("--num-workers", self.num_workers), ("--seed", self.seed)):
            if v < 0:
                raise UsageError(f"{name} must be >= 0, not {v}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, not {self.lr}")
        if not self.max_grad_norm > 0:
            raise UsageError(f"--max-grad-norm must be > 0, not {self.max_grad_norm}")
        if not self.weight_decay >= 0:
            raise UsageError(f"--weight-decay must be >= 0, not {self.weight_decay}")
        if self.size is not None and min(self.size) < 1:
            raise UsageError(f"--size {self.size[0]}x{self.size[1]}: both sides must be >= 1")
        for spec in self.data:
            parse_spec(spec, "--data", must_exist=False)
        if self.val_data:
            parse_spec(self.val_data, "--val-data", must_exist=False)
        if self.eval_data:
            from ..evaluate.datasets import parse_pairs, spec_for

            for name, _ in parse_pairs(list(self.eval_data), "--eval-data"):
                spec_for(self.step.task, name)


# ----------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    """The complete checkpoints under ``out`` (those with their step file), oldest first."""
    found = [p for p in (out / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume == "latest":
        found = checkpoint_dirs(out)
        if not found:
            raise UsageError(f"--resume latest: no checkpoint in {out / 'checkpoints'}", "start without --resume")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})", "use --resume latest")
    return path


def parse_spec(spec: str, option: str = "--data", must_exist: bool = True) -> tuple[str, Path]:
    """``NAME=PATH`` (NAME: hypersim, vkitti, folder) or a bare PATH (folder format) -> (NAME, PATH); checks
    the name and, with ``must_exist``, that PATH is a folder (a stat, no listing)."""
    name, _, path = spec.partition("=") if "=" in spec else ("folder", "", spec)
    if name not in DATASETS:
        raise UsageError(f"{option} {spec}: unknown dataset {name!r}", f"use one of {', '.join(DATASETS)}=PATH")
    root = Path(path).expanduser()
    if must_exist and not root.is_dir():
        raise UsageError(f"{option} {spec}: {path} is not a folder")
    return name, root
