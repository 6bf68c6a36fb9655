"""The SD VAE, run in horizontal strips at high resolution: the same numbers, less memory.

At 512 x 512 px the decoder's last stages hold several full-resolution activations of 128-256 channels
at once (the nearest-neighbour upsampled input beside its convolution, a GroupNorm output beside its
input, a shortcut beside a residual), and that is the peak of a whole Lotus prediction. Each of those
stages is a GroupNorm (a per-group mean and variance over the WHOLE image), a SiLU and a 3 x 3
convolution (which sees one row above and below). So each runs exactly, strip by strip: first the
group statistics over the whole tensor (summed strip by strip, combined in float64), then normalisation,
SiLU and convolution per strip of rows with a one-row halo, written into a preallocated output. A
residual block without a channel change writes its output over its input, which it no longer needs.
The encoder's full-resolution stages are the same pieces plus a stride-2 convolution, run the same way.
The decoder's upsampling layers run as sub-pixel convolutions of their small input (``upsample``), so the
upsampled input is never built, and with 16 instead of 36 multiply-adds.

Differences from diffusers' modules are float rounding only (the GroupNorm is applied as x * a + b, its
statistics summed per strip in float32 and combined in float64; the sub-pixel taps summed;
docs/exactness.md). Any VAE whose structure is not the SD VAE's (other block types, norms,
activations or kernel sizes) runs through diffusers unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import heap, prepack

ROWS = 32  # output rows per strip: 16 strips at 512 px; a strip costs ROWS/H of one activation
# Stages smaller than this (pixels) run as diffusers' modules: their activations are too small to matter,
# and small inputs then give diffusers' numbers to the bit (the fidelity tests' sizes).
MIN_PIXELS = 256 * 256


def encoder_supported(vae) -> bool:
    """Whether ``vae.encoder`` is built only from the pieces this module reproduces."""
    enc = getattr(vae, "encoder", None)
    if enc is None:
        return False
    for db in enc.down_blocks:
        if type(db).__name__ != "DownEncoderBlock2D" or not all(_plain_resnet(r) for r in db.resnets):
            return False
        for down in db.downsamplers or []:
            conv = getattr(down, "conv", None)
            if not (
                type(down).__name__ == "Downsample2D"
                and down.use_conv
                and down.padding == 0
                and down.norm is None
                and _is_conv(conv)
                and conv.kernel_size == (3, 3)
                and conv.stride == (2, 2)
                and conv.padding == (0, 0)
                and conv.groups == 1
            ):
                return False
    return True


@torch.inference_mode()
def encode(vae, x: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """The posterior's parameters ``vae._encode(x)`` for an SD VAE: [B, 3, H, W] -> moments [B, 8, H/8, W/8]
    (mean and log-variance); stages taller than ``rows`` run in strips."""
    if not encoder_supported(vae):
        return vae.encode(x).latent_dist.parameters
    enc = vae.encoder
    h = enc.conv_in(x)
    for db in enc.down_blocks:
        for res in db.resnets:
            h = resnet(res, h, rows) if _big(h, rows) else res(h, None)
        for down in db.downsamplers or []:
            h = downsample(down, h, rows) if _big(h, rows) and h.shape[-2] > 2 * rows else down(h)
    h = enc.mid_block(h)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
    return vae.quant_conv(h) if vae.quant_conv is not None else h


def supported(vae) -> bool:
    """Whether ``vae.decoder`` is built only from the pieces this module reproduces."""
    dec = getattr(vae, "decoder", None)
    if dec is None or not isinstance(getattr(dec, "conv_norm_out", None), torch.nn.GroupNorm):
        return False
    for ub in dec.up_blocks:
        if type(ub).__name__ != "UpDecoderBlock2D":
            return False
        for res in ub.resnets:
            if not _plain_resnet(res):
                return False
        for up in ub.upsamplers or []:
            if not (
                type(up).__name__ == "Upsample2D"
                and up.interpolate
                and up.use_conv
                and up.norm is None
                and not up.use_conv_transpose
                and _conv3(getattr(up, "conv", None))
            ):
                return False
    return isinstance(dec.conv_act, torch.nn.SiLU) and _conv3(dec.conv_out)


def _conv3(conv) -> bool:
    return (
        _is_conv(conv)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def _is_conv(conv) -> bool:
    return isinstance(conv, (torch.nn.Conv2d, prepack.PackedConv2d))


def _weight(conv) -> torch.Tensor:
    """A convolution's weight as it is held: packed (prepack.py) or dense; for prepack.conv2d."""
    return conv.packed if isinstance(conv, prepack.PackedConv2d) else conv.weight


def _plain_resnet(res) -> bool:
    return (
        type(res).__name__ == "ResnetBlock2D"
        and res.time_emb_proj is None
        and not res.up
        and not res.down
        and isinstance(res.norm1, torch.nn.GroupNorm)
        and isinstance(res.norm2, torch.nn.GroupNorm)
        and isinstance(res.nonlinearity, torch.nn.SiLU)
        and _conv3(res.conv1)
        and _conv3(res.conv2)
    )


@torch.inference_mode()
def decode(vae, z: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """``vae.decode(z).sample`` for an SD VAE: [B, 4, h, w] -> [B, 3, 8h, 8w]; stages taller than ``rows``
    run in strips (module doc)."""
    if not supported(vae):
        return vae.decode(z).sample
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    dec = vae.decoder
    x = dec.conv_in(z)
    x = dec.mid_block(x, None)
    x = x.to(next(iter(dec.up_blocks.parameters())).dtype)
    for ub in dec.up_blocks:
        for res in ub.resnets:
            x = resnet(res, x, rows) if _big(x, rows) else res(x, None)
        for up in ub.upsamplers or []:
            x = upsample(up, x, rows) if _big(x, rows, 2) else up(x)
    if not _big(x, rows):
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))
    stats = group_stats(x, dec.conv_norm_out, rows)
    out = _empty_like(x, dec.conv_out.out_channels)
    for r0, r1 in _strips(x.shape[-2], rows):
        out[:, :, r0:r1] = _conv_rows(
            _weight(dec.conv_out),
            dec.conv_out.bias,
            lambda a, b, dst: _norm_act(x[:, :, a:b], stats, dst),
            x,
            x.shape[-2],
            r0,
            r1,
        )
    return out


def resnet(res, x: torch.Tensor, rows: int) -> torch.Tensor:
    """ResnetBlock2D(x) without time embedding: shortcut(x) + conv2(act(norm2(conv1(act(norm1(x)))))), in
    strips. Consumes ``x``: its memory is reused (module doc), so the caller must not use it afterwards."""
    h = x.shape[-2]
    heap.trim_before(h * x.shape[-1], x.device.type)  # the previous block's freed strips (heap.py)
    s1 = group_stats(x, res.norm1, rows)
    if res.conv_shortcut is None:
        h1 = _empty_like(x, res.conv1.out_channels)  # [B, C, H, W]
        out = x  # strip r of the output reads h1, and x only at rows r: it can overwrite x as it goes
    else:
        h1 = _h1_inside(x, res.conv1.out_channels, rows)
        out = _empty_like(x, res.conv2.out_channels)
    for r0, r1 in _strips(h, rows):
        y = _conv_rows(
            _weight(res.conv1), res.conv1.bias, lambda a, b, dst: _norm_act(x[:, :, a:b], s1, dst), x, h, r0, r1
        )
        if res.conv_shortcut is not None:
            out[:, :, r0:r1] = res.conv_shortcut(x[:, :, r0:r1])  # before h1 may overwrite these rows of x
        h1[:, :, r0:r1] = y
    s2 = group_stats(h1, res.norm2, rows)
    for r0, r1 in _strips(h, rows):
        y = _conv_rows(
            _weight(res.conv2), res.conv2.bias, lambda a, b, dst: _norm_act(h1[:, :, a:b], s2, dst), h1, h, r0, r1
        )
        out[:, :, r0:r1] += y  # shortcut(x) or x is already there
        if res.output_scale_factor != 1:
            out[:, :, r0:r1] /= res.output_scale_factor
    return out


def _h1_inside(x: torch.Tensor, channels: int, rows: int) -> torch.Tensor:
    """Where a block that halves the channels (or more) keeps its inner activation h1 [1, C', H, W]: in the
    memory of its input x [1, C, H, W] (NHWC), which strips consume in row order. h1's strip r0..r1 fills
    the elements x's rows r0*C'/C .. r1*C'/C held, all above the row r1 - 1 that the next strip reads first
    (with C' <= C/2 and rows >= 2), and its rows r0..r1 of x went into the shortcut just before. Saves a
    full-resolution activation at the decoder's peak. Elsewhere (batches, NCHW, other widths): a new tensor."""
    b, c, h, w = x.shape
    if (
        b != 1
        or 2 * channels > c
        or rows < 2
        or _format(x) != torch.channels_last
        or not x.is_contiguous(memory_format=torch.channels_last)
    ):
        return _empty_like(x, channels)
    return torch.as_strided(x, (1, channels, h, w), (h * w * channels, 1, w * channels, channels), x.storage_offset())


def upsample(up, x: torch.Tensor, rows: int) -> torch.Tensor:
    """Upsample2D(x): conv(nearest 2x upsample of x) [B, C, 2h, 2w], as four 2 x 2 convolutions of x itself.

    Output pixel (2i + a, 2j + c) sees upsampled rows 2i + a - 1 .. 2i + a + 1, which are input rows
    i - 1, i, i (a = 0) or i, i, i + 1 (a = 1), and the same for columns: so the 3 x 3 kernel acting on the
    upsampled image is a 2 x 2 kernel (taps that see the same input pixel summed) acting on x, one kernel
    per output phase (a, c). All four phases are one convolution with 4x the output channels over the
    zero-padded input, phase (a, c) read at offset (a, c): 16 instead of 36 multiply-adds per input pixel
    and output channel pair, and the upsampled input is never built. Runs in strips of ``rows // 2`` input
    rows; equal to the module up to float rounding of the summed taps."""
    h, w = x.shape[-2:]
    heap.trim_before(4 * h * w, x.device.type)
    c_out = up.conv.out_channels
    weight, bias = subpixel_kernel(up.conv)
    out = torch.empty((x.shape[0], c_out, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=_format(x))
    for s0, s1 in _strips(h, max(rows // 2, 1)):
        y = _conv_rows(weight, bias, lambda a, b, dst: dst.copy_(x[:, :, a:b]), x, h, s0, s1)
        n = s1 - s0  # y: [B, 4 C, n + 1, w + 1], phase (a, c) in channels (2a + c) C .. (2a + c + 1) C
        for a in (0, 1):
            for c in (0, 1):
                k = 2 * a + c
                out[:, :, 2 * s0 + a : 2 * s1 : 2, c::2] = y[:, k * c_out : (k + 1) * c_out, a : a + n, c : c + w]
    return out


def subpixel_kernel(conv) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The four 2 x 2 phase kernels of a 3 x 3 'same' convolution applied after a nearest 2x upsample, as
    one weight [4 C_out, C_in, 2, 2] (phase (a, c) at block 2a + c) and its bias; taps summed in float32."""
    dense = conv.weight  # for a packed convolution, a dense copy
    w = dense.float()
    taps = ((slice(0, 1), slice(1, 3)), (slice(0, 2), slice(2, 3)))  # phase 0: [0], [1, 2]; phase 1: [0, 1], [2]
    phases = []
    for a in (0, 1):
        for c in (0, 1):
            k = torch.stack([torch.stack([w[:, :, ry, cx].sum((2, 3)) for cx in taps[c]], -1) for ry in taps[a]], -2)
            phases.append(k)
    weight = torch.cat(phases).to(dense.dtype)
    if isinstance(conv, prepack.PackedConv2d):
        weight = prepack.pack(weight, padding=(0, 1))
    return weight, None if conv.bias is None else conv.bias.repeat(4)


def downsample(down, x: torch.Tensor, rows: int) -> torch.Tensor:
    """Downsample2D(x) of the SD VAE encoder: zero-pad one column right and one row below, then a 3 x 3
    convolution with stride 2, in strips of output rows (output row r reads input rows 2r .. 2r+2)."""
    h, w = x.shape[-2:]
    oh, ow = (h - 2) // 2 + 1, (w - 2) // 2 + 1
    out = torch.empty(
        (x.shape[0], down.conv.out_channels, oh, ow), dtype=x.dtype, device=x.device, memory_format=_format(x)
    )
    for r0, r1 in _strips(oh, rows):
        a, b = 2 * r0, min(2 * r1 + 1, h)
        s = F.pad(x[:, :, a:b], (0, 1, 0, 2 * r1 + 1 - b))  # the right column, and the bottom row at the end
        out[:, :, r0:r1] = prepack.conv2d(s, _weight(down.conv), down.conv.bias, stride=(2, 2))
    return out


def group_stats(x: torch.Tensor, norm: torch.nn.GroupNorm, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GroupNorm of x [B, C, H, W] as a per-channel affine map: (a, b) [B, C, 1, 1] with
    norm(x) = x * a + b; statistics over the whole image: per strip, per-channel sums of x and x^2 as
    matrix-vector products (several times faster than reductions over H and W here), combined in float64."""
    bsz, c = x.shape[:2]
    first = torch.zeros(bsz, c, dtype=torch.float64, device=x.device)  # sum of x per channel
    second = torch.zeros_like(first)  # sum of x^2 per channel
    nhwc = _format(x) == torch.channels_last
    for r0, r1 in _strips(x.shape[-2], rows):
        s = x[:, :, r0:r1].float()
        if nhwc:  # a row strip of NHWC memory is one [N, C] matrix per image
            m = s.permute(0, 2, 3, 1).reshape(bsz, -1, c)  # [B, N, C]
            ones = torch.ones(1, m.shape[1], dtype=m.dtype, device=m.device)
            first += (ones @ m)[:, 0].double()
            second += (ones @ (m * m))[:, 0].double()
        else:
            m = s.reshape(bsz, c, -1)  # [B, C, N]
            ones = torch.ones(m.shape[2], 1, dtype=m.dtype, device=m.device)
            first += (m @ ones)[..., 0].double()
            second += ((m * m) @ ones)[..., 0].double()
    g = norm.num_groups
    n = x[0, 0].numel() * (c // g)  # values per group: pixels x channels in the group
    mean = first.view(bsz, g, -1).sum(-1) / n  # [B, G]
    var = (second.view(bsz, g, -1).sum(-1) / n - mean.square()).clamp_min(0)
    rstd = (var + norm.eps).rsqrt()
    rstd_c = rstd.repeat_interleave(c // g, dim=1)  # [B, C]
    mean_c = mean.repeat_interleave(c // g, dim=1)
    w = norm.weight.double() if norm.affine else torch.ones(c, dtype=torch.float64, device=x.device)
    b = norm.bias.double() if norm.affine else torch.zeros_like(w)
    a = rstd_c * w
    return a.to(x.dtype)[..., None, None], (b - mean_c * a).to(x.dtype)[..., None, None]


class ChannelsLastGroupNorm(torch.nn.GroupNorm):
    """``nn.GroupNorm`` whose channels-last 4-D inputs get float64 statistics (two passes), applied as
    x * a + b as in the strips. torch's own channels-last GroupNorm kernel rounds more (docs/exactness.md,
    "Exactness"), and float32 sums split across threads would make the result depend on the thread count.
    Other inputs (NCHW, the attention's [B, C, N]) go to nn.GroupNorm unchanged. Same parameters and
    state_dict; swapped in by class (``precise_group_norms``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or _format(x) != torch.channels_last:
            return super().forward(x)
        bsz, c = x.shape[:2]
        s = x.double().reshape(bsz, self.num_groups, -1, *x.shape[2:])  # [B, G, C/G, H, W]
        mean = s.mean(dim=(2, 3, 4), keepdim=True)  # two passes in float64: no digits lost, any thread count
        rstd = ((s - mean).square().mean(dim=(2, 3, 4), keepdim=True) + self.eps).rsqrt()
        mean_c, rstd_c = (
            t.reshape(bsz, self.num_groups).repeat_interleave(c // self.num_groups, 1) for t in (mean, rstd)
        )  # [B, C]
        w = self.weight.double() if self.affine else torch.ones(c, dtype=torch.float64, device=x.device)
        bias = self.bias.double() if self.affine else torch.zeros_like(w)
        a = rstd_c * w  # [B, C]
        shift = (bias - mean_c * a).to(x.dtype)[..., None, None]
        return torch.addcmul(shift, x, a.to(x.dtype)[..., None, None])


def precise_group_norms(model: torch.nn.Module) -> int:
    """Make every plain ``nn.GroupNorm`` of ``model`` a ChannelsLastGroupNorm, in place; returns how many."""
    norms = [m for m in model.modules() if type(m) is torch.nn.GroupNorm]
    for m in norms:
        m.__class__ = ChannelsLastGroupNorm
    return len(norms)


def _norm_act(x: torch.Tensor, stats, dst: torch.Tensor) -> None:
    """dst = SiLU(x * a + b) for a strip x, written straight into ``dst`` (a view of the padded buffer)."""
    a, b = stats
    torch.addcmul(b, x, a, out=dst)
    F.silu(dst, inplace=True)


def _conv_rows(weight: torch.Tensor, bias, fill, like: torch.Tensor, height: int, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 of a convolution with ``weight`` (3 x 3: the output rows r0..r1 of a 'same' convolution;
    2 x 2: rows r0..r1 + 1 of the zero-padded input's, see upsample) over an input of ``height`` rows.
    ``fill(a, b, dst)`` writes the input's rows a..b (r0-1 .. r1+1, clipped) into ``dst``, a view of one
    buffer whose extra zero rows stand in for the padding at the image borders (so no padded copy is made).
    ``like``: a tensor of the input's batch, width, dtype and memory format."""
    a, b = max(r0 - 1, 0), min(r1 + 1, height)
    top = int(r0 == 0)
    buf = torch.empty(
        (like.shape[0], weight.shape[1], r1 - r0 + 2, like.shape[-1]),
        dtype=like.dtype,
        device=like.device,
        memory_format=_format(like),
    )
    if top:
        buf[:, :, 0].zero_()
    if r1 == height:
        buf[:, :, -1].zero_()
    fill(a, b, buf[:, :, top : top + b - a])
    return prepack.conv2d(buf, weight, bias, padding=(0, 1))


def _big(x: torch.Tensor, rows: int, scale: int = 1) -> bool:
    """Whether a stage whose output is ``scale`` times x's height and width is worth running in strips."""
    h, w = x.shape[-2] * scale, x.shape[-1] * scale
    return h > rows and h * w >= MIN_PIXELS


def _strips(height: int, rows: int):
    return [(r, min(r + rows, height)) for r in range(0, height, rows)]


def _format(x: torch.Tensor):
    return (
        torch.channels_last
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format
    )


def _empty_like(x: torch.Tensor, channels: int) -> torch.Tensor:
    return torch.empty((x.shape[0], channels, *x.shape[2:]), dtype=x.dtype, device=x.device, memory_format=_format(x))
