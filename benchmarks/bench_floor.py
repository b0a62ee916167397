"""Kernel floor of one FLUX.1-dev transformer forward: its matmuls and attention calls alone, back to back.

    python benchmarks/bench_floor.py --out benchmarks/results     # flux-dev shapes on the GPU (~35 GB, ~1-2 min)
    python benchmarks/bench_floor.py --tiny --out /tmp/bf         # flux-tiny shapes on the CPU: checks the script

Every linear of one forward (embedders, modulations, the blocks' projections and MLPs, the final layer), in
the forward's order and at its shapes, and the 57 joint attention calls — nothing else: no norms, RoPE,
modulation arithmetic, GELU, residuals, concatenations or quantisation. Captured in one CUDA graph per
variant (no launch gaps) and timed by replaying it. If this skeleton alone is slower than a target, no fusion
of the elementwise work can reach the target with these (cuBLAS/cuDNN) kernels.

Cases: 1024² batch 1, 512² batch 4, 1024² batch 4. Variants:
  bf16, bf16_cudnn            F.linear everywhere + SDPA (torch's default choice; cuDNN attention alone)
  matmuls_bf16                the linears only
  attention, attention_cudnn  the attention calls only
  fp8_cudnn                   what flux.accel.quantize_fp8 converts (qkv, proj, mlp.0, mlp.2, linear1, linear2)
                              as torch._scaled_mm on pre-quantised inputs (per-row scales, bias in the kernel
                              where this torch allows it, fast accumulation), the rest bf16, cuDNN attention
  matmuls_fp8                 the same linears, no attention
Writes <out>/floor.json as it goes and prints a table (ms per forward, TFLOP/s of the work each variant does).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import Results, add_common_args, env_info, gib, model_params, parse_args, time_ms

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
from flux import accel
from flux.accel.kernels import quantize_rows


@dataclass(frozen=True)
class Linear:
    name: str  # one weight per name, as in the model (distinct per block and stream)
    m: int  # rows: tokens × batch, or batch for the vector-wise linears (embedders, modulations)
    k: int
    n: int
    fp8: bool  # converted by flux.accel.quantize_fp8: the blocks' token-wise linears (not modulation `lin`)


ATTENTION = "attention"  # one joint SDPA call over all tokens


def skeleton(p, batch: int, img: int, txt: int) -> list:
    """The matmuls and attention calls of Flux.forward, in its order (flux/model.py, flux/modules/layers.py)."""
    h, mlp, b = p.hidden_size, int(p.hidden_size * p.mlp_ratio), batch
    ops = [Linear("img_in", b * img, p.in_channels, h, False)]
    embedders = (
        [("time_in", 256)] + ([("guidance_in", 256)] if p.guidance_embed else []) + [("vector_in", p.vec_in_dim)]
    )
    for emb, k in embedders:  # MLPEmbedder: in_layer, SiLU, out_layer
        ops += [Linear(f"{emb}.in", b, k, h, False), Linear(f"{emb}.out", b, h, h, False)]
    ops.append(Linear("txt_in", b * txt, p.context_in_dim, h, False))
    for i in range(p.depth):
        streams = (("img", b * img), ("txt", b * txt))
        ops += [Linear(f"double.{i}.{s}_mod", b, h, 6 * h, False) for s, _ in streams]
        ops += [Linear(f"double.{i}.{s}.qkv", m, h, 3 * h, True) for s, m in streams]
        ops.append(ATTENTION)
        for s, m in streams:
            ops += [
                Linear(f"double.{i}.{s}.proj", m, h, h, True),
                Linear(f"double.{i}.{s}.mlp0", m, h, mlp, True),
                Linear(f"double.{i}.{s}.mlp2", m, mlp, h, True),
            ]
    m = b * (img + txt)
    for i in range(p.depth_single_blocks):
        ops += [
            Linear(f"single.{i}.mod", b, h, 3 * h, False),
            Linear(f"single.{i}.linear1", m, h, 3 * h + mlp, True),
            ATTENTION,
            Linear(f"single.{i}.linear2", m, h + mlp, h, True),
        ]
    ops += [Linear("final.adaLN", b, h, 2 * h, False), Linear("final.linear", b * img, h, p.out_channels, False)]
    return ops


def tflops(flops: float, ms: float) -> float:
    return round(flops / (ms * 1e-3) / 1e12, 1)


# name: (matmuls: "bf16" | "fp8" | None, attention: "default" | "cudnn" | None)
VARIANTS = {
    "bf16": ("bf16", "default"),
    "bf16_cudnn": ("bf16", "cudnn"),
    "matmuls_bf16": ("bf16", None),
    "attention": (None, "default"),
    "attention_cudnn": (None, "cudnn"),
    "fp8_cudnn": ("fp8", "cudnn"),
    "matmuls_fp8": ("fp8", None),
}


def sdpa_context(spec: str | None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if spec == "cudnn" else contextlib.nullcontext()


class Skeleton:
    """One case's skeleton over preallocated tensors; `run(mm, attn)` launches it once (outputs are dropped)."""

    def __init__(
        self,
        ops: list,
        weights: dict,
        fp8_weights: dict,
        bias_in_kernel: bool,
        batch: int,
        heads: int,
        tokens: int,
        head_dim: int,
        g: torch.Generator,
    ):
        self.ops, self.weights, self.fp8_weights, self.bias_in_kernel = ops, weights, fp8_weights, bias_in_kernel
        w = next(iter(weights.values()))[0]
        self.dtype = w.dtype
        # One random input per (M, K) and one q, k, v set, allocated before capture. Inputs are not chained
        # output -> input: values do not change these kernels' speed, and in the model each input has just
        # been written by an elementwise kernel anyway (so it is partly in L2 there too).
        shapes = {(op.m, op.k) for op in ops if op != ATTENTION}
        self.x = {s: torch.randn(*s, generator=g, device=w.device, dtype=w.dtype) for s in sorted(shapes)}
        fp8_shapes = {(op.m, op.k) for op in ops if op != ATTENTION and op.name in fp8_weights}
        self.x8 = {s: quantize_rows(self.x[s]) for s in fp8_shapes}  # quantisation excluded from the floor
        self.qkv = [
            torch.randn(batch, heads, tokens, head_dim, generator=g, device=w.device, dtype=w.dtype) for _ in range(3)
        ]

    def run(self, mm: str | None, attn: str | None) -> None:
        for op in self.ops:
            if op == ATTENTION:
                if attn:
                    F.scaled_dot_product_attention(*self.qkv)
            elif mm == "fp8" and op.fp8:  # as FP8Linear.matmul
                (a, scale_a), (w8, scale_w) = self.x8[op.m, op.k], self.fp8_weights[op.name]
                bias = self.weights[op.name][1] if self.bias_in_kernel else None
                torch._scaled_mm(
                    a, w8.t(), scale_a=scale_a, scale_b=scale_w, bias=bias, out_dtype=self.dtype, use_fast_accum=True
                )
            elif mm:
                F.linear(self.x[op.m, op.k], *self.weights[op.name])


def graphed(fn, ctx_factory) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, warmed up on a side stream first as torch's docs require (cuBLAS and
    cuDNN choose and build their plans there, outside the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), ctx_factory():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with ctx_factory(), torch.cuda.graph(graph):
        fn()
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--cases", default="", help="comma-separated subset of the cases (default: all)")
    parser.add_argument("--variants", default="", help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--no-graph", action="store_true", help="time eager calls instead of CUDA graph replays")
    args = parse_args(parser)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.bfloat16
    p = model_params(args.tiny)
    heads, head_dim = p.num_heads, p.hidden_size // p.num_heads
    txt_len = 16 if args.tiny else 512
    cases = (
        {"64x1": (64, 1), "32x4": (32, 4), "64x4": (64, 4)}
        if args.tiny
        else {"1024x1": (1024, 1), "512x4": (512, 4), "1024x4": (1024, 4)}
    )
    if args.cases:
        cases = {c: cases[c] for c in args.cases.split(",")}
    variants = {v: VARIANTS[v] for v in args.variants.split(",")} if args.variants else dict(VARIANTS)
    use_graph = device.type == "cuda" and not args.no_graph

    fp8_problem = accel.fp8_problem(device)
    bias_in_kernel = fp8_problem is None and accel.scaled_mm_takes_bias(device)
    notes = []
    if fp8_problem:
        notes.append(f"fp8 variants skipped: {fp8_problem}")
        variants = {v: s for v, s in variants.items() if s[0] != "fp8"}
    elif not bias_in_kernel:
        notes.append(
            "this torch's _scaled_mm takes no bias with row-wise scales: FP8 linears run without their bias (a floor)"
        )
    if device.type != "cuda":
        notes.append("cuDNN attention needs CUDA: the *_cudnn variants use torch's default attention here")
    res = Results(
        f"{args.out}/floor.json",
        env=env_info(device),
        model="flux-tiny" if args.tiny else "flux-dev",
        dtype="bf16",
        txt_len=txt_len,
        cuda_graph=use_graph,
        fp8_bias_in_kernel=bias_in_kernel,
        notes=notes,
    )

    # Distinct weights per block and stream, as in the model (~24 GB bf16 + ~8.6 GB FP8 at flux-dev sizes):
    # reusing one weight per shape would let weights that fit the 50 MB L2 (proj: 19 MB) stay there between
    # blocks, flattering the floor a little; distinct ones cost nothing but memory, which an 80 GB GPU has.
    t0 = time.perf_counter()
    g = torch.Generator(device=device).manual_seed(0)
    linears = {
        op.name: op for s, b in cases.values() for op in skeleton(p, b, (s // 16) ** 2, txt_len) if op != ATTENTION
    }
    weights, fp8_weights = {}, {}
    for op in linears.values():
        w = torch.randn(op.n, op.k, generator=g, device=device, dtype=dtype) * op.k**-0.5  # as common.randomize_
        weights[op.name] = (w, torch.randn(op.n, generator=g, device=device, dtype=dtype) * 0.02)
        if op.fp8 and not fp8_problem:
            w8, scale = quantize_rows(w)  # as FP8Linear.from_linear: one scale per output row
            fp8_weights[op.name] = (w8, scale.reshape(1, -1))
    nbytes = sum(t.numel() * t.element_size() for d in (weights, fp8_weights) for pair in d.values() for t in pair)
    res.set(
        "weights",
        value={
            "linears": len(weights),
            "fp8_linears": len(fp8_weights),
            "gib": gib(nbytes),
            "build_s": round(time.perf_counter() - t0, 1),
        },
    )

    summary = []
    with torch.inference_mode():
        for case, (size, batch) in cases.items():
            img_tokens = (size // 16) ** 2
            n_tok = img_tokens + txt_len
            ops = skeleton(p, batch, img_tokens, txt_len)
            sk = Skeleton(ops, weights, fp8_weights, bias_in_kernel, batch, heads, n_tok, head_dim, g)
            n_attn = ops.count(ATTENTION)
            flops = {
                "linears": sum(2 * op.m * op.k * op.n for op in ops if op != ATTENTION),
                "attention": n_attn * 4 * batch * heads * n_tok**2 * head_dim,
            }
            flops["total"] = flops["linears"] + flops["attention"]
            flops["accel_flops_per_forward"] = accel.flops_per_forward(
                p, batch, img_tokens, txt_len
            )  # bench_transformer's count
            try:
                from torch.nn.attention import SDPBackend

                names = {int(b): n for n, b in SDPBackend.__members__.items()}
                default_attention = names.get(int(torch._fused_sdp_choice(*sk.qkv)), "?")
            except (AttributeError, RuntimeError):
                default_attention = "?"
            res.set(
                "cases",
                case,
                "shape",
                value={
                    "size": size,
                    "batch": batch,
                    "img_tokens": img_tokens,
                    "tokens": n_tok,
                    "linear_calls": len(ops) - n_attn,
                    "attention_calls": n_attn,
                    "default_attention": default_attention,
                },
            )
            res.set("cases", case, "flops", value=flops)

            forward = None
            for name, (mm, attn) in variants.items():
                if attn == "cudnn" and device.type != "cuda":
                    attn = "default"
                forward = functools.partial(sk.run, mm, attn)
                done = (flops["linears"] if mm else 0) + (flops["attention"] if attn else 0)
                try:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    entry = {}
                    if use_graph:
                        try:
                            graph = graphed(forward, lambda attn=attn: sdpa_context(attn))
                            t = time_ms(graph.replay, device, reps=args.reps)
                            del graph
                        except RuntimeError as e:  # a kernel that cannot be captured: eager launches instead
                            entry["graph_error"] = f"{e.__class__.__name__}: {str(e).splitlines()[0][:300]}"
                            torch.cuda.synchronize(device)
                    if not use_graph or "graph_error" in entry:
                        with sdpa_context(attn):
                            t = time_ms(forward, device, reps=args.reps)
                    graph_used = use_graph and "graph_error" not in entry
                    entry = {
                        **t,
                        "tflops": tflops(done, t["median_ms"]),
                        "attention": attn,
                        "cuda_graph": graph_used,
                        **entry,
                    }
                    if device.type == "cuda":
                        entry["peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
                    summary.append((case, name, t["median_ms"], entry["tflops"]))
                except RuntimeError as e:  # e.g. a backend that cannot run these inputs: record it, go on
                    entry = {"error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:300]}"}
                    summary.append((case, name, None, None))
                res.set("cases", case, "variants", name, value=entry)
            del sk, forward
            if device.type == "cuda":
                torch.cuda.empty_cache()
    res.set("total_s", value=round(time.perf_counter() - t0, 1))

    print(
        f"\nkernel floor of one forward ({'CUDA graph' if use_graph else 'eager'}; {res.data['env'].get('gpu', device)})"
    )
    print(f"{'case':8} {'variant':16} {'ms':>9} {'TFLOP/s':>8}")
    for case, name, ms, tf in summary:
        print(f"{case:8} {name:16} " + (f"{ms:9.2f} {tf:8.1f}" if ms is not None else f"{'error':>9}"))
    for case in cases:
        f = res.data["cases"][case]["flops"]
        print(f"{case}: {f['total'] / 1e12:.3g} TFLOP per forward, {f['attention'] / f['total']:.0%} of it attention")
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
