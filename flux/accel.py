"""Speed and memory options for the FLUX transformer, each one explicit call on a built model.

- `attention_backend(name)`: a context manager choosing the scaled-dot-product-attention kernel
  ("auto" puts cuDNN first on Hopper, where it is ~2x faster than flash at FLUX shapes).
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

None of these changes the forward's signature or its hooks (skip, inject).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError
from .kernels import FP8_DTYPE, gelu_quantize_rows, quantize_rows
from .model import Flux
from .modules.layers import SingleStreamBlock

# ---------------------------------------------------------------------------------------------- attention

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def _sdp_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }


def attention_backend(name: str = "auto", device: torch.device | str | None = None, strict: bool = False) -> AbstractContextManager:
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


# ---------------------------------------------------------------------------------------------- compilation


def blocks(model: Flux) -> list[nn.Module]:
    """The transformer blocks in execution order (global layer index = position in this list)."""
    return [*model.double_blocks, *model.single_blocks]


def is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


def compile_blocks(model: Flux, mode: str | None = None, backend: str | Callable = "inductor", fullgraph: bool = True) -> Flux:
    """Compile each block in place (regional compilation); state-dict keys stay unchanged.

    Blocks of one class share their compiled graph, so the first call compiles two graphs (double and
    single block) per input shape; shapes are specialised (`dynamic=False`) for the fastest kernels.
    `fullgraph=True` turns any graph break into an error instead of a silent slowdown.
    With inductor's default mode, row reductions up to 16k elements (LayerNorm, FP8 per-token scales)
    may run as one-pass persistent kernels, which inductor benchmarks against its looped form at the
    first call ("multi-kernel"; measured on an H100: -1% bf16, -3.5% FP8 step time).
    """
    if getattr(model, "_block_streamer", None) is not None:
        raise UserError("compile_blocks and stream_blocks do not combine: choose one (compile for speed, streaming for memory)")
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
    128-channel 1024² maps); fused, a 1024² decode takes 45 ms instead of 121 on an H100 (and 1.3 GiB of
    activations instead of 3.5), for a ~20 s compile per size. Outputs within bf16 rounding of eager."""
    ae.decoder.compile(backend=backend, dynamic=False, fullgraph=True)
    return ae


# ---------------------------------------------------------------------------------------------- fused GELU


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


# ---------------------------------------------------------------------------------------------- FP8

class FP8Linear(nn.Module):
    """y = x Wᵀ + b with W stored in float8 e4m3 (one fp32 scale per output row) and x quantised
    per token on the fly; the product runs on the FP8 tensor cores (fast accumulation, see below)."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, bias_in_kernel: bool = False):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.bias_in_kernel = bias_in_kernel  # else added apart: not every torch build takes a bias with row-wise scales
        # Hopper's fast FP8 accumulation (fewer promotions to fp32): 10% faster FLUX steps on an H100 for a
        # relative error of 6.53% instead of 6.49% against bf16 (benchmarks/explore_speed.py).
        self.fast_accum = True
        self.register_buffer("weight", weight)  # (N, K) row-major: its transpose is the column-major B operand
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1))  # (1, N)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | str | None = None, bias_in_kernel: bool = False) -> "FP8Linear":
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
        y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=fused,
                             out_dtype=out_dtype, use_fast_accum=self.fast_accum)
        if self.bias is not None and fused is None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3, scales=per-row"


class FP8GELULinear(FP8Linear):
    """An MLP's second FP8 linear taking the hidden layer before its tanh-GELU: the GELU, the per-token
    amax and the quantisation happen in one pass over the hidden layer (flux.kernels)."""

    def forward(self, h: Tensor) -> Tensor:
        x_fp8, x_scale = gelu_quantize_rows([h], [True])
        return self.matmul(x_fp8, x_scale, h.dtype).reshape(*h.shape[:-1], self.out_features)


class FP8FusedSingleStreamBlock(SingleStreamBlock):
    """A single-stream block with FP8 linears whose linear2 input, cat(attention, GELU(MLP)), is formed,
    GELU'd and quantised in one pass (flux.kernels) instead of being written out in bf16 first."""

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
    if getattr(model, "_block_streamer", None) is not None:
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


# ---------------------------------------------------------------------------------------------- streaming


def _align(n: int, multiple: int = 128) -> int:
    return (n + multiple - 1) // multiple * multiple


class _Layout:
    """Where each tensor of a block lives inside one flat buffer per dtype."""

    def __init__(self, block: nn.Module):
        self.entries: list[tuple[str, torch.dtype, int, torch.Size]] = []
        self.sizes: dict[torch.dtype, int] = {}
        for name, t in _tensors(block):
            off = self.sizes.get(t.dtype, 0)
            self.entries.append((name, t.dtype, off, t.shape))
            self.sizes[t.dtype] = off + _align(t.numel())  # aligned offsets keep every view 256-byte aligned
        self.key = tuple((n, str(d), tuple(s)) for n, d, _, s in self.entries)

    def allocate(self, device: torch.device, pin: bool) -> dict[torch.dtype, Tensor]:
        return {d: torch.empty(n, dtype=d, device=device, pin_memory=pin) for d, n in self.sizes.items()}

    def views(self, flat: dict[torch.dtype, Tensor]) -> dict[str, Tensor]:
        return {n: flat[d][o : o + s.numel()].view(s) for n, d, o, s in self.entries}


class _HostArena:
    """Host memory handed out in slices of 1 GiB chunks. torch's pinned allocator rounds every allocation
    up to a power of two, which would waste up to half of each block's host copy."""

    CHUNK = 2**30

    def __init__(self, pin: bool):
        self.pin = pin
        self.chunks: list[Tensor] = []
        self.used = self.CHUNK

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        n = shape.numel() * dtype.itemsize
        size = _align(n, 256)
        if size > self.CHUNK:
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        else:
            if self.used + size > self.CHUNK:
                self.chunks.append(torch.empty(self.CHUNK, dtype=torch.uint8, pin_memory=self.pin))
                self.used = 0
            buf = self.chunks[-1][self.used : self.used + size]
            self.used += size
        return buf[:n].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return len(self.chunks) * self.CHUNK


def _tensors(block: nn.Module) -> list[tuple[str, Tensor]]:
    return [*block.named_parameters(), *((n, b) for n, b in block.named_buffers() if b is not None)]


def _point(block: nn.Module, views: dict[str, Tensor]) -> None:
    """Make every parameter/buffer of `block` use the given storage (same values, other device)."""
    for name, t in _tensors(block):
        t.data = views[name]


@dataclass
class _Slot:
    """One device buffer set for a block layout; `owner` is the block index whose bytes it holds."""

    flat: dict[torch.dtype, Tensor]
    views: dict[str, Tensor]
    owner: int = -1
    loaded: torch.cuda.Event | None = None  # copy finished (side stream)
    free: torch.cuda.Event | None = None  # last reader finished (compute stream)
    last_use: int = 0


class BlockStreamer:
    """Blocks whose weights stay in (pinned) host memory and visit the device only while they run.

    A forward pre-hook makes sure block k's bytes are in one of two device slots of its layout (copied
    now if the prefetch missed, e.g. after a skipped layer) and starts copying the next streamed block;
    a forward hook points the block back at its host copy and marks its slot free once the compute
    stream is done with it. On a CPU "device" the same code runs with synchronous copies, which is
    what the tests use. `keep_bytes` of blocks stay resident, spread evenly over the depth so that
    each copy overlaps the compute of the resident blocks before it.
    """

    def __init__(self, model: Flux, device: torch.device | str, keep_bytes: int = 0):
        if any(is_compiled(b) for b in blocks(model)):
            raise UserError("compile_blocks and stream_blocks do not combine: choose one (compile for speed, streaming for memory)")
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = blocks(model)
        layouts = [_Layout(b) for b in self.blocks]
        self.streamed = _spread([sum(t.numel() * t.element_size() for _, t in _tensors(b)) for b in self.blocks], keep_bytes)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._clock = 0

        block_ids = {id(b) for b in self.blocks}
        for m in model.children():  # embedders, final layer: small, always resident
            if id(m) not in block_ids and not isinstance(m, nn.ModuleList):
                m.to(self.device)
        self.arena = _HostArena(pin=self.cuda)
        self.host: dict[int, dict[str, Tensor]] = {}
        self.layout_of: dict[int, tuple] = {}
        self.slots: dict[tuple, list[_Slot]] = {}
        self.hooks = []
        for i, (block, lay) in enumerate(zip(self.blocks, layouts)):
            if i not in self.streamed:
                block.to(self.device)
                continue
            views = {name: self.arena.empty(t.shape, t.dtype) for name, t in _tensors(block)}
            with torch.no_grad():
                for name, t in _tensors(block):
                    views[name].copy_(t.data)
            _point(block, views)  # the original storage is freed here
            self.host[i] = views
            self.layout_of[i] = lay.key
            if lay.key not in self.slots:
                self.slots[lay.key] = [self._slot(lay) for _ in range(2)]
            self.hooks.append(block.register_forward_pre_hook(self._make_pre_hook(i)))
            self.hooks.append(block.register_forward_hook(self._make_post_hook(i)))
        self.order = sorted(self.streamed)
        if self.cuda:
            torch.cuda.empty_cache()

    def _slot(self, lay: _Layout) -> _Slot:
        flat = lay.allocate(self.device, pin=False)
        return _Slot(flat, lay.views(flat))

    @property
    def device_bytes(self) -> int:
        """Bytes of the streaming slots on the device (two per block layout)."""
        return sum(t.numel() * t.element_size() for s in self.slots.values() for slot in s for t in slot.flat.values())

    def _find(self, i: int) -> _Slot | None:
        return next((s for s in self.slots[self.layout_of[i]] if s.owner == i), None)

    def _load(self, i: int, avoid: _Slot | None = None) -> _Slot:
        """Start copying block i into the least recently used slot of its layout (not `avoid`)."""
        slot = min((s for s in self.slots[self.layout_of[i]] if s is not avoid), key=lambda s: s.last_use)
        self._clock += 1
        slot.owner, slot.last_use = i, self._clock
        if not self.cuda:
            for name, t in self.host[i].items():
                slot.views[name].copy_(t)
            return slot
        with torch.cuda.stream(self.copy_stream):
            if slot.free is not None:
                self.copy_stream.wait_event(slot.free)  # its previous block may still be computing
            for name, t in self.host[i].items():
                slot.views[name].copy_(t, non_blocking=True)
            slot.loaded = torch.cuda.Event()
            slot.loaded.record(self.copy_stream)
        return slot

    def _make_pre_hook(self, i: int):
        def pre_hook(block: nn.Module, args) -> None:
            slot = self._find(i) or self._load(i)
            self._clock += 1
            slot.last_use = self._clock
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(slot.loaded)
            _point(block, slot.views)
            nxt = self.order[(self.order.index(i) + 1) % len(self.order)]
            if nxt != i and self._find(nxt) is None:
                self._load(nxt, avoid=slot)

        return pre_hook

    def _make_post_hook(self, i: int):
        def post_hook(block: nn.Module, args, output) -> None:
            _point(block, self.host[i])
            if self.cuda:
                slot = self._find(i)
                slot.free = torch.cuda.Event()
                slot.free.record(torch.cuda.current_stream(self.device))

        return post_hook

    def remove(self) -> None:
        """Stop streaming: hooks off, slots freed; streamed blocks keep their host copies."""
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.slots.clear()
        self.model._block_streamer = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def _spread(sizes: list[int], keep_bytes: int) -> set[int]:
    """Indices to stream so that the kept (resident) ones fit `keep_bytes` and are spread evenly:
    block i stays when the kept share up to i does not exceed the overall kept share."""
    total = sum(sizes)
    share = min(max(keep_bytes, 0) / total, 1.0) if total else 1.0
    kept, seen, streamed = 0, 0, set()
    for i, n in enumerate(sizes):
        seen += n
        if kept + n <= share * seen + 1 and kept + n <= keep_bytes:
            kept += n
        else:
            streamed.add(i)
    for i in sorted(streamed, key=lambda i: sizes[i]):  # fill what the even spread left of the budget
        if kept + sizes[i] <= keep_bytes:
            kept += sizes[i]
            streamed.discard(i)
    return streamed


def stream_blocks(model: Flux, device: torch.device | str, keep_bytes: int = 0) -> BlockStreamer:
    """Keep the embedders, the final layer and `keep_bytes` worth of blocks on `device`; stream the
    other blocks from pinned host memory at every forward. Returns the streamer (`.remove()` undoes
    the hooks). Outputs are bit-identical to the resident model's."""
    if getattr(model, "_block_streamer", None) is not None:
        raise UserError("this model is already streaming its blocks")
    streamer = BlockStreamer(model, device, keep_bytes)
    model._block_streamer = streamer
    return streamer


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AccelOptions:
    """The speed/memory switches a demo config exposes (defaults: plain eager bf16)."""

    compile: bool = False
    attention: str = "auto"
    fp8: bool = False
    stream_blocks: bool = False
    resident_gb: float = 0.0  # with stream_blocks: GiB of blocks kept on the device
    fuse_gelu: bool = False

    def check(self) -> list[str]:
        problems = []
        if self.attention not in ATTENTION_BACKENDS:
            problems.append(f"attention {self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if self.compile and self.stream_blocks:
            problems.append("compile and stream_blocks do not combine: choose one")
        if self.resident_gb < 0:
            problems.append("resident_gb must be >= 0")
        return problems


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
    "ATTENTION_BACKENDS", "AccelOptions", "BlockStreamer", "FP8Linear", "accelerate", "attention_backend", "compile_decoder",
    "FP8FusedSingleStreamBlock", "FP8GELULinear", "FusedSingleStreamBlock", "LinearGELU", "blocks", "compile_blocks", "flops_per_forward", "fp8_problem", "fuse_gelu",
    "is_compiled", "linear_gelu", "quantize_fp8", "quantize_rows", "scaled_mm_takes_bias", "stream_blocks", "unfuse_gelu",
]
