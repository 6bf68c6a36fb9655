"""The decoder in strips gives the decoder's numbers (tiny random VAE, strips forced small)."""

import pytest
import torch

from lotus_cli.model.cpu import strips
from lotus_cli.model.predictor import LotusPredictor, PredictOptions

from .conftest import make_image


@pytest.fixture(autouse=True)
def all_sizes_in_strips(monkeypatch):
    """Tiny test sizes are below the size from which the VAE runs in strips: lower it, to test the strips."""
    monkeypatch.setattr(strips, "MIN_PIXELS", 0)


@pytest.fixture(scope="module")
def vae(depth_d):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(depth_d, subfolder="vae").eval()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("latent_hw,rows", [((13, 10), 16), ((8, 16), 7), ((6, 6), 64)])
def test_strips_equal_the_plain_decoder(vae, channels_last, latent_hw, rows):
    assert strips.supported(vae)
    z = torch.randn(2, 4, *latent_hw, generator=torch.Generator().manual_seed(0))
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
        z = z.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        plain = vae.decode(z).sample
        ours = strips.decode(vae, z, rows)
    assert ours.shape == plain.shape == (2, 3, latent_hw[0] * 4, latent_hw[1] * 4)
    torch.testing.assert_close(ours, plain, atol=2e-5, rtol=0)


@pytest.mark.parametrize("channels_last,batch", [(True, 1), (False, 1), (True, 2)])
def test_blocks_that_narrow_the_channels(vae, channels_last, batch):
    """The block with a channel change keeps its inner activation inside its input's memory when it can
    (one NHWC image); in every case its output is the module's."""
    res = next(r for ub in vae.decoder.up_blocks for r in ub.resnets if r.conv_shortcut is not None)
    assert 2 * res.conv1.out_channels <= res.conv1.in_channels
    x = torch.randn(batch, res.conv1.in_channels, 37, 9, generator=torch.Generator().manual_seed(2))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = res(x.clone(), None)
        got = strips.resnet(res, x, 5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_an_unknown_decoder_is_left_to_diffusers(vae):
    import copy

    other = copy.deepcopy(vae)
    other.decoder.conv_act = torch.nn.ReLU()
    assert not strips.supported(other)
    z = torch.randn(1, 4, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(strips.decode(other, z, 8), other.decode(z).sample, atol=0, rtol=0)


def test_predictions_do_not_depend_on_the_strips(depth_d):
    pred = LotusPredictor.from_pretrained(depth_d, device="cpu")
    img = make_image(72, 100, 5)
    opts = PredictOptions(processing_res=100)
    pred.strip_rows = 0
    plain = pred.predict(img, opts).map
    pred.strip_rows = 12
    torch.testing.assert_close(
        torch.from_numpy(pred.predict(img, opts).map), torch.from_numpy(plain), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("hw,rows", [((104, 80), 16), ((64, 128), 7), ((48, 48), 64)])
def test_encoder_strips_equal_the_plain_encoder(vae, hw, rows):
    assert strips.encoder_supported(vae)
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        plain = vae.encode(x).latent_dist.parameters
        ours = strips.encode(vae, x, rows)
    assert ours.shape == plain.shape == (2, 8, hw[0] // 4, hw[1] // 4)
    torch.testing.assert_close(ours, plain, atol=2e-5, rtol=0)
