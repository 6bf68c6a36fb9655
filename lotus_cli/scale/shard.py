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
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, or None outside a multi-process launch."""
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank = int(environ["RANK"])
        return rank, world, int(environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise UsageError(
            f"WORLD_SIZE is set but RANK / LOCAL_RANK are not integers ({e})",
            "launch with torchrun, or unset WORLD_SIZE",
        ) from e


def resolve_shard(spec: str | None, environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard of this process: --shard, torchrun's rank, both combined, or None (everything)."""
    shard = parse_shard(spec) if spec else None
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
    """--device for this process: under torchrun, ``auto`` becomes cuda:LOCAL_RANK (or cpu without CUDA)."""
    ranks = env_rank(environ)
    if device != "auto" or ranks is None:
        return device
    import torch  # only under torchrun; deciding needs to know whether CUDA exists

    return f"cuda:{ranks[2]}" if torch.cuda.is_available() else "cpu"
