"""Text to image with FLUX: python demo_0_test.py config.json [key=value ...]  (--print-config lists every key).

Every prompt is drawn with every seed; image i of a prompt starts from the noise of its seed, so a (prompt, seed)
pair names one image on any device. Images already in output_dir are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from flux.sampling import Step
from flux.util import model_spec
from stableflow.config import config_to_dict, load_models_for, run_demo
from stableflow.io import atomic_write_json, refuse_other_settings, save_png
from stableflow.text2img import Text2ImgConfig, image_metadata, image_name

if TYPE_CHECKING:
    from flux.pipeline import FluxModels


def main(cfg: Text2ImgConfig, models: FluxModels | None = None) -> list[Path]:
    """Write every (prompt, seed) image of `cfg` and run.json; returns the image paths, new and old."""
    out = Path(cfg.output_dir)
    spec = model_spec(cfg.model)
    steps = cfg.steps or spec.num_steps
    guidance = spec.guidance if cfg.guidance is None else cfg.guidance

    # The work: one image per (prompt, seed); a PNG on disk is a finished image (they are written atomically).
    jobs = [(p, prompt, seed) for p, prompt in enumerate(cfg.prompts()) for seed in cfg.seeds()]
    todo = [(p, prompt, seed) for p, prompt, seed in jobs if not (out / image_name(p, seed)).exists()]
    # A PNG there counts as done only if it was made with these settings; anything else is refused, not kept.
    done = [job for job in jobs if job not in todo]
    refuse_other_settings(out, {image_name(p, s): image_metadata(cfg, pr, s, steps, guidance) for p, pr, s in done})

    if todo:  # a finished run loads no weights
        models = models or load_models_for(cfg)
        start = time.perf_counter()  # run.json's "seconds" counts the work, not the loading
        text, row = models.encode_all([prompt for _, prompt, _ in todo])  # each distinct prompt once
        timesteps = models.schedule(steps, cfg.width, cfg.height)
        bar = tqdm(total=len(todo) * steps, desc=f"{len(todo)} images x {steps} steps", unit="step", smoothing=0)

        def advance(step: Step) -> None:  # one sampler step advances every image of the batch by one step
            bar.update(len(step.latent))

        for i in range(0, len(todo), cfg.batch_size):
            batch = todo[i : i + cfg.batch_size]
            noise = models.noise([seed for _, _, seed in batch], cfg.width, cfg.height)
            latent = models.denoise(
                text.select([row[prompt] for _, prompt, _ in batch]),
                noise,
                timesteps,
                guidance,
                callback=advance,
            )
            for (p, prompt, seed), image in zip(batch, models.decode(latent)):
                save_png(out / image_name(p, seed), image, image_metadata(cfg, prompt, seed, steps, guidance))
        bar.close()

    seconds = time.perf_counter() - start if todo else 0.0
    files = [out / image_name(p, seed) for p, _, seed in jobs]
    atomic_write_json(
        out / "run.json",
        {
            "config": config_to_dict(cfg),
            "steps": steps,
            "guidance": guidance,
            "images": [{"file": f.name, "prompt": prompt, "seed": seed} for f, (_, prompt, seed) in zip(files, jobs)],
            "generated_this_run": len(todo),
            "already_done": len(jobs) - len(todo),
            "seconds": round(seconds, 2),
        },
    )
    print(f"wrote {len(todo)} image{'s' * (len(todo) != 1)} to {out} ({len(jobs) - len(todo)} already there)")
    return files


if __name__ == "__main__":
    run_demo(Text2ImgConfig, main, description=__doc__.split("\n\n")[0])
