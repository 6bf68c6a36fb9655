"""One training step: the loss equals the paper's formula computed independently here (G and D, with and
without the detail preserver, with masks), annotations, schedule and the evaluation sampler."""

import numpy as np
import pytest
import torch

from lotus_cli.errors import UsageError
from lotus_cli.train.step import (StepOptions, alphas_cumprod, annotation, depth_annotation, draw, latent_valid,
                                  predict_latent, train_timesteps, training_loss)

def load(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    return unet, vae


def tiny_batch(b=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand((b, 3, h, w), generator=g) * 2 - 1
    depth = torch.rand((b, 1, h, w), generator=g) * 5 + 0.5
    valid = torch.ones((b, 1, h, w), dtype=torch.bool)
    valid[0, :, 1, 2] = False  # one pixel spoils one latent cell (4 x 4 pixels per cell in tiny models)
    valid[1, :, 8:16, 0:5] = False  # a block: two cells fully, two more partly invalid
    return {"rgb": rgb, "depth": depth, "valid": valid, "normal": torch.zeros((b, 3, h, w))}


def scaled_linear_abar(t):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return float(np.cumprod(1 - betas)[t])


def class_labels(s0, s1, n):
    return torch.tensor([[np.sin(s0), np.sin(s1), np.cos(s0), np.cos(s1)]] * n, dtype=torch.float32)


def reference_loss(unet, vae, prompt, batch, anno, opts, d):
    """The facts' formula, written out by hand: posterior samples, noisy targets at t, masked latent MSE
    over cells whose f x f pixels are all valid, reconstruction MSE, 1:1."""
    sf = vae.config.scaling_factor
    with torch.no_grad():
        post_i, post_a = vae.encode(batch["rgb"]).latent_dist, vae.encode(anno).latent_dist
        z_img = (post_i.mean + post_i.std * d.image_eps) * sf
        z_anno = (post_a.mean + post_a.std * d.anno_eps) * sf
    b = z_img.shape[0]
    rows = 2 * b if opts.detail_preserver else b
    target = torch.cat([z_anno, z_img])[:rows]
    cond = torch.cat([z_img, z_img])[:rows]
    labels = torch.cat([class_labels(1, 0, b), class_labels(0, 1, b)])[:rows]
    if opts.family == "g":
        a = torch.tensor([scaled_linear_abar(int(t)) for t in d.t], dtype=torch.float32).view(-1, 1, 1, 1)
        x = torch.cat([cond, a.sqrt() * target + (1 - a).sqrt() * d.noise], dim=1)
    else:
        x = cond
    with torch.no_grad():
        pred = unet(x, d.t, encoder_hidden_states=prompt.expand(rows, -1, -1), class_labels=labels).sample
    goal = d.noise if opts.prediction == "eps" else target
    err = ((pred - goal) ** 2).numpy()
    f = batch["rgb"].shape[-1] // z_img.shape[-1]
    valid = batch["valid"].numpy()
    cells = []
    for i in range(b):
        for cy in range(z_img.shape[2]):
            for cx in range(z_img.shape[3]):
                if valid[i, 0, cy * f:(cy + 1) * f, cx * f:(cx + 1) * f].all():
                    cells.append(err[i, :, cy, cx])
    anno_loss = float(np.mean(np.concatenate(cells)))
    rgb_loss = float(err[b:].mean()) if opts.detail_preserver else 0.0
    return anno_loss, rgb_loss


@pytest.mark.parametrize("family", ["g", "d"])
@pytest.mark.parametrize("detail_preserver", [True, False])
def test_loss_equals_the_formula(checkpoints, family, detail_preserver):
    unet, vae = load(checkpoints[("depth", family)])
    prompt = torch.randn(1, 2, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3))
    opts = StepOptions(family=family, detail_preserver=detail_preserver)
    batch = tiny_batch()
    anno = annotation(batch, opts)
    d = draw(2, (4, 4, 4), opts, torch.Generator().manual_seed(5))
    assert d.t.tolist() == [999] * (4 if detail_preserver else 2)
    with torch.no_grad():
        got = training_loss(unet, vae, prompt, batch["rgb"], anno, batch["valid"], opts, d)
    anno_ref, rgb_ref = reference_loss(unet, vae, prompt, batch, anno, opts, d)
    assert got.anno.item() == pytest.approx(anno_ref, rel=1e-5)
    assert got.rgb.item() == pytest.approx(rgb_ref, rel=1e-5, abs=1e-12)
    assert got.total.item() == pytest.approx(anno_ref + rgb_ref, rel=1e-5)
    # the mask matters: 2 of 16 cells of image 1 fully invalid, 2 partly, 1 of image 0
    cells = latent_valid(batch["valid"], 4)
    assert cells[0].sum().item() == 15 and cells[1].sum().item() == 12


def test_eps_prediction_and_multistep_loss(checkpoints):
    unet, vae = load(checkpoints[("depth", "g")])
    prompt = torch.randn(1, 2, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3))
    opts = StepOptions(family="g", prediction="eps", timesteps=10)
    batch = tiny_batch(seed=1)
    anno = annotation(batch, opts)
    d = draw(2, (4, 4, 4), opts, torch.Generator().manual_seed(6))
    assert set(d.t.tolist()) <= set(train_timesteps(10).tolist())
    with torch.no_grad():
        got = training_loss(unet, vae, prompt, batch["rgb"], anno, batch["valid"], opts, d)
    anno_ref, rgb_ref = reference_loss(unet, vae, prompt, batch, anno, opts, d)
    assert got.anno.item() == pytest.approx(anno_ref, rel=1e-5)
    assert got.rgb.item() == pytest.approx(rgb_ref, rel=1e-5)


def test_schedule_and_timesteps():
    abar = alphas_cumprod()
    assert abar[999].item() == pytest.approx(0.00466, abs=5e-5)
    assert abar[999].item() == pytest.approx(scaled_linear_abar(999), rel=1e-6)  # diffusers works in float32
    assert train_timesteps(1).tolist() == [999]
    assert train_timesteps(4).tolist() == [999, 749, 499, 249]
    assert len(set(train_timesteps(1000).tolist())) == 1000


def test_trunc_disparity_maps_quantiles_to_unit_range():
    depth = torch.linspace(1.0, 10.0, 100).view(1, 1, 10, 10)
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[0, 0, 0, 0] = False  # depth 1.0, the nearest: excluded from the quantiles and zeroed
    a = depth_annotation(depth, valid, "trunc_disparity")
    disp = 1 / depth[valid].double().numpy()
    lo, hi = np.quantile(disp, [0.02, 0.98])
    expect = np.clip((1 / depth.double().numpy() - lo) / (hi - lo) * 2 - 1, -1, 1)
    expect[0, 0, 0, 0] = 0
    assert a.shape == (1, 3, 10, 10)
    np.testing.assert_allclose(a[0, 0].numpy(), expect[0, 0], atol=1e-6)
    assert torch.equal(a[:, 0], a[:, 2])
    assert a[0, 0, 0, 1] == 1.0 and a[0, 0, 9, 9] == -1.0  # near -> +1 for disparity
    d = depth_annotation(depth, valid, "trunc_depth")
    assert d[0, 0, 0, 1] == -1.0 and d[0, 0, 9, 9] == 1.0  # near -> -1 for depth


def test_options_are_validated():
    with pytest.raises(UsageError, match="--prediction eps needs --family g"):
        StepOptions(family="d", prediction="eps")
    with pytest.raises(UsageError, match="--timesteps"):
        StepOptions(family="d", timesteps=10)
    with pytest.raises(UsageError, match="--norm"):
        StepOptions(norm="log")
    assert StepOptions(norm="trunc_depth").kind == "depth" and StepOptions(task="normal").kind == "normal"


def test_predict_latent_single_step_is_the_inference_call(depth_g):
    from lotus_cli.predictor import LotusPredictor

    pred = LotusPredictor.from_pretrained(depth_g, device="cpu", channels_last=False)
    z = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = predict_latent(pred.unet, z, pred.prompt_embedding, StepOptions(family="g"), noise)
        theirs = pred.denoise(z, noise)
    torch.testing.assert_close(ours, theirs)
