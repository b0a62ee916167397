"""Watch FLUX denoise: every step's noisy latent x_t and predicted clean image x0, as PNGs, a grid and a GIF.

    python demo_1_layer.py configs/demo_1_layer.json [key=value ...]   (--print-config lists every key)
    python demo_1_layer.py configs/demo_1_layer.json 'skip_layers=[18]'  # the same, with layer 18 bypassed

The sampler integrates the flow from pure noise (t = 1) to the image (t = 0) in Euler steps. At each step the model
predicts a velocity v, and x0 = x_t - t * v is the clean image it currently aims at: early steps fix the layout,
late ones the detail. With skip_layers, those layers are bypassed at every step, to see what they contribute and when.
The file layout is described in stableflow/trajectory.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flux.sampling import Step
from stableflow.config import config_to_dict, load_models_for, run_demo
from stableflow.runs import Output, Run, settings_of
from stableflow.trajectory import TrajectoryConfig, record_trajectories, sample_files, sample_folder, write_trajectory

if TYPE_CHECKING:
    from flux.pipeline import FluxModels


def main(cfg: TrajectoryConfig, models: FluxModels | None = None) -> list[Path]:
    """Record and write every (prompt, seed) trajectory of `cfg`, then run.json; returns the sample folders."""
    (width, height), steps = cfg.image_size, cfg.num_steps
    settings = settings_of(cfg) | {"skip_layers": sorted(cfg.skip_layers)}
    # One sample per (prompt, seed): final.png records it, and it is done when every file of its folder decodes.
    jobs = {
        sample_folder(p, prompt, seed): (prompt, seed) for p, prompt in enumerate(cfg.prompts()) for seed in cfg.seeds()
    }
    outputs = [
        Output(f"{f}/final.png", settings | {"prompt": pr, "seed": s}, sample_files(f, steps))
        for f, (pr, s) in jobs.items()
    ]
    run = Run(cfg.output_dir, outputs, settings)
    todo = [name.removesuffix("/final.png") for name in run.todo_names]

    models = models or load_models_for(cfg)  # also on a finished run: run.json records the model's schedule
    timesteps = models.schedule(steps, width, height)  # steps + 1 values from 1 to 0
    skip = frozenset(cfg.skip_layers)
    if todo:
        # The bar's rate is the average over the run, so its ETA includes the frames' decoding and writing.
        with run.working(len(todo) * steps, f"{len(todo)} samples x {steps} steps") as bar:
            text, row = models.encode_all([jobs[f][0] for f in todo])  # each distinct prompt once

            def advance(step: Step) -> None:  # one sampler step advances every sample of the batch by one step
                bar.update(len(step.latent))

            for i in range(0, len(todo), cfg.batch_size):
                batch = todo[i : i + cfg.batch_size]
                trajectories = record_trajectories(
                    models,
                    text.select([row[jobs[f][0]] for f in batch]),
                    models.noise([jobs[f][1] for f in batch], width, height),
                    timesteps,
                    cfg.guidance_value,
                    skip=[skip] * len(batch) if skip else None,
                    on_step=advance,
                )
                bar.set_postfix_str("writing frames")
                for folder, trajectory in zip(batch, trajectories):
                    write_trajectory(run, folder, trajectory, models, cfg.preview_size, cfg.gif_frame_ms)
                bar.set_postfix_str("")

    run.write_json(
        "run.json",
        {
            "config": config_to_dict(cfg),
            "timesteps": timesteps,
            "samples": [{"folder": f, "prompt": pr, "seed": s, "frames": steps} for f, (pr, s) in jobs.items()],
            "generated_this_run": len(todo),
            "already_done": len(jobs) - len(todo),
            "seconds": round(run.seconds, 2),
        },
    )
    what = "trajectory" if len(todo) == 1 else "trajectories"
    there = f"{len(jobs) - len(todo)} already there{run.repairs('damaged sample')}"
    print(f"wrote {len(todo)} {what} ({steps} steps) to {run.folder} ({there})")
    return [run.folder / f for f in jobs]


if __name__ == "__main__":
    run_demo(TrajectoryConfig, main, description=__doc__.split("\n\n")[0])
