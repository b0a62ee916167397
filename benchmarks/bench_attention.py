"""FP8 attention (flux.kernels.fp8_attention) against torch's bf16 SDPA kernels, at FLUX.1-dev's attention shapes.

    python benchmarks/bench_attention.py                 # on the GPU
    python benchmarks/bench_attention.py --tiny --out /tmp/b   # CPU, toy shapes: checks the script

Per shape (batch, 24 heads, N tokens, 128): ms per call and TFLOP/s of cuDNN / flash SDPA in bf16, of the FP8
kernel alone (inputs already quantised) and of the whole FP8 attention (quantisation included, compiled),
and the relative L2 error of each against float32 attention on the same bf16 inputs. Queries and keys are
RMS-normalised per token like FLUX's QK-norm; `sharp` multiplies the logits by 3 (peakier attention).
Writes <out>/attention.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import Results, add_common_args, env_info, time_ms
from flux import kernels


def inputs(batch: int, tokens: int, heads: int, dim: int, sharp: float, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, dim, device=device, generator=g) for _ in range(3))
    q, k = (F.rms_norm(x, (dim,)) for x in (q, k))
    return (sharp * q).bfloat16(), k.bfloat16(), v.bfloat16()


def rel(out, ref) -> float:
    return round(float((out.float() - ref).norm() / ref.norm()), 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    res = Results(f"{args.out}/attention.json", env=env_info(device))
    heads, dim = (2, 16) if args.tiny else (24, 128)
    shapes = [(1, 40), (2, 37)] if args.tiny else [(1, 4608), (4, 1536), (4, 4608), (1, 4481)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    quantised = torch.compile(kernels.quantize_attention_inputs) if not args.tiny else kernels.quantize_attention_inputs
    whole = torch.compile(kernels.fp8_attention) if not args.tiny else kernels.fp8_attention
    whole_pointers = torch.compile(lambda q, k, v: kernels.fp8_attention(q, k, v, tma=False)) if not args.tiny else None
    for batch, tokens in shapes:
        flops = 4 * batch * heads * tokens**2 * dim
        for sharp in (1.0, 3.0):
            case = f"{batch}x{tokens}" + ("_sharp" if sharp != 1 else "")
            q, k, v = inputs(batch, tokens, heads, dim, sharp, device)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).transpose(1, 2).flatten(2)
            row = {}

            def record(name, fn):
                try:
                    out = fn()
                    t = time_ms(fn, device, reps=args.reps) if sharp == 1 else None
                    row[name] = {"rel_l2": rel(out, ref)}
                    if t:
                        row[name].update(ms=t["median_ms"], tflops=round(flops / t["median_ms"] / 1e9, 1))
                except Exception as e:  # one backend refusing a shape must not lose the others
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}

            for name, backend in [("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)]:
                if device.type == "cuda":
                    def sdpa(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
                    record(name, sdpa)
            record("fp8_whole", lambda: whole(q, k, v))
            if device.type == "cuda" and kernels.triton is not None:
                record("fp8_whole_pointers", lambda: whole_pointers(q, k, v))
                q8, qs, k8, ks, v8, vs = quantised(q, k, v)
                qs = qs * (dim**-0.5 * kernels._LOG2_E)
                v8t = v8.transpose(-1, -2).contiguous()
                record("fp8_kernel_only", lambda: torch.ops.flux.fp8_attention(q8, qs, k8, ks, v8t, vs).flatten(2))
                if tokens % 16 == 0:
                    record("fp8_tma_kernel_only", lambda: torch.ops.flux.fp8_attention_tma(q8, qs, k8, ks, v8t, vs).flatten(2))
                ref8 = kernels.fp8_attention_reference(q, k, v).float()
                row["fp8_kernel_vs_reference"] = rel(kernels.fp8_attention(q, k, v), ref8)
                row["fp8_pointer_kernel_vs_reference"] = rel(kernels.fp8_attention(q, k, v, tma=False), ref8)
                for name in ("_fp8_attention_kernel", "_fp8_attention_tma_kernel"):
                    cfg = getattr(kernels, name).best_config
                    row[f"best_config{name}"] = str(cfg) if cfg else None
            res.set("cases", case, value=row)
            print(case, {n: r if not isinstance(r, dict) else {kk: vv for kk, vv in r.items()} for n, r in row.items()}, flush=True)


if __name__ == "__main__":
    main()
