"""The FLUX autoencoder at 1024²: faster decodes than the pipeline's, and how far each strays from it.

    python benchmarks/bench_decode.py                        # flux-dev AE, random weights, on the GPU (~3 min)
    python benchmarks/bench_decode.py --ae-path ae.safetensors   # the same with the real weights
    python benchmarks/bench_decode.py --tiny --out /tmp/b     # flux-tiny AE on the CPU: checks the script

Decode of one latent (1, 16, 128, 128), each setting timed as FluxModels.decode calls it (latent handed over
in bf16, output clamped and cast to fp32):
1. current: fp32 weights under bf16 autocast (what FluxModels.decode does: load_ae keeps the AE in fp32);
2. the same in channels_last;  3. bf16 weights, no autocast (GroupNorm and swish then run in bf16);
4. bf16 weights in channels_last;  5. torch.compile of the decoder for 1. and for the fastest of 2.-4.;
6. a batch of 2 latents in the fastest setting (ms per image);  and cudnn.benchmark on the fastest eager one.
Each: median ms per image, peak memory above the resident weights, the error against 1. and against a strict
fp32 decode (TF32 off), raw and as the 8-bit pixels stableflow.io writes. Encode of a (1, 3, 1024, 1024) image: fp32
as FluxModels.encode_image runs it (no autocast), 1. and 2. Writes <out>/decode.json as it goes.

Random weights: convolutions ~ N(0, 1/fan_in) (common.randomize_), GroupNorm scales ~ U(0.5, 1.5) (randomize_
would draw them ~ N(0, 0.02), which silences every residual branch). Errors with the real weights can differ:
check the chosen setting with --ae-path before adopting it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import time

import torch
from torch import nn

from common import Results, add_common_args, compare, env_info, first_call_s, gib, parse_args, randomize_, time_ms

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
from flux.modules.autoencoder import AutoEncoder
from flux.util import configs, load_ae

CL = torch.channels_last
# name: (weights dtype, bf16 autocast, channels_last)
EAGER = {
    "current": (torch.float32, True, False),
    "channels_last": (torch.float32, True, True),
    "bf16": (torch.bfloat16, False, False),
    "bf16_channels_last": (torch.bfloat16, False, True),
}


def random_ae(name: str, device: torch.device) -> AutoEncoder:
    with torch.device("meta"):
        ae = AutoEncoder(configs[name].ae_params)
    ae = randomize_(ae.to_empty(device=device), seed=1)
    g = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():
        for m in ae.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
    return ae.eval().requires_grad_(False)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit pixels stableflow.io.tensor_to_pil saves (clamp, 127.5 * (x + 1), truncated)."""
    return (127.5 * (x.float().clamp(-1, 1) + 1.0)).to(torch.uint8)


def pixel_diff(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (pixels(out).int() - pixels(ref).int()).abs()
    return {"frac_differ": round(float((d > 0).float().mean()), 6), "max": int(d.max())}


@contextlib.contextmanager
def strict_fp32():
    """True fp32 (cuDNN convolutions use TF32 by default, matmuls do not)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ae-path", default=None, help="ae.safetensors: real weights instead of random ones")
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default: inductor; tiny: aot_eager)"
    )
    parser.add_argument("--skip", default="", help="comma-separated: fp32,compile,batch2,cudnn_benchmark,encode")
    args = parse_args(parser)
    skip = set(filter(None, args.skip.split(",")))
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    cuda = device.type == "cuda"
    name = "flux-tiny" if tiny else "flux-dev"
    size = 32 if tiny else 1024
    reps, warmup = (args.reps, 1) if tiny else (args.reps, args.warmup)
    backend = args.compile_backend or ("aot_eager" if tiny else "inductor")
    res = Results(
        f"{args.out}/decode.json",
        env=env_info(device),
        model=name,
        weights=args.ae_path or "random",
        case=f"decode (1, 16, {size // 8}, {size // 8}) -> (1, 3, {size}, {size}); encode the reverse",
        tf32={"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        compile_backend=backend,
        reps=reps,
        warmup=warmup,
    )
    t0 = time.perf_counter()

    ae32 = load_ae(name, device, path=args.ae_path) if args.ae_path else random_ae(name, device)
    models = {(torch.float32, False): ae32, (torch.float32, True): copy.deepcopy(ae32).to(memory_format=CL)}
    models[torch.bfloat16, False] = copy.deepcopy(ae32).to(torch.bfloat16)
    models[torch.bfloat16, True] = copy.deepcopy(models[torch.bfloat16, False]).to(memory_format=CL)
    g = torch.Generator(device="cpu").manual_seed(0)
    # The denoiser hands the decoder bf16 latents (FluxModels.dtype); a normalised latent is ~ N(0, 1).
    z = torch.randn(1, 16, size // 8, size // 8, generator=g).to(device, torch.bfloat16)
    z2 = torch.cat([z, torch.randn(1, 16, size // 8, size // 8, generator=g).to(device, torch.bfloat16)])
    image = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device)

    def decoder_call(dtype, autocast, cl, decoder=None):
        """FluxModels.decode for one batch; `decoder` replaces ae.decoder (a compiled one)."""
        ae = models[dtype, cl]
        dec = ae.decoder if decoder is None else decoder

        def run(latent, clamp=True):
            x = latent.to(device, dtype, memory_format=CL if cl else torch.contiguous_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = dec(x / ae.scale_factor + ae.shift_factor)  # = ae.decode(x), with `dec`
            return (out.clamp(-1, 1) if clamp else out).float()

        return run

    def reset() -> int:
        gc.collect()
        if not cuda:
            return 0
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)

    outs: dict[str, torch.Tensor] = {}  # unclamped fp32 outputs, batch row 0

    def measure(
        section: str, key: str, fn, x, refs: dict[str, str], n: int = 1, first: str | None = None, extra=None
    ) -> dict | None:
        """Time fn(x) (n images), its peak memory above what is resident, and the errors of fn(x, clamp=False)
        against outs[ref] for each ref; `first` names the seconds of a first call (compilation, autotuning) to
        report apart. An error string in place of the entry where it fails."""
        try:
            entry = dict(extra or {})
            if first:
                entry[first] = first_call_s(lambda: fn(x), device)
            base = reset()
            out = fn(x, clamp=False)[:1]
            t = time_ms(lambda: fn(x), device, reps=reps, warmup=warmup)
            entry.update(ms_per_image=round(t["median_ms"] / n, 3), **t)
            if cuda:
                entry["peak_extra_gib"] = gib(torch.cuda.max_memory_allocated(device) - base)
            for label, ref in refs.items():
                if ref in outs:
                    entry[label] = compare(out, outs[ref])
                    if section == "decode":
                        entry[label]["pixels"] = pixel_diff(out, outs[ref])
            outs[key] = out
            res.set(section, key, value=entry)
            return entry
        except Exception as e:  # noqa: BLE001  (one failing setting must not lose the others)
            res.set(
                section, key, value={"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            )
            return None

    refs = {"vs_current": "current", "vs_fp32": "fp32"}
    with torch.inference_mode():
        res.set(
            "weights_gib",
            value={
                "fp32": gib(sum(p.numel() * 4 for p in ae32.parameters())),
                "decoder_fp32": gib(sum(p.numel() * 4 for p in ae32.decoder.parameters())),
            },
        )
        # Reference: strict fp32 (timed too, to put the others in proportion).
        if "fp32" not in skip:
            with strict_fp32():
                measure("decode", "fp32", decoder_call(torch.float32, False, False), z, {})
        timings: dict[str, float] = {}
        for key, setting in EAGER.items():
            dtype, autocast, cl = setting
            extra = {"weights": str(dtype).removeprefix("torch."), "autocast": autocast, "channels_last": cl}
            entry = measure("decode", key, decoder_call(*setting), z, refs, extra=extra)
            if entry:
                timings[key] = entry["ms_per_image"]

        calls = {k: decoder_call(*EAGER[k]) for k in timings}
        if "compile" not in skip:
            best_alt = min((k for k in timings if k != "current"), key=timings.get, default=None)
            for key in ["current"] * ("current" in timings) + [best_alt] * (best_alt is not None):
                dtype, autocast, cl = EAGER[key]
                # dynamic=False: the batch of 2 below gets its own static graph, as a pipeline would.
                compiled = torch.compile(models[dtype, cl].decoder, backend=backend, dynamic=False)
                calls[f"compiled_{key}"] = decoder_call(dtype, autocast, cl, decoder=compiled)
                entry = measure("decode", f"compiled_{key}", calls[f"compiled_{key}"], z, refs, first="compile_s")
                if entry:
                    timings[f"compiled_{key}"] = entry["ms_per_image"]
        if not timings:
            raise SystemExit("every decode setting failed: see " + str(res.path))
        best = min(timings, key=timings.get)
        res.set("best", value={"decode": best, "ms_per_image": timings[best]})

        if "batch2" not in skip:
            # Row 0 of the batch against the same setting's batch-1 output: is the result batch-invariant?
            measure(
                "decode",
                f"batch2_{best}",
                calls[best],
                z2,
                {**refs, "vs_same_batch1": best},
                n=2,
                first="compile_s" if best.startswith("compiled") else None,
            )
        best_eager = min(EAGER.keys() & timings.keys(), key=timings.get, default=None)
        if "cudnn_benchmark" not in skip and cuda and best_eager:
            torch.backends.cudnn.benchmark = True  # the first call tries every algorithm for each conv shape
            measure(
                "decode",
                f"cudnn_benchmark_{best_eager}",
                calls[best_eager],
                z,
                {**refs, "vs_same": best_eager},
                first="autotune_s",
            )
            torch.backends.cudnn.benchmark = False

        if "encode" not in skip:

            def encoder_call(autocast, cl):
                ae = models[torch.float32, cl]
                fmt = CL if cl else torch.contiguous_format

                def run(x, clamp=True):  # clamp: unused, keeps measure's signature
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        return ae.encode(x.to(memory_format=fmt)).float()

                return run

            with strict_fp32():
                outs["enc_fp32_strict"] = encoder_call(False, False)(image)
            erefs = {"vs_fp32_strict": "enc_fp32_strict", "vs_pipeline": "enc_pipeline_fp32"}
            measure("encode", "enc_pipeline_fp32", encoder_call(False, False), image, erefs)  # FluxModels.encode_image
            measure("encode", "enc_current", encoder_call(True, False), image, erefs)
            measure("encode", "enc_channels_last", encoder_call(True, True), image, erefs)
    res.set("total_s", value=round(time.perf_counter() - t0, 1))
    print_table(res.data)


def print_table(data: dict) -> None:
    def err(e: dict | None) -> str:
        if not e:
            return f"{'-':>9} {'-':>9} {'-':>7}"
        px = f"{e['pixels']['frac_differ']:7.4f}" if "pixels" in e else f"{'-':>7}"
        return f"{e['max_abs']:9.2e} {e['rel_l2']:9.2e} {px}"

    print(
        f"\n{'':32} {'ms/img':>8} {'peak+GiB':>8} {'compile':>7} | {'vs current: max|Δ|  relL2  px≠':>35} |"
        f" {'vs fp32: max|Δ|  relL2  px≠':>27}"
    )
    for section in ("decode", "encode"):
        for key, e in data.get(section, {}).items():
            if "error" in e:
                print(f"{section[:3]} {key:28} {e['error'][:110]}")
                continue
            first = e.get("vs_current") or e.get("vs_pipeline")
            second = e.get("vs_fp32") or e.get("vs_fp32_strict")
            peak = f"{e['peak_extra_gib']:8.3f}" if "peak_extra_gib" in e else f"{'-':>8}"
            print(
                f"{section[:3]} {key:28} {e['ms_per_image']:8.2f} {peak}"
                f" {e.get('compile_s', e.get('autotune_s', '')):>7} | {err(first):>35} | {err(second):>27}"
            )
    print(
        "px≠: share of 8-bit pixels (as stableflow.io saves them) that differ. Encode rows: vs the pipeline's fp32 encode"
        " (TF32 convolutions) and vs strict fp32. peak+: peak memory above the resident weights."
    )


if __name__ == "__main__":
    main()
