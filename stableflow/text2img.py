"""Text to image (demo_0_test.py): its config and the names and metadata of the PNGs it writes."""

from dataclasses import dataclass, field

from .config import BaseConfig


@dataclass
class Text2ImgConfig(BaseConfig):
    prompt: str | list[str] = field(
        default='a photo of a forest with mist swirling around the tree trunks. The word "FLUX" is painted over '
        "it in big, red brush strokes with visible texture",
        metadata={"help": "one prompt, or a list of prompts"},
    )
    width: int = field(
        default=1024, metadata={"help": "image width in pixels", "min": 16, "max": 4096, "multiple_of": 16}
    )
    height: int = field(
        default=1024, metadata={"help": "image height in pixels", "min": 16, "max": 4096, "multiple_of": 16}
    )
    steps: int | None = field(
        default=None,
        metadata={"help": "denoising steps (null: the model's default, dev 50, schnell 4)", "min": 1, "max": 1000},
    )
    guidance: float | None = field(
        default=None,
        metadata={
            "help": "distilled guidance (null: the model's default, dev 3.5; ignored by schnell)",
            "min": 0,
            "max": 100,
        },
    )
    seed: int | list[int] = field(
        default=0,
        metadata={
            "help": "seed of the first image of each prompt (image i uses seed+i), or one seed per image",
            "min": 0,
        },
    )
    num_images: int = field(
        default=1,
        metadata={"help": "images per prompt (a list of seeds sets it to the list's length)", "min": 1, "max": 1000},
    )
    batch_size: int = field(
        default=1, metadata={"help": "images denoised together (more: faster, more memory)", "min": 1, "max": 64}
    )
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
        if len(set(self.seeds())) != len(self.seeds()):
            problems.append(f"'seed' repeats a seed ({self.seeds()}): the same seed would make the same image twice")
        return problems


def image_name(prompt_index: int, seed: int) -> str:
    return f"img_{prompt_index:03d}_seed{seed}.png"


def image_metadata(cfg: Text2ImgConfig, prompt: str, seed: int, steps: int, guidance: float) -> dict:
    """What a PNG's text chunk records: enough to regenerate exactly that image."""
    return {
        "prompt": prompt,
        "seed": seed,
        "model": cfg.model,
        "width": cfg.width,
        "height": cfg.height,
        "steps": steps,
        "guidance": guidance,
    }
