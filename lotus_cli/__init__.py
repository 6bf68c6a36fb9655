"""lotus-cli: depth and surface normals from images and videos with Lotus (arXiv 2409.18124).

Library use::

    from lotus_cli import LotusPredictor, PredictOptions
    predictor = LotusPredictor.from_pretrained("depth-d")        # or a hub id or a local folder
    pred = predictor.predict(rgb_uint8_hw3, PredictOptions(processing_res=768))
    pred.map  # depth [H, W] in [0, 1] (disparity: 1 = near) or normals [H, W, 3]
"""

__version__ = "0.1.0"

__all__ = ["LotusPredictor", "PredictOptions", "__version__"]


def __getattr__(name):  # lazy: importing lotus_cli must not import torch
    if name in ("LotusPredictor", "PredictOptions"):
        from .model import predictor

        return getattr(predictor, name)
    raise AttributeError(name)
