"""fp16 ONNX graphs (``lotus export onnx --fp16``): the checked fp32 export converted in place.

Method: each fp32 graph ``onnx_export`` wrote and checked is converted with ONNX Runtime's own converter,
``onnxruntime.transformers.float16.convert_float_to_float16`` (the code onnxconverter-common ships, here
without a new dependency), with ``keep_io_types=True``: weights and activations become fp16, the ops on the
converter's fp32 block list (shape arithmetic such as Range) stay fp32, and every graph input and output
stays float32 behind a Cast inside the graph. Exporting from the model cast to half instead would trace
fp16 kernels on the CPU, which torch runs for few ops, and change the inputs' dtype.

Why float32 at the edges: the manifest's inputs, normalisation and the code that feeds the graphs stay those
of the fp32 export (``run_graphs`` and a C++ caller need no change); ONNX Runtime's CUDA provider and
TensorRT run the casts at the edges for a negligible cost next to the UNet, and TensorRT builds an fp16
engine from such a graph as from an fp16-only one (``trtexec --fp16``).

The VAE graphs stay fp32 unless asked (``vae=True``): Stable Diffusion 2's VAE can overflow fp16 at large
sizes (``lotus`` itself probes it and falls back, docs/gpus.md), which a static graph cannot; the VAE is
under a tenth of the weights, and a TensorRT user can still build fp16 VAE engines from the fp32 graphs.
For ``lotus.onnx`` (``--single``) the same split is made inside the graph: the nodes outside the UNet keep
fp32. The map's difference from the torch fp32 predictor is measured and written in the manifest, not held
to the fp32 tolerance; a map with inf or NaN fails the export.
"""

from __future__ import annotations

from pathlib import Path

METHOD = (
    "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True) of the checked fp32 graph, "
    "then topologically sorted; ops on the converter's fp32 block list stay fp32"
)
IO = "float32 at every input and output (Cast to and from fp16 inside the graph): fed as the fp32 export is"
VAE_FP32 = "fp32: SD2's VAE can overflow fp16 at large sizes; build its TensorRT engine with --fp16 if wanted"
VAE_FP16 = "fp16 (asked for): SD2's VAE can overflow fp16 at large sizes; check the map for inf/NaN"
HEADROOM = 2**26  # 64 MB: graphs' nodes and names beside their weights, for the 2 GB decision
CPU_NOTE = (
    "ONNX Runtime's CPU provider computes the ops it has no fp16 kernel for in fp32 between casts it inserts, "
    "so a GPU's fp16 kernels round differently"
)


def _unet_scope(name: str) -> bool:
    """Inside the single graph's UNet (its module is ``denoiser`` in ``onnx_single.Single``)."""
    return name.startswith("/denoiser/")


def convert(onnx, out_dir: Path, graphs: dict, vae: bool = False, limit: int = 2**31) -> dict:
    """Rewrite the written graphs of ``graphs`` (name -> manifest entry, updated) in fp16 in place; the VAE
    graphs (or the single graph's VAE nodes) only with ``vae``; weights of ``limit`` bytes or more go to
    external data. Returns name -> precision."""
    precision = {}
    for name, entry in graphs.items():
        if name in ("vae_encoder", "vae_decoder") and not vae:
            precision[name] = "fp32"
            continue
        path = Path(out_dir) / f"{name}.onnx"
        block = None
        if name == "lotus" and not vae:
            nodes = onnx.load(str(path), load_external_data=False).graph.node
            block = [n.name for n in nodes if not _unet_scope(n.name)]
        entry.update(_convert(onnx, path, block, limit))
        precision[name] = "fp16" if block is None else "fp16 UNet, fp32 VAE and the map's last step"
    return precision


def _convert(onnx, path: Path, block: list[str] | None, limit: int) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # by path: shape inference then runs on the file, which works over protobuf's 2 GB as the model would not
    model = convert_float_to_float16(str(path), keep_io_types=True, node_block_list=block)
    OnnxModel.graph_topological_sort(model.graph)  # the converter appends the edge casts after their users
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    # the 2 GB limit is protobuf's, on the whole file: keep room for the graph itself (a few MB)
    large = sum(t.ByteSize() for t in model.graph.initializer) + HEADROOM >= limit
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, location=data.name)
        data.chmod(path.stat().st_mode & 0o777)
    else:
        onnx.save_model(model, str(path))
    del model
    onnx.checker.check_model(str(path))
    files = [path.name] + ([data.name] if large else [])
    return {"files": files, "bytes": sum((path.parent / f).stat().st_size for f in files)}


def describe(manifest: dict, precision: dict, vae: bool) -> dict:
    """The manifest's precision record (``precision``, per graph ``weights``, the ``fp16`` section)."""
    manifest["precision"] = "fp16"
    for name, p in precision.items():
        manifest["graphs"][name]["weights"] = p
    manifest["fp16"] = {"method": METHOD, "io": IO, "vae": VAE_FP16 if vae else VAE_FP32}
    return manifest
