"""Where the time of one compiled flux-dev forward goes: attention backends and a kernel profile.

    python benchmarks/profile_transformer.py               # GPU
    python benchmarks/profile_transformer.py --tiny --out /tmp/b

1. One SDPA call at FLUX shapes under each attention choice (torch's default order, flux.accel's
   "auto", each backend alone), with the kernel each one launches and, for cuDNN, torch's own
   reasons when it refuses the inputs.
2. A torch.profiler trace of our compiled forward at 1024² batch 1 for each attention choice that
   runs: the top kernels and the time per category (matmul, attention, fused elementwise, other).
Writes <out>/profile.json.
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections import defaultdict

import torch

from common import (
    Results,
    add_common_args,
    attention_context,
    env_info,
    model_params,
    parse_args,
    random_flux,
    random_inputs,
    sdpa_timings,
)

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
from flux import accel

CATEGORIES = [
    ("attention", re.compile(r"fmha|flash|attention|sdpa|cudnn_generated|fort_native", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|matmul|sm90_|splitk|ampere_bf16|fp8", re.IGNORECASE)),
    ("fused elementwise (triton)", re.compile(r"^triton_", re.IGNORECASE)),
]


def category(name: str) -> str:
    return next((c for c, rx in CATEGORIES if rx.search(name)), "other")


def kernel_table(fn, device: torch.device, calls: int = 3, top: int = 25) -> dict:
    """GPU time per kernel name over `calls` calls of fn, per call."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if device.type == "cuda" and evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name][0] += evt.device_time / 1e3 / calls  # us -> ms per call
            per_kernel[evt.name][1] += 1
    cats: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        cats[category(name)] += ms
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "gpu_ms_per_call": round(sum(v[0] for v in per_kernel.values()), 3),
        "by_category_ms": {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": n[:160], "ms": round(ms, 3), "launches_per_call": cnt // calls} for n, (ms, cnt) in rows
        ],
    }


def cudnn_refusal(device: torch.device, q, k, v) -> list[str]:
    """torch's reasons for not using cuDNN attention on these inputs (empty: it can)."""
    try:
        from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

        params = SDPAParams(q, k, v, None, 0.0, False, False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = can_use_cudnn_attention(params, debug=True)
        return [] if ok else [str(w.message)[:300] for w in caught] or ["refused (no reason given)"]
    except Exception as e:  # noqa: BLE001 -- the API differs across versions; this is diagnostics only
        return [f"could not ask: {e.__class__.__name__}: {e}"[:300]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--specs", default="auto,cudnn!,flash!")
    args = parse_args(parser)
    device = torch.device("cpu" if args.tiny else "cuda")
    params = model_params(args.tiny)
    res = Results(f"{args.out}/profile.json", env=env_info(device))
    heads, hd = params.num_heads, params.hidden_size // params.num_heads
    seqs = {"1024x1": (1, 4608), "512x4": (4, 1536), "1024x4": (4, 4608)} if not args.tiny else {"64x1": (1, 32)}
    for case, (b, n) in seqs.items():
        res.set("sdpa_ms", case, value=sdpa_timings(device, b, n, heads, hd))

    # Which kernel each choice launches, and cuDNN's verdict on contiguous and on strided (single-block) inputs.
    b, n = next(iter(seqs.values()))
    q, k, v = (torch.randn(b, heads, n, hd, device=device, dtype=torch.bfloat16) for _ in range(3))
    fused = torch.randn(b, n, 3, heads, hd, device=device, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
    res.set(
        "cudnn_refusal",
        value={
            "contiguous": cudnn_refusal(device, q, k, v),
            "strided_like_single_block": cudnn_refusal(device, *fused),
        },
    )
    for spec in ("default", "auto", "cudnn!", "flash!"):
        try:
            with attention_context(spec, device):
                table = kernel_table(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, calls=2, top=3
                )
            res.set("sdpa_kernels", spec, value=[r["name"] for r in table["top_kernels"]])
        except RuntimeError as e:
            res.set("sdpa_kernels", spec, value=f"error: {str(e).splitlines()[0][:200]}")

    model = random_flux(params, device, torch.bfloat16)
    size = 64 if args.tiny else 1024
    x = random_inputs(params, 1, size, 16 if args.tiny else 512, device, torch.bfloat16, seed=1)
    accel.compile_blocks(model, backend="aot_eager" if args.tiny else "inductor")
    for spec in args.specs.split(","):
        torch._dynamo.reset()  # retrace: the attention kernel is chosen when the blocks are traced
        try:
            with torch.inference_mode(), attention_context(spec, device):
                res.set("compiled_forward_1024x1", spec, value=kernel_table(lambda: model(**x), device))
        except Exception as e:  # noqa: BLE001 -- diagnostics: record the failure, go on
            res.set(
                "compiled_forward_1024x1", spec, value=f"error: {e.__class__.__name__}: {str(e).splitlines()[0][:300]}"
            )


if __name__ == "__main__":
    main()
