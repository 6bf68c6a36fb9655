"""The paper's adaptation protocol (Sec. 4): Stable Diffusion 2 -> Lotus-G or Lotus-D for depth or normals.

surgery (projection class embedding, 8-channel conv_in for G) -> data (Hypersim, Virtual KITTI 2, generic
folders, mixed per batch) -> step (one step and its loss, as the authors train) -> trainer (accelerate:
mixed precision, checkpointing, resume, validation, final save in the hub layout). Run it with `lotus train`
or `accelerate launch -m lotus_cli.train ...` (same options).
"""

from .options import StepOptions, TrainOptions  # noqa: F401
