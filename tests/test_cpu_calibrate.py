"""The per-machine choice of CPU fast paths (lotus_cli/model/cpu/calibrate.py): it picks what its timings say is
fastest, remembers it, survives a broken cache, and falls back to its rule where timings cannot be trusted.

Timings are made deterministic with a fake clock that only the (wrapped) convolutions advance, so the
tests assert the decision logic, not this machine's speed."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from lotus_cli.model import weights
from lotus_cli.model.cpu import calibrate, prepack, strips
from lotus_cli.model.predictor import LotusPredictor, PredictOptions

from .conftest import make_image

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(
    not prepack.available(CPU, torch.float32), reason="this torch build has no oneDNN convolution operators"
)


class FakeClock:
    """A clock that stands still except when ``tick`` moves it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def tick(self, seconds):
        self.now += seconds


def layout_of(x, weight) -> str:
    if weight.is_mkldnn:
        return "channels_last+packed"
    cl = x.dim() == 4 and x.stride()[1] == 1 and x.shape[1] > 1
    return "channels_last" if cl else "nchw"


def runs_in(x, weight) -> str:
    """The memory format torch runs a convolution in: channels-last when its input or its weight is (and is
    not also plain contiguous, as a one-pixel input can be)."""
    cl = any(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in (x, weight))
    return "channels_last" if cl else "nchw"


@pytest.fixture
def timed(monkeypatch):
    """Timings allowed on the tiny models (and on this shared, busy machine), on a fake clock; returns a
    function that sets each layout's cost per convolution call."""
    clock = FakeClock()
    monkeypatch.setattr(calibrate, "_clock", clock)
    monkeypatch.setattr(calibrate, "MIN_TIMED_BYTES", 0)
    monkeypatch.setattr(calibrate, "busy", lambda: (None, 2))
    costs = {}
    real = prepack.conv2d

    def conv2d(x, weight, *args, **kwargs):
        clock.tick(costs.get(layout_of(x, weight), 0.0))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(prepack, "conv2d", conv2d)
    return clock, costs


@pytest.fixture(scope="module")
def modules(depth_g):
    return weights.load_unet_vae(depth_g, torch.float32, CPU)


@pytest.mark.parametrize(
    "fast",
    [pytest.param("nchw"), pytest.param("channels_last"), pytest.param("channels_last+packed", marks=needs_onednn)],
)
def test_the_layout_that_times_fastest_is_chosen(modules, timed, tmp_path, fast):
    clock, costs = timed
    costs.update({lay: 0.01 for lay in calibrate.LAYOUTS}, **{fast: 0.001})
    c = calibrate.choose(*modules, CPU, torch.float32, processing_res=64, cache=tmp_path / "c.json")
    assert c.how == "measured" and c.layout == fast
    est = c.times["layout"]
    assert set(est) == set(calibrate.LAYOUTS if prepack.available(CPU, torch.float32) else calibrate.LAYOUTS[:2])
    assert est[fast] == min(est.values()) and est[fast] > 0
    # the estimates count every convolution of a prediction: 10x the cost per call, 10x the estimate
    other = next(lay for lay in est if lay != fast)
    assert est[other] == pytest.approx(10 * est[fast], rel=1e-6)


def test_what_the_caller_fixes_is_not_timed(modules, timed, tmp_path):
    clock, costs = timed
    costs.update(nchw=0.001, channels_last=0.01)
    c = calibrate.choose(
        *modules,
        CPU,
        torch.float32,
        channels_last=True,
        pack_weights=False,
        processing_res=64,
        cache=tmp_path / "c.json",
    )
    assert c.layout == "channels_last" and c.times["layout"] == {}  # one layout left: nothing to time


def test_a_calibration_that_cannot_run_falls_back_to_the_rule(modules, timed, tmp_path, monkeypatch):
    def broken(*a):
        raise NotImplementedError("no meta kernel for this op")

    monkeypatch.setattr(calibrate, "trace_convolutions", broken)
    c = calibrate.choose(*modules, CPU, torch.float32, processing_res=64, cache=tmp_path / "c.json")
    assert c.how.startswith("rule: calibration failed (NotImplementedError") and c.channels_last
    assert not (tmp_path / "c.json").exists()


def test_strips_are_kept_unless_slower_than_the_plain_modules(modules, timed, tmp_path, monkeypatch):
    """Strips (less memory) win while within STRIP_SLACK of diffusers' modules; the fastest row count."""
    clock, costs = timed
    res_type = type(modules[1].decoder.up_blocks[-1].resnets[-1])
    plain_forward, real_resnet = res_type.forward, strips.resnet
    per_call = {"plain": 1.0, 16: 0.2, 32: 0.1}

    def plain(self, *a, **k):
        clock.tick(per_call["plain"])
        return plain_forward(self, *a, **k)

    def striped(res, x, rows):
        clock.tick(per_call[rows])
        return real_resnet(res, x, rows)

    monkeypatch.setattr(res_type, "forward", plain)
    monkeypatch.setattr(strips, "resnet", striped)
    monkeypatch.setattr(calibrate, "ROW_CHOICES", (16, 32))
    # the tiny VAE has 4 pixels per latent cell: 256 px reaches the size from which strips run
    c = calibrate.choose(*modules, CPU, torch.float32, processing_res=256, cache=tmp_path / "a.json")
    assert c.strip_rows == 32 and set(c.times["strips"]) == {"0", "16", "32"}
    per_call.update({"plain": 0.1, 16: 0.2, 32: 0.12})  # strips 20 % slower than the modules: not worth it
    c = calibrate.choose(*modules, CPU, torch.float32, processing_res=256, cache=tmp_path / "b.json")
    assert c.strip_rows == 0
    per_call.update({"plain": 0.1, 16: 0.2, 32: 0.104})  # 4 % slower: kept for the memory
    c = calibrate.choose(*modules, CPU, torch.float32, processing_res=256, cache=tmp_path / "c.json")
    assert c.strip_rows == 32


def test_the_cache_is_written_reused_and_a_corrupt_one_ignored(modules, timed, tmp_path, monkeypatch):
    clock, costs = timed
    costs.update(nchw=0.001, channels_last=0.01, **{"channels_last+packed": 0.01})
    path = tmp_path / "lotus" / "calibration.json"
    first = calibrate.choose(*modules, CPU, torch.float32, processing_res=64, cache=path)
    data = json.loads(path.read_text())
    (entry,) = data["entries"].values()
    assert first.how == "measured" and entry["unet"] == entry["vae"] == "nchw" and entry["machine"]["cpu"]
    # reused: no timing at all the second time, the same choice
    monkeypatch.setattr(calibrate, "time_layouts", lambda *a: pytest.fail("timed again despite the cache"))
    again = calibrate.choose(*modules, CPU, torch.float32, processing_res=64, cache=path)
    assert again.how == "cached" and again.layout == first.layout == "nchw" and again.times == first.times
    # a corrupt file, or entries not of the shape this version writes, are ignored and rewritten
    monkeypatch.undo()
    for garbage in (
        "{not json",
        json.dumps({"version": 2, "entries": {k: {"unet": "yes"} for k in data["entries"]}}),
        json.dumps({"version": 1, "entries": data["entries"]}),  # an older version's file
        "[]",
        "",
    ):
        path.write_text(garbage)
        c = _timed_choose(modules, path, monkeypatch)
        assert c.how == "measured" and c.layout == "channels_last"
        assert json.loads(path.read_text())["entries"]  # rewritten, readable


def _timed_choose(modules, path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(calibrate, "_clock", clock)
    monkeypatch.setattr(calibrate, "MIN_TIMED_BYTES", 0)
    monkeypatch.setattr(calibrate, "busy", lambda: (None, 2))
    real = prepack.conv2d
    costs = {"nchw": 0.01, "channels_last": 0.001, "channels_last+packed": 0.01}
    monkeypatch.setattr(
        prepack, "conv2d", lambda x, w, *a, **k: (clock.tick(costs[layout_of(x, w)]), real(x, w, *a, **k))[1]
    )
    return calibrate.choose(*modules, CPU, torch.float32, processing_res=64, cache=path)


def test_the_cache_lives_in_lotus_cache_or_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("LOTUS_CACHE", str(tmp_path / "a"))
    assert calibrate.cache_file() == tmp_path / "a" / "calibration.json"
    monkeypatch.delenv("LOTUS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert calibrate.cache_file() == tmp_path / "x" / "lotus" / "calibration.json"


def test_without_timings_the_rule_decides(modules, monkeypatch, tmp_path):
    """Tiny models and busy machines take the rule: packed weights only on AVX-512; a busy machine's
    choice is not cached."""
    path = tmp_path / "c.json"
    monkeypatch.setattr(calibrate, "time_layouts", lambda *a: pytest.fail("timed"))
    c = calibrate.choose(*modules, CPU, torch.float32, processing_res=64, cache=path)
    assert c.how.startswith("rule:") and "too small" in c.how and c.channels_last and c.strip_rows == strips.ROWS
    monkeypatch.setattr(calibrate, "MIN_TIMED_BYTES", 0)
    monkeypatch.setattr(calibrate, "busy", lambda: (9.5, 2))
    for flags, packed in ((("avx2",), False), (("avx2", "avx512f"), prepack.available(CPU, torch.float32))):
        monkeypatch.setattr(calibrate, "machine", lambda flags=flags: calibrate.Machine("cpu", flags, 2, "t", 2))
        c = calibrate.choose(*modules, CPU, torch.float32, processing_res=64, cache=path)
        assert "busy" in c.how and c.channels_last and c.pack_weights == packed
    assert not path.exists()


def test_the_traced_convolutions_are_the_ones_a_prediction_runs(modules):
    """The meta-device trace finds every convolution call of encode, UNet and decode, with its input size."""
    unet, vae = modules
    calls = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: calls.append((m, tuple(i[0].shape[-2:]))))
        for m in (*unet.modules(), *vae.modules())
        if isinstance(m, torch.nn.Conv2d)
    ]
    pred_size = (48, 64)
    with torch.inference_mode():
        z = vae.encode(torch.zeros(1, 3, *pred_size)).latent_dist.mean
        out = unet(
            torch.zeros(1, 8, *z.shape[-2:]),
            torch.tensor(999),
            encoder_hidden_states=torch.zeros(1, 2, 32),
            class_labels=torch.zeros(1, 4),
        ).sample
        vae.decode(out)
    for h in hooks:
        h.remove()
    want = Counter((m.in_channels, m.out_channels, m.kernel_size, m.stride, hw) for m, hw in calls)
    got = Counter()
    for part, conv, hw, uses in calibrate.trace_convolutions(unet, vae, pred_size):
        got[(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, hw)] += uses
        owner = {"unet": unet, "vae": vae}[part]
        assert any(conv is m for m in owner.modules())  # the real module of the named part, for its weight
    assert sum(got.values()) == sum(want.values()) > 20
    assert got == want


def test_the_predictor_runs_as_the_cache_says(depth_g, monkeypatch, tmp_path):
    """A choice found in the cache is what the predictor applies; the numbers stay."""
    monkeypatch.setattr(calibrate, "MIN_TIMED_BYTES", 0)
    monkeypatch.setenv("LOTUS_CACHE", str(tmp_path))
    unet, vae = weights.load_unet_vae(depth_g, torch.float32, CPU)
    layouts = list(calibrate.LAYOUTS if prepack.available(CPU, torch.float32) else calibrate.LAYOUTS[:2])
    torch.set_num_threads(1)  # the key holds the thread count the predictor starts with
    key = calibrate.cache_key(unet, vae, torch.float32, (64, 64), layouts)
    record = dict(
        unet="nchw",
        vae="nchw",
        strip_rows=0,
        threads=2,
        how="measured",
        size=[64, 64],
        times={"layout": {"nchw": 1.0}},
        seconds=0.5,
    )
    entries = {"version": calibrate.CACHE_VERSION, "entries": {key: record}}
    (tmp_path / "calibration.json").write_text(json.dumps(entries))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pred = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32", processing_res=64)
        assert torch.get_num_threads() == 2  # the recorded thread count is set
    finally:
        torch.set_num_threads(before)
    assert pred.engine.choices.how == "cached"
    assert not pred.channels_last and not pred.packed and pred.strip_rows == 0
    assert not any(isinstance(m, prepack.PackedConv2d) for m in pred.vae.modules())
    img, opts = make_image(40, 64, 2), PredictOptions(processing_res=64, seed=3)
    fixed = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32", channels_last=True)
    assert np.abs(pred.predict(img, opts).map - fixed.predict(img, opts).map).max() < 1e-5  # NCHW kernels: rounding


@pytest.mark.parametrize("fast", [1, 2])
def test_the_thread_count_that_times_fastest_is_chosen(modules, timed, tmp_path, monkeypatch, fast):
    """Where the usable CPUs and torch's default differ, the costliest convolutions are timed at each
    count; the fastest is chosen, and torch's own count is left as it was until the model is prepared."""
    clock, costs = timed
    costs.update({lay: 0.01 for lay in calibrate.LAYOUTS})
    monkeypatch.setattr(calibrate, "thread_candidates", lambda: [1, 2])
    inner = prepack.conv2d

    def conv2d(x, w, *a, **k):  # the other count made artificially slow
        clock.tick(0.0 if torch.get_num_threads() == fast else 0.05)
        return inner(x, w, *a, **k)

    monkeypatch.setattr(prepack, "conv2d", conv2d)
    before = torch.get_num_threads()
    c = calibrate.choose(*modules, CPU, torch.float32, processing_res=64, cache=tmp_path / "c.json")
    assert torch.get_num_threads() == before
    t = c.times["threads"]
    assert c.threads == fast and set(t) == {"1", "2"} and t[str(fast)] < t[str(3 - fast)]
    # the timed layers are THREAD_LAYERS calls' worth: 3 layers x their uses x 0.05 s apart, at least
    assert t[str(3 - fast)] - t[str(fast)] >= calibrate.THREAD_LAYERS * 0.05 - 1e-9


def test_threads_set_by_the_user_or_a_single_candidate_are_not_timed(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert calibrate.thread_candidates() == []
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(calibrate.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert calibrate.thread_candidates() == sorted({torch.get_num_threads(), 4})


def test_the_flags_are_those_the_kernels_may_use():
    """An ISA cap (torch's capability, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) takes AVX-512 out of
    the flags the rule and the cache key see; a machine capped to AVX2 is calibrated apart."""
    every = set(calibrate.FLAGS)
    assert calibrate.usable_flags(every, "AVX512", {}) == calibrate.FLAGS
    assert calibrate.usable_flags(every, "AVX2", {}) == ("avx2",)
    assert calibrate.usable_flags(every, "AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == ("avx2",)
    assert calibrate.usable_flags(every, "AVX512", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}) == ("avx2",)
    assert calibrate.usable_flags(every, "AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) == ("avx2", "avx512f")
    bf16 = calibrate.usable_flags(every, "AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert bf16 == ("avx2", "avx512f", "avx512_bf16")
    assert calibrate.usable_flags({"avx2", "sse4_2"}, "AVX2", {}) == ("avx2",)


def test_an_isa_cap_changes_the_machine_and_the_cache_key(modules, monkeypatch):
    import subprocess
    import sys

    code = "from lotus_cli.model.cpu.calibrate import machine; m = machine(); print(m.flags, m.isa)"
    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "avx512f" not in out and "AVX2" in out and "ONEDNN_MAX_CPU_ISA=AVX2" in out
    keys = set()
    for isa in ("AVX512", "AVX2 ONEDNN_MAX_CPU_ISA=AVX2"):
        monkeypatch.setattr(calibrate, "machine", lambda isa=isa: calibrate.Machine("cpu", ("avx2",), 2, "t", 2, isa))
        keys.add(calibrate.cache_key(*modules, torch.float32, (64, 64), ["nchw"]))
    assert len(keys) == 2


@pytest.mark.parametrize("fast", [("nchw", "channels_last"), ("channels_last", "nchw")], ids=("unet-nchw", "vae-nchw"))
def test_each_module_runs_in_the_layout_fastest_for_it(depth_g, timed, tmp_path, monkeypatch, fast):
    """A UNet fastest as NCHW beside a VAE fastest channels-last (as measured on AVX2 kernels), or the other
    way round, runs so: each module's weights, and the inputs its 3 x 3 convolutions are handed, in its
    own memory format (torch runs a convolution channels-last when its input is, whatever its weight); the
    numbers those of the plain modules."""
    unet, vae = weights.load_unet_vae(depth_g, torch.float32, CPU)
    vae_convs = {id(m) for m in vae.modules()}
    fast = dict(zip(("unet", "vae"), fast))
    monkeypatch.setattr(
        calibrate,
        "_conv_estimates",
        lambda conv, hw, dtype, layouts, gen: {
            lay: 0.001 if lay == fast["vae" if id(conv) in vae_convs else "unet"] else 0.01 for lay in layouts
        },
    )
    monkeypatch.setenv("LOTUS_CACHE", str(tmp_path))
    c = calibrate.choose(unet, vae, CPU, torch.float32, processing_res=64)
    assert (c.unet, c.vae) == (fast["unet"], fast["vae"]) and c.layout == f"unet {c.unet}, vae {c.vae}"
    t = c.times
    assert {p: min(t[p], key=t[p].get) for p in ("unet", "vae")} == fast
    assert t["layout"]["nchw"] == pytest.approx(t["unet"]["nchw"] + t["vae"]["nchw"])
    pred = LotusPredictor.from_pretrained(str(depth_g), device="cpu", dtype="fp32", processing_res=64)
    assert pred.engine.choices.how == "cached" and pred.engine.choices.layout == c.layout
    seen = {}  # the layouts each module's 3 x 3 convolutions run in, from the weight and input handed over
    for part, model in (("unet", pred.unet), ("vae", pred.vae)):
        first = model.conv_in if part == "unet" else model.encoder.conv_in
        assert first.weight.is_contiguous() == (fast[part] == "nchw")
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.register_forward_pre_hook(
                    lambda m, inp, part=part: seen.setdefault(part, set()).add(runs_in(inp[0], m.weight))
                )
    plain = LotusPredictor.from_pretrained(
        str(depth_g), device="cpu", dtype="fp32", processing_res=64, channels_last=False, pack_weights=False
    )
    plain.strip_rows = pred.strip_rows = 0
    img, opts = make_image(40, 64, 5), PredictOptions(processing_res=64, seed=1)
    assert np.abs(pred.predict(img, opts).map - plain.predict(img, opts).map).max() < 1e-5
    assert seen == {p: {lay} for p, lay in fast.items()}  # no convolution ran in the other module's format


def test_a_layer_is_timed_whole_or_on_a_full_width_band_of_strip_rows(timed, monkeypatch):
    """What each convolution is timed on: the whole call while within WHOLE_FLOP and WHOLE_BYTES, else a
    band of output rows at full width, at least a strip's rows (the call the VAE's big stages make), with
    the time scaled up by the rows. (Windows of a few output pixels rated the layouts unlike whole runs.)"""
    clock, costs = timed
    shapes = []
    real = prepack.conv2d

    def conv2d(x, weight, *args, **kwargs):
        shapes.append(tuple(x.shape))
        clock.tick(0.001)
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(prepack, "conv2d", conv2d)
    gen = torch.Generator().manual_seed(0)
    cases = [  # (conv, input (h, w), FLOP limit, the input timed, how many of it make the layer)
        (torch.nn.Conv2d(8, 8, 3, padding=1), (40, 48), 8e9, (1, 8, 40, 48), 1),
        (torch.nn.Conv2d(8, 8, 3, padding=1), (128, 48), 1e6, (1, 8, strips.ROWS, 48), 128 / strips.ROWS),
        (torch.nn.Conv2d(3, 128, 3, padding=1), (512, 512), 8e9, (1, 3, 126, 512), 512 / 126),  # 32 MB: 126 rows
        (torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), (128, 48), 1e6, (1, 8, 73, 48), 64 / 37),  # 37 rows of 64
    ]
    for conv, hw, limit, timed_shape, scale in cases:
        monkeypatch.setattr(calibrate, "WHOLE_FLOP", limit)
        shapes.clear()
        est = calibrate._conv_estimates(conv, hw, torch.float32, ["nchw"], gen)
        assert set(shapes) == {timed_shape}
        assert est["nchw"] == pytest.approx(0.001 * scale)
