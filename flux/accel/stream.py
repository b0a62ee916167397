"""Block streaming: blocks live in pinned host memory and visit the device only while they run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..model import Flux
from .compile import blocks, is_compiled


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
            raise UserError(
                "compile_blocks and stream_blocks do not combine: choose one (compile for speed, streaming for memory)"
            )
        self.model = model
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = blocks(model)
        layouts = [_Layout(b) for b in self.blocks]
        self.streamed = _spread(
            [sum(t.numel() * t.element_size() for _, t in _tensors(b)) for b in self.blocks], keep_bytes
        )
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

        pre_hook.streamer = self  # how streamer_of finds this streamer: the model itself carries no extra state
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
    if streamer_of(model) is not None:
        raise UserError("this model is already streaming its blocks")
    return BlockStreamer(model, device, keep_bytes)


def streamer_of(model: Flux) -> BlockStreamer | None:
    """The BlockStreamer serving `model`'s blocks, if any, found through the forward hooks it registered."""
    for block in blocks(model):
        for hook in block._forward_pre_hooks.values():
            if isinstance(getattr(hook, "streamer", None), BlockStreamer):
                return hook.streamer
    return None
