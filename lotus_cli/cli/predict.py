"""`lotus depth`, `lotus normal` and `lotus uncertainty`: parse, build the request, run it, report.

The three commands share their options (``options.PREDICT_OPTIONS``, added by ``with_options``); the work is
``scale.dispatch.predict`` (in this process, or spread over processes and machines).
"""

from __future__ import annotations

from ..errors import UsageError
from .application import app
from .options import Inputs, NormalOutputKind, with_options
from .predict_options import PREDICT_OPTIONS, SCALE_OPTIONS, Batch, Samples, SpreadCmap, SpreadRawOut, Task, Tta
from .report import Report, fail


def run_predict(task: str, inputs, options: dict, **fixed) -> None:
    """One call of a predict command: the library's request and scale from the parsed ``options``, then
    the run, its report and its exit code. Library modules are imported here, so `lotus --help` is fast."""
    from ..run.predict import PredictRequest
    from ..scale.dispatch import predict
    from ..scale.options import Scale

    json = options.pop("json")
    if json and options.get("raw") is not None:
        fail(UsageError("--raw writes maps to stdout and no files: --json cannot apply", "drop --json, or --raw"))
    scale = Scale(**{name: options.pop(name) for name in SCALE_OPTIONS})
    request = PredictRequest(task, tuple(inputs or ()), **options, **fixed)
    Report(json).run(lambda report: predict(request, scale, report), request.out_dir)


@app.command()
@with_options(PREDICT_OPTIONS, omit=("frame",))
def depth(inputs: Inputs = None, **options):
    """Depth maps for images and videos.

    Default model: depth-d (jingheya/lotus-depth-d-v2-0-disparity, deterministic, best AbsRel in the
    paper), which predicts affine-invariant disparity (1 = near)."""
    run_predict("depth", inputs, options)


@app.command()
@with_options(PREDICT_OPTIONS, omit=("cmap", "stabilize"), output_kind=(NormalOutputKind, None))
def normal(inputs: Inputs = None, **options):
    """Surface-normal maps for images and videos.

    Default model: normal-d (jingheya/lotus-normal-d-v1-1, deterministic). Normals are unit vectors, by
    default in Lotus's frame: x left, y up, z toward the camera (--frame for others). PNGs hold
    RGB = (n + 1) / 2; there is no colour map and no temporal alignment (those are depth's)."""
    run_predict("normal", inputs, options, stabilize=False)


@app.command()
@with_options(
    PREDICT_OPTIONS,
    omit=("stabilize", "projection"),  # an ensemble of panoramas is not built: refused, so not offered
    batch_size=(Batch, 4),
    cmap=(SpreadCmap, "inferno"),
    raw_out=(SpreadRawOut, "f32"),
)
def uncertainty(inputs: Inputs = None, task: Task = "depth", samples: Samples = 8, tta: Tta = "none", **options):
    """Per-pixel uncertainty of depth or normals (Lotus-G's spread over noise samples).

    Paper Sec. 4.4: run a Lotus-G model several times with different noise and write the spread (depth:
    std of the [0,1] maps; normals: RMS angle in degrees) as x.png / x.16bit.png / x.npy, and the mean
    prediction as x.mean.*. Default model: depth-g, or normal-g with --task normal. With --raw, the
    float32 spread of each frame goes to stdout. --output-kind: disparity or depth (normal with --task normal)."""
    run_predict(task, inputs, options, stabilize=False, uncertainty=True, samples=samples, tta=tta)
