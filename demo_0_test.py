"""Text to image with FLUX: python demo_0_test.py config.json [key=value ...]  (--print-config lists every key).

Every prompt is drawn with every seed; image i of a prompt starts from the noise of its seed, so a (prompt, seed)
pair names one image on any device. Images already in output_dir are kept, so an interrupted run resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flux.sampling import Step
from stableflow.config import config_to_dict, load_models_for, run_demo
from stableflow.runs import Output, Run, settings_of
from stableflow.text2img import Text2ImgConfig, image_name

if TYPE_CHECKING:
    from flux.pipeline import FluxModels


def main(cfg: Text2ImgConfig, models: FluxModels | None = None) -> list[Path]:
    """Write every (prompt, seed) image of `cfg` and run.json; returns the image paths, new and old."""
    settings = settings_of(cfg)
    jobs = {image_name(p, seed): (prompt, seed) for p, prompt in enumerate(cfg.prompts()) for seed in cfg.seeds()}
    run = Run(
        cfg.output_dir, [Output(n, settings | {"prompt": pr, "seed": s}) for n, (pr, s) in jobs.items()], settings
    )
    todo = run.todo_names
    (width, height), steps = cfg.image_size, cfg.num_steps

    if todo:  # a finished run loads no weights
        models = models or load_models_for(cfg)
        with run.working(len(todo) * steps, f"{len(todo)} images x {steps} steps") as bar:
            text, row = models.encode_all([jobs[n][0] for n in todo])  # each distinct prompt once
            timesteps = models.schedule(steps, width, height)

            def advance(step: Step) -> None:  # one sampler step advances every image of the batch by one step
                bar.update(len(step.latent))

            for i in range(0, len(todo), cfg.batch_size):
                batch = todo[i : i + cfg.batch_size]
                noise = models.noise([jobs[n][1] for n in batch], width, height)
                text_rows = text.select([row[jobs[n][0]] for n in batch])
                latent = models.denoise(text_rows, noise, timesteps, cfg.guidance_value, callback=advance)
                for name, image in zip(batch, models.decode(latent)):
                    run.save(name, image)

    run.write_json(
        "run.json",
        {
            "config": config_to_dict(cfg),
            "steps": steps,
            "guidance": settings["guidance"],
            "images": [{"file": n, "prompt": prompt, "seed": seed} for n, (prompt, seed) in jobs.items()],
            "generated_this_run": len(todo),
            "already_done": len(jobs) - len(todo),
            "seconds": round(run.seconds, 2),
        },
    )
    n = len(todo)
    print(f"wrote {n} image{'s' * (n != 1)} to {run.folder} ({len(jobs) - n} already there{run.repairs()})")
    return [run.folder / n for n in jobs]


if __name__ == "__main__":
    run_demo(Text2ImgConfig, main, description=__doc__.split("\n\n")[0])
