"""Convolution weights packed once into oneDNN's blocked layout, for the UNet and the VAE on CPUs.

``F.conv2d`` on a CPU hands oneDNN the weight in PyTorch's layout, and oneDNN reorders it into its own
blocked layout on every call. For the UNet's 1280-channel convolutions at 8 x 8 and 16 x 16 latent cells
(large weights, little arithmetic) that reorder is most of the time; at large sizes it makes no
difference (docs/performance.md). Packing is what inductor's ``freezing`` does, without the
compile time. The packed weight replaces the dense one (same memory). The numbers are the same up to
float rounding: for most shapes oneDNN runs the very same kernel, for a few small ones it picks another
(tests/test_prepack.py). Whether it pays depends on the CPU: calibrate.py decides.

Uses two of PyTorch's oneDNN operators that inductor itself calls (``mkldnn._reorder_convolution_weight``
and ``mkldnn._convolution_pointwise``); where they are missing, nothing is packed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build can pack convolutions for ``device`` and ``dtype``: the operators exist and
    a small packed convolution gives F.conv2d's numbers (checked once per dtype)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _works(dtype)


@functools.cache
def _works(dtype: torch.dtype) -> bool:
    try:
        if not (
            torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        ):
            return False
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(8, 4, 3, 3, generator=g).to(dtype), torch.randn(8, generator=g).to(dtype)
        x = torch.randn(1, 4, 5, 6, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            got = conv2d(x, pack(w), b, padding=(1, 1))
        return bool(torch.allclose(got.float(), F.conv2d(x, w, b, padding=1).float(), atol=0.1, rtol=0.02))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class PackedConv2d(torch.nn.Module):
    """An inference-only ``nn.Conv2d`` (zero padding) whose weight is held packed. ``weight`` gives the dense
    weight back (a copy), for code that reads it. It behaves like the convolution it replaced where a
    model is handled as a whole: ``state_dict`` / ``load_state_dict`` carry the dense ``weight`` under the
    same key, ``copy.deepcopy`` and pickling work, and ``.to(...)`` moves or casts it (packed again where
    packing is available, else held dense)."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach(), requires_grad=False)
        self._hold(conv.weight.detach())

    def _hold(self, dense: torch.Tensor) -> None:
        """Keep ``dense`` packed when this build can pack for its device and dtype, else as it is."""
        self.packed = (
            pack(dense, self.stride, self.padding, self.dilation, self.groups)
            if available(dense.device, dense.dtype)
            else dense
        )

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense() if self.packed.is_mkldnn else self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.packed, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._hold(fn(self.weight))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight = state_dict.get(prefix + "weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
        elif tuple(weight.shape) != tuple(self.packed.shape):
            error_msgs.append(
                f"size mismatch for {prefix}weight: {tuple(weight.shape)} in the checkpoint, "
                f"{tuple(self.packed.shape)} here"
            )
        else:
            self._hold(weight.detach().to(self.packed.device, self.packed.dtype))
        rest = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["packed"] = self.weight  # oneDNN's tensors cannot be copied or pickled; the dense weight can
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._hold(self.packed)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, {'packed' if self.packed.is_mkldnn else 'dense'}"
        )


def pack(weight: torch.Tensor, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """``weight`` [C_out, C_in, kh, kw] in oneDNN's layout (the input size given only steers the choice of
    layout; any input size runs with the result). Use it through ``conv2d``."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups, [1, weight.shape[1] * groups, 32, 32]
    )


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1
) -> torch.Tensor:
    """``F.conv2d`` for a dense or a packed weight (a packed one with an input it cannot take is unpacked)."""
    if not weight.is_mkldnn:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if x.dtype != weight.dtype or x.device.type != "cpu":
        return F.conv2d(x, weight.to_dense().to(x), bias, stride, padding, dilation, groups)
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, list(padding), list(stride), list(dilation), groups, "none", [], ""
    )


def pack_convolutions(model: torch.nn.Module) -> int:
    """Replace every packable ``nn.Conv2d`` in ``model`` (zero or no padding, given as numbers) by a
    PackedConv2d, in place; returns how many. For inference: the model is not trainable afterwards."""
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is torch.nn.Conv2d
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and m.weight.device.type == "cpu"
    ]
    return _replace(model, names, PackedConv2d)


def unpack_convolutions(model: torch.nn.Module) -> int:
    """The inverse of ``pack_convolutions`` (torch.compile traces plain modules): every PackedConv2d in
    ``model`` becomes an ``nn.Conv2d`` with the same dense weight, in place; returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, PackedConv2d)]
    return _replace(model, names, _plain_conv)


def _plain_conv(old: PackedConv2d) -> torch.nn.Conv2d:
    weight = old.weight
    conv = torch.nn.Conv2d(
        old.in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        old.groups,
        bias=old.bias is not None,
        device="meta",
    )
    conv.weight = torch.nn.Parameter(weight, requires_grad=False)
    if old.bias is not None:
        conv.bias = torch.nn.Parameter(old.bias.detach(), requires_grad=False)
    if weight.dim() == 4 and weight.device.type == "cpu":
        conv.to(memory_format=torch.channels_last)
    return conv


def _replace(model: torch.nn.Module, names: list[str], make) -> int:
    """Replace the submodules ``names`` of ``model`` by ``make(module)``, one at a time, so that at most one
    extra copy of a weight exists at any moment; returns how many."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))
    return len(names)


def weight_bytes(*models: torch.nn.Module) -> int:
    """Bytes of weights the models hold: parameters, buffers and packed convolution weights."""
    seen: dict[int, int] = {}
    for model in models:
        for t in (*model.parameters(), *model.buffers()):
            seen[id(t)] = t.numel() * t.element_size()
        for m in model.modules():
            if isinstance(m, PackedConv2d):
                seen[id(m.packed)] = m.packed.numel() * m.packed.element_size()
    return sum(seen.values())
