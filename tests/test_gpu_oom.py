"""Out of memory, item by item (model/fallbacks.py), and compilation that survives it (model/compile.py).

No GPU here: a stand-in makes the VAE's encode raise torch.cuda.OutOfMemoryError above a number of pixels
per call, as a card with that much memory would."""

import numpy as np
import pytest
import torch

from lotus_cli.errors import InputError, LotusError
from lotus_cli.model import compile as lc
from lotus_cli.model import fallbacks as FB
from lotus_cli.model.predictor import LotusPredictor, PredictOptions, prepare

from .conftest import make_image

OPTS = PredictOptions(processing_res=64, batch_size=3)


@pytest.fixture(scope="module")
def pred(depth_g):
    return LotusPredictor.from_pretrained(depth_g, device="cpu", dtype="fp32", processing_res=64)


@pytest.fixture
def memory(pred, monkeypatch):
    """``set(pixels)``: encode runs out of memory above that many pixels per call (batch x h x w); returns the
    list of (batch, h, w) of every call, and the count of cache frees."""
    seen = {"calls": [], "freed": 0}
    encode = pred.engine.encode

    def limited(limit):
        def run(x):
            b, _, h, w = x.shape
            seen["calls"].append((b, h, w))
            if b * h * w > limit:
                big = torch.empty(1 << 20)  # the frames of the failed call hold tensors: freed before a retry
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {big.numel()} bytes")
            return encode(x)

        monkeypatch.setattr(pred.engine, "encode", run)
        return seen

    monkeypatch.setattr(FB.gpu, "free_cache", lambda device: seen.__setitem__("freed", seen["freed"] + 1))
    return limited


def images():
    return [make_image(48, 64, k) for k in range(3)]  # 48 x 64 px at processing_res 64: 3072 px each


def test_a_batch_that_fits_is_one_call(pred, memory):
    seen = memory(10**9)
    out = FB.predict_items(pred, images(), OPTS)
    assert [c[0] for c in seen["calls"]] == [3] and seen["freed"] == 0
    assert all(p.extra == {} for p in out)


def test_a_batch_out_of_memory_is_retried_image_by_image(pred, memory):
    want = [pred.predict(im, OPTS).map for im in images()]
    seen = memory(2 * 3072)  # two images fit, three do not
    out = FB.predict_items(pred, images(), OPTS)
    assert [c[0] for c in seen["calls"]] == [3, 1, 1, 1] and seen["freed"] == 1
    for p, m in zip(out, want):
        assert np.array_equal(p.map, m)  # an image's map never depends on its batch
        assert p.extra["memory_fallback"] == "alone: the batch of 3 ran out of memory"


def test_an_image_out_of_memory_alone_is_tiled_at_half_the_size(pred, memory):
    seen = memory(3000)  # not even one 48 x 64 image
    out = FB.predict_items(pred, images()[:2], OPTS)
    for p in out:
        assert p.map.shape == (48, 64) and np.isfinite(p.map).all()
        assert p.extra["memory_fallback"] == "tiles: 64x48 px ran out of memory alone"
        plan = p.extra["tiling"]
        assert plan["global_processing_size"] == [32, 24] and plan["tile_res"] == 32 and plan["tiles"] > 1
        assert plan["working_scale"] == 1.0  # the tiles see the image as the failed pass would have
    failed = [c for c in seen["calls"] if c[0] * c[1] * c[2] > 3000]
    assert failed == [(2, 48, 64), (1, 48, 64), (1, 48, 64)]  # the batch, each image alone; every tile fitted
    assert len(seen["calls"]) > len(failed) + 2 * 2  # a global pass and several tiles per image
    assert seen["freed"] == 3  # after the batch, then after each image alone


def test_an_image_that_fits_nowhere_fails_alone_with_the_fix_in_its_hint(pred, memory):
    seen = memory(600)  # tiles of 32 px (1024 px) do not fit either
    out = FB.predict_items(pred, images(), OPTS)
    assert all(isinstance(e, InputError) for e in out)
    e = out[0]
    assert e.message == "out of memory at a processing size of 64x48 px, alone and in tiles"
    assert "--processing-res (now 64)" in e.hint and "--tile" in e.hint and e.__traceback__ is None
    assert seen["freed"] >= 3


def test_only_the_image_that_does_not_fit_fails(pred, memory, monkeypatch):
    imgs = [make_image(48, 64, 0), make_image(48, 64, 1)]
    bad = imgs[1]
    predict = pred.predict_batch

    def second_is_huge(batch, opts):
        if any(im is bad for im in batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return predict(batch, opts)

    out = FB.predict_items(pred, imgs, OPTS, second_is_huge)
    assert np.array_equal(out[0].map, pred.predict(imgs[0], OPTS).map)
    # another predict than the plain one gets no tiled try unless one is given
    assert isinstance(out[1], InputError) and out[1].message.endswith("alone")
    out = FB.predict_items(pred, imgs, OPTS, second_is_huge, tiled=lambda rgb, o: FB.tiled_smaller(pred, rgb, o))
    assert out[1].map.shape == (48, 64) and out[1].extra["memory_fallback"].startswith("tiles")


def test_a_prepared_image_has_no_pixels_left_to_tile(pred, memory):
    memory(3000)
    out = FB.predict_items(pred, [prepare(make_image(48, 64), 64)], OPTS)
    assert isinstance(out[0], InputError) and out[0].message.endswith("alone")


def test_an_item_error_fails_that_item_only(pred):
    """A batch raising an item's LotusError (e.g. inf/NaN no dtype cured) is retried image by image."""
    imgs = images()
    predict = pred.predict_batch

    def nan_for_the_first(batch, opts):
        if any(im is imgs[0] for im in batch):
            raise InputError("the VAE gave inf/NaN in float16 and bfloat16 at 64x48 px (decode)", "--dtype fp32")
        return predict(batch, opts)

    out = FB.predict_items(pred, imgs, OPTS, nan_for_the_first)
    assert isinstance(out[0], LotusError) and "inf/NaN" in str(out[0])
    assert [p.map.shape for p in out[1:]] == [(48, 64), (48, 64)] and "memory_fallback" not in out[1].extra


def test_other_failures_are_raised_as_they_are(pred):
    def bug(batch, opts):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        FB.predict_items(pred, images(), OPTS, bug)


# ---------------------------------------------------------------------------------------- compiling


def test_out_of_memory_is_no_compile_failure():
    """A compiled call that runs out of memory raises it (the caller retries smaller) and stays compiled;
    before, it was taken for a compiler failure and the run went eager for good."""
    module = torch.nn.Identity()
    calls = []

    def compiled(x):
        calls.append(x)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return x * 2

    wrapper = lc._CompiledOrEager(module, compiled)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        wrapper(torch.ones(2))
    assert wrapper.compiled is compiled and wrapper.reason is None
    assert torch.equal(wrapper(torch.ones(2)), torch.full((2,), 2.0))  # the compiled call, not eager


def test_a_compiler_failure_still_falls_back_to_eager():
    def compiled(x):
        raise RuntimeError("inductor: simulated crash")

    wrapper = lc._CompiledOrEager(torch.nn.Identity(), compiled)
    assert torch.equal(wrapper(torch.ones(2)), torch.ones(2))
    assert wrapper.compiled is None and "simulated crash" in wrapper.reason
