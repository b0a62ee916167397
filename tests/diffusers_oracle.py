"""Our checkpoint layout -> diffusers' FluxTransformer2DModel, for any model size.

diffusers' own converter hard-codes hidden size 3072, so tests on tiny models need this mapping
(the facts are listed in shared/reference/flux.md).
"""

import torch
from torch import Tensor

from flux.model import FluxParams


def _swap_halves(t: Tensor) -> Tensor:
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)  # diffusers orders (scale, shift)


def to_diffusers(sd: dict[str, Tensor], p: FluxParams) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    H = p.hidden_size

    def lin(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    for src, dst in [
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ]:
        if f"{src}.in_layer.weight" in sd:
            lin(f"{src}.in_layer", f"time_text_embed.{dst}.linear_1")
            lin(f"{src}.out_layer", f"time_text_embed.{dst}.linear_2")
    for i in range(p.depth):
        s, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{s}.img_mod.lin", f"{d}.norm1.linear")
        lin(f"{s}.txt_mod.lin", f"{d}.norm1_context.linear")
        for stream, names in [("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))]:
            ws = sd[f"{s}.{stream}_attn.qkv.weight"].chunk(3, dim=0)
            bs = sd[f"{s}.{stream}_attn.qkv.bias"].chunk(3, dim=0)
            for name, w, b in zip(names, ws, bs):
                out[f"{d}.attn.{name}.weight"], out[f"{d}.attn.{name}.bias"] = w, b
        out[f"{d}.attn.norm_q.weight"] = sd[f"{s}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{s}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{s}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{s}.txt_attn.norm.key_norm.scale"]
        lin(f"{s}.img_attn.proj", f"{d}.attn.to_out.0")
        lin(f"{s}.txt_attn.proj", f"{d}.attn.to_add_out")
        lin(f"{s}.img_mlp.0", f"{d}.ff.net.0.proj")
        lin(f"{s}.img_mlp.2", f"{d}.ff.net.2")
        lin(f"{s}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        lin(f"{s}.txt_mlp.2", f"{d}.ff_context.net.2")
    for j in range(p.depth_single_blocks):
        s, d = f"single_blocks.{j}", f"single_transformer_blocks.{j}"
        lin(f"{s}.modulation.lin", f"{d}.norm.linear")
        sizes = [H, H, H, int(H * p.mlp_ratio)]
        ws = sd[f"{s}.linear1.weight"].split(sizes, dim=0)
        bs = sd[f"{s}.linear1.bias"].split(sizes, dim=0)
        for name, w, b in zip(["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], ws, bs):
            out[f"{d}.{name}.weight"], out[f"{d}.{name}.bias"] = w, b
        lin(f"{s}.linear2", f"{d}.proj_out")
        out[f"{d}.attn.norm_q.weight"] = sd[f"{s}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{s}.norm.key_norm.scale"]
    lin("final_layer.linear", "proj_out")
    out["norm_out.linear.weight"] = _swap_halves(sd["final_layer.adaLN_modulation.1.weight"])
    out["norm_out.linear.bias"] = _swap_halves(sd["final_layer.adaLN_modulation.1.bias"])
    return out


def diffusers_transformer(
    sd: dict[str, Tensor], p: FluxParams, dtype: torch.dtype | None = torch.float32, assign: bool = False
):
    """diffusers' model with our weights; `assign` makes it hold views of `sd` (no second copy, dtype kept)."""
    from contextlib import nullcontext

    from diffusers import FluxTransformer2DModel

    with torch.device("meta") if assign else nullcontext():
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=p.in_channels,
            out_channels=p.out_channels,
            num_layers=p.depth,
            num_single_layers=p.depth_single_blocks,
            attention_head_dim=p.hidden_size // p.num_heads,
            num_attention_heads=p.num_heads,
            joint_attention_dim=p.context_in_dim,
            pooled_projection_dim=p.vec_in_dim,
            guidance_embeds=p.guidance_embed,
            axes_dims_rope=tuple(p.axes_dim),
        )
    model.load_state_dict(to_diffusers(sd, p), strict=True, assign=assign)
    return (model if assign else model.to(dtype)).eval()


def diffusers_forward(model, x: dict[str, Tensor]) -> Tensor:
    """diffusers' forward on the inputs of our Flux.forward (keyword names as ours)."""
    return model(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"] if model.config.guidance_embeds else None,
        return_dict=False,
    )[0]
