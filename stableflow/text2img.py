"""Text to image (demo_0_test.py): its config and the names of the PNGs it writes."""

from dataclasses import dataclass, field

from .config import PromptsConfig


@dataclass
class Text2ImgConfig(PromptsConfig):
    batch_size: int = field(
        default=1, metadata={"help": "images denoised together (more: faster, more memory)", "min": 1, "max": 64}
    )
    output_dir: str = field(default="outputs/demo_0_test", metadata={"help": "folder for the PNGs and run.json"})


def image_name(prompt_index: int, seed: int) -> str:
    return f"img_{prompt_index:03d}_seed{seed}.png"
