"""Would Winograd convolutions pay here? A measurement behind a decision not to adopt them (docs/performance.md),
in one run.

    python benchmarks/bench_winograd.py               # this CPU's kernels (about a minute)
    python benchmarks/bench_winograd.py --isa avx2    # torch, oneDNN and MKL capped to AVX2 kernels

On AVX2 kernels the predictor's convolutions already run at about the machine's fp32 GEMM rate, so being
faster there means less arithmetic. Winograd's F(4 x 4, 3 x 3) (Lavin and Gray, arXiv 1509.09308) computes a
4 x 4 output tile of a 3 x 3 convolution from a 6 x 6 input tile with 36 instead of 144 multiplies per
channel pair. This script builds it from PyTorch operations (a weight transform as one GEMM, the input
tiles gathered and transformed as one GEMM, 36 batched GEMMs, the output transform as one GEMM) and times
it against oneDNN's direct convolution (channels-last, as the predictor runs) on each 3 x 3, stride-1 layer
shape of the SD VAE at 512 px, with the number of times a prediction runs each. It prints per shape the
time ratio Winograd / direct and the largest error of each against a float64 convolution, and the share
of the VAE's 3 x 3 convolution time Winograd would save, chosen per shape where it is faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_predictor import ISA_CAPS  # noqa: E402

# F(4, 3) at the points 0, 1, -1, 2, -2 and infinity: Y = A^T [(G g G^T) * (B^T d B)] A
BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0]]
BT += [[0, 4, 0, -5, 0, 1]]
G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6]]
G += [[1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]

# (C_in, C_out, input side, uses per prediction): the SD VAE's 3 x 3 stride-1 layers at 512 px with 128
# channels or more (encoder and decoder; the decoder's upsampling layers run as sub-pixel 2 x 2 convolutions
# in lotus-cli and are not listed)
SHAPES = [
    (512, 512, 64, 18),
    (512, 512, 128, 9),
    (256, 512, 128, 1),
    (512, 256, 256, 1),
    (256, 256, 256, 8),
    (128, 256, 256, 1),
    (256, 128, 512, 1),
    (128, 128, 512, 9),
]


def kron(m) -> torch.Tensor:
    t = torch.tensor(m, dtype=torch.float64)
    return torch.kron(t, t)


KB, KG, KA = kron(BT).float(), kron(G).float(), kron(AT).float()  # 36 x 36, 36 x 9, 16 x 36


def winograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 3 x 3, stride-1, 'same' convolution of x [N, C, H, W] (channels-last) by F(4, 3)."""
    n, c, h, w = x.shape
    co = weight.shape[0]
    ty, tx = -(-h // 4), -(-w // 4)
    u = (weight.reshape(co * c, 9) @ KG.T).T.reshape(36, co, c).transpose(1, 2)  # [36, C, C_out]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 4 * tx + 1 - w, 1, 4 * ty + 1 - h))  # NHWC, padded
    tiles = xp.unfold(1, 6, 4).unfold(2, 6, 4)  # [N, ty, tx, C, 6, 6]
    v = (KB @ tiles.permute(4, 5, 0, 1, 2, 3).reshape(36, -1)).view(36, n * ty * tx, c)
    m = torch.bmm(v, u)  # [36, tiles, C_out]
    y = (KA @ m.view(36, -1)).view(4, 4, n, ty, tx, co).permute(2, 3, 0, 4, 1, 5).reshape(n, 4 * ty, 4 * tx, co)
    out = torch.empty((n, co, h, w), dtype=x.dtype, memory_format=torch.channels_last)
    torch.add(y[:, :h, :w], bias, out=out.permute(0, 2, 3, 1))
    return out


def best(fn, repeats: int = 3) -> float:
    fn()
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=("native", "avx2"), default="native")
    args = ap.parse_args()
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in ISA_CAPS.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_CAPS})
    from lotus_cli.model.cpu.calibrate import machine

    m = machine()
    print(
        f"CPU: {m.cpu}; kernels may use: {' '.join(m.flags)}; {m.isa}; torch {torch.__version__}, {m.threads} threads"
    )
    head = ("C_in -> C_out @ side", "uses", "direct ms", "winograd ms", "ratio")
    print(f"{head[0]:>22} {head[1]:>5} {head[2]:>10} {head[3]:>12} {head[4]:>6}   max error: direct, winograd")
    gen = torch.Generator().manual_seed(0)
    direct_total = best_total = 0.0
    with torch.inference_mode():
        for ci, co, side, uses in SHAPES:
            x = torch.randn(1, ci, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(co, ci, 3, 3, generator=gen) / (3 * ci**0.5)
            bias = torch.randn(co, generator=gen)
            w_cl = weight.contiguous(memory_format=torch.channels_last)
            exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
            err_d = (F.conv2d(x, w_cl, bias, padding=1).double() - exact).abs().max().item()
            err_w = (winograd(x, weight, bias).double() - exact).abs().max().item()
            t_d = best(lambda x=x, w=w_cl, b=bias: F.conv2d(x, w, b, padding=1))
            t_w = best(lambda x=x, w=weight, b=bias: winograd(x, w, b))
            direct_total += uses * t_d
            best_total += uses * min(t_d, t_w)
            print(
                f"{f'{ci} -> {co} @ {side}':>22} {uses:>5} {t_d * 1e3:>10.1f} {t_w * 1e3:>12.1f} {t_w / t_d:>6.2f}"
                f"   {err_d:.1e}, {err_w:.1e} (outputs up to {exact.abs().max().item():.1f})"
            )
    print(
        f"VAE 3 x 3 layers listed, per prediction: direct {direct_total:.2f} s; Winograd where faster "
        f"{best_total:.2f} s: saves {direct_total - best_total:.2f} s ({1 - best_total / direct_total:.1%} of them)"
    )


if __name__ == "__main__":
    main()
