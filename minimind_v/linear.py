"""The language model's linear layers: `nn.Linear`, with a faster path for a few rows on a CPU.

    y = x W^T          x (..., K), W (N, K) -> y (..., N)

In training and prefill, x has hundreds or thousands of rows and `F.linear` runs one matrix
product (GEMM) that is bound by arithmetic. A decoding step has one row per sequence: the product
becomes a matrix-vector product that reads every weight once and does two FLOPs per weight read,
so its speed is the speed of reading W from memory. The whole model's weights (~100 MB in
float32) are read once per generated token.

On a CPU, `F.linear` hands such a product to the BLAS (MKL) as a GEMM with one column. On an AMD
EPYC that reads weights at ~10 GB/s, a third of what the memory delivers; on an Intel Xeon MKL's
own path runs it at full speed (`benchmarks/bench_generate.py --steps-only` prints both: the
decode step's products take 3.9 ms through `F.linear` and 12.4 ms through the batched form on a
2-core Xeon, 9.5 and 3.9 ms on a 2-core EPYC). MKL takes its own code paths on Intel CPUs, the
likely cause (one machine of each vendor was measured), so the choice here follows the vendor
(`FEW_ROWS_BATCHED`): on a non-Intel CPU, splitting W into `c` blocks of rows
and running the blocks as one batched product (`torch.bmm`, c problems of (N/c, K) x (K, R)) takes
another path through the library that streams W at close to the memory's speed: the same dot
products, each still summed over the full K, so the result differs from `F.linear`'s only by
float rounding.

`Linear` keeps `nn.Linear`'s parameters and state-dict names (`weight`, `bias`), so every
checkpoint loads unchanged; only the forward differs, and only for float32 inputs on a non-Intel
CPU with at most `FEW_ROWS` rows. Everything else (training, GPUs, bf16, Intel CPUs) is `F.linear`.

`shared_input_linear` is the other half: under autocast, several layers that read the same input
(q/k/v, gate/up) run as one product over their stacked weights, each keeping its own parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 8          # above this the GEMM is no longer bound by reading W, and F.linear wins
BLOCKS = (8, 4, 2)    # the first that divides the output size N is used


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def batched_is_faster(vendor: str, mkl: bool) -> bool:
    """Whether `few_rows_linear` beats F.linear for a few rows: with MKL on a known non-Intel CPU."""
    return mkl and vendor not in ("", "GenuineIntel")


FEW_ROWS_BATCHED = batched_is_faster(_cpu_vendor(), torch.backends.mkl.is_available())


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) as a batched product over row blocks of `weight`.
    x (..., K), weight (N, K), bias (N,) or None -> (..., N)."""
    N, K = weight.shape
    c = next((c for c in BLOCKS if N % c == 0), 1)
    rows = x.reshape(-1, K)                                              # (R, K)
    xt = rows.t().unsqueeze(0).expand(c, K, rows.shape[0])               # (c, K, R): a view, no copy
    y = torch.bmm(weight.view(c, N // c, K), xt)                         # (c, N/c, R)
    y = y.reshape(N, rows.shape[0]).t()                                  # (R, N)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], N)


class Linear(nn.Linear):
    """`nn.Linear` whose forward uses `few_rows_linear` for a few float32 rows on a CPU where that is
    the faster product (decoding; `FEW_ROWS_BATCHED`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (FEW_ROWS_BATCHED and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.numel() <= FEW_ROWS * self.in_features and self.weight.is_contiguous()
                and not torch.is_autocast_enabled("cpu")):
            return few_rows_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def shared_input_linear(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers); under autocast computed as one product: x (..., K) -> a
    tuple of (..., N_i).

    q, k and v are three products of the same normed x, and so are gate and up. Under autocast each
    layer casts x to bf16 on its own, and in backward its gradient is summed from the layers' in
    float32. With their weights stacked, W = [W_1; W_2; ...] (N_1 + N_2 + ..., K), x is cast once
    and its gradient comes out of one product; the outputs are column slices of one
    (..., sum N_i) tensor. In float32 there is no cast to save, and measured, the stacked product
    gains nothing on the real model and costs ~5% of a step on the demo's small one, so the layers
    stay separate; so do a few rows (decoding: stacking copies the weights, and reading the
    weights is all a decoding step does) and layers with a bias.
    """
    if (not torch.is_autocast_enabled(x.device.type) or x.numel() <= FEW_ROWS * x.shape[-1]
            or any(layer.bias is not None for layer in layers)):
        return tuple(layer(x) for layer in layers)
    y = F.linear(x, torch.cat([layer.weight for layer in layers]))         # (..., sum N_i)
    return _SplitLast.apply(y, [layer.out_features for layer in layers])


class _SplitLast(torch.autograd.Function):
    """y.split(sizes, dim=-1). Its backward copies each part's gradient into its columns of one
    buffer; autograd's own (torch.cat along the last dimension) ran 2x slower in float32."""

    @staticmethod
    def forward(ctx, y, sizes):
        ctx.sizes = sizes
        return y.split(sizes, dim=-1)                                          # views of y

    @staticmethod
    def backward(ctx, *grads):
        like = next(g for g in grads if g is not None)
        grad = like.new_empty(*like.shape[:-1], sum(ctx.sizes))                # (..., sum N_i)
        for part, g in zip(grad.split(ctx.sizes, dim=-1), grads):
            part.zero_() if g is None else part.copy_(g)
        return grad, None
