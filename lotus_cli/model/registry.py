"""Named Lotus checkpoints: what each predicts, where to find it, and fetching it.

A model spec is a short registry name (``depth-d``), a Hugging Face hub id (``jingheya/lotus-normal-g-v1-1``)
or a local folder in the hub layout (``unet/ vae/ text_encoder/ tokenizer/``). ``resolve`` turns a spec
into a ``ModelRef`` without touching the network; ``fetch`` makes the files local (cache first, then the
hub); ``weights`` loads them.

What a checkpoint predicts (task, output kind) travels with the checkpoint: its registry entry (by name or
hub id, also for a folder in the Hugging Face cache or one named exactly as a released repo), the
``lotus.json`` that ``lotus train`` writes, or ``model_index.json``'s ``lotus_task``. Nothing is guessed
from a folder's name: where nothing says, the caller states it (``kind=``; the CLI's ``--output-kind``)
or the model is refused. ``ModelEntry.source`` records where the answer came from. G vs D is decided from
``unet.config.in_channels`` (8 = image latent + noise, 4 = image latent), not from names.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ModelError, UsageError

HUB_OWNER = "jingheya"


# Files a predictor needs; anything else in a repo (pickles, the scheduler, fp16 duplicates) is skipped.
ALLOW_PATTERNS = [
    "model_index.json",
    "lotus.json",
    "README.md",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
    "lotus_empty_prompt.safetensors",
]


EMBEDDING_FILE = "lotus_empty_prompt.safetensors"


METADATA_FILE = "lotus.json"


@dataclass(frozen=True)
class ModelEntry:
    """Metadata of a checkpoint: what it predicts and how its output reads.

    ``kind``: "disparity" (affine-invariant inverse depth, 1 = near, 0 = far), "depth" (affine-invariant
    depth, 0 = near) or "normal" (camera-space normals, x left, y up, z toward the camera).
    """

    name: str
    repo_id: str
    task: str | None  # None: nothing says (a folder or hub repo without metadata)
    family: str | None = None  # "g" / "d"; confirmed from the weights at load time
    kind: str | None = "depth"
    licence: str = "unknown"
    size_gb: float | None = None
    note: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # Where task and kind come from: "registry entry" (...), "lotus.json", "model_index.json" (the task only),
    # "given" (by the caller: --output-kind, or code that builds the entry, as the trainer does), "unknown".
    source: str = "given"

    @property
    def known(self) -> bool:
        return self.task is not None and self.kind is not None


# Licence as the model cards state it: the Lotus cards state none (the Lotus code is Apache-2.0; the
# weights are fine-tuned from Stable Diffusion 2, released under CreativeML Open RAIL++-M). Sizes are
# those of the whole hub repos (G repo ~4.3 GB: UNet fp32 3.47 GB, VAE and text encoder fp16).
CARD_LICENCE = "not stated"


LICENCE_NOTE = (
    "The Lotus model cards state no licence; the Lotus code is Apache-2.0 and the weights are "
    "fine-tuned from Stable Diffusion 2 (CreativeML Open RAIL++-M): check both before commercial use."
)


REGISTRY: tuple[ModelEntry, ...] = tuple(
    replace(e, source="registry entry")
    for e in (
        ModelEntry(
            "depth-g-v2-1-disparity",
            f"{HUB_OWNER}/lotus-depth-g-v2-1-disparity",
            "depth",
            "g",
            "disparity",
            CARD_LICENCE,
            4.3,
            "generative; uncertainty maps",
            ("depth-g",),
        ),
        ModelEntry(
            "depth-d-v2-0-disparity",
            f"{HUB_OWNER}/lotus-depth-d-v2-0-disparity",
            "depth",
            "d",
            "disparity",
            CARD_LICENCE,
            4.3,
            "deterministic; default for depth",
            ("depth-d",),
        ),
        ModelEntry(
            "normal-g-v1-1",
            f"{HUB_OWNER}/lotus-normal-g-v1-1",
            "normal",
            "g",
            "normal",
            CARD_LICENCE,
            4.3,
            "generative; uncertainty maps",
            ("normal-g",),
        ),
        ModelEntry(
            "normal-d-v1-1",
            f"{HUB_OWNER}/lotus-normal-d-v1-1",
            "normal",
            "d",
            "normal",
            CARD_LICENCE,
            4.3,
            "deterministic; default for normals",
            ("normal-d",),
        ),
        ModelEntry(
            "depth-g-v1-0",
            f"{HUB_OWNER}/lotus-depth-g-v1-0",
            "depth",
            "g",
            "depth",
            CARD_LICENCE,
            4.3,
            "older; affine-invariant depth",
        ),
        ModelEntry(
            "depth-d-v1-0",
            f"{HUB_OWNER}/lotus-depth-d-v1-0",
            "depth",
            "d",
            "depth",
            CARD_LICENCE,
            4.3,
            "older; affine-invariant depth",
        ),
    )
)


DEFAULT_MODEL = {"depth": "depth-d", "normal": "normal-d"}


DEFAULT_G_MODEL = {"depth": "depth-g", "normal": "normal-g"}


def _lookup() -> dict[str, ModelEntry]:
    table = {}
    for e in REGISTRY:
        for key in (e.name, e.repo_id, e.repo_id.split("/")[1], *e.aliases):
            table[key.lower()] = e
    return table


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec: the entry describing it and where its files are (or will be)."""

    entry: ModelEntry
    repo_id: str | None = None  # set for hub models
    folder: Path | None = None  # set for local folders (and after fetch)

    @property
    def label(self) -> str:
        return self.repo_id or str(self.folder)


KINDS = {"depth": ("disparity", "depth"), "normal": ("normal",)}  # output kinds of each task


def task_of_kind(kind: str) -> str:
    """ "disparity" / "depth" -> "depth"; "normal" -> "normal"."""
    return "normal" if kind == "normal" else "depth"


def resolve(spec: str | os.PathLike | None, task: str | None = None, kind: str | None = None) -> ModelRef:
    """Turn ``spec`` (registry name, hub id or folder) into a ModelRef; never touches the network.

    ``task`` ("depth" / "normal") picks the default model when ``spec`` is None and refuses a model known
    to predict the other task, or a folder that says nothing about what it predicts. ``kind``
    ("disparity" / "depth" / "normal") states the output kind of a checkpoint whose metadata does not;
    it must agree with metadata that does.
    """
    if kind is not None and kind not in (*KINDS["depth"], *KINDS["normal"]):
        raise ModelError(f"kind must be disparity, depth or normal, not {kind!r}")
    if spec is None or str(spec) == "":
        if task is None:
            raise ModelError("no model given", "pass --model NAME (see `lotus models list`)")
        spec = DEFAULT_MODEL[task]
    spec_s = str(spec)
    path = Path(spec_s).expanduser()
    if path.is_dir():
        ref = ModelRef(_folder_entry(path), folder=path.resolve())
    elif spec_s.lower() in _lookup():
        entry = _lookup()[spec_s.lower()]
        ref = ModelRef(entry, repo_id=entry.repo_id)
    elif spec_s.count("/") == 1 and not spec_s.startswith((".", "/", "~")) and not path.exists():
        # A hub repo outside the registry: its lotus.json, once fetched, says what it predicts.
        ref = ModelRef(ModelEntry(spec_s, spec_s, None, kind=None, source="unknown"), repo_id=spec_s)
    else:
        names = sorted({e.name for e in REGISTRY} | {a for e in REGISTRY for a in e.aliases})
        close = difflib.get_close_matches(spec_s, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelError(
            f"unknown model {spec_s!r}: not a registry name, a hub id (owner/name) or a folder",
            f"{hint}see `lotus models list`, or pass --model /path/to/checkpoint",
        )
    ref = replace(ref, entry=_stated(ref, kind))
    if task is not None:
        check_task(ref, task)
    return ref


def _stated(ref: ModelRef, kind: str | None) -> ModelEntry:
    """The entry with the caller's ``kind`` filled in where the metadata is silent; a contradiction is an error."""
    e = ref.entry
    if kind is None:
        return e
    if e.task is not None and e.task != task_of_kind(kind):
        raise ModelError(
            f"model {ref.label} predicts {e.task}, not {kind} (from its {e.source})",
            f"drop the output kind, or use a {task_of_kind(kind)} model",
        )
    if e.kind is not None:
        if e.kind != kind:
            raise ModelError(
                f"model {ref.label} outputs {e.kind}, not {kind} (from its {e.source})",
                "drop the output kind: the checkpoint's metadata says what it outputs",
            )
        return e
    return replace(e, task=task_of_kind(kind), kind=kind, source="given")


def check_output_kind(kind: str | None, task: str) -> None:
    """A stated output kind (``kind``; the CLI's --output-kind) must be one of ``task``'s: disparity or depth,
    or normal."""
    if kind is not None and kind not in KINDS[task]:
        raise UsageError(f"--output-kind must be {' or '.join(KINDS[task])} for {task}, not {kind!r}")


def check_task(ref: ModelRef, task: str) -> None:
    """Refuse a model for ``task`` when it is known to predict the other task, or nothing says what it predicts
    (a local folder; a hub repo outside the registry is checked again once fetched)."""
    if ref.folder is not None:
        check_known(ref, task)
    elif ref.entry.task is not None and ref.entry.task != task:
        check_known(ref, task)


def check_known(ref: ModelRef, task: str | None = None) -> None:
    """Refuse a checkpoint known to predict another ``task``, or whose task or output kind nothing states
    (ModelError naming how to state it)."""
    e = ref.entry
    if task is not None and e.task is not None and e.task != task:
        raise ModelError(
            f"model {ref.label} predicts {e.task}, not {task} (from its {e.source})",
            f"use a {task} model such as {DEFAULT_MODEL[task]}",
        )
    if e.known:
        return
    task = e.task or task
    kinds = KINDS[task] if task else (*KINDS["depth"], *KINDS["normal"])
    what = f"which {task} it outputs ({' or '.join(kinds)})" if e.task else "what it predicts"
    example = json.dumps({"task": task or "depth", "kind": kinds[0]})
    raise ModelError(
        f"model {ref.label}: nothing says {what} (no lotus.json, not a registry model)",
        f"state it with --output-kind {'|'.join(kinds)}, or write {METADATA_FILE} beside unet/: {example}",
    )


def _hub_id_of(path: Path) -> str | None:
    """The hub id of a folder in the Hugging Face cache layout (.../models--owner--name/snapshots/<commit>)."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        owner_name = parts[-3][len("models--") :].split("--", 1)
        if len(owner_name) == 2:
            return "/".join(owner_name)
    return None


def _folder_entry(path: Path) -> ModelEntry:
    """What a local checkpoint says it is: lotus.json, else the registry entry of its hub id (the Hugging Face
    cache path, or a folder named exactly as a released repo, as a git clone is), else model_index.json's
    lotus_task (task only; a normal model has one output kind). Otherwise task and kind are None."""
    meta_file = path / METADATA_FILE
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            t = meta["task"]
            if t not in KINDS:
                raise ValueError(f"task {t!r} is not depth or normal")
            kind = meta.get("kind", "normal" if t == "normal" else None)
            if kind is not None and kind not in KINDS[t]:
                raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS[t])}")
            return ModelEntry(
                name=meta.get("name", path.name),
                repo_id=str(path),
                task=t,
                family=meta.get("family"),
                kind=kind,
                licence=meta.get("licence", "unknown"),
                note=meta.get("note", ""),
                source=METADATA_FILE,
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(
                f"{meta_file}: unreadable model metadata ({e})",
                'fix or delete the file; it holds {"task": "depth"|"normal", "kind": ...}',
            ) from e
    table = _lookup()
    for key, how in ((_hub_id_of(path), "hub cache path"), (path.name, "folder name = hub repo name")):
        if key and key.lower() in table:
            return replace(table[key.lower()], repo_id=str(path), source=f"registry entry, by {how}")
    index = path / "model_index.json"
    hint_task = None
    if index.is_file():
        try:
            hint_task = json.loads(index.read_text()).get("lotus_task")
        except ValueError:
            pass
    if hint_task in KINDS:
        kind = "normal" if hint_task == "normal" else None
        return ModelEntry(path.name, str(path), hint_task, kind=kind, source="model_index.json")
    return ModelEntry(path.name, str(path), None, kind=None, source="unknown")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_folder(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id`` if every file we need is there, else None. No network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / "unet" / "config.json").is_file() else None


def fetch(ref: ModelRef) -> ModelRef:
    """Make ``ref``'s files local: the folder itself, the hub cache, or a download (with progress bar).

    Raises ModelError naming the repo and the fix when the files cannot be had (offline, no network,
    unknown or gated repo).
    """
    if ref.folder is not None:
        return ref
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    repo = ref.repo_id
    folder = cached_folder(repo)
    if folder is None:
        pull_hint = (
            f"run `lotus models pull {ref.entry.name}` on a machine with network "
            f"(or with HF_HUB_OFFLINE unset), or pass --model /path/to/a/downloaded/folder"
        )
        if hub_offline():
            raise ModelError(f"model {repo} is not in the local cache and HF_HUB_OFFLINE is set", pull_hint)
        try:
            folder = Path(snapshot_download(repo, allow_patterns=ALLOW_PATTERNS))
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise ModelError(
                f"model {repo} was not found on the hub or is gated ({type(e).__name__})",
                "check the id with `lotus models list`, or log in with `hf auth login`",
            ) from e
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise ModelError(f"cannot download model {repo}: {str(e).splitlines()[0]}", pull_hint) from e
    if ref.entry.source in ("unknown", "given"):  # a hub repo outside the registry: its own metadata, if any
        own = ModelRef(replace(_folder_entry(folder), name=repo, repo_id=repo), repo_id=repo, folder=folder)
        if own.entry.known or ref.entry.source == "unknown":
            return replace(own, entry=_stated(own, ref.entry.kind if ref.entry.source == "given" else None))
    return replace(ref, folder=folder)


def check_layout(folder: Path) -> None:
    need = ["unet/config.json", "vae/config.json"]
    missing = [n for n in need if not (folder / n).is_file()]
    weights = "diffusion_pytorch_model.safetensors"
    for sub in ("unet", "vae"):
        if (folder / sub).is_dir() and not (folder / sub / weights).is_file():
            missing.append(f"{sub}/{weights} (only safetensors weights are loaded, never pickles)")
    if missing:
        raise ModelError(
            f"{folder} is not a Lotus checkpoint: missing {', '.join(missing)}",
            "pass a folder in the hub layout (unet/, vae/, text_encoder/, tokenizer/, model_index.json)",
        )
