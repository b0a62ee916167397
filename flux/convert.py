"""Key conversion between the official FLUX.1 checkpoint layout and diffusers' (transformer and VAE).

Each official tensor is described by a `Rule`: the diffusers tensors it is made of and how they combine.
The same table converts both ways, so a model built on the meta device also yields the names and shapes a
diffusers file must hold before a single byte of it is read. Facts: shared/reference/flux.md.
"""

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .model import FluxParams
from .modules.autoencoder import AutoEncoderParams

Op = Literal["same", "cat", "swap", "conv"]


class Rule(NamedTuple):
    src: tuple[str, ...]  # diffusers names, in the order the official tensor holds them
    op: Op = "same"  # cat: concatenated on dim 0; swap: halves swapped; conv: 1x1 conv kernel of a linear weight
    sizes: tuple[int, ...] = ()  # rows of each part, for op "cat"


# ---------------------------------------------------------------------------------------------- transformer


def transformer_rules(p: FluxParams) -> dict[str, Rule]:
    """official name -> Rule, for every tensor of Flux(p)."""
    rules: dict[str, Rule] = {}
    H, mlp = p.hidden_size, int(p.hidden_size * p.mlp_ratio)

    def linear(official: str, diffusers: str) -> None:
        for t in ("weight", "bias"):
            rules[f"{official}.{t}"] = Rule((f"{diffusers}.{t}",))

    def fused(official: str, parts: list[str], sizes: tuple[int, ...]) -> None:
        for t in ("weight", "bias"):
            rules[f"{official}.{t}"] = Rule(tuple(f"{d}.{t}" for d in parts), "cat", sizes)

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if p.guidance_embed:
        embedders.append(("guidance_in", "guidance_embedder"))
    for official, diffusers in embedders:
        linear(f"{official}.in_layer", f"time_text_embed.{diffusers}.linear_1")
        linear(f"{official}.out_layer", f"time_text_embed.{diffusers}.linear_2")

    for i in range(p.depth):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        # Per stream: (official prefix, diffusers modulation, q/k/v names, q/k norm names, out proj, MLP module)
        for s, mod, qkv, norms, proj, ff in (
            ("img", "norm1", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff"),
            (
                "txt",
                "norm1_context",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                ("norm_added_q", "norm_added_k"),
                "to_add_out",
                "ff_context",
            ),
        ):
            linear(f"{o}.{s}_mod.lin", f"{d}.{mod}.linear")
            fused(f"{o}.{s}_attn.qkv", [f"{d}.attn.{n}" for n in qkv], (H, H, H))
            rules[f"{o}.{s}_attn.norm.query_norm.scale"] = Rule((f"{d}.attn.{norms[0]}.weight",))
            rules[f"{o}.{s}_attn.norm.key_norm.scale"] = Rule((f"{d}.attn.{norms[1]}.weight",))
            linear(f"{o}.{s}_attn.proj", f"{d}.attn.{proj}")
            linear(f"{o}.{s}_mlp.0", f"{d}.{ff}.net.0.proj")
            linear(f"{o}.{s}_mlp.2", f"{d}.{ff}.net.2")

    for j in range(p.depth_single_blocks):
        o, d = f"single_blocks.{j}", f"single_transformer_blocks.{j}"
        linear(f"{o}.modulation.lin", f"{d}.norm.linear")
        # linear1 fuses q, k, v and the MLP's input projection; linear2 reads cat(attention, MLP) (the same in both).
        fused(f"{o}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], (H, H, H, mlp))
        linear(f"{o}.linear2", f"{d}.proj_out")
        rules[f"{o}.norm.query_norm.scale"] = Rule((f"{d}.attn.norm_q.weight",))
        rules[f"{o}.norm.key_norm.scale"] = Rule((f"{d}.attn.norm_k.weight",))

    linear("final_layer.linear", "proj_out")
    # The official final modulation chunks as (shift, scale), diffusers' AdaLayerNormContinuous as (scale, shift).
    for t in ("weight", "bias"):
        rules[f"final_layer.adaLN_modulation.1.{t}"] = Rule((f"norm_out.linear.{t}",), "swap")
    return rules


def transformer_config(p: FluxParams) -> dict[str, object]:
    """The config.json values of diffusers' FluxTransformer2DModel that describe Flux(p)."""
    return {
        "patch_size": 1,
        "in_channels": p.in_channels,
        "out_channels": p.out_channels,
        "num_layers": p.depth,
        "num_single_layers": p.depth_single_blocks,
        "attention_head_dim": p.hidden_size // p.num_heads,
        "num_attention_heads": p.num_heads,
        "joint_attention_dim": p.context_in_dim,
        "pooled_projection_dim": p.vec_in_dim,
        "guidance_embeds": p.guidance_embed,
        "axes_dims_rope": list(p.axes_dim),
    }


# ---------------------------------------------------------------------------------------------- autoencoder

# Official (latent-diffusion) name fragments -> diffusers', applied in order to every key.
_VAE_RENAMES = [
    (r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets."),
    (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
]


def vae_rules(official_keys: list[str], p: AutoEncoderParams) -> dict[str, Rule]:
    """official name -> Rule, for the given AutoEncoder(p) keys."""
    levels = len(p.ch_mult)
    rules = {}
    for key in official_keys:
        # The decoder's levels are numbered from the bottom (official) vs from the top (diffusers).
        name = re.sub(
            r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", key
        )
        name = re.sub(
            r"^decoder\.up\.(\d+)\.upsample\.",
            lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.",
            name,
        )
        for pattern, repl in _VAE_RENAMES:
            name = re.sub(pattern, repl, name)
        # The mid attention's q, k, v, out are 1x1 convs officially and linears in diffusers.
        attn_weight = re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", name)
        rules[key] = Rule((name,), "conv" if attn_weight else "same")
    return rules


def vae_config(p: AutoEncoderParams) -> dict[str, object]:
    """The config.json values of diffusers' AutoencoderKL that describe AutoEncoder(p)."""
    return {
        "in_channels": p.in_channels,
        "out_channels": p.out_ch,
        "latent_channels": p.z_channels,
        "block_out_channels": [p.ch * m for m in p.ch_mult],
        "layers_per_block": p.num_res_blocks,
        "scaling_factor": p.scale_factor,
        "shift_factor": p.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


# ---------------------------------------------------------------------------------------------- both ways


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def to_official(read: Callable[[str], Tensor], rules: Mapping[str, Rule]) -> Iterator[tuple[str, Tensor]]:
    """Official (name, tensor) pairs, reading each diffusers tensor through `read` only when it is needed."""
    for key, rule in rules.items():
        parts = [read(name) for name in rule.src]
        if rule.op == "cat":
            yield key, torch.cat(parts)
        elif rule.op == "swap":
            yield key, _swap_halves(parts[0])
        elif rule.op == "conv":
            yield key, parts[0][:, :, None, None]
        else:
            yield key, parts[0]


def to_diffusers(sd: Mapping[str, Tensor], rules: Mapping[str, Rule]) -> dict[str, Tensor]:
    """The diffusers state dict of an official one (works on meta tensors: names and shapes only)."""
    out = {}
    for key, rule in rules.items():
        t = sd[key]
        if rule.op == "cat":
            out.update(zip(rule.src, t.split(list(rule.sizes))))
        elif rule.op == "swap":
            out[rule.src[0]] = _swap_halves(t)
        elif rule.op == "conv":
            out[rule.src[0]] = t[:, :, 0, 0]
        else:
            out[rule.src[0]] = t
    return out
