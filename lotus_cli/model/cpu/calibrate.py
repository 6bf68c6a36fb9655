"""Which CPU fast paths pay on this machine, decided by measuring them there, once, and remembered.

CPUs differ in what pays: packed oneDNN weights (prepack.py) made a prediction faster on an AVX-512
machine and slower on an AVX2-only one (docs/performance.md). So the choices are timed on first
use, for this model's architecture at the processing size, and cached:

* layout, per module (UNet, VAE): every distinct convolution of the UNet and VAE (found by a shape-only
  run on the meta device: channels, kernel, stride and input size at the processing size) is timed with
  random input as NCHW, channels-last and channels-last with a packed weight, with this model's own
  weight. A layer within ``WHOLE_FLOP`` and ``WHOLE_BYTES`` runs whole; a larger one on a band of its
  output rows at full width, as many as those allow but at least a strip's (strips.py: the call the VAE's
  big stages really make), scaled up by the rows. The heap is trimmed after each, so the timings do not
  raise the first prediction's peak memory. (Windows of 0.15 GFLOP, a few output pixels of a wide layer, were
  tried first: their kernels were not the full layers' ones, and on AVX2 kernels they rated packed
  weights 13 % faster for the VAE where whole predictions ran 15 % slower; docs/performance.md.)
  A module's estimate per layout is the sum over its layers times their uses; each module runs in its
  fastest, so the choice is not slower than diffusers' plain modules (NCHW, unpacked) by the estimate.
* strips (strips.py): the decoder's last full-resolution residual block and the upsampler before it, on
  a band of rows at the processing width, as diffusers' modules and in strips of ``ROW_CHOICES`` rows, in
  the chosen layout. Strips exist for memory, so they are kept while within ``STRIP_SLACK`` of the plain
  modules' time, with the fastest row count.
* threads: where the CPUs this process may use differ from torch's default (one thread per physical
  core; hyper-threads, or a cpuset smaller than the machine), the ``THREAD_LAYERS`` costliest
  convolutions are timed, in the chosen layout, at each of those thread counts and the fastest is set
  (``torch.set_num_threads``) when the model is prepared. Where they agree there is nothing to time, and
  a count set by ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` is the user's and kept.

Other devices (CUDA, MPS) get none of this: diffusers' modules, NCHW unless ``channels_last`` asks for it.
Whatever the caller fixes (``channels_last`` / ``pack_weights`` given) is not timed. Without timings a
rule decides (``_rule``: channels-last, packed weights only on AVX-512 CPUs, strips): for models under
``MIN_TIMED_BYTES`` of weights (their layers take microseconds: timings would pick noise) and when the
machine is busy (load average above ``BUSY_LOAD`` per core: timings would measure the other processes);
a busy machine's choice is not cached. The cache (``calibration.json`` in lotus-cli's cache folder:
``$LOTUS_CACHE``, else ``$XDG_CACHE_HOME/lotus``, else ``~/.cache/lotus``) is keyed by CPU model and
flags, torch version, threads, dtype, model architecture and processing size; an unreadable one is
ignored and rewritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..weights import latent_factor
from . import heap, prepack, strips

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the instruction sets that decide the kernels
CACHE_VERSION = 3  # 2: a layout per module; 3: whole layers or full-width bands timed
WHOLE_FLOP = 8e9  # a layer above this many FLOP per call is timed on a band of its rows at full width
WHOLE_BYTES = 32 * 2**20  # ... and one whose input and output take more (the peak RSS of a first run)
LONG_CALL = 0.05  # seconds: a timed call this long is timed once after its warm-up
MIN_TIMED_BYTES = 64 * 2**20  # weights below this: rule defaults, not timings
ROW_CHOICES = (16, 32)
STRIP_SLACK = 1.05  # strips (less memory) are kept while at most 5 % slower than the plain modules
BUSY_LOAD = 1.25  # load average per core above which the machine is too busy to time
STRIP_BAND = 64  # rows (at most STRIP_WIDTH columns) of the decoder stage timed for the strip choice
STRIP_WIDTH = 128
LAYOUTS = ("nchw", "channels_last", "channels_last+packed")
PARTS = ("unet", "vae")
THREAD_LAYERS = 3  # the costliest convolutions (FLOP x uses) timed at each candidate thread count
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # a thread count set by the user: kept, not timed
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


@dataclass(frozen=True)
class Machine:
    """The CPU as the kernels see it: model name, the FLAGS its kernels may use, logical cores; torch and its
    threads; ``isa``: torch's vector capability and any of ``ISA_CAPS`` set in the environment."""

    cpu: str
    flags: tuple[str, ...]
    cores: int
    torch: str
    threads: int
    isa: str = ""


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo, read once per process."""
    names, flags = [], set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                names.append(value.strip())
            elif key.strip() == "flags":
                flags |= set(value.split())
    except OSError:  # not Linux: the name platform gives, and no flags known
        pass
    return (names[0] if names else (platform.processor() or platform.machine())), frozenset(flags)


def usable_flags(flags, capability: str, caps: dict[str, str]) -> tuple[str, ...]:
    """The FLAGS the kernels may use: the CPU's, less AVX-512 (and its bf16 / AMX) where torch's vector
    capability is below AVX-512 or the environment caps oneDNN or MKL below it (``ONEDNN_MAX_CPU_ISA=AVX2``
    and the like, which run an AVX-512 CPU's kernels as on an AVX2-only one)."""
    out = {f for f in FLAGS if f in flags}
    limits = [capability.upper()] + [caps[k].upper() for k in ISA_CAPS[1:] if k in caps]
    if any(not v.startswith(("AVX512", "AVX10", "ALL")) for v in limits if v):
        out -= {"avx512f", "avx512_bf16", "amx_bf16"}
    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # oneDNN runs bf16 natively from these up
        v = caps.get(k, "ALL").upper()
        if v != "ALL" and "AMX" not in v:
            out.discard("amx_bf16")
            if "BF16" not in v and not v.startswith("AVX10"):
                out.discard("avx512_bf16")
    return tuple(f for f in FLAGS if f in out)


def machine() -> Machine:
    cpu, flags = _cpuinfo()
    capability = torch.backends.cpu.get_cpu_capability()
    caps = {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}
    isa = " ".join([capability] + [f"{k}={v}" for k, v in caps.items()])
    return Machine(
        cpu, usable_flags(flags, capability, caps), os.cpu_count() or 1, torch.__version__, torch.get_num_threads(), isa
    )


def cpu_has_native_bf16() -> bool:
    return any(f in machine().flags for f in ("avx512_bf16", "amx_bf16"))


@dataclass
class Choices:
    """What runs, and why. ``unet``, ``vae``: each module's layout (one of LAYOUTS); ``how``: "measured",
    "cached" (measured earlier on this machine), or "rule: <reason>"; ``times``: the measured seconds per
    option ({"layout": {layout: s} (both modules), "unet"/"vae": {layout: s}, "strips": {rows: s} (rows
    "0" = diffusers' modules), "threads": {n: s}}), estimates for the processing size ``size`` (h, w)."""

    unet: str
    vae: str
    strip_rows: int
    threads: int
    how: str
    size: tuple[int, int] = (0, 0)
    times: dict = field(default_factory=dict)
    seconds: float = 0.0  # what the calibration itself took

    @property
    def channels_last(self) -> bool:
        """Whether either module runs channels-last."""
        return self.unet != "nchw" or self.vae != "nchw"

    @property
    def pack_weights(self) -> bool:
        """Whether either module's convolution weights are packed."""
        return any(lay.endswith("packed") for lay in (self.unet, self.vae))

    @property
    def layout(self) -> str:
        """The layout, or "unet X, vae Y" where the modules differ."""
        return self.unet if self.unet == self.vae else f"unet {self.unet}, vae {self.vae}"


def choose(
    unet,
    vae,
    device: torch.device,
    dtype: torch.dtype,
    *,
    channels_last: bool | None = None,
    pack_weights: bool | None = None,
    processing_res: int = 768,
    cache: Path | None = None,
) -> Choices:
    """The fast paths for this UNet and VAE (not yet applied), from the cache, a calibration or a rule."""
    can_pack = prepack.available(device, dtype)
    if device.type != "cpu":
        # The CPU speed code stays on the CPU: no strips (their float64 GroupNorm statistics do not run on MPS,
        # and on CUDA they only add kernel launches and apply GroupNorm in fp16 as x * a + b), diffusers' modules
        lay = "channels_last" if channels_last else "nchw"
        return Choices(lay, lay, 0, torch.get_num_threads(), "rule: not a CPU")
    layouts = [
        lay
        for lay in LAYOUTS
        if channels_last in (None, lay != "nchw")
        and pack_weights in (None, lay.endswith("packed"))
        and (can_pack or not lay.endswith("packed"))
    ]
    if not layouts:  # packing asked for where it cannot run: channels-last, unpacked (as before)
        layouts = ["channels_last" if channels_last is not False else "nchw"]
    weights = prepack.weight_bytes(unet, vae)
    if weights < MIN_TIMED_BYTES:
        return _rule(layouts, f"{weights / 2**20:.1f} MB of weights, too small to time")
    size = (processing_res, processing_res) if processing_res else (768, 768)
    path = cache or cache_file()
    key = cache_key(unet, vae, dtype, size, layouts)
    found = _read(path).get(key)
    if found is not None:
        return Choices(
            **{
                **{k: found[k] for k in Choices.__dataclass_fields__ if k in found},
                "size": tuple(found["size"]),
                "how": "cached",
            }
        )
    load, cores = busy()
    if load is not None:  # other processes share the cores: timings would measure them, not the options
        return _rule(layouts, f"machine busy (load {load:.1f} on {cores} cores), not measured")
    t0 = time.perf_counter()
    try:
        per_part = time_layouts(unet, vae, dtype, size, layouts) if len(layouts) > 1 else {}
        times = {"layout": {lay: sum(per_part[p][lay] for p in PARTS) for lay in layouts} if per_part else {}}
        times.update(per_part)
        lay = {p: min(per_part[p], key=per_part[p].get) if per_part else layouts[0] for p in PARTS}
        times["strips"] = time_strips(vae, dtype, size, lay["vae"])
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError) as e:
        # an architecture the meta-device trace or the timings cannot run: the rule, not a failed load
        return _rule(layouts, f"calibration failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    counts = thread_candidates()
    if len(counts) > 1:
        times["threads"] = time_threads(unet, vae, dtype, size, lay, counts)
    threads = int(min(times["threads"], key=times["threads"].get)) if times.get("threads") else None
    plain = times["strips"].get("0")
    rows = min((r for r in times["strips"] if r != "0"), key=times["strips"].get, default="0")
    if plain is not None and rows != "0" and times["strips"][rows] > STRIP_SLACK * plain:
        rows = "0"
    if not times["strips"]:
        rows = str(strips.ROWS)  # the stages are too small for strips to run at this size: keep the default
    choices = _choices(lay, int(rows), "measured", size, times, time.perf_counter() - t0, threads)
    _write(path, key, choices)
    return choices


def busy() -> tuple[float | None, int]:
    """(load average, cores) when the machine is too busy for timings to mean anything, else (None, cores)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None, cores
    return (load, cores) if load > BUSY_LOAD * cores else (None, cores)


def _rule(layouts: list[str], why: str) -> Choices:
    """The choice without timings: channels-last, weights packed only on AVX-512 CPUs (packing paid on one
    and cost on an AVX2-only one; docs/performance.md), strips of ``strips.ROWS`` rows (memory)."""
    wanted = "channels_last+packed" if "avx512f" in machine().flags else "channels_last"
    lay = wanted if wanted in layouts else max(layouts, key=LAYOUTS.index)
    return _choices({p: lay for p in PARTS}, strips.ROWS, f"rule: {why}")


def _choices(layout: dict, rows: int, how: str, size=(0, 0), times=None, seconds=0.0, threads=None) -> Choices:
    """Choices from {part: layout} and the rest; threads default to torch's current count."""
    threads = threads or torch.get_num_threads()
    return Choices(layout["unet"], layout["vae"], rows, threads, how, size, times or {}, seconds)


def thread_candidates() -> list[int]:
    """The thread counts worth timing: torch's default (one per physical core) and the CPUs this process
    may run on, where they differ (hyper-threads; a cpuset or affinity smaller than the machine). One
    count, nothing to time: that one; [] where ``THREAD_VARS`` set it (the user's choice, kept)."""
    if any(os.environ.get(k) for k in THREAD_VARS):
        return []
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return sorted({torch.get_num_threads(), usable})


# ------------------------------------------------------------------------------------------ the cache


def cache_file() -> Path:
    from ...io.cache import cache_dir

    return cache_dir() / "calibration.json"


def cache_key(unet, vae, dtype, size, layouts) -> str:
    m = machine()
    ident = {
        "cpu": m.cpu,
        "flags": m.flags,
        "isa": m.isa,
        "torch": m.torch,
        "threads": m.threads,
        "dtype": str(dtype),
        "size": list(size),
        "layouts": list(layouts),
        "version": CACHE_VERSION,
        "unet": _config(unet),
        "vae": _config(vae),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _config(model) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def _read(path: Path) -> dict:
    """{key: record} from the cache; {} when missing, unreadable or not what this version writes."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"] if data.get("version") == CACHE_VERSION else {}
        return {k: v for k, v in entries.items() if _valid(v)}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def _valid(r) -> bool:
    return (
        isinstance(r, dict)
        and r.get("unet") in LAYOUTS
        and r.get("vae") in LAYOUTS
        and isinstance(r.get("strip_rows"), int)
        and r["strip_rows"] >= 0
        and isinstance(r.get("times"), dict)
        and isinstance(r.get("threads"), int)
        and isinstance(r.get("size"), list)
        and len(r["size"]) == 2
        and set(r) <= {*Choices.__dataclass_fields__, "machine"}
    )


def _write(path: Path, key: str, choices: Choices) -> None:
    """Add ``choices`` under ``key``; a cache that cannot be written only costs the next run a calibration."""
    from ...errors import LotusError
    from ...io.atomic import write_json

    entries = _read(path)
    entries[key] = {**asdict(choices), "how": "measured", "machine": asdict(machine())}
    try:
        write_json(path, {"version": CACHE_VERSION, "entries": entries})
    except (OSError, LotusError):
        pass


def cached() -> list[dict]:
    """Every calibration recorded in the cache (for `lotus doctor`)."""
    return list(_read(cache_file()).values())


# --------------------------------------------------------------------------------------- the timings


_clock = time.perf_counter  # the timings' clock (tests replace it)


def _best(fn, repeats: int = 2) -> float:
    """The fastest of ``repeats`` calls of ``fn`` after a warm-up (oneDNN picks its kernel on the first); one
    call where the warm-up took over ``LONG_CALL`` (its noise is small beside it)."""
    t0 = _clock()
    fn()
    if _clock() - t0 > LONG_CALL:
        repeats = 1
    best = math.inf
    for _ in range(repeats):
        t0 = _clock()
        fn()
        best = min(best, _clock() - t0)
    return best


def trace_convolutions(unet, vae, size: tuple[int, int]) -> list[tuple[str, torch.nn.Conv2d, tuple, int]]:
    """Every distinct convolution one prediction at ``size`` (h, w) runs: (its module, "unet" or "vae"; a
    module of it with that shape; its input's (h, w); its number of uses). Found by a shape-only run on
    the meta device."""
    calls: dict[tuple, list] = {}
    with torch.device("meta"):
        ghosts = {"unet": type(unet).from_config(unet.config), "vae": type(vae).from_config(vae.config)}
    hooks = []
    for part, ghost in ghosts.items():
        for name, m in ghost.named_modules():
            if isinstance(m, torch.nn.Conv2d):

                def record(mod, inp, out, part=part, name=name):
                    k = (
                        mod.in_channels,
                        mod.out_channels,
                        mod.kernel_size,
                        mod.stride,
                        mod.padding,
                        mod.groups,
                        tuple(inp[0].shape[-2:]),
                    )
                    calls.setdefault(k, [part, name, 0])[2] += 1

                hooks.append(m.register_forward_hook(record))
    cfg, f = unet.config, latent_factor(vae.config)
    latent = (size[0] // f, size[1] // f)
    with torch.inference_mode(), torch.device("meta"):
        ghosts["vae"].encode(torch.empty(1, vae.config.in_channels, *size))
        labels = (
            torch.empty(1, cfg.projection_class_embeddings_input_dim) if cfg.class_embed_type == "projection" else None
        )
        out = ghosts["unet"](
            torch.empty(1, cfg.in_channels, *latent),
            torch.tensor(999),
            encoder_hidden_states=torch.empty(1, 2, cfg.cross_attention_dim),
            class_labels=labels,
        )
        ghosts["vae"].decode(torch.empty(1, vae.config.latent_channels, *out.sample.shape[-2:]))
    for h in hooks:
        h.remove()
    real = {"unet": unet, "vae": vae}
    return [(part, real[part].get_submodule(name), k[-1], n) for k, (part, name, n) in calls.items()]


def _conv_estimates(conv, hw: tuple[int, int], dtype, layouts, gen) -> dict[str, float]:
    """Estimated seconds of one call of ``conv`` on an input of ``hw`` (h, w), per layout: the whole call, or
    for a layer of more than ``WHOLE_FLOP`` or ``WHOLE_BYTES`` a band of its output rows at full width (module
    doc), scaled up by the rows."""
    h, w = hw
    weight, bias = conv.weight.detach().to(dtype), None if conv.bias is None else conv.bias.detach().to(dtype)
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    flop = 2 * weight.numel() * out_h * out_w
    row_bytes = (conv.in_channels * sh * w + conv.out_channels * out_w) * weight.element_size()  # in and out
    fits = min(out_h * WHOLE_FLOP / flop, WHOLE_BYTES / row_bytes)  # rows within both limits
    rows = out_h if fits >= out_h else min(out_h, max(strips.ROWS, math.ceil(fits)))
    in_rows = min(h, max(1, (rows - 1) * sh + kh - 2 * ph))
    x = torch.randn(1, conv.in_channels, in_rows, w, generator=gen).to(dtype)
    out = {}
    for lay in layouts:
        out[lay] = _time_layout(conv, x, weight, bias, lay) * out_h / rows
        # the heap keeps what the timings freed (glibc), and it would add to the peak of the first prediction
        heap.release_freed_memory()
    return out


def _time_layout(conv, x, weight, bias, lay: str) -> float:
    """Seconds of ``conv`` with ``weight`` on ``x``, both in layout ``lay``."""
    if lay.endswith("packed"):
        w_lay = prepack.pack(weight, conv.stride, conv.padding, conv.dilation, conv.groups)
    else:
        w_lay = weight.contiguous(memory_format=torch.channels_last) if lay != "nchw" else weight
    x_lay = x.contiguous(memory_format=torch.channels_last) if lay != "nchw" else x
    return _best(lambda: prepack.conv2d(x_lay, w_lay, bias, conv.stride, conv.padding, conv.dilation, conv.groups))


def time_layouts(unet, vae, dtype, size, layouts) -> dict[str, dict[str, float]]:
    """Estimated seconds of all the convolutions of one prediction at ``size``, per module and layout:
    {"unet": {layout: s}, "vae": {layout: s}} (module doc)."""
    gen = torch.Generator().manual_seed(0)
    totals = {p: dict.fromkeys(layouts, 0.0) for p in PARTS}
    with torch.inference_mode():
        for part, conv, hw, uses in trace_convolutions(unet, vae, size):
            for lay, secs in _conv_estimates(conv, hw, dtype, layouts, gen).items():
                totals[part][lay] += uses * secs
    return totals


def time_threads(unet, vae, dtype, size, layout: dict[str, str], counts: list[int]) -> dict[str, float]:
    """Estimated seconds of the ``THREAD_LAYERS`` costliest convolutions of one prediction at ``size``, each
    in its module's ``layout`` ({part: layout}), per thread count ({"2": s, "4": s}); torch's thread count
    is restored after."""

    def cost(call) -> int:
        _, conv, (h, w), uses = call
        return uses * conv.weight.numel() * h * w // (conv.stride[0] * conv.stride[1])

    heaviest = sorted(trace_convolutions(unet, vae, size), key=cost, reverse=True)[:THREAD_LAYERS]
    before = torch.get_num_threads()
    out = {}
    try:
        with torch.inference_mode():
            for n in counts:
                torch.set_num_threads(n)
                gen = torch.Generator().manual_seed(0)
                out[str(n)] = 0.0
                for part, conv, hw, uses in heaviest:
                    out[str(n)] += uses * _conv_estimates(conv, hw, dtype, [layout[part]], gen)[layout[part]]
    finally:
        torch.set_num_threads(before)
    return out


def time_strips(vae, dtype, size, layout: str) -> dict[str, float]:
    """Seconds of the decoder's last full-resolution stage (its upsampler and a residual block) on a band
    of ``STRIP_BAND`` rows at the processing width, in ``layout``: {"0": diffusers' modules, "R": strips
    of R rows}. {} when the VAE is not one strips.py runs, or the stage is too small to run in strips."""
    import copy

    dec = getattr(vae, "decoder", None)
    if not strips.supported(vae) or not dec.up_blocks:
        return {}
    ups = [ub for ub in dec.up_blocks if ub.upsamplers]
    ub = dec.up_blocks[-1]
    f = latent_factor(vae.config)
    h, w = (size[0] // f) * f, (size[1] // f) * f
    if h * w < strips.MIN_PIXELS:
        return {}
    band, w = min(h, STRIP_BAND), min(w, STRIP_WIDTH)
    res = copy.deepcopy(ub.resnets[-1]).to(dtype)
    up = copy.deepcopy(ups[-1].upsamplers[0]).to(dtype) if ups else None
    if layout != "nchw":
        res, up = (m if m is None else m.to(memory_format=torch.channels_last) for m in (res, up))
    if layout.endswith("packed"):
        for m in (res, up):
            if m is not None:
                prepack.pack_convolutions(m)
    fmt = torch.channels_last if layout != "nchw" else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, res.in_channels, band, w, generator=gen).to(dtype).contiguous(memory_format=fmt)
    xu = (
        None
        if up is None
        else torch.randn(1, up.channels, band // 2, w // 2, generator=gen).to(dtype).contiguous(memory_format=fmt)
    )
    out = {}
    with torch.inference_mode():

        def plain():
            res(x, None)
            if up is not None:
                up(xu)

        out["0"] = _best(plain)
        clone = _best(lambda: x.clone(memory_format=fmt))  # what each striped run spends copying its input
        for rows in ROW_CHOICES:
            if rows >= band:
                continue

            def striped(rows=rows):
                strips.resnet(res, x.clone(memory_format=fmt), rows)  # it consumes its input
                if up is not None:
                    strips.upsample(up, xu, rows)

            out[str(rows)] = max(_best(striped) - clone, 0.0)
    return out
