"""torch.compile (inductor) for long runs: the UNet compiled once per processing size, cached on disk.

Inductor traces the UNet for one input shape, fuses its pointwise work into generated C++ (CPU) or
Triton (CUDA) kernels and, with ``freezing`` on a CPU, folds the weights into the graph and packs the
convolution weights for oneDNN itself. The first call for a shape pays for that compilation; its
artifacts (inductor's FX graph cache and the compiled kernels) go to ``inductor_cache_dir()``, so a later
process running the same model at the same size loads them instead of compiling. docs/performance.md
("Compiled path") gives the measured costs and what it buys; ``should_compile`` encodes when it pays.

Weights packed by the predictor for eager oneDNN convolutions cannot be traced (oneDNN's opaque tensor
layout), so they are unpacked into plain ``nn.Conv2d`` first: freezing then packs them again. With
``vae=True`` the VAE's encoder and decoder are compiled too, whole: the predictor's row strips (which
call the VAE's submodules one by one, to save memory) are then switched off; without it the VAE keeps
its strips and runs eagerly beside the compiled UNet.

When the compiler is missing (no C++ compiler on a CPU, no Triton for CUDA) or compilation fails, the
model runs eagerly and the reason is returned / recorded as one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..io.cache import cache_dir
from .cpu import prepack
from .gpu import is_out_of_memory

MODES = ("auto", "on", "off")
# --compile auto compiles runs of at least this many same-size items: where the first call's compilation
# (cold: nothing cached; warm: artifacts cached by an earlier run) is paid back by the faster calls after
# it, as measured by benchmarks/bench_compile.py (docs/performance.md, "Compiled path").
MIN_ITEMS_COLD = 40
MIN_ITEMS_WARM = 12
# ... and only models up to this size: the full-size architecture (3.8 GB of fp32 weights) ran 0.74x as
# fast compiled as eager even with a warm cache (21.2 vs 16.7 s per 512 px frame; the compiled VAE loses
# the eager one's row strips and sub-pixel upsampling), where the tiny one ran 1.49x as fast.
MAX_AUTO_BYTES = 256 * 2**20


def inductor_cache_dir() -> Path:
    """Where inductor keeps its compiled artifacts: $LOTUS_CACHE/inductor, else $XDG_CACHE_HOME/lotus/inductor
    (~/.cache/lotus/inductor)."""
    return cache_dir() / "inductor"


def compiler_missing(device_type: str) -> str | None:
    """Why inductor cannot compile for ``device_type`` here, or None if it can (a C++ compiler for CPUs,
    Triton for CUDA; nothing else is supported)."""
    if device_type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except (exc.InvalidCxxCompiler, OSError, RuntimeError):
            return "no C++ compiler found (install g++ or set CXX)"
        return None
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (pip install triton)"
        return None
    return f"torch.compile is not supported here on {device_type}"


def has_cached_artifacts(directory: Path | None = None) -> bool:
    """Whether ``directory`` (default ``inductor_cache_dir()``) holds FX graphs compiled by an earlier run."""
    fx = Path(directory or inductor_cache_dir()) / "fxgraph"
    return fx.is_dir() and any(fx.iterdir())


def should_compile(
    n_items: int | None,
    is_video: bool = False,
    device_type: str = "cpu",
    warm: bool | None = None,
    weight_bytes: int = 0,
) -> bool:
    """``--compile auto``: whether compiling pays for ``n_items`` predictions of one processing size (the
    frames of a video, or same-size images) with a model of ``weight_bytes``. ``None``: a video or stream
    of unknown length, counted as long. ``warm``: whether compiled artifacts are cached (default: look in
    ``inductor_cache_dir()``). Only on CPUs, where it was measured, and for models up to ``MAX_AUTO_BYTES``
    (above, compiled ran slower); on CUDA compiling is asked for explicitly (--compile on)."""
    if device_type != "cpu" or weight_bytes > MAX_AUTO_BYTES:
        return False
    if n_items is None:
        return is_video
    if warm is None:
        warm = has_cached_artifacts()
    return n_items >= (MIN_ITEMS_WARM if warm else MIN_ITEMS_COLD)


def _inductor_cache_dir_chosen() -> bool:
    """Whether TORCHINDUCTOR_CACHE_DIR was set by the user (importing diffusers makes torch set it to its
    own default under /tmp, which is cleared on reboot)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return bool(given) and os.path.abspath(given) != os.path.abspath(default_cache_dir())


def _root_cause(e: BaseException) -> str:
    """The innermost exception's type and first line (dynamo wraps a backend's error in its own)."""
    while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


class _CompiledOrEager:
    """Stands in for a module's ``_compiled_call_impl``: the compiled call, and at its first failure the
    eager one from then on, with the failure kept as ``reason``. Running out of memory is no compiler
    failure: it is raised as it is (the caller frees memory and retries, smaller) and compilation stays on."""

    def __init__(self, module: torch.nn.Module, compiled):
        self.module, self.compiled, self.reason = module, compiled, None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager model is always right
                if is_out_of_memory(e):
                    raise
                self.compiled = None
                self.reason = f"torch.compile failed ({_root_cause(e)}); running eagerly"
        return self.module._call_impl(*args, **kwargs)


def compile_predictor(
    predictor,
    mode: str = "auto",
    cache_dir: Path | str | None = None,
    *,
    n_items: int = 1,
    is_video: bool = False,
    vae: bool = True,
    backend="inductor",
    cuda_graphs: bool = False,
) -> tuple[bool, str]:
    """Compile ``predictor.unet`` (and with ``vae`` the VAE's encoder and decoder) in place: the predictor
    keeps working through the same module objects, which keep their weights (unpacked).

    ``mode``: "off" leaves it eager, "on" compiles, "auto" compiles when ``should_compile(n_items,
    is_video)`` says it pays (``n_items`` predictions of one processing size follow). Compilation itself
    happens at the first call per input shape; artifacts are cached under ``cache_dir`` (default
    ``inductor_cache_dir()``; this sets TORCHINDUCTOR_CACHE_DIR for the process unless the user set it).
    ``cuda_graphs``: CUDA only, what inductor's "reduce-overhead" mode adds (CUDA graphs; the processing
    size and batch must then stay fixed to pay). Returns (compiled, one-line reason); a failure
    at the first call falls back to eager and is reported by ``compile_status``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "off":
        return False, "--compile off"
    device_type = predictor.device.type
    weight_bytes = predictor.weight_bytes()
    if mode == "auto" and not should_compile(n_items, is_video, device_type, weight_bytes=weight_bytes):
        if device_type == "cpu" and weight_bytes > MAX_AUTO_BYTES:
            return False, "--compile auto: not compiled (a model this size ran slower compiled: docs/performance.md)"
        return False, f"--compile auto: not compiled for {n_items} item(s) on {device_type}"
    if backend == "inductor":
        missing = compiler_missing(device_type)
        if missing:
            return False, f"not compiled: {missing}; running eagerly"
        if cache_dir is not None or not _inductor_cache_dir_chosen():
            directory = Path(cache_dir) if cache_dir is not None else inductor_cache_dir()
            directory.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    modules = [predictor.unet]
    if vae:  # the VAE compiled whole: its row strips (which call its submodules one by one) are switched off
        modules += [predictor.vae.encoder, predictor.vae.decoder]
        predictor.strip_rows = 0
    for m in modules:
        prepack.unpack_convolutions(m)
    options = None
    if backend == "inductor":
        # freezing: weights become constants, convolutions are packed for oneDNN at compile time (CPU);
        # on CUDA it lets inductor fold the weights' layout changes too.
        options = {"freezing": True}
        if cuda_graphs and device_type == "cuda":
            options["triton.cudagraphs"] = True
    for m in modules:
        m._compiled_call_impl = _CompiledOrEager(
            m, torch.compile(m._call_impl, backend=backend, dynamic=False, options=options)
        )
    how = "inductor, freezing" + (", CUDA graphs" if options and "triton.cudagraphs" in options else "")
    what = "UNet and VAE" if vae else "UNet"
    return True, f"{what} compiled ({how if backend == 'inductor' else backend}); first call per size compiles"


def _compiled_modules(predictor) -> list[torch.nn.Module]:
    return [
        m
        for m in (predictor.unet, predictor.vae.encoder, predictor.vae.decoder)
        if isinstance(getattr(m, "_compiled_call_impl", None), _CompiledOrEager)
    ]


def compile_status(predictor) -> str | None:
    """The one-line reason a compiled module fell back to eager at run time, or None."""
    return next(
        (m._compiled_call_impl.reason for m in _compiled_modules(predictor) if m._compiled_call_impl.reason), None
    )
