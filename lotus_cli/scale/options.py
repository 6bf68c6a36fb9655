"""How to spread one command's work: the scale-out options (docs: "Many GPUs and machines")."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..errors import UsageError
from .shard import parse_shard

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Scale:
    """``shard``: "K/N" (--shard); ``engine``: local or ray; the rest: the Ray pool (--ray-address, --workers,
    --gpus-per-worker, --cpus-per-worker)."""

    shard: str | None = None
    engine: str = "local"
    ray_address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    def check(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.engine == "local" and (
            self.ray_address or self.workers != 1 or self.gpus_per_worker or self.cpus_per_worker != 1
        ):
            raise UsageError("--ray-address, --workers, --gpus-per-worker and --cpus-per-worker need --engine ray")
        if self.workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise UsageError("--workers must be >= 1, --gpus-per-worker >= 0 and --cpus-per-worker > 0")
        if self.shard is not None:
            parse_shard(self.shard)
        if self.engine == "ray" and importlib.util.find_spec("ray") is None:  # an extra: say how to add it
            raise UsageError("--engine ray needs Ray, which is not installed", "pip install 'lotus-cli[ray]'")
