"""The device decisions of the GPU path (issue 27), checked on a CPU machine: device strings the decision
functions take as they are, and a monkeypatched ``torch.cuda`` for what a card would answer."""

from types import SimpleNamespace

import pytest
import torch

from lotus_cli.errors import UsageError
from lotus_cli.model import gpu
from lotus_cli.model.predictor import resolve_device
from lotus_cli.scale.shard import Shard, env_rank, parse_shard, resolve_shard, worker_device


@pytest.fixture
def cards(monkeypatch):
    """CUDA as it would look with the cards of ``majors`` (compute capability per index); current device 0;
    torch.cuda.is_bf16_supported as torch answers it, emulation counted (True for every card)."""
    calls = {"set_device": []}

    def install(*majors):
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(majors))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(major=majors[i]))
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
        return calls

    return install


# ------------------------------------------------------------------------------------------- bf16


def test_bf16_only_on_cards_that_run_it_natively_asked_of_the_card_in_use(cards):
    cards(8, 7)  # cuda:0 an A100 (8.0), cuda:1 a V100 (7.0): torch says bf16 "supported" for both (emulation)
    assert gpu.bf16_supported(torch.device("cuda:0"))
    assert not gpu.bf16_supported(torch.device("cuda:1"))  # not the current device's answer
    assert gpu.fallback_dtype(torch.device("cuda:1")) == torch.float32
    assert gpu.fallback_dtype(torch.device("cuda")) == torch.bfloat16  # plain "cuda": the current device (0)


def test_bf16_on_turing_is_emulated_so_the_vae_falls_back_to_fp32(cards):
    cards(7)  # a T4 or an RTX 20xx
    assert not gpu.bf16_supported(torch.device("cuda"))
    assert gpu.fallback_dtype(torch.device("cuda")) == torch.float32


def test_bf16_elsewhere():
    assert gpu.bf16_supported(torch.device("cpu")) and not gpu.bf16_supported(torch.device("mps"))


# ------------------------------------------------------------------------------------- MPS, float64


def test_antialiased_resize_runs_on_mps_only_from_torch_2_7():
    mps = torch.device("mps")
    assert not gpu.resizes_on(mps, "2.4.1") and not gpu.resizes_on(mps, "2.6.0")
    assert gpu.resizes_on(mps, "2.7.0") and gpu.resizes_on(mps, "2.13.0+cpu")
    assert gpu.resizes_on(torch.device("cuda"), "2.4.0") and gpu.resizes_on(torch.device("cpu"), "2.4.0")


def test_finish_resizes_on_the_cpu_where_the_device_cannot(depth_g, monkeypatch):
    from lotus_cli.model import predictor as P

    pred = P.LotusPredictor.from_pretrained(depth_g, device="cpu")
    decoded = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    want = pred.finish(decoded, (30, 40))
    asked, moved = [], []
    monkeypatch.setattr(P.gpu, "resizes_on", lambda device: asked.append(device) or False)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: moved.append(self.shape) or self.clone())
    got = pred.finish(decoded, (30, 40))
    assert asked == [decoded.device] and moved[0] == decoded.shape and (got == want).all()


# ------------------------------------------------------------------------ the CPU speed code stays there


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_no_row_strips_off_the_cpu(depth_g, device):
    """Strips hold float64 GroupNorm statistics on the device (none on MPS); off the CPU the VAE runs as
    diffusers' modules, and its GroupNorms stay diffusers' own even channels-last."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lotus_cli.model import cpu
    from lotus_cli.model.cpu import strips
    from lotus_cli.model.cpu.calibrate import choose

    unet = UNet2DConditionModel.from_pretrained(depth_g, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(depth_g, subfolder="vae")
    dev = torch.device(device)
    for cl in (None, True):
        c = choose(unet, vae, dev, torch.float16, channels_last=cl)
        assert c.strip_rows == 0 and c.how == "rule: not a CPU"
    engine = cpu.prepare(unet, vae, dev, torch.float16, channels_last=True)
    assert engine.strip_rows == 0 and engine.vae_channels_last
    assert not any(isinstance(m, strips.ChannelsLastGroupNorm) for m in vae.modules())
    assert any(type(m) is torch.nn.GroupNorm for m in vae.modules())


def test_the_cpu_keeps_its_strips(depth_g):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lotus_cli.model.cpu import strips
    from lotus_cli.model.cpu.calibrate import choose

    unet = UNet2DConditionModel.from_pretrained(depth_g, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(depth_g, subfolder="vae")
    assert choose(unet, vae, torch.device("cpu"), torch.float32).strip_rows == strips.ROWS


# ------------------------------------------------------------------------------- which GPU, which rank


def test_an_explicit_cuda_index_must_be_visible_and_becomes_current(cards, monkeypatch):
    calls = cards(8, 8)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert calls["set_device"] == [torch.device("cuda:1")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    cards(8)  # a Ray actor: only its own GPU, as cuda:0
    with pytest.raises(UsageError) as e:
        resolve_device("cuda:1")
    assert "--device cuda:1" in e.value.message and "1 CUDA device" in e.value.message
    assert "CUDA_VISIBLE_DEVICES=3" in e.value.message and "--device cuda" in e.value.hint
    assert resolve_device("cuda") == torch.device("cuda")


def test_under_torchrun_every_rank_gets_its_own_gpu(cards):
    cards(8, 8)
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    assert worker_device("auto", env) == "cuda:1"
    assert worker_device("cuda", env) == "cuda:1"  # not every rank on cuda:0
    assert worker_device("cuda:0", env) == "cuda:0" and worker_device("cpu", env) == "cpu"  # the user's
    assert worker_device("cuda", {}) == "cuda"  # no torchrun: as given
    with pytest.raises(UsageError, match="LOCAL_RANK=2") as e:
        worker_device("auto", {"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "2"})  # 3 ranks, 2 GPUs
    assert "nproc-per-node" in e.value.hint


def test_without_cuda_torchrun_ranks_run_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    assert worker_device("auto", env) == "cpu"
    assert worker_device("cuda", env) == "cuda"  # resolve_device says CUDA is missing, naming --device


@pytest.mark.parametrize(
    "env, name",
    [
        ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1"),
        ({"WORLD_SIZE": "4"}, "RANK is not"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-3"}, "LOCAL_RANK=-3"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ],
)
def test_torchrun_variables_are_range_checked_and_named(env, name):
    with pytest.raises(UsageError) as e:
        env_rank(env)
    assert name in e.value.message and "torchrun" in e.value.hint
    with pytest.raises(UsageError):
        resolve_shard(None, env)


def test_torchrun_variables_in_range():
    assert env_rank({"WORLD_SIZE": "2", "RANK": "1"}) == (1, 2, 1)
    assert env_rank({"WORLD_SIZE": "1", "RANK": "0"}) is None and env_rank({"WORLD_SIZE": "1"}) is None
    assert resolve_shard(None, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}) == Shard(0, 2)


def test_an_empty_shard_is_a_usage_error_not_everything():
    with pytest.raises(UsageError, match="--shard ''"):
        parse_shard("")
    with pytest.raises(UsageError, match="--shard ''"):
        resolve_shard("", {})
    assert resolve_shard(None, {}) is None


# ------------------------------------------------------------------------------------ out of memory


def test_out_of_memory_is_told_from_other_failures():
    assert gpu.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert gpu.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"))
    assert gpu.is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert gpu.is_out_of_memory(wrapped)  # as torch.compile wraps it
    assert not gpu.is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not gpu.is_out_of_memory(ValueError("out of range"))


# --------------------------------------------------------------------------------- the tiling budget


def test_the_cuda_budget_counts_what_the_allocator_holds_cached(monkeypatch):
    """After a first image, PyTorch keeps its activations' blocks cached: free for the next image, but not
    free to the driver. The budget (and so the tile plan) must not shrink for the second image."""
    from lotus_cli.model.tiling import MemoryCost, device_budget

    GB = 1024**3
    cost = MemoryCost(weights=2 * GB, per_pixel=1000.0)
    state = {"free": 10 * GB, "reserved": 2 * GB, "allocated": 2 * GB}  # before the first image: weights only
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (state["free"], 24 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: state["allocated"])
    first = device_budget(torch.device("cuda"), cost)
    state.update(free=6 * GB, reserved=6 * GB)  # after it: 4 GB of activations' blocks cached, unused
    second = device_budget(torch.device("cuda"), cost)
    assert first == second == 2 * GB + 5 * GB


def test_the_mps_budget_is_the_working_set_not_8_gib(monkeypatch):
    from lotus_cli.model.tiling import MemoryCost, device_budget

    GB = 1024**3
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 48 * GB)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 4 * GB)  # the weights
    assert device_budget(torch.device("mps"), MemoryCost(4 * GB, 1.0)) == 4 * GB + 22 * GB


def test_an_auto_budget_is_not_called_max_memory():
    from lotus_cli.model.tiling import MemoryCost, TileOptions, plan_tiles

    cost = MemoryCost(weights=1000, per_pixel=1.0)
    with pytest.raises(UsageError) as e:
        plan_tiles(4000, 3000, TileOptions(tile=512, tile_res=512), cost=cost, budget=5000)  # auto: none given
    assert "--max-memory is" not in e.value.message and "(auto)" in e.value.message
    assert "--max-memory" not in e.value.hint
    with pytest.raises(UsageError) as e:
        plan_tiles(4000, 3000, TileOptions(tile=512, tile_res=512, max_memory=5000), cost=cost, budget=5000)
    assert "--max-memory is" in e.value.message and "raise --max-memory" in e.value.hint
