"""demo_0 end to end with random full-size networks: steady-state seconds per image against the denoising alone.

    python benchmarks/bench_e2e.py --out DIR            # flux-dev on the GPU: 1024², 15 steps, `auto` options
    python benchmarks/bench_e2e.py --tiny --out DIR     # flux-tiny on the CPU: checks the script

The networks come through `stableflow.config.load_models_for`, so whatever `auto` decides for this card (compile,
fuse_gelu, streaming, whether T5 and CLIP stay on the GPU) is what a demo gets; only the weights are random:
flux.pipeline's four loaders are replaced by builders of random networks of the model's shapes (common.py), so
nothing is read from disk or the network (the printed "weights:" line names where real weights would come from).
Each run is demo_0's `main` into a fresh folder, `--images` images (two prompts, encoded once per run, as demo_0
does): the first run warms up (compilation), the median of the next `--reps` runs is the steady state. The
denoising alone is `FluxModels.denoise` of one image with the same steps. Prints one JSON line, also written to
<out>/e2e.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import add_common_args, env_info, full_size_text_encoders, parse_args, random_flux, random_module, sync

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
import demo_0_test  # the demo's own run loop
from flux import pipeline
from flux.accel import describe
from flux.modules.autoencoder import AutoEncoder
from flux.modules.conditioner import HFEmbedder
from flux.util import configs
from stableflow.config import load_config, load_models_for
from stableflow.text2img import Text2ImgConfig

PROMPTS = ["a photo of a forest with mist swirling around the tree trunks", "a cat reading a book by candlelight"]


def use_random_weights(tiny: bool) -> None:
    """flux.pipeline's loaders build networks of the model's shapes with random weights, on the device asked."""
    pipeline.load_flow_model = lambda name, device, dtype, path=None, params=None: random_flux(
        params or configs[name].params, device, dtype
    )
    pipeline.load_ae = lambda name, device, path=None: random_module(
        lambda: AutoEncoder(configs[name].ae_params), device, torch.float32, seed=3
    )
    if tiny:
        pipeline.load_t5 = lambda device, max_length, version, dtype: HFEmbedder.tiny("t5", max_length).to(device)
        pipeline.load_clip = lambda device, version, dtype: HFEmbedder.tiny("clip", 77).to(device)
    else:
        encoders = functools.cache(full_size_text_encoders)  # T5 and CLIP are built together; each loader takes one
        pipeline.load_t5 = lambda device, max_length, version, dtype: encoders(device, dtype)[0]
        pipeline.load_clip = lambda device, version, dtype: encoders(device, dtype)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--images", type=int, default=None, help="images per demo_0 run (default 4; tiny 2)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 15; tiny 2)")
    args = parse_args(parser, reps=3)  # a repetition is a whole demo run
    images, steps = args.images or (2 if args.tiny else 4), args.steps or (2 if args.tiny else 15)
    model, size = ("flux-tiny", 64) if args.tiny else ("flux-dev", 1024)
    use_random_weights(args.tiny)
    work = Path(tempfile.mkdtemp())

    def config(run: str) -> Text2ImgConfig:
        overrides = {
            "model": model,
            "prompt": PROMPTS,
            "num_images": images // len(PROMPTS),
            "width": size,
            "height": size,
            "steps": steps,
            "dtype": "fp32" if args.tiny else "bf16",
            "device": "cpu" if args.tiny else "auto",
            "output_dir": str(work / run),
        }
        return load_config(Text2ImgConfig, None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])

    t0 = time.perf_counter()
    models = load_models_for(config("load"))
    device = models.device
    result = {"model": model, "size": size, "steps": steps, "images_per_run": images, "options": describe(models.accel)}
    result["text_encoders_kept_on_gpu"] = models.keep_text_encoders
    result["load_s"] = round(time.perf_counter() - t0, 1)

    def run(name: str) -> float:
        sync(device)
        start = time.perf_counter()
        demo_0_test.main(config(name), models)
        sync(device)
        return time.perf_counter() - start

    result["first_run_s"] = round(run("warmup"), 2)
    runs = [run(f"run{i}") for i in range(args.reps)]
    result["runs_s"] = [round(s, 3) for s in runs]
    result["s_per_image"] = round(statistics.median(runs) / images, 4)

    # The denoising alone: one image, the same steps, the prompt already encoded.
    text = models.encode(PROMPTS[:1])
    timesteps = models.schedule(steps, size, size)
    noise = models.noise([0], size, size)
    denoise = []
    for _ in range(args.reps + 1):  # the first one warms up
        sync(device)
        start = time.perf_counter()
        latent = models.denoise(text, noise, timesteps, models.spec.guidance)
        sync(device)
        denoise.append(time.perf_counter() - start)
    result["denoise_s_per_image"] = round(statistics.median(denoise[1:]), 4)
    sync(device)
    start = time.perf_counter()
    models.decode(latent)
    sync(device)
    result["decode_s"] = round(time.perf_counter() - start, 4)
    result["ratio"] = round(result["s_per_image"] / result["denoise_s_per_image"], 3)
    if device.type == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["env"] = env_info(device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "e2e.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
