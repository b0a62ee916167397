"""Text to image (demo_0_test.py and `python -m flux`): prompts x seeds -> PNGs with their settings."""

import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .config import BaseConfig, config_to_dict, load_models_for
from .io import atomic_write_json, save_png
from flux.pipeline import FluxModels
from flux.sampling import Step


@dataclass
class Text2ImgConfig(BaseConfig):
    prompt: str | list[str] = field(
        default="a photo of a forest with mist swirling around the tree trunks. The word \"FLUX\" is painted over "
        "it in big, red brush strokes with visible texture",
        metadata={"help": "one prompt, or a list of prompts"},
    )
    width: int = field(default=1024, metadata={"help": "image width in pixels", "min": 16, "max": 4096, "multiple_of": 16})
    height: int = field(default=1024, metadata={"help": "image height in pixels", "min": 16, "max": 4096, "multiple_of": 16})
    steps: int | None = field(default=None, metadata={"help": "denoising steps (null: the model's default, dev 50, schnell 4)", "min": 1, "max": 1000})
    guidance: float | None = field(default=None, metadata={"help": "distilled guidance (null: the model's default, dev 3.5; ignored by schnell)", "min": 0, "max": 100})
    seed: int | list[int] = field(default=0, metadata={"help": "seed of the first image of each prompt (image i uses seed+i), or one seed per image", "min": 0})
    num_images: int = field(default=1, metadata={"help": "images per prompt (a list of seeds sets it to the list's length)", "min": 1, "max": 1000})
    batch_size: int = field(default=1, metadata={"help": "images denoised together (more: faster, more memory)", "min": 1, "max": 64})
    output_dir: str = field(default="outputs/demo_0_test", metadata={"help": "folder for the PNGs and run.json"})

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def seeds(self) -> list[int]:
        return list(self.seed) if isinstance(self.seed, list) else [self.seed + i for i in range(self.num_images)]

    def check(self) -> list[str]:
        problems = super().check()
        if not self.prompts():
            problems.append("'prompt' is an empty list: give at least one prompt")
        if isinstance(self.seed, list) and not self.seed:
            problems.append("'seed' is an empty list: give at least one seed, or a single number")
        return problems


def image_name(prompt_index: int, seed: int) -> str:
    return f"img_{prompt_index:03d}_seed{seed}.png"


def run(cfg: Text2ImgConfig, models: FluxModels | None = None) -> list[Path]:
    """Generate every (prompt, seed) image into cfg.output_dir; skips images that already exist."""
    out = Path(cfg.output_dir)
    jobs = [(p, prompt, seed) for p, prompt in enumerate(cfg.prompts()) for seed in cfg.seeds()]
    todo = [j for j in jobs if not (out / image_name(j[0], j[2])).exists()]
    models = models or load_models_for(cfg)
    steps = cfg.steps or models.spec.num_steps
    guidance = models.spec.guidance if cfg.guidance is None else cfg.guidance
    start = time.perf_counter()
    bar = tqdm(total=len(todo) * steps, unit="step", desc="denoising")

    def advance(step: Step) -> None:
        bar.update(1)

    text, row = models.encode_all([prompt for _, prompt, _ in todo]) if todo else (None, {})
    timesteps = models.schedule(steps, cfg.width, cfg.height)
    for i in range(0, len(todo), cfg.batch_size):
        batch = todo[i : i + cfg.batch_size]
        latent = models.denoise(
            text.select([row[prompt] for _, prompt, _ in batch]),
            models.noise([seed for *_, seed in batch], cfg.width, cfg.height),
            timesteps,
            guidance,
            callback=advance,
        )
        for (p, prompt, seed), image in zip(batch, models.decode(latent)):
            save_png(out / image_name(p, seed), image, {
                "prompt": prompt, "seed": seed, "model": cfg.model, "width": cfg.width, "height": cfg.height,
                "steps": steps, "guidance": guidance,
            })
    bar.close()
    files = [out / image_name(p, seed) for p, _, seed in jobs]
    atomic_write_json(out / "run.json", {
        "config": config_to_dict(cfg), "steps": steps, "guidance": guidance,
        "images": [{"file": f.name, "prompt": prompt, "seed": seed} for f, (_, prompt, seed) in zip(files, jobs)],
        "generated_this_run": len(todo), "seconds": round(time.perf_counter() - start, 2),
    })
    return files
