"""Watch FLUX denoise: every step's noisy latent x_t and predicted clean image x0, as PNGs, a grid and a GIF.

    python demo_1_layer.py configs/demo_1_layer.json [key=value ...]   (--print-config lists every key)
    python demo_1_layer.py configs/demo_1_layer.json 'skip_layers=[18]'  # the same, with layer 18 bypassed

The sampler integrates the flow from pure noise (t = 1) to the image (t = 0) in Euler steps. At each step the model
predicts a velocity v, and x0 = x_t - t * v is the clean image it currently aims at: early steps fix the layout,
late ones the detail. With skip_layers, those layers are bypassed at every step, to see what they contribute and when.
The file layout is described in stableflow/trajectory.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from flux.sampling import Step
from flux.util import model_spec
from stableflow.config import config_to_dict, load_models_for, run_demo
from stableflow.io import atomic_write_json, refuse_other_settings
from stableflow.trajectory import (
    TrajectoryConfig,
    record_trajectories,
    sample_folder,
    sample_metadata,
    write_trajectory,
)

if TYPE_CHECKING:
    from flux.pipeline import FluxModels


def main(cfg: TrajectoryConfig, models: FluxModels | None = None) -> list[Path]:
    """Record and write every (prompt, seed) trajectory of `cfg`, then run.json; returns the sample folders."""
    out = Path(cfg.output_dir)
    spec = model_spec(cfg.model)
    guidance = spec.guidance if cfg.guidance is None else cfg.guidance

    # The work: one sample per (prompt, seed). trajectory.gif is a sample's last file, so where it exists the
    # sample is complete and is skipped.
    jobs = [(p, prompt, seed) for p, prompt in enumerate(cfg.prompts()) for seed in cfg.seeds()]
    todo = [job for job in jobs if not (out / sample_folder(*job) / "trajectory.gif").exists()]
    # A finished sample counts only if made with these settings (skip_layers, steps, ...); anything else is refused.
    done = [job for job in jobs if job not in todo]
    refuse_other_settings(
        out, {f"{sample_folder(*job)}/final.png": sample_metadata(cfg, job[1], job[2], guidance) for job in done}
    )

    models = models or load_models_for(cfg)  # also on a finished run: run.json records the model's schedule
    start = time.perf_counter()  # run.json's "seconds" counts the work, not the loading
    timesteps = models.schedule(cfg.steps, cfg.width, cfg.height)  # steps + 1 values from 1 to 0
    skip = frozenset(cfg.skip_layers)
    if todo:
        text, row = models.encode_all([prompt for _, prompt, _ in todo])  # each distinct prompt once
        bar = tqdm(
            total=len(todo) * cfg.steps, desc=f"{len(todo)} samples x {cfg.steps} steps", unit="step", smoothing=0
        )  # the average over the run, so the ETA includes the frames' decoding and writing

        def advance(step: Step) -> None:  # one sampler step advances every sample of the batch by one step
            bar.update(len(step.latent))

        for i in range(0, len(todo), cfg.batch_size):
            batch = todo[i : i + cfg.batch_size]
            trajectories = record_trajectories(
                models,
                text.select([row[prompt] for _, prompt, _ in batch]),
                models.noise([seed for _, _, seed in batch], cfg.width, cfg.height),
                timesteps,
                guidance,
                skip=[skip] * len(batch) if skip else None,
                on_step=advance,
            )
            bar.set_postfix_str("writing frames")
            for (p, prompt, seed), trajectory in zip(batch, trajectories):
                write_trajectory(
                    out / sample_folder(p, prompt, seed),
                    trajectory,
                    models,
                    sample_metadata(cfg, prompt, seed, guidance),
                    cfg.preview_size,
                    cfg.gif_frame_ms,
                )
            bar.set_postfix_str("")
        bar.close()

    atomic_write_json(
        out / "run.json",
        {
            "config": config_to_dict(cfg),
            "timesteps": timesteps,
            "samples": [
                {"folder": sample_folder(*job), **sample_metadata(cfg, job[1], job[2], guidance), "frames": cfg.steps}
                for job in jobs
            ],
            "generated_this_run": len(todo),
            "already_done": len(jobs) - len(todo),
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
    what = "trajectory" if len(todo) == 1 else "trajectories"
    print(f"wrote {len(todo)} {what} ({cfg.steps} steps) to {out} ({len(jobs) - len(todo)} already there)")
    return [out / sample_folder(*job) for job in jobs]


if __name__ == "__main__":
    run_demo(TrajectoryConfig, main, description=__doc__.split("\n\n")[0])
