"""One training step: the loss equals the paper's formula computed independently here (G and D, with and
without the detail preserver, with masks), annotations, schedule and the evaluation sampler."""

import numpy as np
import pytest
import torch

from lotus_cli.errors import UsageError
from lotus_cli.train.options import StepOptions
from lotus_cli.train.step import (
    alphas_cumprod,
    annotation,
    depth_annotation,
    draw,
    latent_valid,
    loss_mask,
    predict_latent,
    train_timesteps,
    training_loss,
)


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
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return float(np.cumprod(1 - betas)[t])


def class_labels(s0, s1, n):
    return torch.tensor([[np.sin(s0), np.sin(s1), np.cos(s0), np.cos(s1)]] * n, dtype=torch.float32)


def reference_loss(unet, vae, prompt, batch, anno, opts, d):
    """The authors' step, written out by hand: their rgb_latents = encode(cat(rgb, rgb)).sample() and
    target_latents = encode(cat(anno, rgb)).sample(), so every image latent is its own posterior sample;
    noisy targets at t, masked latent MSE over cells whose f x f pixels are all valid, reconstruction MSE, 1:1."""
    sf = vae.config.scaling_factor
    b = batch["rgb"].shape[0]
    rows = 2 * b if opts.detail_preserver else b
    with torch.no_grad():
        post_i, post_a = vae.encode(batch["rgb"]).latent_dist, vae.encode(anno).latent_dist
        cond = torch.cat([(post_i.mean + post_i.std * d.image_eps[k * b : (k + 1) * b]) * sf for k in range(rows // b)])
        targets = [(post_a.mean + post_a.std * d.anno_eps) * sf]
        if opts.detail_preserver:
            targets.append((post_i.mean + post_i.std * d.target_eps) * sf)
    z_img = cond[:b]
    target = torch.cat(targets)
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
                if valid[i, 0, cy * f : (cy + 1) * f, cx * f : (cx + 1) * f].all():
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


def authors_trunc_disparity(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The authors' Virtual KITTI loader: disparity = 1 / depth on every pixel, 2 % / 98 % quantiles over
    the valid pixels with depth > 0, ((disparity - min) / (max - min + 1e-5) - 0.5) * 2, clipped to [-1, 1]."""
    with np.errstate(divide="ignore"):
        disparity = 1 / depth
    lo, hi = np.quantile(disparity[valid & (depth > 0)], [0.02, 0.98])
    return np.clip(((disparity - lo) / (hi - lo + 1e-5) - 0.5) * 2.0, -1, 1)


def test_trunc_disparity_is_the_authors_normalisation_with_sky_and_holes():
    depth = torch.linspace(1.0, 10.0, 100, dtype=torch.float64).view(1, 1, 10, 10).float()
    depth[0, 0, 0, 0] = 0.0  # no measurement
    depth[0, 0, 0, 1] = 655.35  # Virtual KITTI sky
    valid = (depth > 1e-5) & (depth < 80)
    a = depth_annotation(depth, valid, "trunc_disparity")
    expect = authors_trunc_disparity(depth.double().numpy()[0, 0], valid.numpy()[0, 0])
    assert a.shape == (1, 3, 10, 10) and torch.equal(a[:, 0], a[:, 2])
    np.testing.assert_allclose(a[0, 0].numpy(), expect, atol=1e-6)
    assert a[0, 0, 0, 0] == 1.0  # 1 / 0 clipped to +1, as the authors' annotation holds it
    assert a[0, 0, 0, 1] == -1.0  # sky: the farthest value
    assert a[0, 0, 0, 2] == 1.0 and a[0, 0, 9, 9] == -1.0  # near -> +1 for disparity
    # the 1e-5 in the denominator: a range of 1 maps its top to 2 / (1 + 1e-5) - 1, not to 1
    flat = torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=torch.float64).view(1, 1, 2, 2)
    top = depth_annotation(flat, torch.ones_like(flat, dtype=torch.bool), "disparity")[0, 0, 1, 1].item()
    assert top == pytest.approx(2 / (1 + 1e-5) - 1, abs=1e-12) and top < 1.0
    d = depth_annotation(depth, valid, "trunc_depth")
    assert d[0, 0, 0, 2] == -1.0 and d[0, 0, 9, 9] == 1.0  # near -> -1 for depth
    assert d[0, 0, 0, 1] == 1.0  # sky is the farthest value in depth too


def test_hypersim_quantiles_come_from_every_pixel():
    """The authors' Hypersim transform takes the quantiles over the whole frame (no mask); our Hypersim
    reader marks every pixel valid, so a pixel without a usable normal still sets the range."""
    g = torch.Generator().manual_seed(0)
    depth = torch.rand((1, 1, 8, 8), generator=g, dtype=torch.float64) * 9 + 1
    every = torch.ones_like(depth, dtype=torch.bool)
    a = depth_annotation(depth, every, "trunc_disparity")[0, 0].numpy()
    np.testing.assert_allclose(a, authors_trunc_disparity(depth.numpy()[0, 0], every.numpy()[0, 0]), atol=1e-6)
    fewer = every.clone()
    fewer[0, 0, :2] = False
    assert not np.allclose(depth_annotation(depth, fewer, "trunc_disparity")[0, 0].numpy(), a)


def test_loss_mask_is_valid_plus_sky_for_depth_and_valid_normals_for_normals():
    valid = torch.tensor([[True, False, False, True]]).view(1, 1, 1, 4)
    sky = torch.tensor([[False, True, False, False]]).view(1, 1, 1, 4)
    normal = torch.zeros((1, 3, 1, 4))
    normal[:, 2, :, :2] = 1.0  # pixels 0 and 1 have a normal
    batch = {"valid": valid, "sky": sky, "normal": normal}
    assert loss_mask(batch, StepOptions()).flatten().tolist() == [True, True, False, True]
    assert loss_mask(batch, StepOptions(task="normal")).flatten().tolist() == [True, False, False, False]
    assert loss_mask({"valid": valid}, StepOptions()).flatten().tolist() == [True, False, False, True]


def test_every_image_latent_is_its_own_posterior_draw():
    opts = StepOptions()
    d = draw(2, (4, 3, 3), opts, torch.Generator().manual_seed(0))
    assert d.image_eps.shape == (4, 4, 3, 3) and d.anno_eps.shape == d.target_eps.shape == (2, 4, 3, 3)
    cond_anno, cond_rgb, target = d.image_eps[:2], d.image_eps[2:], d.target_eps
    assert not torch.equal(cond_anno, cond_rgb) and not torch.equal(cond_anno, target)
    assert not torch.equal(cond_rgb, target)
    plain = draw(2, (4, 3, 3), StepOptions(detail_preserver=False), torch.Generator().manual_seed(0))
    assert plain.image_eps.shape == (2, 4, 3, 3) and plain.target_eps is None
    mean = draw(2, (4, 3, 3), StepOptions(latent="mean"), torch.Generator().manual_seed(0))
    assert mean.image_eps is mean.anno_eps is mean.target_eps is None


def test_options_are_validated():
    with pytest.raises(UsageError, match="--prediction eps needs --family g"):
        StepOptions(family="d", prediction="eps")
    with pytest.raises(UsageError, match="--timesteps"):
        StepOptions(family="d", timesteps=10)
    with pytest.raises(UsageError, match="--norm"):
        StepOptions(norm="log")
    assert StepOptions(norm="trunc_depth").kind == "depth" and StepOptions(task="normal").kind == "normal"


def test_predict_latent_single_step_is_the_inference_call(depth_g):
    from lotus_cli.model.predictor import LotusPredictor

    pred = LotusPredictor.from_pretrained(depth_g, device="cpu", channels_last=False)
    z = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = predict_latent(pred.unet, z, pred.prompt_embedding, StepOptions(family="g"), noise)
        theirs = pred.denoise(z, noise)
    torch.testing.assert_close(ours, theirs)
