"""Training on a device without float64 (Apple's MPS), and validation that leaves the trained modules alone.

No MPS here: the meta device stands in for it, with a dispatch mode that refuses every float64 tensor made
on it, as MPS does. The step must then run the same formula with no float64 on the device."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lotus_cli.model import gpu
from lotus_cli.train import step as S
from lotus_cli.train.options import StepOptions

from .test_train_step import load, tiny_batch


class NoFloat64On(TorchDispatchMode):
    """Raises, as MPS does, when an operation makes a float64 tensor on ``device_type``."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == self.device_type:
                raise TypeError(f"{func}: float64 on {self.device_type} (MPS has no float64)")
        return out


def test_the_stand_in_refuses_what_mps_refuses():
    with NoFloat64On("meta"), pytest.raises(TypeError, match="float64"):
        torch.zeros(3, dtype=torch.float64).to("meta")
    with NoFloat64On("meta"):
        torch.zeros(3, dtype=torch.float64).float().to("meta")  # float32 on the device, float64 on the CPU: fine


@pytest.mark.parametrize("family", ["g", "d"])
def test_training_loss_puts_no_float64_on_the_device(checkpoints, family):
    unet, vae = load(checkpoints[("depth", family)])
    opts = StepOptions(family=family, latent="sample", detail_preserver=True)
    batch = tiny_batch()
    anno = S.annotation(batch, opts)
    mask = S.loss_mask(batch, opts)
    draws = S.draw(2, (4, 4, 4), opts, torch.Generator().manual_seed(0))
    prompt = torch.zeros(1, 2, unet.config.cross_attention_dim)
    # the same step on the CPU: what the device must compute
    want = S.training_loss(unet, vae, prompt, batch["rgb"], anno, mask, opts, draws)
    unet, vae = unet.to("meta"), vae.to("meta")
    with NoFloat64On("meta"):
        got = S.training_loss(
            unet, vae, prompt.to("meta"), batch["rgb"].to("meta"), anno.to("meta"), mask.to("meta"), opts, draws
        )
    assert got.total.device.type == "meta" and got.total.dtype == torch.float32
    assert torch.isfinite(want.total)


def test_noisy_targets_use_the_schedule_rounded_once_to_float32():
    t = torch.tensor([999, 0, 500, 999])
    got = S.abar_at(t, torch.device("cpu"))
    assert got.dtype == torch.float32
    # the numbers the device computed before: the float64 table indexed, then rounded to float32
    assert torch.equal(got, S.alphas_cumprod()[t].float())
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(got.numpy(), np.cumprod(1 - betas)[t.numpy()], rtol=1e-6)


def test_multistep_sampling_puts_no_float64_on_the_device(depth_g):
    unet, _ = load(depth_g)
    opts = StepOptions(family="g", timesteps=3, prediction="eps")
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    prompt = torch.zeros(1, 2, unet.config.cross_attention_dim)
    want = S.predict_latent(unet, z, prompt, opts, noise)
    with NoFloat64On("meta"):
        got = S.predict_latent(unet.to("meta"), z.to("meta"), prompt.to("meta"), opts, noise)
    assert got.shape == want.shape and got.dtype == torch.float32 and torch.isfinite(want).all()


def test_depth_annotations_take_their_float64_statistics_to_the_cpu_where_the_device_has_none(monkeypatch):
    assert gpu.float64_device(torch.device("mps")) == torch.device("cpu")
    assert gpu.float64_device(torch.device("cuda:1")) == torch.device("cuda:1")  # CUDA has float64
    assert gpu.float64_device(torch.device("cpu")) == torch.device("cpu")
    asked = []

    def spy(device):
        asked.append(device)
        return torch.device("cpu")

    batch = tiny_batch()
    want = S.depth_annotation(batch["depth"], batch["valid"])
    monkeypatch.setattr(S, "float64_device", spy)
    got = S.depth_annotation(batch["depth"], batch["valid"])
    assert asked == [batch["depth"].device] and torch.equal(got, want)


# -------------------------------------------------------------------------- validation during training


class Acc:
    """The accelerator as _predictor uses it."""

    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(m):
        return m


def test_validation_predictor_leaves_the_trained_vae_as_it_was(depth_g, tmp_path):
    """Mixed-precision training keeps the frozen VAE in fp16. Validating through a LotusPredictor must not
    cast it to bf16 (where fp16 overflows) or make its SiLUs in place for the rest of the training."""
    from lotus_cli.train.options import TrainOptions
    from lotus_cli.train.trainer import _predictor, evaluate_samples

    unet, vae = load(depth_g)
    vae.to(torch.float16).eval().requires_grad_(False)
    with torch.no_grad():  # activations beyond fp16's range, finite in bf16: fp16 overflows
        vae.decoder.conv_in.bias.fill_(65000)
        vae.decoder.conv_in.weight.mul_(3000)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    opts = TrainOptions(data=("x",), out=tmp_path, base=str(depth_g), step=StepOptions(family="g"))
    prompt = torch.zeros(1, 2, unet.config.cross_attention_dim)
    pred = _predictor(Acc, unet, vae, prompt, opts, 0)
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    sample = {"rgb": rgb, "depth": np.linspace(1, 2, 32 * 32).reshape(32, 32), "valid": np.ones((32, 32), bool)}
    with torch.no_grad(), torch.autocast("cpu", torch.float16):  # as _validate runs it: acc.autocast()
        record = evaluate_samples(pred, [sample], opts.step)
    assert np.isfinite(record["error"])  # the overflowing items were redone on a copy in the fallback dtype
    assert pred.vae_redone >= 1
    assert next(vae.parameters()).dtype == torch.float16
    assert not any(m.inplace for m in vae.modules() if isinstance(m, torch.nn.SiLU))
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())
