"""FP8 e4m3 linears (per-row weight scales, per-token activation scales) through torch._scaled_mm."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..model import Flux
from ..modules.layers import SingleStreamBlock
from .compile import blocks, is_compiled
from .kernels import FP8_DTYPE, gelu_quantize_rows, quantize_rows


class FP8Linear(nn.Module):
    """y = x Wᵀ + b with W stored in float8 e4m3 (one fp32 scale per output row) and x quantised
    per token on the fly; the product runs on the FP8 tensor cores (fast accumulation, see below)."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, bias_in_kernel: bool = False):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.bias_in_kernel = (
            bias_in_kernel  # else added apart: not every torch build takes a bias with row-wise scales
        )
        # Hopper's fast FP8 accumulation (fewer promotions to fp32): faster steps for a barely larger error
        # against bf16 (docs/performance.md, "Options tried").
        self.fast_accum = True
        self.register_buffer("weight", weight)  # (N, K) row-major: its transpose is the column-major B operand
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1))  # (1, N)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, device: torch.device | str | None = None, bias_in_kernel: bool = False
    ) -> "FP8Linear":
        w = linear.weight.detach().to(device)
        w_fp8, w_scale = quantize_rows(w)
        bias = linear.bias.detach().to(device) if linear.bias is not None else None
        return cls(w_fp8, w_scale, bias, bias_in_kernel)

    def forward(self, x: Tensor) -> Tensor:
        x_fp8, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        return self.matmul(x_fp8, x_scale, x.dtype).reshape(*x.shape[:-1], self.out_features)

    def matmul(self, x_fp8: Tensor, x_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
        """(M, out_features) from an input already quantised per row."""
        fused = self.bias if self.bias_in_kernel else None
        y = torch._scaled_mm(
            x_fp8,
            self.weight.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=fused,
            out_dtype=out_dtype,
            use_fast_accum=self.fast_accum,
        )
        if self.bias is not None and fused is None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3, scales=per-row"


class FP8GELULinear(FP8Linear):
    """An MLP's second FP8 linear taking the hidden layer before its tanh-GELU: the GELU, the per-token
    amax and the quantisation happen in one pass over the hidden layer (flux.accel.kernels)."""

    def forward(self, h: Tensor) -> Tensor:
        x_fp8, x_scale = gelu_quantize_rows([h], [True])
        return self.matmul(x_fp8, x_scale, h.dtype).reshape(*h.shape[:-1], self.out_features)


class FP8FusedSingleStreamBlock(SingleStreamBlock):
    """A single-stream block with FP8 linears whose linear2 input, cat(attention, GELU(MLP)), is formed,
    GELU'd and quantised in one pass (flux.accel.kernels) instead of being written out in bf16 first."""

    def project_in(self, x_mod: Tensor) -> tuple[Tensor, Tensor]:
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        return qkv, mlp  # before the GELU: project_out applies it

    def project_out(self, attn: Tensor, mlp: Tensor) -> Tensor:
        x_fp8, x_scale = gelu_quantize_rows([attn, mlp], [False, True])
        return self.linear2.matmul(x_fp8, x_scale, attn.dtype).view(*attn.shape[:-1], -1)


def fp8_problem(device: torch.device | str) -> str | None:
    """Why FP8 matmuls cannot run on `device`, or None when they can."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "FP8 was asked for on CUDA, but CUDA is not available"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            name = torch.cuda.get_device_name(device)
            return (
                f"FP8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                f"{name} has {cap[0]}.{cap[1]}"
            )
        return None
    try:  # CPU builds of recent torch have the kernel; older ones and other backends may not
        _probe_scaled_mm(device, bias=False)
    except (RuntimeError, NotImplementedError) as e:
        return f"this torch build has no FP8 matmul for {device.type} ({str(e).splitlines()[0]})"
    return None


def _probe_scaled_mm(device: torch.device, bias: bool) -> None:
    a = torch.ones(16, 16, device=device).to(FP8_DTYPE)
    one = torch.ones(16, 1, device=device)
    b = torch.ones(16, device=device, dtype=torch.bfloat16) if bias else None
    torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t(), bias=b, out_dtype=torch.bfloat16)


def scaled_mm_takes_bias(device: torch.device | str) -> bool:
    """Whether torch._scaled_mm adds a bias inside the kernel with row-wise scales on `device`."""
    try:
        _probe_scaled_mm(torch.device(device), bias=True)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _fp8_targets(model: Flux) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """The token-wise linears of every block. Modulation linears (one row per sample: memory-bound
    matrix-vector products where FP8 saves little time and costs accuracy) stay in bf16."""
    for block in blocks(model):
        for parent in block.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear) and not name == "lin":
                    if child.in_features % 16 == 0 and child.out_features % 16 == 0:  # _scaled_mm's shape rule
                        yield parent, name, child


def quantize_fp8(model: Flux, device: torch.device | str | None = None) -> Flux:
    """Replace the blocks' token-wise linears by `FP8Linear` in place, quantising each weight on
    `device` (default: where it lives) one at a time, so a model on the CPU never needs its full bf16
    copy on the GPU. Raises UserError where FP8 matmuls cannot run.

    The result is a runtime model, not a checkpoint: its state dict holds float8 weights and scales.
    """
    from .gelu import FusedSingleStreamBlock, LinearGELU  # gelu.py builds on this module
    from .stream import streamer_of

    if streamer_of(model) is not None:
        raise UserError("quantize_fp8 must come before stream_blocks (or instead of it)")
    if any(is_compiled(b) for b in blocks(model)):
        raise UserError("quantize_fp8 must come before compile_blocks")
    if any(isinstance(m, (LinearGELU, FusedSingleStreamBlock)) for m in model.modules()):
        raise UserError("quantize_fp8 must come before fuse_gelu")
    target = torch.device(device) if device is not None else next(model.parameters()).device
    problem = fp8_problem(target)
    if problem:
        raise UserError(f"{problem}: turn the fp8 option off.")
    in_kernel = scaled_mm_takes_bias(target)
    for parent, name, linear in list(_fp8_targets(model)):
        setattr(parent, name, FP8Linear.from_linear(linear, target, in_kernel))
    if device is not None:
        model.to(target)  # the rest (embedders, modulation, norms): small next to the FP8 weights
    return model
