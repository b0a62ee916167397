"""`"auto"` speed and memory options resolved for one device, dtype and model size.

Auto turns on only what keeps results within bf16 rounding (compile, fuse_gelu: bf16 on a CUDA GPU of compute
capability 8.0 or newer, where Triton and the cuBLASLt GELU epilogue exist), never FP8 (lossy), and streams the
transformer's blocks (lossless) when the GPU is too small for the resident path. An explicit true/false/number
always wins.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..model import Flux, FluxParams

if TYPE_CHECKING:
    from . import AccelOptions

AUTO = "auto"
GiB = 2**30
# Besides the resident blocks, the streaming path needs the two slots per block layout (~1.8 GiB at FLUX.1 sizes),
# the autoencoder, the activations of a two-image 1024² edit and its decode, and the allocator's slack: measured
# 21.9 GiB allocated with 15 GiB of blocks resident (benchmarks/results), so 7 GiB of work plus a margin.
STREAM_OVERHEAD = 8.5 * GiB
# The resident path holds the transformer and the text encoders together while prompts are encoded; sampling and
# decoding at 1024² add a few GiB once T5 has left the GPU.
RESIDENT_MARGIN = 4 * GiB
# Keeping T5 and CLIP on the GPU for the whole run leaves sampling and decoding beside every network's weights: at
# 1024² they need under 4 GiB (a sweep batch of 4 or a 3-image edit, docs/performance.md), so 12 GiB leaves room for
# larger batches and sizes. A 40 GB card (31.8 GiB of FLUX.1 weights) moves them to host memory as before.
KEEP_TEXT_MARGIN = 12 * GiB


def transformer_bytes(params: FluxParams, dtype: torch.dtype) -> int:
    """Bytes of the transformer's weights in `dtype` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        n = sum(p.numel() for p in Flux(params).parameters())
    return n * dtype.itemsize


def resolve_accel(
    options: AccelOptions,
    device: torch.device,
    dtype: torch.dtype,
    params: FluxParams,
    text_bytes: int = 0,
    free_bytes: int | None = None,
    offload: bool = False,
) -> AccelOptions:
    """`options` with every "auto" replaced by a value for this device, dtype and model; `.reason` says why.

    `text_bytes`: the text encoders' weights (they share the GPU with the transformer while prompts are encoded);
    `free_bytes`: the GPU's free memory (None: asked from the driver); `offload`: the networks already live in
    host memory, so nothing is streamed.
    """
    cuda = device.type == "cuda"
    why = []
    speed_ok, speed_why = _speed_support(device, dtype)
    stream, resident = options.stream_blocks, options.resident_gb
    free = None
    # Streaming is the lossless way to fit a small card, unless something explicit already decides memory.
    if cuda and stream == AUTO and not (offload or options.fp8 or options.compile is True):
        free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
        model = transformer_bytes(params, dtype)
        stream = free < model + text_bytes + RESIDENT_MARGIN
        if stream:
            why.append(
                f"stream_blocks on: {free / GiB:.1f} GiB free < {(model + text_bytes) / GiB:.1f} GiB of "
                f"weights + {RESIDENT_MARGIN // GiB} GiB"
            )
    stream = stream is True
    if cuda and stream and resident == AUTO:  # also when stream_blocks=true was explicit: as much resident as fits
        free = free if free is not None else (torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes)
        resident = max(0.0, (free - STREAM_OVERHEAD) // (GiB // 2) / 2)  # down to half a GiB
        why.append(f"resident_gb {resident:g} (free - {STREAM_OVERHEAD / GiB:g} GiB)")
    resident = 0.0 if resident == AUTO else float(resident)
    compile_ = options.compile
    if compile_ == AUTO:
        compile_ = speed_ok and not stream  # compiled blocks and streamed blocks do not combine
        if speed_ok and stream:
            why.append("compile off: stream_blocks")
    fuse = speed_ok if options.fuse_gelu == AUTO else options.fuse_gelu
    if AUTO in (options.compile, options.fuse_gelu):
        why.insert(0, speed_why)
    return replace(
        options, compile=compile_, fuse_gelu=fuse, stream_blocks=stream, resident_gb=resident, reason="; ".join(why)
    )


def keep_text_encoders(
    device: torch.device, weight_bytes: int, free_bytes: int | None = None, offload: bool = False, stream: bool = False
) -> bool:
    """Whether T5 and CLIP stay on the GPU once prompts are encoded, instead of moving to host memory (and back for
    the next prompts) each run: when the card's free memory before loading holds all the weights (`weight_bytes`)
    and KEEP_TEXT_MARGIN of work. Never off a CUDA GPU, with offload or with stream_blocks: the encoders live in
    host memory there. `free_bytes`: None asks the driver."""
    if device.type != "cuda" or offload or stream:
        return False
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    return free >= weight_bytes + KEEP_TEXT_MARGIN


def _speed_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether compile and fuse_gelu are exact up to bf16 rounding and supported here, and the words for it."""
    if device.type != "cuda":
        return False, f"auto: off on {device.type}"
    if dtype != torch.bfloat16:  # their closeness to eager is established for bf16 only (README, tests)
        return False, f"auto: off with {str(dtype).removeprefix('torch.')}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"auto: off on sm_{major}{minor} (needs 8.0+)"
    from torch.utils._triton import has_triton

    if not has_triton():
        return False, "auto: off, no Triton for torch.compile"
    return True, f"auto: CUDA bf16 sm_{major}{minor}"


def describe(options: AccelOptions) -> str:
    """One line for the log, e.g. "speed options: compile on, fuse_gelu on (auto: CUDA bf16 sm_90)"."""
    onoff = {True: "on", False: "off"}
    parts = [f"compile {onoff[options.compile]}", f"fuse_gelu {onoff[options.fuse_gelu]}"]
    if options.fp8:
        parts.append("fp8 on")
    if options.stream_blocks:
        parts.append(f"stream_blocks on, resident_gb {options.resident_gb:g}")
    return "speed options: " + ", ".join(parts) + (f" ({options.reason})" if options.reason else "")


def use_expandable_segments() -> bool:
    """Let the CUDA caching allocator grow segments in place instead of caching fixed-size ones, so that memory
    freed between phases (encode, denoise, decode) is reused for differently shaped tensors rather than held as
    fragments: the reserved memory stays near the allocated. A user's own PYTORCH_CUDA_ALLOC_CONF wins."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or not torch.cuda.is_available():
        return False
    setting = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    try:
        setting("expandable_segments:True")
    except (AttributeError, RuntimeError):  # an older torch, or a platform without it (Windows)
        return False
    return True
