"""The fp16 path (the GPU default), run on the CPU: a native-size load, and every decoded batch checked for
inf/NaN, an item that overflowed in fp16 redone in the fallback dtype and saying so, never a NaN map."""

import numpy as np
import pytest
import torch

from lotus_cli.errors import InputError
from lotus_cli.model.predictor import EnsembleOptions, LotusPredictor, PredictOptions

from .conftest import make_image


def fp16(folder, processing_res=64):
    return LotusPredictor.from_pretrained(folder, device="cpu", dtype="fp16", processing_res=processing_res)


def overflow_in_fp16(vae):
    """Activations beyond fp16's 65504 in the decoder's first layer, finite in bf16 and fp32: fp16 gives
    inf there and NaN after the next GroupNorm, as SD's VAE does on large images."""
    with torch.no_grad():
        vae.decoder.conv_in.bias.fill_(65000)
        vae.decoder.conv_in.weight.mul_(3000)


def test_fp16_at_native_size_loads_and_predicts(depth_g):
    """--processing-res 0 gives no size to probe the VAE at: no probe at load (it ran a convolution on an
    empty image and crashed), the items are checked one by one instead."""
    pred = fp16(depth_g, processing_res=0)
    assert pred.vae_dtype == torch.float16 and pred.warnings == [
        "fp16 on a CPU is very slow and no more exact; fp32 is the CPU default"
    ]
    out = pred.predict(make_image(40, 56), PredictOptions(processing_res=0))
    assert out.map.shape == (40, 56) and np.isfinite(out.map).all() and out.extra == {}


def test_an_item_fp16_overflows_on_is_redone_in_the_fallback_dtype_and_says_so(depth_g):
    pred = fp16(depth_g, processing_res=0)  # no probe at load: the VAE stays fp16
    overflow_in_fp16(pred.vae)
    images = [make_image(32, 48, 0), make_image(32, 48, 1)]
    out = pred.predict_batch(images, PredictOptions(processing_res=0, batch_size=2))
    for p in out:
        assert np.isfinite(p.map).all()
        assert p.extra["vae_fallback"]["dtype"] == "bfloat16" and "float16" in p.extra["vae_fallback"]["reason"]
    assert pred.vae_redone == 2 and next(pred.vae.parameters()).dtype == torch.float16  # a copy ran them
    # what the whole VAE gives in bf16 on the same (fp16-encoded) latents: the redone decode is that one
    fb, dtype = pred._fallback_vae()
    assert dtype == torch.bfloat16 and next(fb.parameters()).dtype == torch.bfloat16


def test_only_the_item_that_overflowed_is_redone(depth_g):
    pred = fp16(depth_g)
    images = [make_image(32, 48, 0), make_image(32, 48, 1)]
    opts = PredictOptions(processing_res=64, batch_size=2)
    clean = pred.predict_batch(images, opts)
    decode = pred.engine.decode

    def second_row_nan(z, f):
        y = decode(z, f).clone()
        y[1, :, :4] = float("nan")  # the second item's decode went wrong in fp16
        return y

    pred.engine.decode = second_row_nan
    out = pred.predict_batch(images, opts)
    assert out[0].extra == {} and np.array_equal(out[0].map, clean[0].map)  # the other item: untouched
    assert out[1].extra["vae_fallback"]["dtype"] == "bfloat16" and np.isfinite(out[1].map).all()
    # redone in bf16: near the fp16 map, not NaN-clamped into it
    assert 0 < np.abs(out[1].map - clean[1].map).max() < 0.05


def test_ensembles_and_tiles_record_the_fallback_too(depth_g):
    from lotus_cli.model.tiling import TileOptions, predict_tiled

    pred = fp16(depth_g, processing_res=0)
    overflow_in_fp16(pred.vae)
    img = make_image(40, 56)
    ens = pred.predict_ensemble(img, PredictOptions(processing_res=32), EnsembleOptions(samples=2))
    assert np.isfinite(ens.map).all() and ens.extra["vae_fallback"]["dtype"] == "bfloat16"
    tiled = predict_tiled(pred, [make_image(96, 128)], PredictOptions(processing_res=32), TileOptions(tile=64))[0]
    assert tiled.extra["tiling"]["tiles"] > 1 and tiled.extra["vae_fallback"]["dtype"] == "bfloat16"
    assert np.isfinite(tiled.map).all()


def test_a_non_finite_map_is_an_error_never_a_map(depth_g):
    """No fallback dtype cures it (fp32 has none; the UNet gave NaN): the item fails with an InputError that
    names the part at fault, instead of a map clamp() made out of NaN."""
    pred = LotusPredictor.from_pretrained(depth_g, device="cpu", dtype="fp32", processing_res=64)
    overflow = pred.engine.decode
    pred.engine.decode = lambda z, f: overflow(z, f) * float("inf")
    with pytest.raises(InputError) as e:
        pred.predict(make_image(32, 48), PredictOptions(processing_res=64))
    assert "VAE" in e.value.message and "float32" in e.value.message and "--dtype" not in e.value.message
    pred.engine.decode = overflow
    denoise = pred.denoise
    pred.denoise = lambda z, noise=None: denoise(z, noise) * float("nan")
    with pytest.raises(InputError, match="the UNet gave inf/NaN in float32"):
        pred.predict(make_image(32, 48), PredictOptions(processing_res=64))
