"""Which scaled-dot-product-attention kernel FLUX's attention uses."""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext

import torch

from ..errors import UserError

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def _sdp_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }


def attention_backend(
    name: str = "auto", device: torch.device | str | None = None, strict: bool = False
) -> AbstractContextManager:
    """Context in which every `scaled_dot_product_attention` prefers backend `name`.

    "auto": cuDNN first on Hopper (and newer) GPUs, torch's own order elsewhere. A named backend goes
    first in the priority list and the others follow as fallbacks (torch skips a backend that cannot
    run the given inputs, e.g. cuDNN on a CPU), except "math", which is used alone. `strict`: the
    named backend alone, so that attention fails rather than silently use another kernel.
    Compiled blocks fix their kernel when they are traced: enter this context before their first call.
    torch's compile caches do not key on this choice (seen with torch 2.11: blocks retraced under
    "flash" still ran cuDNN from the cache), so compare backends in eager mode or fresh processes.
    On Hopper, torch 2.11's own order already picks cuDNN for FLUX shapes; "auto" makes sure of it.
    """
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"unknown attention backend {name!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    from torch.nn.attention import sdpa_kernel

    backends = _sdp_backends()
    if name == "auto":
        device = torch.device(device) if device is not None else None
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if not (on_cuda and torch.cuda.get_device_capability(device) >= (9, 0)):
            return nullcontext()
        name = "cudnn"
    if name == "math" or strict:
        return sdpa_kernel([backends[name]])
    order = [backends[name]] + [b for n, b in backends.items() if n != name]
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:  # torch < 2.6: no priority order
        return sdpa_kernel([backends[name], backends["math"]])
    return sdpa_kernel(order, set_priority=True)
