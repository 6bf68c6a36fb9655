"""The decoder in strips gives the decoder's numbers (tiny random VAE, strips forced small)."""

import pytest
import torch

from lotus_cli import strips
from lotus_cli.predictor import LotusPredictor, PredictOptions

from .conftest import make_image


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


def test_residual_blocks_keep_their_input_when_they_must(vae):
    """A block with a channel change cannot overwrite its input; one without may (and does)."""
    res = next(r for ub in vae.decoder.up_blocks for r in ub.resnets if r.conv_shortcut is not None)
    x = torch.randn(1, res.conv1.in_channels, 20, 9)
    keep = x.clone()
    with torch.inference_mode():
        strips.resnet(res, x, 6)
    torch.testing.assert_close(x, keep, atol=0, rtol=0)


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
    pred.decode_rows = 0
    plain = pred.predict(img, opts).map
    pred.decode_rows = 12
    torch.testing.assert_close(torch.from_numpy(pred.predict(img, opts).map), torch.from_numpy(plain), atol=1e-5, rtol=0)
