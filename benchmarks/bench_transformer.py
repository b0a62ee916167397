"""Our transformer vs diffusers' FluxTransformer2DModel with the same random bf16 weights, side by side.

    python benchmarks/bench_transformer.py                  # flux-dev on the GPU (needs ~30 GB)
    python benchmarks/bench_transformer.py --tiny --out /tmp/b   # flux-tiny on the CPU: checks the script

Cases: 1024² batch 1 (4096 image + 512 text tokens) and 512² batch 4. For each: eager (torch's default
attention and cuDNN attention), regionally compiled (ours: flux.accel.compile_blocks; diffusers:
compile_repeated_blocks), ours with the GELU fused into the matmuls (flux.accel.fuse_gelu), eager and
compiled, and ours with FP8 weights; ms/step (median), TFLOP/s, the difference to
diffusers and to our bf16 eager output, peak memory, compile time, and whether layer skips recompile.
Writes <out>/transformer.json as it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch

from common import (
    Results,
    add_common_args,
    attention_context,
    compare,
    diffusers_forward,
    diffusers_twin,
    env_info,
    first_call_s,
    gib,
    model_params,
    parse_args,
    random_flux,
    random_inputs,
    sync,
    time_ms,
    uncompile,
)

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
from flux import accel
from flux.model import Injection


def tflops(flops: float, ms: float) -> float:
    return round(flops / (ms * 1e-3) / 1e12, 1)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def check_recompiles(model, x, case, res, device, reps) -> None:
    """Layer skips and injection sources must not recompile the blocks."""
    b = x["img"].shape[0]
    n = model.num_layers
    before = unique_graphs()
    skips = [[{3}, {n // 2}, set(), {n - 1}][:b], [{0}] * b, [{1, 2}, {30 % n}, {40 % n}, {18 % n}][:b]]
    for s in skips:
        model(**x, skip=s)
    after_skip = unique_graphs()
    t_skip = time_ms(lambda: model(**x, skip=skips[0]), device, reps=max(1, reps // 2))
    model(**x, inject=Injection.from_reference({0, 1, n // 3, n - 2}, b))
    after_inject = unique_graphs()
    model(**x, inject=Injection(frozenset({2, n // 2}), tuple(range(b))[::-1]))
    after_inject2 = unique_graphs()
    res.set(
        "recompiles",
        value={
            "case": case,
            "new_graphs_for_3_skip_patterns": after_skip - before,
            "new_graphs_first_injection": after_inject - after_skip,
            "new_graphs_other_injection_layers_and_sources": after_inject2 - after_inject,
            "skip_forward": t_skip,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default: inductor; tiny: aot_eager)"
    )
    parser.add_argument(
        "--attention", default="auto,cudnn!", help="attention choices for the compiled model, the first is the default"
    )
    parser.add_argument("--mode", default=None, help="torch.compile mode for our blocks (default: inductor's default)")
    parser.add_argument("--cases", default="", help="comma-separated subset of the cases (default: all)")
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to leave out: eager,compiled,fused,diffusers_compiled,fp8"
    )
    args = parse_args(parser)
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.bfloat16
    params = model_params(args.tiny)
    backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    txt_len = 16 if args.tiny else 512
    cases = {"32x2": (32, 2)} if args.tiny else {"1024x1": (1024, 1), "512x4": (512, 4)}
    if args.cases:
        cases = {c: cases[c] for c in args.cases.split(",")}
    res = Results(
        f"{args.out}/transformer.json",
        env=env_info(device),
        model="flux-tiny" if args.tiny else "flux-dev",
        dtype="bf16",
        txt_len=txt_len,
        compile_backend=backend,
        compile_mode=args.mode,
    )
    torch.backends.cuda.matmul.allow_tf32 = True  # bf16 everywhere; this only affects stray fp32 matmuls

    t0 = time.perf_counter()
    model = random_flux(params, device, dtype)
    twin = diffusers_twin(model)
    res.set("setup", "build_s", value=round(time.perf_counter() - t0, 1))
    inputs = {c: random_inputs(params, b, s, txt_len, device, dtype, seed=1) for c, (s, b) in cases.items()}
    flops = {c: accel.flops_per_forward(params, b, (s // 16) ** 2, txt_len) for c, (s, b) in cases.items()}
    res.set("flops_per_forward", value=flops)
    ref: dict[str, torch.Tensor] = {}  # our bf16 eager output (torch's default attention) per case
    ref_diffusers: dict[str, torch.Tensor] = {}

    def measure(
        key: str, case: str, fn, reference: torch.Tensor | None = None, extra: dict | None = None
    ) -> torch.Tensor:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        t = time_ms(fn, device, reps=args.reps)
        entry = {**t, "tflops": tflops(flops[case], t["median_ms"]), **(extra or {})}
        if device.type == "cuda":
            entry["peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
        if reference is not None:
            entry["vs_ours_eager"] = compare(out, reference)
        if case in ref_diffusers and reference is not ref_diffusers[case]:
            entry["vs_diffusers_eager"] = compare(out, ref_diffusers[case])
        res.set("cases", case, key, value=entry)
        return out

    with torch.inference_mode():
        # --- eager: ours and diffusers, torch's default attention order, then cuDNN first.
        if "eager" not in skip:
            for case, x in inputs.items():
                ref[case] = measure("ours_eager", case, lambda x=x: model(**x))
                ref_diffusers[case] = measure(
                    "diffusers_eager", case, lambda x=x: diffusers_forward(twin, x), ref[case]
                )
                try:
                    with attention_context("cudnn!", device):
                        measure("ours_eager_cudnn", case, lambda x=x: model(**x), ref[case])
                        measure("diffusers_eager_cudnn", case, lambda x=x: diffusers_forward(twin, x), ref[case])
                except RuntimeError as e:
                    res.set("errors", "eager_cudnn", value=str(e).splitlines()[0][:300])
        else:
            for case, x in inputs.items():
                ref[case] = model(**x)

        # --- ours compiled per block, for each attention choice (fixed when the blocks are traced).
        best = (float("inf"), "auto")
        if "compiled" not in skip:
            accel.compile_blocks(model, mode=args.mode, backend=backend)
            for vi, spec in enumerate(args.attention.split(",")):
                key = "ours_compiled" if vi == 0 else f"ours_compiled[{spec}]"
                torch._dynamo.reset()
                try:
                    with attention_context(spec, device):
                        for case, x in inputs.items():
                            compile_s = first_call_s(lambda x=x: model(**x), device)
                            measure(
                                key,
                                case,
                                lambda x=x: model(**x),
                                ref[case],
                                {"compile_s": compile_s, "attention": spec},
                            )
                            if case == next(iter(cases)):
                                best = min(best, (res.data["cases"][case][key]["median_ms"], spec))
                            # CPU time to enqueue one forward: when it is well under the GPU time, the GPU
                            # never waits for the host and CUDA graphs have nothing left to save.
                            sync(device)
                            t1 = time.perf_counter()
                            model(**x)
                            dispatch_ms = (time.perf_counter() - t1) * 1e3
                            sync(device)
                            res.set("cases", case, key, "host_dispatch_ms", value=round(dispatch_ms, 2))
                        if vi == 0:
                            check_recompiles(model, inputs[list(cases)[-1]], list(cases)[-1], res, device, args.reps)
                except Exception as e:  # noqa: BLE001 -- a backend that cannot run these inputs: record it, go on
                    res.set("errors", key, value=f"{e.__class__.__name__}: {str(e).splitlines()[0][:300]}")
            res.set("best_compiled_attention", value=best[1])

        # --- ours with the GELU fused into the matmul epilogues (flux.accel.fuse_gelu), eager and compiled.
        if "fused" not in skip:
            uncompile(model)
            accel.fuse_gelu(model)
            with attention_context(best[1], device):
                for case, x in inputs.items():
                    measure("ours_eager_fuse_gelu", case, lambda x=x: model(**x), ref[case])
                accel.compile_blocks(model, mode=args.mode, backend=backend)
                for case, x in inputs.items():
                    compile_s = first_call_s(lambda x=x: model(**x), device)
                    measure(
                        "ours_compiled_fuse_gelu",
                        case,
                        lambda x=x: model(**x),
                        ref[case],
                        {"compile_s": compile_s, "attention": best[1]},
                    )
            uncompile(model)
            accel.unfuse_gelu(model)

        # --- diffusers compiled the same regional way (its own helper), torch's default attention.
        if "diffusers_compiled" not in skip:
            compiler = getattr(twin, "compile_repeated_blocks", None)
            how = "compile_repeated_blocks" if compiler else "torch.compile(model)"
            if compiler:
                compiler(fullgraph=True, backend=backend, dynamic=False)
            else:
                twin = torch.compile(twin, backend=backend, dynamic=False)
            for case, x in inputs.items():
                compile_s = first_call_s(lambda x=x: diffusers_forward(twin, x), device)
                measure(
                    "diffusers_compiled",
                    case,
                    lambda x=x: diffusers_forward(twin, x),
                    ref[case],
                    {"compile_s": compile_s, "how": how},
                )

    # --- FP8: a fresh model with the same weights (the compiled one cannot be quantised), quantised in place.
    if "fp8" not in skip:
        del twin
        model = None
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if device.type == "cuda":
            res.set(
                "fp8_allocated_before_build_gib", value=gib(torch.cuda.memory_allocated(device))
            )  # leftovers count in peak_gib
        model = random_flux(params, device, dtype)
        problem = accel.fp8_problem(device)
        if problem:
            res.set("fp8", value={"skipped": problem})
            return
        accel.quantize_fp8(model)
        with torch.inference_mode():
            for case, x in inputs.items():
                measure("ours_fp8_eager", case, lambda x=x: model(**x), ref[case])
            with attention_context(best[1], device):
                accel.compile_blocks(model, mode=args.mode, backend=backend)
                for case, x in inputs.items():
                    compile_s = first_call_s(lambda x=x: model(**x), device)
                    measure(
                        "ours_fp8_compiled",
                        case,
                        lambda x=x: model(**x),
                        ref[case],
                        {"compile_s": compile_s, "attention": best[1]},
                    )
                if "fused" not in skip:
                    uncompile(model)
                    accel.compile_blocks(accel.fuse_gelu(model), mode=args.mode, backend=backend)
                    for case, x in inputs.items():
                        compile_s = first_call_s(lambda x=x: model(**x), device)
                        measure(
                            "ours_fp8_compiled_fuse_gelu",
                            case,
                            lambda x=x: model(**x),
                            ref[case],
                            {"compile_s": compile_s, "attention": best[1]},
                        )
    res.set("total_s", value=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
