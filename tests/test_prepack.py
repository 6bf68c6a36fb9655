"""Convolution weights packed for oneDNN (prepack.py) and the decoder's sub-pixel upsampling (strips.py):
the same numbers as the plain modules."""

import copy

import numpy as np
import pytest
import torch

from lotus_cli.model.cpu import prepack, strips
from lotus_cli.model.predictor import LotusPredictor, PredictOptions

from .conftest import make_image

needs_onednn = pytest.mark.skipif(
    not prepack.available(torch.device("cpu"), torch.float32),
    reason="this torch build has no oneDNN convolution operators",
)
# bf16 packing needs a CPU with native bf16 (avx512_bf16 / amx_bf16; prepack.available checks that a packed
# bf16 convolution runs and is right). Where it is absent, the fallback (held dense) is tested instead, and
# the fallback is also tested here by making the check fail.
CAN_PACK_BF16 = prepack.available(torch.device("cpu"), torch.bfloat16)
needs_bf16_packing = pytest.mark.skipif(
    not CAN_PACK_BF16,
    reason="this CPU cannot pack bf16 convolutions (no native bf16: avx512_bf16 or amx_bf16); the fallback is tested",
)


@pytest.fixture
def no_bf16_packing(monkeypatch):
    """This machine as a CPU without bf16 packing (an AVX2-only one): the capability check says no."""
    works = prepack._works
    monkeypatch.setattr(prepack, "_works", lambda dtype: dtype != torch.bfloat16 and works(dtype))


@needs_onednn
@pytest.mark.parametrize(
    "cin,cout,k,stride,padding,bias",
    [(16, 24, 3, 1, 1, True), (16, 24, 1, 1, 0, False), (8, 16, 3, 2, 1, True), (12, 20, 3, 1, (0, 1), True)],
)
def test_a_packed_convolution_gives_the_convolutions_numbers(cin, cout, k, stride, padding, bias):
    conv = torch.nn.Conv2d(cin, cout, k, stride, padding, bias=bias).eval()
    packed = prepack.PackedConv2d(conv)
    x = torch.randn(2, cin, 13, 18, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(packed.weight, conv.weight, atol=0, rtol=0)  # it holds the same weight
        nhwc = x.contiguous(memory_format=torch.channels_last)
        want, got = conv(nhwc), packed(nhwc)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed(x), conv(x), atol=1e-5, rtol=0)  # NCHW: another kernel, rounding
        small = torch.randn(1, cin, 3, 4)  # any input size, not only the one packed for
        torch.testing.assert_close(packed(small), conv(small), atol=1e-5, rtol=0)


@needs_onednn
def test_packing_replaces_the_convolutions_and_keeps_the_predictions(depth_g):
    packed = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32", pack_weights=True)
    plain = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32", pack_weights=False)
    assert packed.packed and not plain.packed and packed.channels_last and plain.channels_last
    mods = [*packed.unet.modules(), *packed.vae.modules()]
    assert sum(isinstance(m, prepack.PackedConv2d) for m in mods) > 20
    assert not any(type(m) is torch.nn.Conv2d for m in mods)
    assert not any(isinstance(m, prepack.PackedConv2d) for m in (*plain.unet.modules(), *plain.vae.modules()))
    assert prepack.weight_bytes(packed.unet, packed.vae) == prepack.weight_bytes(plain.unet, plain.vae)
    img = make_image(40, 56, 3)
    for opts in (PredictOptions(processing_res=56, seed=4), PredictOptions(processing_res=0, batch_size=2)):
        a = packed.predict_batch([img, img[::-1].copy()], opts)
        b = plain.predict_batch([img, img[::-1].copy()], opts)
        for x, y in zip(a, b):
            assert x.map.std() > 1e-3
            # the same kernels, or for a few small shapes another one: float rounding
            assert np.abs(x.map - y.map).max() < 2e-6


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=needs_onednn)])
@pytest.mark.parametrize("hw,rows,batch", [((9, 14), 6, 2), ((16, 7), 5, 1), ((5, 5), 64, 1)])
def test_subpixel_upsampling_equals_upsample_then_convolve(packed, hw, rows, batch):
    """Four 2 x 2 kernels on the input == a 3 x 3 kernel on the nearest-upsampled input, borders included,
    in strips of any height (odd ones too)."""
    from diffusers.models.upsampling import Upsample2D

    up = Upsample2D(channels=12, use_conv=True, out_channels=10).eval()
    with torch.no_grad():
        up.conv.bias.normal_()
    x = torch.randn(batch, 12, *hw, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = up(x)
        if packed:
            up = copy.deepcopy(up)
            prepack.pack_convolutions(up)
            assert isinstance(up.conv, prepack.PackedConv2d)
        got = strips.upsample(up, x, rows)
    assert got.shape == want.shape == (batch, 10, 2 * hw[0], 2 * hw[1])
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


@needs_onednn
def test_a_packed_vae_in_strips_equals_the_plain_vae(depth_d, monkeypatch):
    from diffusers import AutoencoderKL

    monkeypatch.setattr(strips, "MIN_PIXELS", 0)  # every stage in strips at test sizes
    vae = AutoencoderKL.from_pretrained(depth_d, subfolder="vae").eval().to(memory_format=torch.channels_last)
    packed = copy.deepcopy(vae)
    assert prepack.pack_convolutions(packed) > 10 and strips.supported(packed) and strips.encoder_supported(packed)
    z = torch.randn(2, 4, 11, 7, generator=torch.Generator().manual_seed(2))
    z = z.contiguous(memory_format=torch.channels_last)
    x = (torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        torch.testing.assert_close(strips.decode(packed, z, 6), vae.decode(z).sample, atol=2e-5, rtol=0)
        torch.testing.assert_close(strips.encode(packed, x, 6), vae.encode(x).latent_dist.parameters, atol=2e-5, rtol=0)


@pytest.mark.heavy
def test_without_working_operators_nothing_is_packed(depth_d, monkeypatch):
    monkeypatch.setattr(prepack, "_works", lambda dtype: False)
    pred = LotusPredictor.from_pretrained(str(depth_d), device="cpu", dtype="fp32")
    assert not pred.packed
    assert not any(isinstance(m, prepack.PackedConv2d) for m in (*pred.unet.modules(), *pred.vae.modules()))
    assert pred.predict(make_image(24, 32)).map.shape == (24, 32)


@needs_onednn
@pytest.mark.parametrize("capable", [pytest.param(True, marks=needs_bf16_packing), False])
def test_bf16_packs_where_it_can_and_stays_near_fp32(depth_g, capable, request):
    if not capable:
        request.getfixturevalue("no_bf16_packing")
    assert prepack.available(torch.device("cpu"), torch.bfloat16) == capable
    img, opts = make_image(32, 48, 6), PredictOptions(processing_res=0, seed=1)
    fp32 = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32").predict(img, opts).map
    pred = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="bf16", pack_weights=True)
    mods = [*pred.unet.modules(), *pred.vae.modules()]
    if capable:
        assert pred.packed and pred.unet.conv_in.packed.dtype == torch.bfloat16
    else:  # asked to pack, it cannot: the dense bf16 modules run
        assert not pred.packed and not any(isinstance(m, prepack.PackedConv2d) for m in mods)
        assert pred.unet.conv_in.weight.dtype == torch.bfloat16
    bf16 = pred.predict(img, opts).map
    assert bf16.dtype == np.float32 and np.abs(bf16 - fp32).max() < 0.05 and bf16.std() > 1e-3


@needs_onednn
@pytest.mark.parametrize("capable", [pytest.param(True, marks=needs_bf16_packing), False])
def test_a_packed_model_saves_loads_copies_and_moves_like_the_plain_one(capable, request):
    import io

    if not capable:
        request.getfixturevalue("no_bf16_packing")

    plain = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 1))
    model = copy.deepcopy(plain)
    prepack.pack_convolutions(model)
    x = torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(5)).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        want = plain(x)
        # state_dict: the same keys and values as the plain model (a saved packed model loses nothing)
        sd, psd = model.state_dict(), plain.state_dict()
        assert list(sd) == list(psd) and all(torch.equal(sd[k], psd[k]) for k in psd)
        # copies and pickles stay packed and give the same numbers
        for other in (copy.deepcopy(model), _pickled(model, io)):
            assert other[0].packed.is_mkldnn
            torch.testing.assert_close(other(x), want, atol=1e-6, rtol=0)
        # .to(dtype) casts and packs again where it can; a dtype oneDNN cannot pack is held dense and still runs
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        assert bf16[0].packed.is_mkldnn == capable and bf16[0].packed.dtype == bf16[0].bias.dtype == torch.bfloat16
        torch.testing.assert_close(bf16[0].weight, plain[0].weight.bfloat16(), atol=0, rtol=0)
        torch.testing.assert_close(bf16(x.bfloat16()).float(), want, atol=0.05, rtol=0.05)
        f64 = copy.deepcopy(model).double()
        assert not f64[0].packed.is_mkldnn and f64[0].packed.dtype == torch.float64
        torch.testing.assert_close(f64(x.double()).float(), want, atol=1e-5, rtol=0)
        # load_state_dict repacks the new weights; missing or misshapen weights are errors, as for nn.Conv2d
        fresh = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 1))
        model.load_state_dict(fresh.state_dict())
        assert model[0].packed.is_mkldnn
        torch.testing.assert_close(model(x), fresh(x), atol=1e-6, rtol=0)
        with pytest.raises(RuntimeError, match="Missing key.*0.weight"):
            model.load_state_dict({k: v for k, v in fresh.state_dict().items() if k != "0.weight"})
        with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
            model.load_state_dict({**fresh.state_dict(), "0.weight": torch.zeros(16, 8, 1, 1)})


def _pickled(model, io):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)
