"""Seconds, NFE and peak GPU memory per edit of each demo_5 method, at 1024² with random full-size networks.

    python benchmarks/bench_methods.py --out DIR          # flux-dev on the GPU: configs/demo_5_bench.json's methods
    python benchmarks/bench_methods.py --tiny --out DIR   # flux-tiny on the CPU: checks the script

The methods, their steps and vital layers are configs/demo_5_bench.json's (each method's published defaults,
stableflow.bench.method_params, as demo_5 runs them); `--methods` keeps some of them. The networks come through
`stableflow.config.load_models_for` with every speed option `auto`, bf16, with random weights of FLUX.1-dev's,
T5-XXL's and CLIP-L's full shapes (bench_e2e.use_random_weights: the text encoders are random networks too, not a
precomputed embedding). The case is PIE-Bench's kind, a real image: random pixels at the model's native size (an
edit's cost does not depend on its content), two prompts encoded once by stableflow.methods.prepare, as demo_5
prepares a case once for all its methods.

Each method first makes one warm-up edit with `--warmup-steps` steps (the same batch shapes, injection layers and
code paths as the timed edit, so compilation and autotuning happen there, at a fraction of a full edit's time;
0: a full-length warm-up), then `--reps` timed edits of its own steps, timed as demo_5 times an edit (`edit()`,
CUDA-synchronised around it), median reported. NFE is the method's own count (Edited.nfe: transformer evaluations
per sample); peak memory is torch's max allocated during the timed edits. Writes <out>/methods.json after every
method (atomically) and prints a markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import REPO, Results, add_common_args, env_info, gib, parse_args, sync

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
from bench_e2e import use_random_weights  # bench_e2e's random networks, through flux.pipeline's loaders

from flux.accel import describe
from stableflow.bench import BenchConfig, method_params, params_record
from stableflow.config import load_config, load_models_for
from stableflow.methods import EditCase, edit, prepare

CONFIG = REPO / "configs" / "demo_5_bench.json"
PROMPTS = ("a cat sitting on a wooden bench in a park", "a dog sitting on a wooden bench in a park")


def table(methods: dict, title: str) -> str:
    lines = [title, "", "| method | s/edit | NFE | ms/NFE | peak GPU memory |", "|---|---|---|---|---|"]
    for name, r in methods.items():
        peak = "–" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.1f} GiB"
        ms = 1e3 * r["s_per_edit"] / r["nfe"] if r["nfe"] else float("nan")
        lines.append(f"| {name} | {r['s_per_edit']:.2f} | {r['nfe']} | {ms:.0f} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--methods", nargs="+", help="only these of the config's methods (default: all of them)")
    parser.add_argument(
        "--warmup-steps", type=int, default=4, help="steps of each method's warm-up edit (0: the method's own)"
    )
    args = parse_args(parser, reps=1)  # a repetition is a whole edit
    overrides = {"dtype": "bf16", "device": "auto"}
    if args.tiny:
        overrides = {"model": "flux-tiny", "dtype": "fp32", "device": "cpu", "width": 64, "height": 64}
    if args.methods:
        overrides["methods"] = args.methods
    cfg = load_config(BenchConfig, CONFIG, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    use_random_weights(args.tiny)
    width, height = cfg.image_size

    t0 = time.perf_counter()
    models = load_models_for(cfg)
    device = models.device
    res = Results(
        Path(args.out) / "methods.json",
        model=cfg.model,
        size=[width, height],
        dtype=cfg.dtype,
        options=describe(models.accel),
        text_encoders_kept_on_gpu=models.keep_text_encoders,
        reps=args.reps,
        warmup_steps=args.warmup_steps,
        env=env_info(device),
    )
    res.set("load_s", value=round(time.perf_counter() - t0, 1))

    pixels = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sync(device)
    t0 = time.perf_counter()
    case = prepare(models, EditCase(*PROMPTS, image=pixels, seed=0, width=width, height=height))
    sync(device)
    res.set("prepare_s", value=round(time.perf_counter() - t0, 3))

    for name in cfg.methods:
        params = method_params(models, name, cfg.steps, cfg.vital_layers)
        warmup = (
            method_params(models, name, args.warmup_steps or None, cfg.vital_layers) if args.warmup_steps else params
        )
        sync(device)
        t0 = time.perf_counter()
        edit(models, case, warmup)
        sync(device)
        warmup_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, nfe = [], None
        for _ in range(args.reps):
            sync(device)
            t0 = time.perf_counter()
            nfe = edit(models, case, params).nfe
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        record = {
            "s_per_edit": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
            "nfe": nfe,
            "peak_allocated_gib": peak,
            "warmup_s": round(warmup_s, 2),
            "params": params_record(params),
        }
        res.set("methods", name, value=record)

    gpu = res.data["env"].get("gpu", str(device))
    title = f"{cfg.model}, {width}x{height}, {cfg.dtype}, {res.data['options']}; {gpu}, {res.data['env']['date'][:10]}"
    print(table(res.data["methods"], title), flush=True)


if __name__ == "__main__":
    main()
