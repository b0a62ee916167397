from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .modules.layers import (
    DoubleStreamBlock,
    EmbedND,
    KVSource,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)


@dataclass
class FluxParams:
    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool


@dataclass(frozen=True)
class Injection:
    """Stable Flow's attention injection, for one forward call.

    In every layer of `layers` (global indices), sample b attends with the image-token keys and
    values of sample `source[b]`; `source[b] == b` leaves sample b untouched. `keys=False` takes the values only and
    `text=True` the text tokens' too: RF-Solver-Edit's and FireFlow's sharing of the whole V in late single blocks.
    """

    layers: frozenset[int]
    source: tuple[int, ...]
    keys: bool = True
    text: bool = False

    @classmethod
    def from_reference(cls, layers: Collection[int], batch_size: int, reference: int = 0) -> "Injection":
        """Every sample of the batch takes its image K/V from the reference sample."""
        return cls(frozenset(layers), (reference,) * batch_size)


SkipSets = Sequence[Collection[int]]
"""Per-sample layer bypass: batch element b skips the global layers in skip[b]."""


class Flux(nn.Module):
    """The FLUX.1 rectified-flow transformer, in the official checkpoint layout.

    Layers have global indices: 0..depth-1 are the double-stream blocks, depth.. the single-stream ones.
    """

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"Hidden size {params.hidden_size} must be divisible by num_heads {params.num_heads}")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"Got {params.axes_dim} but expected positional dim {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if params.guidance_embed else None
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    @property
    def num_layers(self) -> int:
        return self.params.depth + self.params.depth_single_blocks

    def layer_name(self, layer: int) -> str:
        return layer_name(layer, self.params.depth)

    def check_layers(self, layers: Collection[int], what: str = "layer") -> None:
        check_layers(layers, self.num_layers, what)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        skip: SkipSets | None = None,
        inject: Injection | None = None,
    ) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Input img and txt tensors must have 3 dimensions.")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        skip_mask = self._skip_mask(skip, img.shape[0], img.device)
        kv_source = self._kv_source(inject, img.shape[0], img.device)
        depth = self.params.depth
        for i, block in enumerate(self.double_blocks):
            kv = kv_source if inject is not None and i in inject.layers else None
            if skip_mask is None or not skip_mask[i].any_skip:
                img, txt = block(img, txt, vec, pe, kv)
            elif not skip_mask[i].all_skip:
                new_img, new_txt = block(img, txt, vec, pe, kv)
                img = torch.where(skip_mask[i].mask, img, new_img)
                txt = torch.where(skip_mask[i].mask, txt, new_txt)

        txt_len = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for j, block in enumerate(self.single_blocks):
            i = depth + j
            kv = kv_source if inject is not None and i in inject.layers else None
            if skip_mask is None or not skip_mask[i].any_skip:
                x = block(x, vec, pe, txt_len, kv)
            elif not skip_mask[i].all_skip:
                x = torch.where(skip_mask[i].mask, x, block(x, vec, pe, txt_len, kv))
        img = x[:, txt_len:, ...]
        return self.final_layer(img, vec)

    def _skip_mask(self, skip: SkipSets | None, batch: int, device: torch.device) -> "list[_LayerSkip] | None":
        if skip is None:
            return None
        if len(skip) != batch:
            raise ValueError(f"skip has {len(skip)} entries but the batch has {batch} samples")
        for s in skip:
            self.check_layers(s, "skip")
        flags = [[layer in s for s in skip] for layer in range(self.num_layers)]
        # One host-to-device copy for all layers: a copy per layer would stall the GPU queue once each.
        masks = _to_device(torch.tensor(flags).view(self.num_layers, batch, 1, 1), device)
        return [_LayerSkip(any(f), all(f), masks[layer]) for layer, f in enumerate(flags)]

    def _kv_source(self, inject: Injection | None, batch: int, device: torch.device) -> KVSource | None:
        if inject is None:
            return None
        if len(inject.source) != batch:
            raise ValueError(f"inject.source has {len(inject.source)} entries but the batch has {batch} samples")
        if any(not 0 <= s < batch for s in inject.source):
            raise ValueError(f"inject.source {inject.source} names samples outside the batch of {batch}")
        self.check_layers(inject.layers, "inject")
        return KVSource(_to_device(torch.tensor(inject.source, dtype=torch.long), device), inject.keys, inject.text)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on `device` without making the host wait for the GPU's queue."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class _LayerSkip:
    any_skip: bool
    all_skip: bool
    mask: Tensor  # (B, 1, 1), True where the sample bypasses the layer


def check_layers(layers: Collection[int], num_layers: int, what: str = "layer") -> None:
    """ValueError naming the indices outside 0..num_layers-1; the one range rule, also for configs checked before a
    model is loaded (num_layers = depth + depth_single_blocks of the model's spec)."""
    bad = sorted({i for i in layers if not 0 <= i < num_layers})
    if bad:
        raise ValueError(
            f"{what}: layer{'s' * (len(bad) > 1)} {', '.join(map(str, bad))} out of range: this model "
            f"has layers 0..{num_layers - 1} (double blocks first, then single blocks)"
        )


def layer_name(layer: int, depth: int) -> str:
    """Readable name of global layer `layer` for a model with `depth` double blocks."""
    if layer < depth:
        return f"double_blocks.{layer}"
    return f"single_blocks.{layer - depth} (layer {layer})"
