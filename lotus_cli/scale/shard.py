"""Shards of the work list: ``--shard K/N``, torchrun's RANK / WORLD_SIZE, and the device of a rank.

``--shard K/N``: process K of N (0-based) takes the inputs whose output key hashes to K. The hash is of the
key alone (BLAKE2b), so a file's shard never depends on which other files exist: adding files to the
folder does not move finished work to another shard. Under torchrun, RANK / WORLD_SIZE give the shard and
LOCAL_RANK the device (cuda:LOCAL_RANK when CUDA exists, else the CPU); with ``--shard K/N`` as well, rank
r of W takes shard K*W + r of N*W (a Slurm array of torchrun jobs).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import UsageError
from ..io.sources import Item


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str) -> Shard:
    """'3/8' -> Shard(3, 8); K is 0-based."""
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        k, n = -1, 0
    if n < 1 or not 0 <= k < n:
        raise UsageError(
            f"--shard {spec!r}: expected K/N with 0 <= K < N",
            "e.g. --shard 0/4 .. --shard 3/4; in a Slurm array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
        )
    return Shard(k, n)


def env_rank(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, or None outside a multi-process launch (no
    WORLD_SIZE, or 1). Raises UsageError naming the variable that is missing, not an integer or out of range
    (RANK in 0 .. WORLD_SIZE-1, LOCAL_RANK >= 0), so a bad launch never silently runs the wrong share."""
    if "WORLD_SIZE" not in environ:
        return None
    hint = "launch with torchrun (it sets WORLD_SIZE, RANK and LOCAL_RANK), or unset WORLD_SIZE"
    world = _env_int(environ, "WORLD_SIZE", hint)
    if world < 1:
        raise UsageError(f"WORLD_SIZE={world}: the number of processes must be at least 1", hint)
    if world == 1 and "RANK" not in environ:
        return None
    if "RANK" not in environ:
        raise UsageError(f"WORLD_SIZE={world} is set but RANK is not: which share is this process's?", hint)
    rank = _env_int(environ, "RANK", hint)
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is out of range for WORLD_SIZE={world}: it must be 0 .. {world - 1}", hint)
    local = _env_int(environ, "LOCAL_RANK", hint) if "LOCAL_RANK" in environ else rank
    if local < 0:
        raise UsageError(f"LOCAL_RANK={local} must be >= 0", hint)
    return (rank, world, local) if world > 1 else None


def _env_int(environ: Mapping[str, str], name: str, hint: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise UsageError(f"{name}={environ[name]!r} is not an integer", hint) from None


def resolve_shard(spec: str | None, environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard of this process: --shard, torchrun's rank, both combined, or None (everything)."""
    shard = parse_shard(spec) if spec is not None else None  # --shard "" is a mistake, not "everything"
    ranks = env_rank(environ)
    if ranks is None:
        return shard
    rank, world, _ = ranks
    if shard is None:
        return Shard(rank, world)
    return Shard(shard.index * world + rank, shard.count * world)


def shard_of(key: str, count: int) -> int:
    """The shard (0 .. count-1) an output key belongs to; stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select(items: Iterable[Item], shard: Shard | None) -> list[Item]:
    """The items of ``shard`` (all of them for None), in their given order."""
    items = list(items)
    if shard is None or shard.count == 1:
        return items
    return [i for i in items if shard_of(i.key, shard.count) == shard.index]


def worker_device(device: str, environ: Mapping[str, str] = os.environ) -> str:
    """--device for this process: under torchrun, ``auto`` and ``cuda`` become cuda:LOCAL_RANK (``auto`` the
    CPU without CUDA), so every rank gets its own GPU; an explicit cuda:N is kept. Raises UsageError when
    LOCAL_RANK names a GPU this process does not see (more ranks per node than GPUs)."""
    ranks = env_rank(environ)
    if device.lower() not in ("auto", "cuda") or ranks is None:
        return device
    import torch  # only under torchrun; deciding needs to know whether CUDA exists

    if not torch.cuda.is_available():
        return "cpu" if device.lower() == "auto" else device  # --device cuda without CUDA: resolve_device says so
    from ..model.gpu import check_cuda_index

    check_cuda_index(ranks[2], f"LOCAL_RANK={ranks[2]}", "start at most one process per GPU: torchrun --nproc-per-node")
    return f"cuda:{ranks[2]}"
