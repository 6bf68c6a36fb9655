"""`lotus train`'s options as TrainOptions, every one checked before anything is built, with no torch import so
that a bad option is answered at once; and the debug preset's defaults and folders (``debug.py`` builds them)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from ..model import registry
from .options import StepOptions, TrainOptions, find_checkpoint, parse_spec

DEBUG = dict(
    steps=300,
    batch_size=4,
    lr=1e-3,
    checkpoint_every=100,
    val_every=100,
    val_samples=8,
    log_every=10,
    size=(32, 32),
    train_scenes=64,
    vae_steps=400,
    threads=1,
)
DEFAULT_BASE = "stabilityai/stable-diffusion-2-base"


def training_options(a: dict):
    """The command's options as TrainOptions, every check done; creates nothing. Raises UsageError."""
    dbg = a["preset"] == "debug"
    if a["preset"] not in (None, "debug"):
        raise UsageError(f"--preset {a['preset']!r}: the only preset is debug")
    if a["num_processes"] < 1:
        raise UsageError(f"--num-processes must be >= 1, not {a['num_processes']}")
    pick = lambda name, default: a[name] if a[name] is not None else (DEBUG[name] if dbg else default)  # noqa: E731
    out = a["out"] or (Path("runs/debug") if dbg else None)
    if out is None:
        raise UsageError("no --out folder", "pass --out runs/NAME")
    _check_out(out)
    base, data, val, size = a["base"], a["data"], a["val_data"], _size(a["size"])
    for spec in data or ():
        parse_spec(spec, "--data")
    if val:
        parse_spec(val, "--val-data")
    built_base = dbg and base == DEFAULT_BASE  # the debug preset builds its own base, after these checks
    if dbg:
        paths = debug_paths(out)
        base = str(paths["base"]) if built_base else base
        data = data or [f"folder={paths['train']}"]
        val = val or f"folder={paths['val']}"
        size = size or DEBUG["size"]
    step = StepOptions(
        task=a["task"],
        family=a["family"],
        prediction=a["prediction"],
        timesteps=a["timesteps"],
        detail_preserver=a["detail_preserver"],
        norm=a["norm"],
        latent=a["latent"],
    )
    opts = TrainOptions(
        base=base,
        out=out,
        data=tuple(data or ()),
        step=step,
        mix=_mix(a["mix"]),
        steps=pick("steps", 20_000),
        batch_size=pick("batch_size", 16),
        grad_accum=a["grad_accum"],
        lr=pick("lr", 3e-5),
        weight_decay=a["weight_decay"],
        max_grad_norm=a["max_grad_norm"],
        mixed_precision=a["mixed_precision"],
        gradient_checkpointing=a["gradient_checkpointing"],
        checkpoint_every=pick("checkpoint_every", 2000),
        resume=a["resume"],
        seed=a["seed"],
        size=size,
        flip=a["flip"],
        val_data=val,
        val_every=pick("val_every", 0),
        val_samples=DEBUG["val_samples"],
        eval_data=tuple(a["eval_data"] or ()),
        eval_max_samples=a["eval_max_samples"],
        log_every=a["log_every"],
        num_workers=a["num_workers"],
        name=out.name,
    )
    if opts.resume:
        find_checkpoint(out, opts.resume)
    if not built_base:
        _check_base(base)
    return opts


def _check_out(out: Path) -> None:
    """--out must be a folder, or a path where one can be made: no file in the way, a writable parent."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"--out {out}: {p} is a file, not a folder", "pass --out runs/NAME")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UsageError(f"--out {out}: {p} is not writable", "pass --out a folder you can write to")
            return


def _check_base(base: str) -> None:
    """--base names a folder or a hub id that is at hand (a folder, the local cache, or the network)."""
    ref = registry.resolve(base)
    if ref.folder is None and registry.hub_offline() and registry.cached_folder(ref.repo_id) is None:
        raise UsageError(
            f"--base {base}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
            "download it once with the network on, or pass --base /path/to/a/folder",
        )


def _mix(spec: str | None) -> tuple[float, ...] | None:
    if not spec:
        return None
    try:
        return tuple(float(v) for v in spec.split(","))
    except ValueError as e:
        raise UsageError(f"--mix {spec!r}: expected numbers separated by commas, e.g. 0.9,0.1") from e


def _size(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        h, w = (int(v) for v in spec.lower().split("x"))
    except ValueError as e:
        raise UsageError(f"--size {spec!r}: expected HxW, e.g. 576x768") from e
    if h < 8 or w < 8 or h % 8 or w % 8:
        raise UsageError(f"--size {spec!r}: both sides must be multiples of 8 (the VAE's latent cells), e.g. 576x768")
    return h, w


def debug_paths(out: Path) -> dict:
    return {"base": out / "debug-base", "train": out / "debug-data", "val": out / "debug-val"}


def uses_debug_inputs(opts) -> bool:
    """Whether the run takes its base, data or validation set from the debug preset (else nothing to build)."""
    paths = debug_paths(opts.out)
    specs = {f"folder={paths['train']}", f"folder={paths['val']}"}
    return opts.base == str(paths["base"]) or bool(specs & {*opts.data, opts.val_data})
