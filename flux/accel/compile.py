"""Regional compilation: each transformer block (and the AE decoder) compiled in place."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import UserError
from ..model import Flux


def blocks(model: Flux) -> list[nn.Module]:
    """The transformer blocks in execution order (global layer index = position in this list)."""
    return [*model.double_blocks, *model.single_blocks]


def is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


def compile_blocks(
    model: Flux, mode: str | None = None, backend: str | Callable = "inductor", fullgraph: bool = True
) -> Flux:
    """Compile each block in place (regional compilation); state-dict keys stay unchanged.

    Blocks of one class share their compiled graph, so the first call compiles two graphs (double and
    single block) per input shape; shapes are specialised (`dynamic=False`) for the fastest kernels.
    `fullgraph=True` turns any graph break into an error instead of a silent slowdown.
    With inductor's default mode, row reductions up to 16k elements (LayerNorm, FP8 per-token scales)
    may run as one-pass persistent kernels, which inductor benchmarks against its looped form at the
    first call ("multi-kernel"; its gain is in docs/performance.md).
    """
    from .stream import streamer_of  # stream.py builds on this module

    if streamer_of(model) is not None:
        raise UserError(
            "compile_blocks and stream_blocks do not combine: choose one (compile for speed, streaming for memory)"
        )
    # Inductor's FX graph cache stays off for these graphs: with torch 2.11 / Triton 3.6 a multi-kernel graph
    # loaded from it in a later process fails (TypeError in triton's JITFunction.cache_key), so every process
    # compiles afresh (Triton's own kernel cache still serves).
    options = {"triton.multi_kernel": 1, "fx_graph_cache": False} if backend == "inductor" and mode is None else None
    for block in blocks(model):
        block.compile(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=False, options=options)
    return model


def compile_decoder(ae: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """Compile the autoencoder's decoder in place (state-dict keys unchanged), one graph per image size.

    Eager decoding is dominated by memory traffic at full resolution (GroupNorm, SiLU and residual passes over
    128-channel 1024² maps), which inductor fuses; one compile per image size pays off over many decodes
    (docs/performance.md). Outputs within bf16 rounding of eager."""
    ae.decoder.compile(backend=backend, dynamic=False, fullgraph=True)
    return ae
