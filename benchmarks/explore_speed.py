"""Which compile settings and fusions pay at FLUX.1-dev shapes: one process, one model, many variants.

    python benchmarks/explore_speed.py --out DIR               # GPU
    python benchmarks/explore_speed.py --tiny --out DIR        # flux-tiny on the CPU: checks the script

Each variant recompiles the blocks from scratch (torch._dynamo.reset) and reports its compile time,
ms/step (median), the kernel time per category (torch.profiler) and its output's error against our
bf16 eager forward. Variants:
- default: flux.accel.compile_blocks as the demos use it;
- max-autotune: inductor's Triton GEMM templates (epilogue fusion) against cuBLAS, per shape;
- coordinate-descent: inductor's block-size tuning of the fused elementwise kernels;
- fused-epilogues: flux.accel.fuse_gelu (GELU in the cuBLASLt matmul epilogue, no concatenation
  before linear2);
- cuda-graph: the whole compiled forward captured once and replayed;
- fused-persistent / fused-multi-kernel, fp8-persistent / fp8-multi-kernel: inductor's persistent
  row reductions allowed up to 16k elements (forced, or benchmarked against the looped form), so that a
  row's norm or FP8 quantisation can run in one pass;
- fp8 (bias inside the FP8 matmul where torch allows) / fp8-bias-apart / fp8-max-autotune;
- fp8-fused: FP8 with flux.accel.fuse_gelu (GELU + per-token amax + quantisation in one Triton kernel);
  fp8-fused-exact-accum: the same without Hopper's fast FP8 accumulation (FP8Linear's default since
  2026-11-26; the fp8 variants above ran without it on that day).
Writes <out>/explore.json as it goes.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from common import (
    Results,
    add_common_args,
    attention_context,
    compare,
    env_info,
    first_call_s,
    model_params,
    parse_args,
    random_flux,
    random_inputs,
    time_ms,
    uncompile,
)
from profile_transformer import kernel_table

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
from flux import accel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--variants", default="default,fused-epilogues,fused-persistent,fp8,fp8-persistent")
    parser.add_argument("--cases", default="1024x1,512x4")
    args = parse_args(parser)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.bfloat16
    params = model_params(args.tiny)
    backend = "aot_eager" if args.tiny else "inductor"
    txt_len = 16 if args.tiny else 512
    sizes = {"1024x1": (1024, 1), "512x4": (512, 4), "64x1": (64, 1)}
    cases = ["64x1"] if args.tiny else args.cases.split(",")
    res = Results(f"{args.out}/explore.json", env=env_info(device))
    inputs = {c: random_inputs(params, sizes[c][1], sizes[c][0], txt_len, device, dtype, seed=1) for c in cases}
    flops = {c: accel.flops_per_forward(params, sizes[c][1], (sizes[c][0] // 16) ** 2, txt_len) for c in cases}
    model = random_flux(params, device, dtype)
    ref = {}
    with torch.inference_mode(), attention_context("auto", device):
        for c in cases:
            ref[c] = model(**inputs[c])

    def run_variant(
        name: str, model, compile_kw: dict | None, inductor: dict | None = None, graph: bool = False
    ) -> None:
        uncompile(model)
        t0 = time.perf_counter()
        with torch.inference_mode(), attention_context("auto", device), torch._inductor.config.patch(inductor or {}):
            if compile_kw is not None:
                accel.compile_blocks(model, backend=backend, **compile_kw)
            for ci, c in enumerate(cases):
                x = inputs[c]
                fn = lambda x=x: model(**x)
                compile_s = first_call_s(fn, device)
                if graph and device.type == "cuda":
                    fn()
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        static_out = model(**x)
                    fn = lambda g=g, out=static_out: (g.replay(), out)[1]
                out = fn()
                t = time_ms(fn, device, reps=args.reps)
                entry = {
                    **t,
                    "tflops": round(flops[c] / (t["median_ms"] * 1e-3) / 1e12, 1),
                    "compile_s": compile_s,
                    "vs_ours_eager": compare(out, ref[c]),
                }
                if ci == 0 and device.type == "cuda":
                    table = kernel_table(fn, device, calls=2, top=12)
                    entry["gpu_ms_per_call"] = table["gpu_ms_per_call"]
                    entry["by_category_ms"] = table["by_category_ms"]
                    entry["top_kernels"] = table["top_kernels"]
                res.set("variants", name, c, value=entry)
                if graph:
                    del g, static_out
        res.set("variants", name, "total_s", value=round(time.perf_counter() - t0, 1))

    # name: (fuse_gelu, fp8, compile kwargs, inductor config, CUDA graph)
    autotune = {"mode": "max-autotune-no-cudagraphs"}
    persistent = {"triton.multi_kernel": 2}  # row reductions up to 16k wide in one pass, epilogue fused
    table = {
        "default": (False, False, {}, None, False),
        "fused-epilogues": (True, False, {}, None, False),
        "fused-persistent": (True, False, {}, persistent, False),
        "fused-multi-kernel": (True, False, {}, {"triton.multi_kernel": 1}, False),
        "cuda-graph": (False, False, {}, None, True),
        "coordinate-descent": (False, False, {}, {"coordinate_descent_tuning": True}, False),
        "max-autotune": (False, False, autotune, None, False),
        "fp8": (False, True, {}, None, False),
        "fp8-bias-apart": (False, True, {}, None, False),
        "fp8-persistent": (False, True, {}, persistent, False),
        "fp8-multi-kernel": (False, True, {}, {"triton.multi_kernel": 1}, False),
        "fp8-max-autotune": (False, True, autotune, None, False),
        "fp8-fused": (True, True, {}, None, False),
        "fp8-fused-exact-accum": (True, True, {}, None, False),
    }
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in table]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(table)}")
    for v in sorted(variants, key=lambda v: table[v][1]):  # bf16 first, then one FP8 model for the rest
        fuse, fp8, compile_kw, inductor, graph = table[v]
        try:
            if fp8 and not isinstance(model.single_blocks[0].linear1, accel.FP8Linear):
                if accel.fp8_problem(device):
                    break
                uncompile(model)
                del model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                model = accel.quantize_fp8(random_flux(params, device, dtype))
            if fp8:
                in_kernel = v != "fp8-bias-apart" and accel.scaled_mm_takes_bias(device)
                for m in model.modules():
                    if isinstance(m, accel.FP8Linear):
                        m.bias_in_kernel = in_kernel
                        m.fast_accum = not v.endswith("exact-accum")
            if fuse:
                uncompile(model)
                accel.fuse_gelu(model)
            run_variant(v, model, compile_kw, inductor, graph)
            if fuse:
                uncompile(model)
                accel.unfuse_gelu(model)
        except Exception as e:  # noqa: BLE001 -- record and go on: one failing variant must not cost the others
            res.set("errors", v, value=f"{e.__class__.__name__}: {str(e).splitlines()[0][:400]}")
    # The table, last, so that the end of the log carries it.
    for v, cs in res.data.get("variants", {}).items():
        print(
            v.ljust(20),
            "  ".join(
                f"{c}: {e['median_ms']:.1f} ms ({e['vs_ours_eager']['rel_l2']:.3g})"
                for c, e in cs.items()
                if isinstance(e, dict)
            ),
        )


if __name__ == "__main__":
    main()
