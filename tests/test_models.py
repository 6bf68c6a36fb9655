import json
import os
import subprocess
import sys
import time

import pytest

from lotus_cli.errors import ModelError
from lotus_cli.model import registry, weights
from lotus_cli.model.predictor import LotusPredictor


def test_registry_names_aliases_and_defaults():
    assert registry.resolve("depth-d").repo_id == "jingheya/lotus-depth-d-v2-0-disparity"
    assert registry.resolve(None, "depth").entry.name == "depth-d-v2-0-disparity"
    assert registry.resolve(None, "normal").repo_id == "jingheya/lotus-normal-d-v1-1"
    assert registry.resolve("NORMAL-G").entry.kind == "normal"
    assert registry.resolve("lotus-depth-g-v1-0").entry.kind == "depth"  # repo name works too
    assert registry.resolve("jingheya/lotus-depth-g-v2-1-disparity").entry.family == "g"
    for e in registry.REGISTRY:
        assert registry.resolve(e.name).entry == e and e.licence and e.task in ("depth", "normal")


def test_unknown_hub_id_and_name():
    ref = registry.resolve("someone/my-lotus-normal-finetune")  # the name is no evidence: its lotus.json will be
    assert ref.repo_id == "someone/my-lotus-normal-finetune" and ref.entry.task is None and not ref.entry.known
    stated = registry.resolve("someone/my-lotus-normal-finetune", "depth", kind="disparity")
    assert (stated.entry.task, stated.entry.kind, stated.entry.source) == ("depth", "disparity", "given")
    with pytest.raises(ModelError) as e:
        registry.resolve("depht-d")
    assert "depth-d" in str(e.value) and "lotus models list" in str(e.value)


def test_wrong_task_is_a_usage_error():
    with pytest.raises(ModelError) as e:
        registry.resolve("normal-d", "depth")
    assert e.value.exit_code == 2 and "predicts normal" in str(e.value)


def test_folder_metadata_from_name_and_lotus_json(checkpoints, tmp_path):
    ref = registry.resolve(checkpoints[("depth", "g")])  # named exactly as the released repo (a git clone)
    assert ref.folder is not None and ref.entry.kind == "disparity" and ref.entry.task == "depth"
    assert ref.entry.source == "registry entry, by folder name = hub repo name"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "lotus.json").write_text(json.dumps({"task": "depth", "kind": "depth", "name": "mine"}))
    assert registry.resolve(tmp_path / "mine").entry.kind == "depth"
    assert registry.resolve(tmp_path / "mine").entry.source == "lotus.json"


def _copy(src, dest, lotus_task=True):
    """A copy of a tiny checkpoint under another folder name; without model_index.json's lotus_task if asked."""
    import shutil

    shutil.copytree(src, dest)
    if not lotus_task:
        index = json.loads((dest / "model_index.json").read_text())
        del index["lotus_task"]
        (dest / "model_index.json").write_text(json.dumps(index))
    return dest


@pytest.mark.parametrize("name", ["my_weights", "lotus-depth-d-v2-0-disparity-copy", "normal-disparity"])
def test_kind_is_never_guessed_from_a_folder_name(checkpoints, tmp_path, name):
    """The same weights under any name that is not a released repo's: model_index.json says depth, nothing says
    disparity or depth, so the model is refused until the caller states it; the name plays no part."""
    folder = _copy(checkpoints[("depth", "d")], tmp_path / name)
    ref = registry.resolve(folder)
    assert (ref.entry.task, ref.entry.kind, ref.entry.source) == ("depth", None, "model_index.json")
    with pytest.raises(ModelError) as e:
        registry.resolve(folder, "depth")
    assert e.value.exit_code == 2 and "--output-kind disparity|depth" in str(e.value) and "lotus.json" in str(e.value)
    for kind in ("disparity", "depth"):
        stated = registry.resolve(folder, "depth", kind=kind)
        assert (stated.entry.kind, stated.entry.source) == (kind, "given")
    with pytest.raises(ModelError, match="predicts depth, not normal"):  # a depth checkpoint is no normal model
        registry.resolve(folder, "normal")
    with pytest.raises(ModelError, match="predicts depth, not normal"):
        registry.resolve(folder, None, kind="normal")


def test_checkpoint_without_any_metadata_and_stated_kinds(checkpoints, tmp_path):
    bare = _copy(checkpoints[("normal", "d")], tmp_path / "weights", lotus_task=False)
    for task in ("depth", "normal"):
        with pytest.raises(ModelError, match="nothing says what it predicts"):
            registry.resolve(bare, task)
    with pytest.raises(ModelError, match="nothing says"):  # the library refuses it too
        LotusPredictor.from_pretrained(bare, device="cpu")
    pred = LotusPredictor.from_pretrained(bare, task="normal", kind="normal", device="cpu")
    assert (pred.task, pred.kind, pred.describe()["kind_source"]) == ("normal", "normal", "given")
    # metadata wins over a contradicting statement, with an error that says so
    (bare / "lotus.json").write_text(json.dumps({"task": "depth", "kind": "depth"}))
    with pytest.raises(ModelError, match="outputs depth, not disparity"):
        registry.resolve(bare, "depth", kind="disparity")
    assert registry.resolve(bare, "depth", kind="depth").entry.source == "lotus.json"
    (bare / "lotus.json").write_text(json.dumps({"task": "depth", "kind": "normal"}))
    with pytest.raises(ModelError, match="unreadable model metadata"):
        registry.resolve(bare)


def test_offline_without_cache_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ModelError) as e:
        registry.fetch(registry.resolve("depth-g"))
    msg = str(e.value)
    assert "jingheya/lotus-depth-g-v2-1-disparity" in msg and "lotus models pull depth-g" in msg
    assert "--model /path" in msg
    assert time.monotonic() - t0 < 10  # no network retries (a dead network retries for ~24 s)


def test_hub_cache_path_is_used(depth_d, tmp_path, monkeypatch):
    """A checkpoint in the Hugging Face cache layout loads by its hub id, with no network."""
    from huggingface_hub.constants import HF_HUB_CACHE

    repo = "jingheya/lotus-depth-d-v2-0-disparity"
    root = os.path.join(HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
    commit = "0" * 40
    snap = os.path.join(root, "snapshots", commit)
    import shutil

    shutil.copytree(depth_d, snap, dirs_exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    try:
        assert registry.cached_folder(repo) is not None
        pred = LotusPredictor.from_pretrained("depth-d", device="cpu")
        assert pred.family == "d" and pred.kind == "disparity"
    finally:
        shutil.rmtree(root)


def test_not_a_checkpoint_and_pickles_refused(tmp_path, depth_d):
    with pytest.raises(ModelError) as e:
        weights.load_unet_vae(tmp_path, None, "cpu")
    assert "not a Lotus checkpoint" in str(e.value) and "hub layout" in str(e.value)
    import shutil

    fake = tmp_path / "pickled"
    shutil.copytree(depth_d, fake)
    (fake / "unet" / "diffusion_pytorch_model.safetensors").rename(fake / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError) as e:
        weights.load_unet_vae(fake, None, "cpu")
    assert "safetensors" in str(e.value)


def test_family_from_in_channels_not_name(checkpoints, tmp_path):
    import shutil

    misnamed = tmp_path / "lotus-depth-d-v2-0-disparity"  # a G checkpoint under a D repo's name
    shutil.copytree(checkpoints[("depth", "g")], misnamed)
    pred = LotusPredictor.from_pretrained(misnamed, device="cpu")
    assert pred.family == "g" and any("weights say G" in w for w in pred.warnings)


def test_cli_models_list_and_path():
    """The table is data: on stdout, with full names when piped, whatever the terminal width."""
    out = subprocess.run(
        [sys.executable, "-m", "lotus_cli", "models", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "40"},
    )
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["name", "aliases", "hub id"]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    for e in registry.REGISTRY:
        assert rows[e.name][2] == e.repo_id and rows[e.name][5] == e.kind
    assert "not stated" in out.stdout and "Open RAIL++-M" in out.stderr
    grep = subprocess.run(
        f"{sys.executable} -m lotus_cli models list | grep depth-d-v2-0-disparity",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert grep.returncode == 0 and "jingheya/lotus-depth-d-v2-0-disparity" in grep.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "lotus_cli", "models", "path", "depth-g"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "lotus models pull depth-g" in missing.stderr and missing.stdout == ""
