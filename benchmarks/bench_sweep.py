"""Time a sample of the layer-ablation sweep (demo_2_skip) and extrapolate to the full 3,712 images.

    python benchmarks/bench_sweep.py                                   # one GPU
    torchrun --nproc_per_node 2 benchmarks/bench_sweep.py --tag 2gpu   # one process per GPU
    python benchmarks/bench_sweep.py --tiny --out /tmp/b               # flux-tiny on the CPU: checks the script

Runs demo_2_skip.run_sweep itself (batches of ablation variants with per-sample skip sets, AE decode,
PNG writing) with a random flux-dev transformer and AE; the text encoders are stand-ins returning
random embeddings of the right shapes (encoding 64 prompts is a one-time cost of seconds). The
transformer is compiled per block with cuDNN attention (flux.accel), the AE decoder as a whole, and warmed up (compiled) before
the timed sample. Writes <out>/sweep_<tag>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time

import torch
from torch import nn

from common import (
    REPO,
    Results,
    add_common_args,
    attention_context,
    env_info,
    fastest_attention,
    model_params,
    parse_args,
    random_flux,
    randomize_,
)

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
from demo_2_skip import run_sweep  # the sweep loop lives in the demo
from flux import accel
from flux.modules.autoencoder import AutoEncoder
from flux.pipeline import FluxModels
from flux.util import configs
from stableflow.sweep import Dist, SweepPlan, load_prompts, select_prompts

FULL_SWEEP_IMAGES = 64 * 58


class RandomText(nn.Module):
    """Stands in for T5 (shape (B, length, dim)) or CLIP (length None: (B, dim)): a fixed random
    embedding per prompt text."""

    def __init__(self, dim: int, length: int | None):
        super().__init__()
        self.dim, self.length = dim, length

    def forward(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little"))
            rows.append(torch.randn(*([self.length] if self.length else []), self.dim, generator=g))
        return torch.stack(rows)


def random_models(
    name: str, device: torch.device, compile_blocks: bool, backend: str, fuse_gelu: bool = False
) -> FluxModels:
    spec = configs[name]
    model = random_flux(spec.params, device, torch.bfloat16)
    if fuse_gelu:
        accel.fuse_gelu(model)
    with torch.device("meta"):
        ae = AutoEncoder(spec.ae_params)
    ae = randomize_(ae.to_empty(device=device), seed=1).eval()  # fp32, as load_ae gives it
    if compile_blocks:  # as load_models does with the compile option: the blocks and the AE decoder
        accel.compile_blocks(model, backend=backend)
        accel.compile_decoder(ae, backend=backend)
    t5 = RandomText(spec.params.context_in_dim, spec.max_length)
    clip = RandomText(spec.params.vec_in_dim, None)
    return FluxModels(name, spec, model, ae, t5, clip, device, torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--tag", default="1gpu")
    parser.add_argument(
        "--prompts",
        type=int,
        default=4,
        help="prompts in the sample: a multiple of --batch-size, like the real sweep's 64 (its batches "
        "then hold one variant each)",
    )
    parser.add_argument("--layers", default="0,5,10,15,20,25,30,35,40,45,50", help="layers bypassed in the sample")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument(
        "--attention", default="pick", help='"pick" (fastest SDPA at this shape), or a spec: auto, cudnn!, ...'
    )
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--fuse-gelu", action="store_true", help="flux.accel.fuse_gelu (the config key fuse_gelu)")
    parser.add_argument("--workdir", default="/tmp/bench_sweep", help="where the sample's PNGs go (deleted first)")
    args = parse_args(parser)

    dist = Dist.from_env()
    if dist.world_size > 1:
        torch.distributed.init_process_group("gloo")  # only barriers and a gather of a few numbers
    tiny = args.tiny
    name = "flux-tiny" if tiny else "flux-dev"
    if tiny:
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(dist.local_rank)
        device = torch.device("cuda", dist.local_rank)
    size = 64 if tiny else 1024
    steps = 2 if tiny else args.steps
    backend = "aot_eager" if tiny else "inductor"
    params = model_params(tiny)
    layers = [int(s) for s in args.layers.split(",") if int(s) < params.depth + params.depth_single_blocks]
    prompts = select_prompts(load_prompts(REPO / "prompts" / "prompt.json"), count=args.prompts)
    n_images = len(prompts) * (len(layers) + 1)
    res = None
    if dist.rank == 0:
        res = Results(
            f"{args.out}/sweep_{args.tag}.json",
            env=env_info(device),
            model=name,
            world_size=dist.world_size,
            sample={
                "prompts": len(prompts),
                "layers": layers,
                "images": n_images,
                "size": size,
                "steps": steps,
                "batch_size": args.batch_size,
                "compile": not args.no_compile,
                "fuse_gelu": args.fuse_gelu,
                "attention": args.attention,
            },
        )
    workdir = f"{args.workdir}_{args.tag}"
    if dist.rank == 0:
        shutil.rmtree(workdir, ignore_errors=True)

    t0 = time.perf_counter()
    attention, sdpa = (
        (args.attention, {})
        if args.attention != "pick"
        else fastest_attention(device, args.batch_size, (size // 16) ** 2 + 512)
    )
    if res:
        res.set("attention", value={"chosen": attention, "sdpa_ms": sdpa})
    # Preferred, not strict: the AE's attention (one 512-wide head) needs a fallback kernel.
    with attention_context(attention.rstrip("!"), device):
        models = random_models(name, device, not args.no_compile, backend, args.fuse_gelu)
        build_s = time.perf_counter() - t0
        # Warm-up: compile the blocks for this batch shape (and with a per-sample skip), tune the AE convs.
        b = args.batch_size
        text = models.encode([p.prompt for p in prompts[:1]] * b)
        noise = models.noise([0] * b, size, size)
        t1 = time.perf_counter()
        with torch.inference_mode():
            latent = models.denoise(
                text, noise, models.schedule(2, size, size), 3.5, skip=[{layers[0]}] + [set()] * (b - 1)
            )
            models.decode(latent[:1])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            warm_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            for _ in range(3):
                models.decode(latent[:1])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            decode_ms = (time.perf_counter() - t2) / 3 * 1e3
        if dist.world_size > 1:
            torch.distributed.barrier()
        t3 = time.perf_counter()
        plan = SweepPlan(
            name,
            params.depth,
            params.depth_single_blocks,
            "bf16",
            prompts,
            layers,
            size,
            size,
            steps,
            3.5,
            args.batch_size,
            workdir,
        )
        result = run_sweep(plan, lambda dev: models, device=str(device), dist=dist, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sample_s = time.perf_counter() - t3
    mine = {
        "rank": dist.rank,
        "images": len(result.written),
        "sample_s": round(sample_s, 2),
        "build_s": round(build_s, 1),
        "warmup_compile_s": round(warm_s, 1),
        "decode_ms_per_image": round(decode_ms, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    ranks = [mine]
    if dist.world_size > 1:
        ranks = [None] * dist.world_size
        torch.distributed.all_gather_object(ranks, mine)
    if dist.rank == 0:
        wall = max(r["sample_s"] for r in ranks)
        images = sum(r["images"] for r in ranks)
        per_image = wall / images  # seconds of wall time per image, all processes together
        res.set("ranks", value=ranks)
        res.set(
            "summary",
            value={
                "images": images,
                "wall_s": round(wall, 2),
                "wall_s_per_image": round(per_image, 3),
                "images_per_s": round(images / wall, 3),
                "ms_per_step_per_image": round(per_image / steps * 1e3, 1),
                "extrapolated_full_sweep_h": round(FULL_SWEEP_IMAGES * per_image / 3600, 3),
                "one_time_s": round(max(r["build_s"] + r["warmup_compile_s"] for r in ranks), 1),
            },
        )
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    if dist.rank == 0 and not os.environ.get("KEEP_SWEEP_PNGS"):
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
