"""Model surgery: SD2 UNet -> Lotus UNet (projection class embedding, 8-channel conv_in for G)."""

import copy

import pytest
import torch

from lotus_cli.errors import ModelError
from lotus_cli.model.synthetic import TINY_UNET
from lotus_cli.train.surgery import add_class_embedding, is_lotus_unet, to_lotus, widen_conv_in


@pytest.fixture(scope="module")
def sd2_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(in_channels=4, **TINY_UNET).eval()


def inputs(channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, channels, 8, 12, generator=g)
    emb = torch.randn(2, 2, TINY_UNET["cross_attention_dim"], generator=g)
    return z, emb


def test_widened_conv_in_with_the_same_latent_twice_reproduces_the_original(sd2_unet):
    z, emb = inputs()
    t = torch.tensor([999, 500])
    wide = widen_conv_in(copy.deepcopy(sd2_unet))
    assert wide.config.in_channels == 8 and wide.conv_in.in_channels == 8
    torch.testing.assert_close(wide.conv_in.weight[:, :4], sd2_unet.conv_in.weight * 0.5)
    torch.testing.assert_close(wide.conv_in.weight[:, 4:], sd2_unet.conv_in.weight * 0.5)
    assert torch.equal(wide.conv_in.bias, sd2_unet.conv_in.bias)
    with torch.no_grad():
        before = sd2_unet(z, t, encoder_hidden_states=emb).sample
        after = wide(torch.cat([z, z], dim=1), t, encoder_hidden_states=emb).sample
        other = wide(torch.cat([z, torch.zeros_like(z)], dim=1), t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert (other - before).abs().max() > 1e-3  # the second half does reach the output


def test_class_embedding_is_added_and_everything_else_kept(sd2_unet):
    lotus = add_class_embedding(sd2_unet, seed=3)
    assert is_lotus_unet(lotus) and not is_lotus_unet(sd2_unet)
    old, new = sd2_unet.state_dict(), lotus.state_dict()
    added = sorted(set(new) - set(old))
    assert added and all(k.startswith("class_embedding.") for k in added)
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert lotus.class_embedding.linear_1.in_features == 4
    assert lotus.class_embedding.linear_2.out_features == lotus.time_embedding.linear_2.out_features
    # the task switch now changes the output: annotation [1, 0] vs reconstruction [0, 1]
    from lotus_cli.model.predictor import ANNOTATION, RECONSTRUCTION, task_embedding

    z, emb = inputs()
    with torch.no_grad():
        a = lotus(z, 999, encoder_hidden_states=emb, class_labels=task_embedding(ANNOTATION, 2)).sample
        r = lotus(z, 999, encoder_hidden_states=emb, class_labels=task_embedding(RECONSTRUCTION, 2)).sample
    assert (a - r).abs().max() > 1e-4


def test_to_lotus_families_and_the_saved_unet_loads(sd2_unet, tmp_path):
    from lotus_cli.model.synthetic import build_checkpoint
    from lotus_cli.model.weights import load_unet_vae

    g = to_lotus(copy.deepcopy(sd2_unet), "g")
    d = to_lotus(copy.deepcopy(sd2_unet), "d")
    assert (g.config.in_channels, d.config.in_channels) == (8, 4)
    assert to_lotus(g, "g") is g  # a Lotus UNet passes through (continue training)
    with pytest.raises(ModelError, match="D model takes 4"):
        to_lotus(g, "d")
    build_checkpoint(tmp_path, family="g", components=("vae",))
    g.save_pretrained(tmp_path / "unet", safe_serialization=True)
    unet, _ = load_unet_vae(tmp_path, torch.float32, torch.device("cpu"))
    assert unet.config.in_channels == 8 and is_lotus_unet(unet)
