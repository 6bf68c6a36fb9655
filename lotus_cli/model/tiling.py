"""Seam-free tiling for high-resolution inputs: a global pass for the layout, overlapping tiles for detail.

For an RGB image of H x W input pixels (rows y down, columns x right):

1. global pass: the whole image at ``processing_res`` (long side), kept at that size as the layout;
2. tiles: overlapping windows of ``tile`` input pixels, each fed to the model at ``tile_res`` (long side),
   so the image is seen at a working resolution of ``tile_res / tile`` model pixels per input pixel;
   Lotus-G tiles take their noise from ONE field for the whole image (seeded by ``seed``), cropped
   per tile at the nearest latent cell, so overlapping tiles see the same noise at the same place;
3. depth: each tile's scale and shift are fitted to the global pass (robust least squares, in the
   model's own output space: disparity for the disparity models, depth for the depth models), comparing
   the two at the global pass's resolution so that detail the global pass lacks cannot bias the fit;
   normals need no fit;
4. blending: per axis, a tile's weight is 1 in its core and a smoothstep ramp across each band it shares
   with a neighbour, the neighbour's ramp being its complement, so weights sum to exactly 1 everywhere and
   fall to 0 at every inner tile border; normals are blended as vectors and renormalised;
5. the result has the input's full resolution: depth [H, W] in [0, 1], normals [H, W, 3] unit vectors.

``auto`` skips tiling when the global pass already sees nearly every pixel, maps one input pixel to one
model pixel up to 4x the global pass's detail (larger tiles beyond that), and lowers tile_res and the tiles
per model call until the estimated peak fits the memory budget, so peak memory is bounded whatever the
input size; only the input image and the output map grow with it. A tile too flat to fit (sky, a blank
wall) keeps its own detail at unit scale, levelled to the global pass.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..geometry.camera import robust_scale_shift
from .cpu import release_memory
from .predictor import EnsembleOptions, Prediction, PredictOptions, noise_for, processing_size, unflip

DEFAULT_TILE_RES = 768  # Lotus's training resolution, used when processing_res is 0 (native)
MIN_TILE = 32  # input pixels; below this a tile holds too few latent cells to mean anything
MIN_AUTO_TILE_RES = 256  # auto never shrinks tiles below this to meet a budget
# Peak activation bytes per model pixel, as a multiple of the VAE's first-block width x element size:
# the decoder's last up-block holds about three full-resolution activations of 2-3x that width at once.
# Calibrated on the full-size SD2 VAE: 1.13 GB above the weights at 512 x 512 px, fp32.
ACTIVATION_FACTOR = 9.0
FIT_SAMPLES = 16384  # enough pixels to fix two numbers; more only costs time
# A tile's map spans [0, 1] over its own content, which in global units spans at most the whole range: a fitted
# scale above MAX_TILE_SCALE is noise being blown up. A tile whose contrast is below FLAT_TILE of the
# global pass's over it is "flat".
MAX_TILE_SCALE = 4.0
FLAT_TILE = 0.02
MAX_DETAIL = 4.0  # auto: tiles at most this many times finer than the global pass (more tiles, less context)
MIN_DETAIL = 1.3  # auto: below this gain over the global pass, tiling is not worth its cost


# ------------------------------------------------------------------------------------------ options


def parse_bytes(text: str | int | None) -> int | None:
    """'6G', '6GB', '512M', '1.5g', '4000000000' -> bytes (powers of 1024 for K/M/G/T); None/'auto' -> None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if str(text).strip().lower() == "auto":
        return None
    if not m:
        raise UsageError(f"--max-memory {text!r} is not a size", "use bytes or a size like 6G, 512M, or auto")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


@dataclass(frozen=True)
class TileOptions:
    """How to tile; validated once, before any work.

    ``tile``: "auto" or the tile side in input pixels; ``overlap``: fraction of the tile shared with each
    neighbour, 0 .. 0.5; ``tile_res``: long side of a tile as fed to the model (None: the processing
    resolution, or 768 when that is 0); ``max_memory``: budget in bytes for weights + one batch of
    activations (None: auto, half of the free device memory on top of the weights). Strings are accepted
    for ``tile`` ("512") and ``max_memory`` ("6G") as typed on the command line.
    """

    tile: str | int = "auto"
    overlap: float = 0.25
    tile_res: int | None = None
    max_memory: int | str | None = None

    def __post_init__(self):
        tile = self.tile
        if isinstance(tile, str) and tile.strip().isdigit():
            tile = int(tile)
        if isinstance(tile, str):
            tile = tile.strip().lower()
        if tile != "auto" and not (isinstance(tile, int) and tile >= MIN_TILE):
            raise UsageError(
                f"--tile must be auto or a size of at least {MIN_TILE} pixels, not {self.tile!r}",
                "e.g. --tile auto or --tile 768",
            )
        object.__setattr__(self, "tile", tile)
        if not 0.0 <= self.overlap <= 0.5:
            raise UsageError(
                f"--overlap must be a fraction in 0 .. 0.5, not {self.overlap}",
                "0.25 is a good default; above 0.5 a pixel would lie in three tiles",
            )
        if self.tile_res is not None and self.tile_res < MIN_TILE:
            raise UsageError(f"--tile-res must be at least {MIN_TILE}, not {self.tile_res}", "Lotus was trained at 768")
        budget = parse_bytes(self.max_memory)
        if budget is not None and budget <= 0:
            raise UsageError(f"--max-memory must be positive, not {self.max_memory!r}", "e.g. 6G, or auto")
        object.__setattr__(self, "max_memory", budget)


# --------------------------------------------------------------------------------------- memory model


@dataclass(frozen=True)
class MemoryCost:
    """Estimated device memory of a predictor: ``weights`` bytes held, plus ``per_pixel`` activation bytes
    per model-input pixel of each image in a batch (the peak of encode, UNet and decode)."""

    weights: int = 0
    per_pixel: float = 0.0

    def peak(self, pixels: int, batch: int = 1) -> int:
        return int(self.weights + self.per_pixel * pixels * batch)


def memory_cost(predictor) -> MemoryCost:
    """Estimate from the loaded modules' sizes and the VAE config; zero for objects without them."""
    vae, unet = getattr(predictor, "vae", None), getattr(predictor, "unet", None)
    if vae is None or unet is None:
        return MemoryCost()
    weights = predictor.weight_bytes()
    elem = next(vae.parameters()).element_size()
    return MemoryCost(weights, ACTIVATION_FACTOR * vae.config.block_out_channels[0] * elem)


def device_budget(device, cost: MemoryCost) -> int:
    """The auto budget: the weights plus half the memory free for activations now. CUDA: the device's free
    memory plus what PyTorch's allocator holds cached but unused (so the plan does not shrink once the first
    image has filled the cache: plans, and the maps, do not depend on the order of the images); MPS: the
    recommended working set less what tensors hold; else RAM available."""
    import torch

    kind = getattr(device, "type", "cpu")
    if kind == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    elif kind == "mps":  # unified memory: Metal's recommended working set (torch 2.5+), else 2/3 of the RAM
        limit = getattr(torch.mps, "recommended_max_memory", None)
        total = limit() if limit else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 2 // 3
        free = max(0, total - torch.mps.current_allocated_memory())
    else:
        try:
            info = Path("/proc/meminfo").read_text()
            free = int(re.search(r"MemAvailable:\s+(\d+)", info).group(1)) * 1024
        except (OSError, AttributeError):
            free = 8 * 1024**3  # no /proc (macOS): assume a modest machine
    return int(cost.weights + free // 2)


# ------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles go, at what resolution and in what batches. Sizes are (h, w); starts are the
    top rows (``ys``) and left columns (``xs``) of the tile grid, in input pixels. No tiles (``ys`` and
    ``xs`` empty) means the global pass already sees every input pixel."""

    height: int
    width: int
    mode: str  # "auto" | "fixed"
    global_size: tuple[int, int]  # processing size of the global pass
    tile_size: tuple[int, int]  # input pixels per tile
    tile_processing_size: tuple[int, int]  # model pixels per tile
    tile_res: int
    overlap: float  # requested fraction
    ys: tuple[int, ...] = ()
    xs: tuple[int, ...] = ()
    batch: int = 1  # tiles per model call
    budget: int | None = None  # bytes
    estimated_peak: int = 0  # bytes: weights + the larger of the global pass and one batch of tiles

    @property
    def tiles(self) -> list[tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) of every tile, row by row."""
        th, tw = self.tile_size
        return [(y, y + th, x, x + tw) for y in self.ys for x in self.xs]

    def overlap_px(self) -> tuple[int, int]:
        """The narrowest band shared by neighbouring tiles, (rows, columns); 0 with one tile per axis."""

        def narrowest(starts, t):
            return min((a + t - b for a, b in zip(starts, starts[1:])), default=0)

        return narrowest(self.ys, self.tile_size[0]), narrowest(self.xs, self.tile_size[1])

    def weights(self, y0: int, x0: int) -> np.ndarray:
        """Blend weights [th, tw] float32 of the tile at (y0, x0); over all tiles they sum to 1."""
        wy = axis_weights(self.ys, self.tile_size[0], self.ys.index(y0))
        wx = axis_weights(self.xs, self.tile_size[1], self.xs.index(x0))
        return wy[:, None] * wx[None, :]

    def to_json(self) -> dict:
        """The sidecar record; sizes as [w, h] like the sidecar's input_size."""
        ov = self.overlap_px()
        d = asdict(self)
        return {
            "mode": self.mode,
            "input_size": [self.width, self.height],
            "global_processing_size": [self.global_size[1], self.global_size[0]],
            "tile_size": [self.tile_size[1], self.tile_size[0]],
            "tile_processing_size": [self.tile_processing_size[1], self.tile_processing_size[0]],
            "tile_res": self.tile_res,
            "working_scale": round(self.tile_processing_size[1] / self.tile_size[1], 6),
            "overlap": self.overlap,
            "overlap_px": [ov[1], ov[0]],
            "grid": [len(self.xs), len(self.ys)],
            "tiles": len(self.xs) * len(self.ys),
            "x_starts": list(d["xs"]),
            "y_starts": list(d["ys"]),
            "batch": self.batch,
            "budget_bytes": self.budget,
            "estimated_peak_bytes": self.estimated_peak,
            "blend": "smoothstep ramps across each shared band, weights summing to 1",
        }


def axis_starts(length: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Evenly spaced tile starts covering [0, length) with neighbours sharing >= overlap * tile pixels."""
    if length <= tile:
        return (0,)
    stride = max(1, math.floor(tile * (1 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return tuple(round(i * (length - tile) / (n - 1)) for i in range(n))


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def transitions(starts: tuple[int, ...], tile: int) -> list[tuple[float, float]]:
    """(a, b) of the band where weight passes from tile i to tile i+1: centred in their shared pixels,
    as wide as that share but never wider than the smallest spacing, so that no two bands meet and no
    pixel is ever blended from three tiles."""
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    half = [min((tile - g) / 2, min(gaps) / 2) for g in gaps]
    mids = [(b + a + tile) / 2 for a, b in zip(starts, starts[1:])]
    return [(c - h, c + h) for c, h in zip(mids, half)]


def axis_weights(starts: tuple[int, ...], tile: int, i: int) -> np.ndarray:
    """1-D weights [tile] of tile ``i`` at its pixel centres: 1 in its core, a smoothstep rise across the
    band shared with tile i-1 and a fall across the band shared with tile i+1; a neighbour's ramp is the
    complement, so over all tiles the weights sum to 1 at every pixel."""
    x = np.arange(starts[i], starts[i] + tile, dtype=np.float64) + 0.5
    bands = transitions(starts, tile)
    w = np.ones(tile)
    if i > 0:
        a, b = bands[i - 1]
        w *= smoothstep((x - a) / max(b - a, 1e-9))
    if i + 1 < len(starts):
        a, b = bands[i]
        w *= 1 - smoothstep((x - a) / max(b - a, 1e-9))
    return w.astype(np.float32)


def plan_tiles(
    height: int,
    width: int,
    topts: TileOptions = TileOptions(),
    *,
    processing_res: int = 768,
    batch_size: int = 1,
    cost: MemoryCost = MemoryCost(),
    budget: int | None = None,
) -> TilePlan:
    """The tiling of an H x W image. Pure: ``budget`` (bytes, None = unbounded) comes from the caller.

    auto: none when the global pass already sees the image at MIN_DETAIL (1.3) input pixels per model pixel
    or finer; else tiles of tile_res input pixels (one model pixel per input pixel), made larger for big
    images so that they are at most MAX_DETAIL (4) times finer than the global pass (each tile keeps enough
    context, and a 64 MP photo needs tens of tiles, not hundreds); tile_res shrinks (not below 256) until
    one tile fits the budget. The tiles per model call are ``batch_size``, lowered to fit. Raises
    UsageError when the global pass or an explicitly sized tile cannot fit the budget.
    """
    auto = topts.tile == "auto"
    res = topts.tile_res or processing_res or DEFAULT_TILE_RES
    gsize = processing_size(height, width, processing_res)
    fits = lambda px, b=1: budget is None or cost.peak(px, b) <= budget
    # the budget is the user's --max-memory, or the auto one the caller worked out: say which
    given = topts.max_memory is not None
    limit = f"--max-memory is {_gb(budget)}" if given else f"the memory free for it is {_gb(budget)} (auto)"
    more = "raise --max-memory" if given else "free device memory"
    if not fits(gsize[0] * gsize[1]):
        raise UsageError(
            f"the global pass at --processing-res {processing_res} needs about "
            f"{_gb(cost.peak(gsize[0] * gsize[1]))} but {limit}",
            f"lower --processing-res or {more}",
        )
    detail = max(height, width) / processing_res if processing_res else 1.0  # input px per global model px
    global_sees_all = detail < MIN_DETAIL
    while not (auto and global_sees_all) and not fits(res * res):
        if not (auto and topts.tile_res is None) or res - 64 < MIN_AUTO_TILE_RES:
            raise UsageError(
                f"a tile at --tile-res {res} needs about {_gb(cost.peak(res * res))} but {limit}",
                f"lower --tile-res or {more}",
            )
        res -= 64
    tile = round(res * max(1.0, detail / MAX_DETAIL)) if auto else topts.tile
    th, tw = min(tile, height), min(tile, width)
    tproc = processing_size(th, tw, res)
    ys, xs = (
        ((), ())
        if (auto and global_sees_all)
        else (axis_starts(height, th, topts.overlap), axis_starts(width, tw, topts.overlap))
    )
    n = len(ys) * len(xs)
    tile_px = tproc[0] * tproc[1]
    batch = max(1, min(batch_size, n or 1))
    while batch > 1 and not fits(tile_px, batch):
        batch -= 1
    peak = max(cost.peak(gsize[0] * gsize[1]), cost.peak(tile_px, batch) if n else 0)
    return TilePlan(
        height,
        width,
        "auto" if auto else "fixed",
        gsize,
        (th, tw),
        tproc,
        res,
        topts.overlap,
        ys,
        xs,
        batch,
        budget,
        peak,
    )


def _gb(n: int | None) -> str:
    if n is None:
        return "unbounded"
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


# ---------------------------------------------------------------------------------------- prediction


def predict_tiled(
    predictor,
    images: list[np.ndarray],
    opts: PredictOptions = PredictOptions(),
    topts: TileOptions = TileOptions(),
    progress: Callable[[TilePlan, int, int], None] | None = None,
) -> list[Prediction]:
    """Tiled prediction of uint8 RGB images [H, W, 3], one image at a time; the contract of
    ``LotusPredictor.predict_batch`` (maps at each input's full size, in the predictor's kind and
    ``opts.frame``), with the plan and the per-tile depth fits in ``extra["tiling"]``.
    Tiles go through the predictor ``plan.batch`` at a time (``opts.batch_size``, lowered to fit
    ``topts.max_memory``). ``progress(plan, done, total)``: told the plan before any tile runs (done 0), then
    after each tile (a large image takes minutes)."""
    import torch

    with torch.inference_mode():
        return [_predict_one(predictor, im, opts, topts, progress=progress)[0] for im in images]


def predict_tiled_ensemble(
    predictor,
    images: list[np.ndarray],
    opts: PredictOptions = PredictOptions(),
    topts: TileOptions = TileOptions(),
    eopts: EnsembleOptions = EnsembleOptions(),
    progress: Callable[[TilePlan, int, int], None] | None = None,
) -> list[Prediction]:
    """Uncertainty with tiling (``progress`` as for ``predict_tiled``, over every sample's tiles): the contract
    of ``LotusPredictor.predict_ensemble`` (map = spread, layers["mean"]),
    each sample a whole tiled prediction with seed ``opts.seed + k`` (and, with ``tta="flip"``, of the mirrored
    image too). As in the untiled ensemble, the latents (the global pass's and every tile's) are encoded
    once per view and shared by the samples."""
    import torch

    seeds = predictor.ensemble_seeds(opts, eopts)
    out = []
    with torch.inference_mode():
        for rgb in images:
            t0, maps, plan, extra = time.perf_counter(), [], None, {}
            for flipped, view in enumerate([rgb, rgb[:, ::-1]] if eopts.tta == "flip" else [rgb]):
                for p in _predict_one(predictor, np.ascontiguousarray(view), opts, topts, seeds, progress):
                    maps.append(unflip(p.map, predictor.task) if flipped else p.map)
                    plan = plan or p.extra["tiling"]
                    extra.update({k: v for k, v in p.extra.items() if k == "vae_fallback"})
            out.append(
                predictor.ensemble_prediction(
                    maps, seeds, eopts, p.processing_size, time.perf_counter() - t0, tiling=plan, **extra
                )
            )
    return out


def _predict_one(
    predictor,
    rgb: np.ndarray,
    opts: PredictOptions,
    topts: TileOptions,
    seeds: list[int] | None = None,
    progress: Callable[[TilePlan, int, int], None] | None = None,
) -> list[Prediction]:
    """One image, one tiled prediction per seed in ``seeds`` (default: ``[opts.seed]``); the global pass's and
    the tiles' latents are encoded once and shared by the seeds (G noise differs per seed)."""
    t0 = time.perf_counter()
    h, w = rgb.shape[:2]
    seeds = [opts.seed] if seeds is None else seeds
    redone_before = getattr(predictor, "vae_redone", 0)
    cost = memory_cost(predictor)
    budget = topts.max_memory if topts.max_memory is not None else device_budget(predictor.device, cost)
    plan = plan_tiles(
        h, w, topts, processing_res=opts.processing_res, batch_size=opts.batch_size, cost=cost, budget=budget
    )
    total = len(plan.tiles) * len(seeds)
    tick = (lambda done: progress(plan, done, total)) if progress and total else (lambda done: None)
    tick(0)
    x = model_input(predictor, rgb, plan.global_size)  # [1, 3, h, w]
    release_memory()  # the full-width float strips model_input made and freed (tens of MB each)
    z_global = predictor.encode(x, opts.latent, [opts.seed])  # [1, 4, ., .]
    del x
    z_tiles = _tile_latents(predictor, rgb, plan, opts)  # [(boxes, [b, 4, lh, lw])], encoded once
    if len(seeds) > 1:
        z_tiles = list(z_tiles)  # kept for every seed; one seed streams them, holding one batch at a time
    out = []
    for k, seed in enumerate(seeds):
        noise = predictor.noise([seed], tuple(z_global.shape[-2:])) if predictor.family == "g" else None
        decoded = predictor.decode(predictor.denoise(z_global, noise))  # [1, 3, h', w'] in [0, 1]
        m, record = _blend(predictor, decoded, z_tiles, plan, opts, seed, lambda i, k=k: tick(k * len(plan.tiles) + i))
        out.append(Prediction(m, plan.global_size, 0.0, {"tiling": record}))
    for p in out:
        p.seconds = (time.perf_counter() - t0) / len(out)
        if getattr(predictor, "vae_redone", 0) != redone_before:  # a tile or the global pass overflowed in fp16
            p.extra.update(predictor.fallback_note())
    return out


def _blend(predictor, decoded, z_tiles, plan: TilePlan, opts: PredictOptions, seed: int, tick=lambda done: None):
    """The global pass ``decoded`` [1, 3, h', w'] and the tiles (denoised with ``seed``'s noise field) ->
    (map at the input's full size, the sidecar's tiling record)."""
    from ..geometry.camera import convert_normals

    h, w = plan.height, plan.width
    record = plan.to_json()
    if not plan.tiles:
        return predictor.finish(decoded, (h, w), opts.resample, opts.frame), record
    layout = _layout(predictor, decoded)  # [1, C, h', w']
    depth = predictor.task != "normal"
    out = np.zeros((h, w) if depth else (h, w, 3), np.float32)
    fits = []
    for i, (m, (y0, y1, x0, x1)) in enumerate(_tile_maps(predictor, z_tiles, plan, opts, seed), 1):
        tick(i)
        if depth:
            s, b = _fit(m, layout, (y0, y1, x0, x1), (h, w))
            m = s * m + b  # in place of the tile's own scale and shift: the global pass's
            fits.append([round(s, 5), round(b, 5)])
        wt = plan.weights(y0, x0)
        out[y0:y1, x0:x1] += wt * m if depth else wt[..., None] * m
    if depth:
        np.clip(out, 0.0, 1.0, out=out)
        record["depth_fit"] = {
            "space": predictor.kind,
            "method": "robust least squares (median/MAD start, "
            "3 trimmed refits) against the global pass at its resolution",
            "scale_shift": fits,
        }
    else:
        out /= np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-6)
        if opts.frame != "lotus":
            out = convert_normals(out, opts.frame)
    record["noise"] = "one field for the image, cropped per tile" if predictor.family == "g" else None
    return out, record


def model_input(predictor, rgb: np.ndarray, size: tuple[int, int], rows: int = 512):
    """uint8 [H, W, 3] -> the model input [1, C, *size] (predictor.to_tensor then predictor.resize), without
    a float copy of the whole image: the antialiased resize is separable, so rows are narrowed strip by
    strip and the strips then resized in height (the same numbers as one resize)."""
    import torch

    if rgb.shape[0] <= rows:
        return predictor.resize(predictor.to_tensor(rgb), size)
    strips = [
        predictor.resize(predictor.to_tensor(rgb[i : i + rows]), (min(rows, rgb.shape[0] - i), size[1]))
        for i in range(0, rgb.shape[0], rows)
    ]
    return predictor.resize(torch.cat(strips, dim=2), size)  # [1, C, H, w] -> [1, C, h, w]


def _layout(predictor, decoded):
    """The global pass as the value fitted against: depth [1, 1, h', w'] (channel mean, as finish does), or
    the decoded normals [1, 3, h', w']."""
    return decoded.float().cpu().mean(dim=1, keepdim=True) if predictor.task != "normal" else decoded.float().cpu()


def _tile_latents(predictor, rgb, plan: TilePlan, opts):
    """Yield (boxes, latents [b, 4, lh, lw]) per batch of ``plan.batch`` tiles."""
    import torch

    tiles = plan.tiles
    for i in range(0, len(tiles), plan.batch):
        boxes = tiles[i : i + plan.batch]
        x = torch.cat(
            [
                predictor.resize(predictor.to_tensor(rgb[y0:y1, x0:x1]), plan.tile_processing_size)
                for y0, y1, x0, x1 in boxes
            ]
        )  # [b, 3, th', tw']
        yield boxes, predictor.encode(x, opts.latent, [opts.seed] * len(boxes))  # [b, 4, lh, lw]


def _tile_maps(predictor, z_tiles, plan: TilePlan, opts, seed: int):
    """Yield (map, box) per tile: map in the predictor's kind at the tile's input size, normals in Lotus's
    frame; G noise cropped from one field for the whole image (``seed``) at the working resolution."""
    import torch

    field = _noise_field(predictor, plan, seed) if predictor.family == "g" else None
    for boxes, z in z_tiles:
        noise = None if field is None else torch.cat([_crop_noise(field, plan, box, z.shape[-2:]) for box in boxes])
        decoded = predictor.decode(predictor.denoise(z, noise))  # [b, 3, lh*f, lw*f]
        for j, (y0, y1, x0, x1) in enumerate(boxes):
            yield predictor.finish(decoded[j : j + 1], (y1 - y0, x1 - x0), opts.resample, "lotus"), boxes[j]


def _noise_field(predictor, plan: TilePlan, seed: int):
    """G noise [1, C, Hl, Wl] for the whole image at the tiles' latent resolution (a single tile that
    is the whole image gets exactly the noise of a plain prediction at that size)."""
    f = predictor.latent_factor
    (th, tw), (ph, pw) = plan.tile_size, plan.tile_processing_size
    hl = max(ph // f, int(plan.height * ph / th / f))
    wl = max(pw // f, int(plan.width * pw / tw / f))
    return noise_for(seed, (1, predictor.latent_channels, hl, wl))


def _crop_noise(field, plan: TilePlan, box, latent_hw):
    """The field's cells under the tile, at the nearest latent cell."""
    f = plan.tile_processing_size[0] / plan.tile_size[0], plan.tile_processing_size[1] / plan.tile_size[1]
    lh, lw = latent_hw
    cell = plan.tile_processing_size[0] / lh, plan.tile_processing_size[1] / lw  # model pixels per cell
    ly = min(round(box[0] * f[0] / cell[0]), field.shape[2] - lh)
    lx = min(round(box[2] * f[1] / cell[1]), field.shape[3] - lw)
    return field[:, :, ly : ly + lh, lx : lx + lw]


def sample_layout(layout, box, size, out_hw):
    """The layout [1, C, h', w'] (covering the whole H x W image, ``size``) sampled bilinearly at the
    centres of an out_hw grid over box (y0, y1, x0, x1) -> float32 [C, *out_hw] (numpy)."""
    import torch
    import torch.nn.functional as F

    (y0, y1, x0, x1), (h, w), (oh, ow) = box, size, out_hw
    ys = y0 + (torch.arange(oh, dtype=torch.float64) + 0.5) * (y1 - y0) / oh  # input-pixel coordinates
    xs = x0 + (torch.arange(ow, dtype=torch.float64) + 0.5) * (x1 - x0) / ow
    gy, gx = (2 * ys / h - 1).float(), (2 * xs / w - 1).float()  # align_corners=False: -1, 1 = image edges
    grid = torch.stack([gx.expand(oh, ow), gy[:, None].expand(oh, ow)], dim=-1)[None]  # [1, oh, ow, 2]
    return F.grid_sample(layout, grid, mode="bilinear", padding_mode="border", align_corners=False)[0].numpy()


def _fit(m: np.ndarray, layout, box, size) -> tuple[float, float]:
    """(s, b) with s * tile + b ~ the global pass over the tile. Both are taken through the same filter
    down to the global pass's resolution (the global upsampled over the tile, then both averaged down),
    so detail only the tile has cannot dilute the scale, and identical content fits to exactly (1, 0)."""
    import torch
    import torch.nn.functional as F

    gh, gw = layout.shape[-2:]
    oh = max(2, round((box[1] - box[0]) * gh / size[0]))
    ow = max(2, round((box[3] - box[2]) * gw / size[1]))
    if oh * ow > FIT_SAMPLES:  # enough pixels to fix two numbers
        k = math.sqrt(oh * ow / FIT_SAMPLES)
        oh, ow = max(2, int(oh / k)), max(2, int(ow / k))
    ref = sample_layout(layout, box, size, m.shape)  # [1, th, tw]
    both = torch.from_numpy(np.stack([m, ref[0]]))[:, None]  # [2, 1, th, tw]
    coarse, ref_c = F.interpolate(both, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)[
        :, 0
    ].numpy()
    s, b, _ = robust_scale_shift(coarse, ref_c)
    flat = np.std(coarse) < FLAT_TILE * max(np.std(ref_c), 1e-6)
    if flat or not (np.isfinite(s) and 0 < s <= MAX_TILE_SCALE):
        # A tile with (almost) no contrast of its own (sky, a blank wall): its scale cannot be fitted, so its
        # detail stays at unit scale. An inverted or wild fit: the contrast ratio, at most MAX_TILE_SCALE.
        # Either way the level comes from the global pass.
        s = 1.0 if flat else float(np.clip(np.std(ref_c) / max(np.std(coarse), 1e-6), 0.0, MAX_TILE_SCALE))
        b = float(np.median(ref_c) - s * np.median(coarse))
    return float(s), float(b)
