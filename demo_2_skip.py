"""Layer-ablation sweep (Stable Flow, Sec. 3.1): each prompt's reference image and one image per bypassed layer.

    python demo_2_skip.py configs/demo_2_skip.json                       # one process
    torchrun --nproc_per_node 8 demo_2_skip.py configs/demo_2_skip.json  # one process per GPU (multi-node too)
    python demo_2_skip.py configs/demo_2_skip.json num_prompts=4 'layers=[0,1,2]'

Writes <output_dir>/<prompt_id>/ref.png and layer_XX.png plus <output_dir>/manifest.json; rerun with the same
settings to resume: only missing images are made.  --print-config lists every key.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from stableflow.config import load_models_for, run_demo
from stableflow.runs import PngWriter
from stableflow.sweep import (
    Dist,
    SkipConfig,
    SweepPlan,
    SweepResult,
    claim,
    encode_prompts,
    progress_bar,
    sweep_device,
)

if TYPE_CHECKING:
    from flux.pipeline import FluxModels


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_sweep(
    plan: SweepPlan,
    load: Callable[[str], FluxModels],
    device: str = "auto",
    dist: Dist | None = None,
    progress: bool = True,
) -> SweepResult:
    """Make this rank's missing images of `plan`. `load(device)` loads the models, only if work remains."""
    dist = dist or Dist()
    root, tag = plan.output_dir, dist.tag
    work = claim(plan, dist)  # checks/extends manifest.json (other settings: UserError), finds what is missing
    repaired = f" ({work.repaired} of them damaged)" if work.repaired else ""
    log(
        f"{tag}sweep of {plan.total} images ({len(plan.prompts)} prompts x {len(plan.layers) + 1} variants) in "
        f"{root}: {sum(map(len, work.mine))} are this process's, {work.done} already done, {len(work.todo)} to "
        f"make{repaired}"
    )
    if not work.pending:
        return SweepResult([], work.done, plan.total)

    models = load(sweep_device(device, dist))
    text, row = encode_prompts(models, work.prompts())
    timesteps = models.schedule(plan.steps, plan.width, plan.height)
    seeds = {p.seed for p in work.prompts()}
    noise = {s: models.noise([s], plan.width, plan.height) for s in seeds}  # every variant of a prompt: same noise

    start = time.perf_counter()
    bar = progress_bar(len(work.todo), f"{tag}sweep", enabled=progress and dist.local_rank == 0)
    with bar, models.on_device(models.model, models.ae), PngWriter(4, on_written=lambda _: bar.update(1)) as writer:
        for batch in work.pending:
            # One variant of several prompts: each sample bypasses its own layer (all the same one in full groups).
            latent = models.denoise(
                text.select([row[it.prompt] for it in batch]),
                torch.cat([noise[it.prompt.seed] for it in batch]),
                timesteps,
                plan.guidance,
                skip=[it.skip for it in batch],
            )
            writer.wait()  # the previous batch's files: a kill then loses only the batch in flight
            for i, item in enumerate(batch):
                if item in work.todo:  # the others are there: identical by construction
                    # Decoded one at a time: the AE's activations at 1024² are large (docs/performance.md).
                    out = plan.output(item)
                    writer.submit(root / out.name, models.decode(latent[i : i + 1])[0], out.record)
    seconds = time.perf_counter() - start
    return SweepResult(writer.written, work.done, plan.total, seconds, work.repaired)


def main(cfg: SkipConfig) -> None:
    plan = cfg.plan()  # validated prompts and layers (the prompt file was read once, by the config check)
    dist = Dist.from_env()  # torchrun's RANK / WORLD_SIZE: each process takes every WORLD_SIZE-th batch
    result = run_sweep(
        plan, lambda device: load_models_for(replace(cfg, device=device)), cfg.device, dist, cfg.progress
    )
    rate = f" in {result.seconds:.1f} s ({result.seconds / len(result.written):.2f} s/image)" if result.written else ""
    repaired = f", {result.repaired} damaged image{'s' * (result.repaired != 1)} remade" if result.repaired else ""
    there = f"{result.skipped} already there{repaired}"
    print(f"{dist.tag}wrote {len(result.written)} images to {plan.output_dir}{rate} ({there})")


if __name__ == "__main__":
    run_demo(SkipConfig, main, description=__doc__.split("\n\n")[0])
