"""Two hand-written GPU kernels for FP8 inference, each defined by a torch reference that runs everywhere.

- `gelu_quantize_rows`: a row's GELU, per-row amax and float8 quantisation in one pass. Inductor cannot
  produce that kernel itself: it computes the row amax of the 12,288-wide GELU output and the quantisation
  in two passes over memory (FLUX's MLP hidden layer, ~140 MB a block at 1024²).
- `fp8_attention`: attention whose two products, QKᵀ and PV, run on the FP8 tensor cores (torch has no FP8
  attention). Q and K are quantised per token, V per channel, the probabilities P with a fixed scale.

On CUDA with Triton installed each runs as a Triton kernel registered as a torch custom op (so that
torch.compile keeps it whole); elsewhere, and in the tests, the reference serves.
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
    rows = [(F.gelu(p.float(), approximate="tanh") if g else p.float()).reshape(-1, p.shape[-1]) for p, g in zip(parts, gelu)]
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
            a, b, out, scale, a.stride(0), b.stride(0), width_a, width_b,
            BLOCK_A=max(triton.next_power_of_2(width_a), 16), BLOCK_B=block_b, GELU_A=gelu_a, GELU_B=gelu_b,
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
    def _gelu_quantize_kernel(a_ptr, b_ptr, out_ptr, scale_ptr, a_row_stride, b_row_stride, width_a, width_b,
                              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, GELU_A: tl.constexpr, GELU_B: tl.constexpr):
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


# ---------------------------------------------------------------------------------------------- FP8 attention

_LOG2_E = 1.4426950408889634


def quantize_attention_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
    """(B, H, L, D) q, k, v -> fp8 q, k with one scale per token (B, H, L) and fp8 v with one scale per
    channel (B, H, D): a product of per-token and per-channel scales factors out of both QKᵀ and PV."""
    def per_token(x: Tensor) -> tuple[Tensor, Tensor]:
        scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        return (x.float() / scale).to(FP8_DTYPE), scale.squeeze(-1)

    q8, q_scale = per_token(q)
    k8, k_scale = per_token(k)
    v_scale = v.abs().amax(dim=-2, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    v8 = (v.float() / v_scale).to(FP8_DTYPE)
    return q8, q_scale, k8, k_scale, v8, v_scale.squeeze(-2)


def fp8_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(QKᵀ/√D) V over the fp8-rounded q, k, v (B, H, L, D), in float32; returns (B, L, H·D) in v's dtype.
    The kernel also rounds P to fp8, which this leaves out: the two differ by that rounding alone."""
    q8, q_scale, k8, k_scale, v8, v_scale = quantize_attention_inputs(q, k, v)
    out = F.scaled_dot_product_attention(
        q8.float() * q_scale[..., None], k8.float() * k_scale[..., None], v8.float() * v_scale[..., None, :]
    )
    return out.transpose(1, 2).flatten(2).to(v.dtype)


def fp8_attention(q: Tensor, k: Tensor, v: Tensor, tma: bool = True) -> Tensor:
    """`fp8_attention_reference`, with both products on the FP8 tensor cores where the Triton kernel runs."""
    if triton is None or not q.is_cuda:
        return fp8_attention_reference(q, k, v)
    q8, q_scale, k8, k_scale, v8, v_scale = quantize_attention_inputs(q, k, v)
    # The softmax runs in base 2: 1/√D and log2(e) ride on the query scales.
    q_scale = q_scale * (q.shape[-1] ** -0.5 * _LOG2_E)
    # (B, H, D, L) with rows padded to 16 bytes: FP8 tensor cores want PV's B operand K-major, TMA aligned rows.
    length = v8.shape[-2]
    v8_t = v8.new_empty(*v8.shape[:2], v8.shape[-1], -(-length // 16) * 16)[..., :length]
    v8_t.copy_(v8.transpose(-1, -2))
    op = torch.ops.flux.fp8_attention_tma if tma else torch.ops.flux.fp8_attention
    return op(q8, q_scale, k8, k_scale, v8_t, v_scale).flatten(2).to(v.dtype)


if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    def _attention_out(q8: Tensor) -> Tensor:
        batch, heads, length, dim = q8.shape
        return torch.empty(batch, length, heads, dim, device=q8.device, dtype=torch.bfloat16)

    @torch.library.custom_op("flux::fp8_attention", mutates_args=())
    def _fp8_attention_op(q8: Tensor, q_scale: Tensor, k8: Tensor, k_scale: Tensor, v8_t: Tensor, v_scale: Tensor) -> Tensor:
        batch, heads, length, dim = q8.shape
        q8, k8, q_scale, k_scale, v_scale = (t.contiguous() for t in (q8, k8, q_scale, k_scale, v_scale))
        out = _attention_out(q8)
        grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _fp8_attention_kernel[grid](q8, k8, v8_t, q_scale, k_scale, v_scale, out, length, heads, v8_t.stride(-2),
                                    out.stride(0), out.stride(1), out.stride(2), D=dim)
        return out

    @torch.library.custom_op("flux::fp8_attention_tma", mutates_args=())
    def _fp8_attention_tma_op(q8: Tensor, q_scale: Tensor, k8: Tensor, k_scale: Tensor, v8_t: Tensor, v_scale: Tensor) -> Tensor:
        batch, heads, length, dim = q8.shape
        q8, k8, q_scale, k_scale, v_scale = (t.contiguous() for t in (q8, k8, q_scale, k_scale, v_scale))
        out = _attention_out(q8)
        rows = batch * heads * length
        # Block shapes are placeholders: the autotuner's pre-hook sets them per config.
        q_desc = TensorDescriptor(q8, [rows, dim], [dim, 1], [16, dim])
        k_desc = TensorDescriptor(k8, [rows, dim], [dim, 1], [16, dim])
        v_desc = TensorDescriptor(v8_t, [batch * heads * dim, length], [v8_t.stride(-2), 1], [dim, 16])
        grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _fp8_attention_tma_kernel[grid](q_desc, k_desc, v_desc, q_scale, k_scale, v_scale, out, length, heads,
                                        out.stride(0), out.stride(1), out.stride(2), D=dim)
        return out

    for _op in (_fp8_attention_op, _fp8_attention_tma_op):
        @_op.register_fake
        def _(q8: Tensor, q_scale: Tensor, k8: Tensor, k_scale: Tensor, v8_t: Tensor, v_scale: Tensor) -> Tensor:
            batch, heads, length, dim = q8.shape
            return q8.new_empty(batch, length, heads, dim, dtype=torch.bfloat16)

    _CONFIGS = [(64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4),
                (128, 128, 8, 2), (64, 256, 4, 2)]

    def _set_blocks(nargs: dict) -> None:
        bm, bn, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["D"]
        nargs["q_desc"].block_shape = [bm, d]
        nargs["k_desc"].block_shape = [bn, d]
        nargs["v_desc"].block_shape = [d, bn]

    @triton.jit
    def _softmax_pv_step(s, row_scale, m_i, l_i, acc, v):
        # Online softmax in base 2 with P scaled by 2^8: fp8 keeps P's small values (down to 2^-17 instead of
        # 2^-9), and the scale cancels between acc and l. One FMA and one exp2 per logit.
        m_new = tl.maximum(m_i, tl.max(s, 1) * row_scale)
        p = tl.exp2(s * row_scale[:, None] - (m_new - 8.0)[:, None])
        alpha = tl.exp2(m_i - m_new)
        acc = tl.dot(p.to(tl.float8e4nv), v, acc * alpha[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), acc

    @triton.jit
    def _store_rows(o_ptr, acc, l_i, v_scale_ptr, bh, H, offs_m, L, o_stride_b, o_stride_l, o_stride_h, D: tl.constexpr):
        offs_d = tl.arange(0, D)
        out = acc * (tl.load(v_scale_ptr + bh * D + offs_d)[None, :] / l_i[:, None])
        o = o_ptr + (bh // H) * o_stride_b + offs_m[:, None] * o_stride_l + (bh % H) * o_stride_h + offs_d[None, :]
        tl.store(o, out.to(tl.bfloat16), mask=offs_m[:, None] < L)

    @triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _CONFIGS],
        key=["L", "D"],
    )
    @triton.jit
    def _fp8_attention_kernel(q_ptr, k_ptr, vt_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, L, H, v_stride,
                              o_stride_b, o_stride_l, o_stride_h, D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program per (block of BLOCK_M queries, batch·head): FlashAttention's online softmax over key
        # blocks, both products on FP8 operands with fp32 accumulation; the ragged last key block apart.
        bh = tl.program_id(1).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < L
        q = tl.load(q_ptr + bh * L * D + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        row_scale = tl.load(q_scale_ptr + bh * L + offs_m, mask=row_ok, other=0.0)
        k_ptr += bh * L * D
        vt_ptr += bh * D * v_stride
        k_scale_ptr += bh * L
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full = L // BLOCK_N * BLOCK_N
        for start in range(0, full, BLOCK_N):
            n = start + offs_n
            s = tl.dot(q, tl.load(k_ptr + n[None, :] * D + offs_d[:, None])) * tl.load(k_scale_ptr + n)[None, :]
            v = tl.load(vt_ptr + offs_d[None, :] * v_stride + n[:, None])  # (BLOCK_N, D), contiguous along n
            m_i, l_i, acc = _softmax_pv_step(s, row_scale, m_i, l_i, acc, v)
        if full < L:
            n = full + offs_n
            ok = n < L
            k_t = tl.load(k_ptr + n[None, :] * D + offs_d[:, None], mask=ok[None, :], other=0.0)
            s = tl.dot(q, k_t) * tl.load(k_scale_ptr + n, mask=ok, other=0.0)[None, :]
            s = tl.where(ok[None, :], s, float("-inf"))
            v = tl.load(vt_ptr + offs_d[None, :] * v_stride + n[:, None], mask=ok[:, None], other=0.0)
            m_i, l_i, acc = _softmax_pv_step(s, row_scale, m_i, l_i, acc, v)
        _store_rows(o_ptr, acc, l_i, v_scale_ptr, bh, H, offs_m, L, o_stride_b, o_stride_l, o_stride_h, D)

    @triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_blocks)
                 for m, n, w, s in _CONFIGS],
        key=["L", "D"],
    )
    @triton.jit
    def _fp8_attention_tma_kernel(q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, L, H,
                                  o_stride_b, o_stride_l, o_stride_h, D: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # As _fp8_attention_kernel, with q, k and v tiles brought in by the TMA engine. Rows past L belong to
        # the next head (or read as zeros): their logits are masked and their outputs never stored.
        bh = tl.program_id(1)
        start_m = tl.program_id(0) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        q = q_desc.load([bh * L + start_m, 0])
        row_scale = tl.load(q_scale_ptr + bh * L + offs_m, mask=offs_m < L, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        full = L // BLOCK_N * BLOCK_N
        for start in range(0, full, BLOCK_N):
            s = tl.dot(q, k_desc.load([bh * L + start, 0]).T) * tl.load(k_scale_ptr + bh * L + start + offs_n)[None, :]
            m_i, l_i, acc = _softmax_pv_step(s, row_scale, m_i, l_i, acc, v_desc.load([bh * D, start]).T)
        if full < L:
            n = full + offs_n
            ok = n < L
            s = tl.dot(q, k_desc.load([bh * L + full, 0]).T) * tl.load(k_scale_ptr + bh * L + n, mask=ok, other=0.0)[None, :]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _softmax_pv_step(s, row_scale, m_i, l_i, acc, v_desc.load([bh * D, full]).T)
        _store_rows(o_ptr, acc, l_i, v_scale_ptr, bh, H, offs_m, L, o_stride_b, o_stride_l, o_stride_h, D)
