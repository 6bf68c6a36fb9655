"""A batch that runs out of memory, item by item: smaller tries instead of a failed batch (or a failed run).

``predict_items`` runs a batch through the predictor. Where it runs out of memory (CUDA, MPS or the CPU
allocator) it frees the cached memory and retries each image alone; an image that does not fit alone is
tried once more in tiles at half the processing size; one that fails that too gets an ``InputError`` of its
own whose hint names --processing-res and --tile, and the others go on. An item's ``InputError`` (an
unreadable map: inf/NaN the fallback dtype could not cure) fails that item only: a batch that raises one
is retried image by image. Retried items say so in their sidecar (``extra["memory_fallback"]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ..errors import InputError, LotusError, UsageError
from . import gpu
from .predictor import Prediction, PredictOptions, Prepared, processing_size

OOM = "out of memory"  # what a try returns instead of the exception (whose frames would keep the tensors)


def predict_items(
    predictor,
    images: Sequence[np.ndarray | Prepared],
    opts: PredictOptions = PredictOptions(),
    predict: Callable[[list, PredictOptions], list[Prediction]] | None = None,
    *,
    tiled: Callable[[np.ndarray, PredictOptions], Prediction] | None = None,
) -> list[Prediction | LotusError]:
    """One result per image of ``images`` (uint8 RGB [H, W, 3] or ``Prepared``, one processing size, as
    ``predict_batch`` takes them), in order: its ``Prediction``, or the ``LotusError`` (an ``InputError``)
    that fails that image alone. Its message names no file: the caller adds the item's path.

    ``predict(images, opts)``: the batch function (default ``predictor.predict_batch``; tiling or ensembles
    may replace it). ``tiled(rgb, opts)``: the last try for one image that ran out of memory alone; default
    ``tiled_smaller`` for the plain prediction (``predict`` None), none for another ``predict`` unless given.
    A ``Prepared`` image has no pixels left to tile. Exceptions other than out of memory and ``LotusError``
    are raised, as ``predict`` raised them."""
    images = list(images)
    plain = predict is None
    predict = predict or predictor.predict_batch
    if tiled is None and plain:
        tiled = lambda rgb, o: tiled_smaller(predictor, rgb, o)  # noqa: E731
    got = _try(lambda: predict(images, opts))
    if isinstance(got, list):
        return got
    if len(images) == 1:
        return [_alone_failed(predictor, images[0], opts, tiled, got)]
    if got == OOM:
        gpu.free_cache(predictor.device)
    one = replace(opts, batch_size=1)
    out = []
    for im in images:
        r = _try(lambda im=im: predict([im], one))
        if isinstance(r, list):
            if got == OOM:
                r[0].extra["memory_fallback"] = f"alone: the batch of {len(images)} ran out of memory"
            out.append(r[0])
        else:
            out.append(_alone_failed(predictor, im, one, tiled, r))
    return out


def _alone_failed(predictor, image, opts: PredictOptions, tiled, why) -> Prediction | LotusError:
    """The result of an image whose try alone gave ``why`` (OOM or its LotusError): the tiled try, or an error."""
    if why != OOM:
        return why
    gpu.free_cache(predictor.device)
    h, w = image.shape[:2]
    ph, pw = processing_size(h, w, opts.processing_res)
    tiles = tiled is not None and not isinstance(image, Prepared)
    if tiles:
        r = _try(lambda: [tiled(image, opts)])
        if isinstance(r, list):
            r[0].extra["memory_fallback"] = f"tiles: {pw}x{ph} px ran out of memory alone"
            return r[0]
        gpu.free_cache(predictor.device)
        if r != OOM and not isinstance(r, UsageError):  # a UsageError: the tile plan's own "does not fit"
            return r
    return InputError(
        f"out of memory at a processing size of {pw}x{ph} px, alone{' and in tiles' if tiles else ''}",
        f"lower --processing-res (now {opts.processing_res or 'native'}) or tile it: --tile auto --tile-res 512",
    )


def _try(call) -> list | str | LotusError:
    """``call()``'s result, or OOM, or the LotusError it raised, without its traceback: the frames of a
    failed call hold the tensors that filled the memory, and they must go before the cache is freed."""
    try:
        return call()
    except LotusError as e:
        e.__traceback__ = None
        e.__context__ = e.__cause__ = None
        return e
    except Exception as e:
        if gpu.is_out_of_memory(e):
            return OOM
        raise


def tiled_smaller(predictor, rgb: np.ndarray, opts: PredictOptions) -> Prediction:
    """``rgb`` [H, W, 3] in tiles, about a quarter of the memory of one plain prediction: the global pass at
    half the processing size's long side, and tiles of that size in model pixels, overlapping by a quarter,
    that see the image at the working scale of the prediction that ran out of memory. The contract of
    ``predict_tiled`` (the plan in ``extra["tiling"]``)."""
    from .tiling import MIN_TILE, TileOptions, predict_tiled

    h, w = rgb.shape[:2]
    long = max(processing_size(h, w, opts.processing_res))
    res = max(MIN_TILE, long // 2)
    tile = max(MIN_TILE, round(res * max(h, w) / long))
    small = replace(opts, processing_res=res, batch_size=1)
    return predict_tiled(predictor, [rgb], small, TileOptions(tile=tile, tile_res=res))[0]
