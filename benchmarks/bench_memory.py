"""Does a two-image 1024² edit step of FLUX.1-dev fit a 24 GB card? Streaming blocks and FP8 weights.

    python benchmarks/bench_memory.py                   # flux-dev on one GPU, capped at 24 GiB
    python benchmarks/bench_memory.py --tiny --out /tmp/b    # flux-tiny on the CPU: checks the script

One transformer forward of an edit batch (reference + edited image, 1024², 512 text tokens, image K/V
injected from the reference in the vital layers), the way demo_4_edit runs it:
1. resident bf16, uncapped: the reference output, its time and peak memory;
2. the weights go to host memory, the GPU is capped with torch.cuda.set_per_process_memory_fraction;
   `stream_blocks` keeps as many blocks resident as fit under the target and streams the rest from
   pinned memory: peak allocated, ms/step, bit-identical to 1.;
3. the same with every block streamed (the smallest footprint);
4. FP8 weights quantised from the host copy (`quantize_fp8`): peak, ms/step eager and compiled, and
   the relative error against 1.
Writes <out>/memory.json as it goes.
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
    fastest_attention,
    first_call_s,
    gib,
    model_params,
    parse_args,
    random_flux,
    random_inputs,
    time_ms,
)

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
from flux import accel
from flux.model import Injection

# Vital layers of FLUX.1-dev reported by Stable Flow (global indices); any set works for memory and speed.
EDIT_LAYERS = (0, 1, 17, 18, 25, 28, 53, 54, 56)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--cap-gib", type=float, default=24.0, help="GPU memory cap (per-process fraction)")
    parser.add_argument("--target-gib", type=float, default=21.0, help="peak to plan the resident blocks for")
    parser.add_argument("--compile-backend", default=None)
    parser.add_argument("--skip", default="", help="comma-separated: stream,stream_all,fp8,fp8_compiled")
    args = parse_args(parser)
    skip = set(filter(None, args.skip.split(",")))
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    params = model_params(tiny)
    size, txt_len = (64, 16) if tiny else (1024, 512)
    backend = args.compile_backend or ("aot_eager" if tiny else "inductor")
    res = Results(
        f"{args.out}/memory.json",
        env=env_info(device),
        model="flux-tiny" if tiny else "flux-dev",
        case=f"edit of 2 images at {size}², {txt_len} text tokens, injection in layers {list(EDIT_LAYERS)}",
    )
    reps = max(1 if tiny else 2, args.reps // 2)

    def peak() -> float | None:
        return gib(torch.cuda.max_memory_allocated(device)) if cuda else None

    def reset() -> None:
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    t0 = time.perf_counter()
    model = random_flux(params, device, dtype)
    layers = {i for i in EDIT_LAYERS if i < model.num_layers}
    x = random_inputs(params, 2, size, txt_len, device, dtype, seed=2)
    inject = Injection.from_reference(layers, 2)
    weights = nbytes(model.parameters())
    block_bytes = nbytes(p for b in accel.blocks(model) for p in b.parameters())
    res.set("weights_gib", value={"all": gib(weights), "blocks": gib(block_bytes), "rest": gib(weights - block_bytes)})

    attention, sdpa = fastest_attention(device, 2, (size // 16) ** 2 + txt_len)
    res.set("attention", value={"chosen": attention, "sdpa_ms": sdpa})
    with torch.inference_mode(), attention_context(attention, device):
        step = lambda: model(**x, inject=inject)
        reset()
        ref = step()
        t = time_ms(step, device, reps=reps)
        resident_peak = peak()
        res.set("resident_bf16_uncapped", value={**t, "peak_gib": resident_peak})
        activations = (torch.cuda.max_memory_allocated(device) - weights) if cuda else 0

        # As on a 24 GB card: the weights start in host memory, the GPU is capped.
        model.cpu()
        reset()
        if cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, args.cap_gib * 2**30 / total), torch.cuda.current_device()
            )
            res.set(
                "cap",
                value={
                    "cap_gib": args.cap_gib,
                    "fraction": args.cap_gib * 2**30 / total,
                    "target_gib": args.target_gib,
                },
            )

        def streamed(key: str, keep: int) -> None:
            reset()
            t1 = time.perf_counter()
            streamer = accel.stream_blocks(model, device, keep_bytes=keep)
            setup = {"setup_s": round(time.perf_counter() - t1, 2), "setup_peak_gib": peak()}
            reset()
            out = step()
            entry = {
                "keep_gib": gib(keep),
                "streamed_blocks": len(streamer.streamed),
                "streamed_gib_per_step": gib(
                    sum(nbytes(accel.blocks(model)[i].parameters()) for i in streamer.streamed)
                ),
                "slots_gib": gib(streamer.device_bytes),
                "host_arena_gib": gib(streamer.arena.nbytes),
                "bit_identical": bool(torch.equal(out, ref)),
                **compare(out, ref),
                **setup,
            }
            entry.update(time_ms(step, device, reps=reps, warmup=1))
            entry["peak_gib"] = peak()
            res.set(key, value=entry)
            streamer.remove()

        if "stream" not in skip:
            # Resident blocks: what is left of the target after the rest of the model, two slots per block
            # layout, the activations measured above and a margin for the allocator.
            slots = 2 * (nbytes(model.double_blocks[0].parameters()) + nbytes(model.single_blocks[0].parameters()))
            keep = int(args.target_gib * 2**30 - (weights - block_bytes) - slots - activations - 0.5 * 2**30)
            streamed("stream_bf16", max(keep, 0) if cuda else block_bytes // 2)
        if "stream_all" not in skip:
            streamed("stream_bf16_all_blocks", 0)

        # FP8 weights quantised one linear at a time from the host copy.
        if "fp8" not in skip:
            model.cpu()
            reset()
            problem = accel.fp8_problem(device)
            if problem:
                res.set("fp8", value={"skipped": problem})
                return
            accel.quantize_fp8(model, device)
            quant_peak = peak()
            reset()
            out = step()
            entry = {
                "quantize_peak_gib": quant_peak,
                "weights_gib": gib(nbytes(model.parameters()) + nbytes(model.buffers())),
                **compare(out, ref),
                **time_ms(step, device, reps=reps),
                "peak_gib": peak(),
            }
            res.set("fp8_eager", value=entry)
            if "fp8_compiled" not in skip:
                accel.compile_blocks(model, backend=backend)
                reset()
                compile_s = first_call_s(step, device)
                out = step()
                entry = {
                    "compile_s": compile_s,
                    **compare(out, ref),
                    **time_ms(step, device, reps=reps),
                    "peak_gib": peak(),
                }
                res.set("fp8_compiled", value=entry)
    res.set("total_s", value=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
