"""One hand-written GPU kernel, for FP8 inference: a row's GELU, per-row amax and float8 quantisation in one pass.

`gelu_quantize_rows` is defined by its torch reference (`gelu_quantize_rows_reference`), which runs on every
device and in the tests; on CUDA with Triton installed the same function runs as one Triton kernel that reads
each input row once. Inductor cannot produce that kernel itself: it computes the row amax of the 12,288-wide
GELU output and the quantisation in two passes over memory (FLUX's MLP hidden layer, ~140 MB a block at 1024²).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) -> (x_fp8, scale (M, 1) fp32) with x ≈ x_fp8 * scale, one scale per row (amax / 448)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def gelu_quantize_rows_reference(parts: Sequence[Tensor], gelu: Sequence[bool]) -> tuple[Tensor, Tensor]:
    """The rows of cat(part or tanh-GELU(part)) quantised per row: (fp8 (M, K), scale (M, 1)).
    Each part is (..., K_i) with the same leading shape; the GELU is taken in float32."""
    rows = [
        (F.gelu(p.float(), approximate="tanh") if g else p.float()).reshape(-1, p.shape[-1])
        for p, g in zip(parts, gelu)
    ]
    return quantize_rows(torch.cat(rows, dim=-1))


def gelu_quantize_rows(parts: Sequence[Tensor], gelu: Sequence[bool]) -> tuple[Tensor, Tensor]:
    """`gelu_quantize_rows_reference`, as one Triton kernel where it can run (CUDA, one or two parts)."""
    if triton is None or not parts[0].is_cuda or len(parts) > 2:
        return gelu_quantize_rows_reference(parts, gelu)
    if len(parts) == 1:
        parts, gelu = (parts[0][..., :0], parts[0]), (False, gelu[0])
    rows = parts[1].numel() // parts[1].shape[-1]
    a, b = (p.reshape(rows, p.shape[-1]) for p in parts)
    return torch.ops.flux.gelu_quantize_rows(a, b, gelu[0], gelu[1])


if triton is not None:
    # A custom op, so that torch.compile treats the kernel as one opaque call with known output shapes.
    @torch.library.custom_op("flux::gelu_quantize_rows", mutates_args=())
    def _gelu_quantize_op(a: Tensor, b: Tensor, gelu_a: bool, gelu_b: bool) -> tuple[Tensor, Tensor]:
        a, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (a, b))  # rows may be strided, not their elements
        rows, width_a, width_b = b.shape[0], a.shape[1], b.shape[1]
        out = torch.empty(rows, width_a + width_b, device=b.device, dtype=FP8_DTYPE)
        scale = torch.empty(rows, 1, device=b.device, dtype=torch.float32)
        block_b = triton.next_power_of_2(width_b)
        _gelu_quantize_kernel[(rows,)](
            a,
            b,
            out,
            scale,
            a.stride(0),
            b.stride(0),
            width_a,
            width_b,
            BLOCK_A=max(triton.next_power_of_2(width_a), 16),
            BLOCK_B=block_b,
            GELU_A=gelu_a,
            GELU_B=gelu_b,
            num_warps=16 if block_b >= 8192 else 8,
        )
        return out, scale

    @_gelu_quantize_op.register_fake
    def _(a: Tensor, b: Tensor, gelu_a: bool, gelu_b: bool) -> tuple[Tensor, Tensor]:
        out = b.new_empty(b.shape[0], a.shape[1] + b.shape[1], dtype=FP8_DTYPE)
        return out, b.new_empty(b.shape[0], 1, dtype=torch.float32)

    @triton.jit
    def _gelu_tanh(x):
        # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x³)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * u)

    @triton.jit
    def _gelu_quantize_kernel(
        a_ptr,
        b_ptr,
        out_ptr,
        scale_ptr,
        a_row_stride,
        b_row_stride,
        width_a,
        width_b,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        GELU_A: tl.constexpr,
        GELU_B: tl.constexpr,
    ):
        # One program per row: the whole row stays in registers between the amax and the quantisation.
        row = tl.program_id(0).to(tl.int64)
        ia = tl.arange(0, BLOCK_A)
        ib = tl.arange(0, BLOCK_B)
        a = tl.load(a_ptr + row * a_row_stride + ia, mask=ia < width_a, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * b_row_stride + ib, mask=ib < width_b, other=0.0).to(tl.float32)
        if GELU_A:
            a = _gelu_tanh(a)
        if GELU_B:
            b = _gelu_tanh(b)
        amax = tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(b), axis=0))
        scale = tl.maximum(amax, 1e-12) / 448.0
        tl.store(scale_ptr + row, scale)
        out_row = out_ptr + row * (width_a + width_b)
        qa = tl.minimum(tl.maximum(a / scale, -448.0), 448.0)
        qb = tl.minimum(tl.maximum(b / scale, -448.0), 448.0)
        tl.store(out_row + ia, qa.to(tl.float8e4nv), mask=ia < width_a)
        tl.store(out_row + width_a + ib, qb.to(tl.float8e4nv), mask=ib < width_b)
