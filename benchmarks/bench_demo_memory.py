"""Peak GPU memory of every FLUX demo at 1024², with all four networks at full size (random weights).

    python benchmarks/bench_demo_memory.py --out DIR          # on a GPU
    python benchmarks/bench_demo_memory.py --offload --out DIR   # with the demos' offload option
    python benchmarks/bench_demo_memory.py --tiny --out DIR   # flux-tiny on the CPU: checks the script
    python benchmarks/bench_demo_memory.py --cap 24 --edit-only --options stream_blocks=true,resident_gb=15
    python benchmarks/bench_demo_memory.py --cap 24 --edit-only --offload --options fp8=true   # a 24 GB card

Builds the flux-dev transformer (bf16), the autoencoder (fp32), T5-XXL (bf16, 4.7 B parameters) and CLIP-L (bf16)
on the meta device and materialises them on the GPU with random weights, then moves each where
flux.pipeline.load_models would put it for the given options, and runs each demo's own `run` with 2 steps (peak
memory does not depend on the step count): demo_0 (one image), demo_1 (trajectory), demo_2 (sweep batch of 4),
demo_4 generated (reference + 2 edits) and real (input image, inversion, reference + 2 edits); with --edit-only the
two demo_4 runs in batches of two images. Before each demo the text encoders go back where loading put them, as at
a fresh start. `--cap` limits the process to that many GiB of the GPU (a smaller card). Writes
<out>/demo_memory[_offload][_options].json after each demo.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from common import REPO, add_common_args, env_info, full_size_text_encoders, gib, parse_args, random_flux, random_module

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
import demo_0_test  # the demos' run loops live in the demo scripts
import demo_1_layer
import demo_2_skip
import demo_4_edit
from flux import accel
from flux.accel import AccelOptions
from flux.modules.autoencoder import AutoEncoder
from flux.modules.conditioner import HFEmbedder
from flux.pipeline import FluxModels, text_encoder_home
from flux.util import configs
from stableflow import edit, text2img, trajectory
from stableflow.config import load_config
from stableflow.io import atomic_write_json
from stableflow.sweep import PromptSpec, SweepPlan


def build_models(
    tiny: bool, device: torch.device, offload: bool = False, options: AccelOptions | None = None
) -> FluxModels:
    """The networks where flux.pipeline.load_models puts them for these options. Random weights are drawn
    on `device` (fast) and then moved to their home: with offload every network lives in host memory and
    visits the GPU only while it is used; with stream_blocks the blocks stream from pinned host memory
    and T5/CLIP encode on the CPU."""
    name = "flux-tiny" if tiny else "flux-dev"
    options = options or AccelOptions()
    home = torch.device("cpu") if offload else device
    spec = configs[name]
    dtype = torch.float32 if tiny else torch.bfloat16
    model = random_flux(spec.params, device, dtype)
    if options.fp8:
        accel.quantize_fp8(model)
    if options.fuse_gelu:
        accel.fuse_gelu(model)
    model.to(home if not options.stream_blocks else "cpu")
    if options.stream_blocks:
        accel.stream_blocks(model, device, keep_bytes=int(options.resident_gb * 2**30))
    ae = random_module(lambda: AutoEncoder(spec.ae_params), device, torch.float32, seed=3).to(home)
    if options.compile:
        backend = "aot_eager" if tiny else "inductor"
        accel.compile_blocks(model, backend=backend)
        accel.compile_decoder(ae, backend=backend)
    if tiny:
        t5, clip = HFEmbedder.tiny("t5", spec.max_length), HFEmbedder.tiny("clip", 77)
    else:
        t5, clip = full_size_text_encoders(device, dtype)
    text_home = text_encoder_home(options, home)
    t5, clip = t5.to(text_home), clip.to(text_home)
    if device.type == "cuda":  # after the encoders left: their random weights drawn here must not stay cached
        torch.cuda.empty_cache()
    return FluxModels(name, spec, model, ae, t5, clip, device, dtype, offload=offload, accel=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--offload", action="store_true", help="the demos' offload option: networks live in host memory"
    )
    parser.add_argument(
        "--options", default="", help="speed/memory config keys, e.g. stream_blocks=true,resident_gb=15"
    )
    parser.add_argument("--cap", type=float, default=None, help="cap the GPU at this many GiB (a smaller card)")
    parser.add_argument(
        "--edit-only", action="store_true", help="only the two-image edits (reference + 1 edit per batch)"
    )
    parser.add_argument("--only", default="", help="run only the demos whose name contains this text")
    parser.add_argument(
        "--no-expandable",
        action="store_true",
        help="keep the allocator's fixed-size segments (load_models turns expandable ones on with stream_blocks)",
    )
    args = parse_args(parser)
    device = torch.device("cpu" if args.tiny else "cuda")
    size = 64 if args.tiny else 1024
    options = AccelOptions(
        **{k: json.loads(v) for k, v in (kv.split("=") for kv in filter(None, args.options.split(",")))}
    )
    expandable = options.stream_blocks and not args.no_expandable and not args.tiny and accel.use_expandable_segments()
    t0 = time.perf_counter()
    models = build_models(args.tiny, device, args.offload, options)
    results = {
        "env": env_info(device),
        "size": size,
        "offload": args.offload,
        "options": str(options),
        "expandable_segments": expandable,
        "build_s": round(time.perf_counter() - t0, 1),
        "demos": {},
    }
    if args.cap and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap * 2**30 / total)
        results["cap_gib"] = args.cap
    if device.type == "cuda":
        results["resident_gib"] = {
            n: gib(sum(p.numel() * p.element_size() for p in m.parameters()))
            for n, m in (("transformer", models.model), ("ae", models.ae), ("t5", models.t5), ("clip", models.clip))
        }
    work = tempfile.mkdtemp()
    base = {"model": models.name, "width": size, "height": size, "steps": 2, "device": str(device)}
    demos = {
        "demo_0_test": lambda: demo_0_test.main(
            load_config(text2img.Text2ImgConfig, None, _args(base, output_dir=f"{work}/d0")), models
        ),
        "demo_1_layer": lambda: demo_1_layer.main(
            load_config(trajectory.TrajectoryConfig, None, _args(base, output_dir=f"{work}/d1")), models
        ),
        "demo_2_skip (batch 4)": lambda: demo_2_skip.run_sweep(
            SweepPlan(
                models.name,
                models.spec.params.depth,
                models.spec.params.depth_single_blocks,
                "fp32" if args.tiny else "bf16",
                (PromptSpec("p0", "a fox", 0),),
                (0, 1, 2),
                size,
                size,
                2,
                3.5,
                4,
                f"{work}/d2",
            ),
            lambda d: models,
            str(device),
            progress=False,
        ),
        "demo_4_edit generated (ref + 2 edits)": lambda: demo_4_edit.main(
            load_config(
                edit.EditConfig, None, _args(base, output_dir=f"{work}/d4", edits=["a dog", "a cat"], batch_size=3)
            ),
            models,
        ),
        "demo_4_edit real (ref + 2 edits)": lambda: demo_4_edit.main(
            load_config(
                edit.EditConfig,
                None,
                _args(
                    base,
                    output_dir=f"{work}/d4r",
                    image=str(REPO / "tests/data/house.png"),
                    size=size,
                    edits=["a red house", "a house in snow"],
                    batch_size=3,
                ),
            ),
            models,
        ),
    }
    if args.edit_only:  # the 24 GB case: batches of two images
        demos = {
            f"{name} (2-image batches)": lambda name=name, i=i: demo_4_edit.main(
                load_config(
                    edit.EditConfig,
                    None,
                    _args(
                        base,
                        output_dir=f"{work}/{i}",
                        edits=["a dog", "a cat"],
                        batch_size=2,
                        **({"image": str(REPO / "tests/data/house.png"), "size": size} if "real" in name else {}),
                    ),
                ),
                models,
            )
            for i, name in enumerate(("demo_4_edit generated", "demo_4_edit real"))
        }
    demos = {name: run for name, run in demos.items() if args.only in name}
    text_home = next(models.t5.parameters()).device
    for name, run in demos.items():
        if not args.offload:  # back where loading put them, as at a fresh start
            models.t5.to(text_home), models.clip.to(text_home)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        run()
        entry = {"seconds": round(time.perf_counter() - t, 1)}
        if device.type == "cuda":
            entry["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
            entry["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
        results["demos"][name] = entry
        print(name, entry, flush=True)
        tag = "_offload" * args.offload + (
            "_" + args.options.replace("=", "-").replace(",", "_") if args.options else ""
        )
        tag += "_fixed_segments" * (args.no_expandable and bool(options.stream_blocks))
        atomic_write_json(f"{args.out}/demo_memory{tag}.json", results)  # after each demo


def _args(base: dict, **more) -> list[str]:
    import json

    return [f"{k}={json.dumps(v)}" for k, v in {**base, **more}.items()]


if __name__ == "__main__":
    main()
