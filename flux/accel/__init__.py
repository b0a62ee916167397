"""Speed and memory options for the FLUX transformer, each one explicit call on a built model.

- `attention_backend(name)`: a context manager choosing the scaled-dot-product-attention kernel
  ("auto" puts cuDNN first on Hopper, where it beats flash at FLUX shapes: docs/performance.md).
- `compile_blocks(model)`: regional compilation, one compiled graph per block class (reused by every
  block of that class), so compile time stays bounded and per-sample layer skips never recompile:
  the skip/inject logic runs in `Flux.forward`, outside the compiled blocks.
- `fuse_gelu(model)`: each MLP's tanh-GELU in its matmul's epilogue (cuBLASLt), and the single
  blocks' linear2 as two accumulating matmuls instead of one over a concatenation.
- `quantize_fp8(model)`: the blocks' token-wise linears in float8 e4m3 with one scale per weight row
  and per token, through `torch._scaled_mm` (Ada/Hopper GPUs; CPUs whose torch has the kernel).
- `stream_blocks(model, device)`: blocks that do not fit a memory budget live in pinned host memory
  and are copied to the device just before they run, the next one's copy overlapping the current
  block's compute on a side stream. Lossless: the same bytes reach the same kernels.
- `accelerate(model, AccelOptions(...), device)`: all of the above from config values.
- `resolve_accel(AccelOptions(...), device, dtype, params)`: "auto" values decided for this GPU and model.

None of these changes the forward's signature or its hooks (skip, inject).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..model import Flux
from .attention import ATTENTION_BACKENDS, attention_backend
from .auto import AUTO, describe, keep_text_encoders, resolve_accel, transformer_bytes, use_expandable_segments
from .compile import blocks, compile_blocks, compile_decoder, is_compiled
from .fp8 import FP8FusedSingleStreamBlock, FP8GELULinear, FP8Linear, fp8_problem, quantize_fp8, scaled_mm_takes_bias
from .gelu import FusedSingleStreamBlock, LinearGELU, fuse_gelu, linear_gelu, unfuse_gelu
from .kernels import quantize_rows
from .stream import BlockStreamer, stream_blocks, streamer_of


@dataclass(frozen=True)
class AccelOptions:
    """The speed/memory switches a demo config exposes (defaults: plain eager bf16). compile, fuse_gelu,
    stream_blocks and resident_gb may be "auto" until `resolve_accel` decides them for a device."""

    compile: bool | str = False
    attention: str = "auto"
    fp8: bool = False
    stream_blocks: bool | str = False
    resident_gb: float | str = 0.0  # with stream_blocks: GiB of blocks kept on the device
    fuse_gelu: bool | str = False
    reason: str = field(default="", compare=False)  # why resolve_accel chose what it chose

    def check(self) -> list[str]:
        problems = []
        if self.attention not in ATTENTION_BACKENDS:
            problems.append(f"attention {self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if autos := [k for k in ("compile", "fuse_gelu", "stream_blocks", "resident_gb") if getattr(self, k) == AUTO]:
            problems.append(f"{', '.join(autos)} still 'auto': resolve_accel decides them for a device first")
        if self.compile is True and self.stream_blocks is True:
            problems.append("compile and stream_blocks do not combine: choose one")
        if isinstance(self.resident_gb, str) and self.resident_gb != AUTO:
            problems.append(f"resident_gb must be a number of GiB or 'auto', got {self.resident_gb!r}")
        elif not isinstance(self.resident_gb, str) and self.resident_gb < 0:
            problems.append("resident_gb must be >= 0")
        return problems

    def as_dict(self) -> dict:
        """The resolved values, as a run's metadata records them."""
        return {
            k: getattr(self, k)
            for k in ("compile", "fuse_gelu", "attention", "fp8", "stream_blocks", "resident_gb", "reason")
        }


def accelerate(model: Flux, options: AccelOptions, device: torch.device | str) -> Flux:
    """Apply `options` in their one valid order: FP8, fused GELU, then streaming or compilation.
    Attention is a context: wrap sampling in `attention_backend(options.attention)`."""
    problems = options.check()
    if problems:
        raise UserError("; ".join(problems))
    if options.fp8:
        quantize_fp8(model, device if not options.stream_blocks else None)
    if options.fuse_gelu:
        fuse_gelu(model)
    if options.stream_blocks:
        stream_blocks(model, device, keep_bytes=int(options.resident_gb * 2**30))
    else:
        model.to(device)
    if options.compile:
        compile_blocks(model)
    return model


def flops_per_forward(params, batch: int, img_tokens: int, txt_tokens: int) -> float:
    """Matmul + attention FLOPs of one transformer forward (elementwise work excluded)."""
    h, n = params.hidden_size, img_tokens + txt_tokens
    mlp = int(h * params.mlp_ratio)
    per_token_block = 2 * (3 * h * h + h * h + 2 * h * mlp)  # qkv, proj, mlp in+out (= linear1 + linear2)
    layers = params.depth + params.depth_single_blocks
    attn = 4 * n * n * h
    return batch * layers * (n * per_token_block + attn)


__all__ = [
    "AUTO",
    "describe",
    "keep_text_encoders",
    "resolve_accel",
    "transformer_bytes",
    "use_expandable_segments",
    "ATTENTION_BACKENDS",
    "AccelOptions",
    "BlockStreamer",
    "FP8Linear",
    "accelerate",
    "attention_backend",
    "compile_decoder",
    "FP8FusedSingleStreamBlock",
    "FP8GELULinear",
    "FusedSingleStreamBlock",
    "LinearGELU",
    "blocks",
    "compile_blocks",
    "flops_per_forward",
    "fp8_problem",
    "fuse_gelu",
    "is_compiled",
    "linear_gelu",
    "quantize_fp8",
    "quantize_rows",
    "scaled_mm_takes_bias",
    "stream_blocks",
    "streamer_of",
    "unfuse_gelu",
]
