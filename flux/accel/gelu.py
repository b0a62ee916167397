"""The MLPs' GELU fused into a neighbouring kernel (bf16: the matmul epilogue; FP8: the quantisation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..model import Flux
from ..modules.layers import SingleStreamBlock
from .compile import blocks, is_compiled
from .fp8 import FP8FusedSingleStreamBlock, FP8GELULinear, FP8Linear


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """tanh-GELU(x Wᵀ + b). On CUDA the GELU runs in the cuBLASLt matmul's epilogue, on the fp32
    accumulator, so the hidden layer is written once instead of written, read and written again."""
    if x.is_cuda:
        y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], weight.shape[0])
    # Elsewhere torch's _addmm_activation applies the erf GELU, not FLUX's tanh form.
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


class LinearGELU(nn.Linear):
    """An MLP's first linear with its tanh-GELU fused in (same parameters, same state-dict keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear_gelu(x, self.weight, self.bias)


class FusedSingleStreamBlock(SingleStreamBlock):
    """A single-stream block whose MLP hidden layer (12,288 wide at FLUX.1 sizes) never takes an extra
    pass over memory: linear1 runs as two matmuls (q,k,v; MLP with GELU in the epilogue) and linear2 as
    two matmuls accumulating into one output, so nothing is concatenated. Same parameters and keys."""

    def project_in(self, x_mod: Tensor) -> tuple[Tensor, Tensor]:
        n = 3 * self.hidden_size
        w, b = self.linear1.weight, self.linear1.bias
        return F.linear(x_mod, w[:n], b[:n]), linear_gelu(x_mod, w[n:], b[n:])

    def project_out(self, attn: Tensor, mlp_hidden: Tensor) -> Tensor:
        w = self.linear2.weight
        out = F.linear(attn, w[:, : self.hidden_size], self.linear2.bias).flatten(0, 1)
        out = torch.addmm(out, mlp_hidden.flatten(0, 1), w[:, self.hidden_size :].t())
        return out.view(*attn.shape[:-1], -1)


def _recast(module: nn.Module, cls: type) -> nn.Module:
    """A module of class `cls` sharing `module`'s submodules, parameters and buffers."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def fuse_gelu(model: Flux) -> Flux:
    """Fuse every block's GELU into a neighbouring kernel, in place. bf16 linears: into the matmul's
    epilogue (LinearGELU, FusedSingleStreamBlock); outputs change by bf16 rounding only, as the GELU reads
    the fp32 accumulator instead of the rounded bf16 product. FP8 linears (quantize_fp8 first): into the
    next linear's input quantisation (FP8GELULinear, FP8FusedSingleStreamBlock), which then takes the
    GELU in float32 before quantising instead of after rounding to bf16."""
    if any(is_compiled(b) for b in blocks(model)):
        raise UserError("fuse_gelu must come before compile_blocks")
    for block in model.double_blocks:
        for mlp in (block.img_mlp, block.txt_mlp):
            if type(mlp[0]) is nn.Linear:
                mlp[0], mlp[1] = _recast(mlp[0], LinearGELU), nn.Identity()
            elif type(mlp[2]) is FP8Linear:
                mlp[1], mlp[2] = nn.Identity(), _recast(mlp[2], FP8GELULinear)
    for i, block in enumerate(model.single_blocks):
        if type(block) is not SingleStreamBlock:
            continue
        if type(block.linear1) is nn.Linear and type(block.linear2) is nn.Linear:
            model.single_blocks[i] = _recast(block, FusedSingleStreamBlock)
        elif type(block.linear2) is FP8Linear:
            model.single_blocks[i] = _recast(block, FP8FusedSingleStreamBlock)
    return model


def unfuse_gelu(model: Flux) -> Flux:
    """Undo fuse_gelu (the official forward again)."""
    for block in model.double_blocks:
        for mlp in (block.img_mlp, block.txt_mlp):
            if type(mlp[0]) is LinearGELU:
                mlp[0], mlp[1] = _recast(mlp[0], nn.Linear), nn.GELU(approximate="tanh")
            elif type(mlp[2]) is FP8GELULinear:
                mlp[1], mlp[2] = nn.GELU(approximate="tanh"), _recast(mlp[2], FP8Linear)
    for i, block in enumerate(model.single_blocks):
        if type(block) in (FusedSingleStreamBlock, FP8FusedSingleStreamBlock):
            model.single_blocks[i] = _recast(block, SingleStreamBlock)
    return model
