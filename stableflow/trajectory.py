"""The denoising trajectory (demo_1_layer.py): at every step, the noisy latent x_t and the clean image the model
predicts from it, x0 = x_t - t * v, decoded; optionally with layers bypassed, to watch what a layer contributes.

Output layout:

    <out>/run.json                                  the config, the timesteps and one record per sample
    <out>/<NN>_<prompt-slug>_seed<S>/               one folder per (prompt, seed); NN is the prompt's index
        x_t/step_XX.png                             the latent entering step XX (XX = 00 .. steps-1), decoded
        x0/step_XX.png                              the clean image predicted at step XX
        final.png                                   the finished image (equals x0/step_<last>.png)
        grid.png                                    rows: steps; columns: x_t and predicted x0, captioned
        trajectory.gif                              one frame per step: x_t beside predicted x0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from flux.model import check_layers
from flux.sampling import Step, unpack
from flux.util import model_spec

from .config import BaseConfig
from .io import atomic_open, make_grid, save_gif, save_png, slug, tensor_to_pil

if TYPE_CHECKING:
    from flux.pipeline import FluxModels, Text


@dataclass
class TrajectoryConfig(BaseConfig):
    prompt: str | list[str] = field(
        default="a photo of a red fox sitting in fresh snow at sunrise, detailed fur",
        metadata={"help": "one prompt, or a list of prompts"},
    )
    seed: int | list[int] = field(
        default=0, metadata={"help": "one seed or a list; every prompt runs with every seed", "min": 0}
    )
    width: int = field(default=1024, metadata={"help": "image width", "min": 16, "max": 4096, "multiple_of": 16})
    height: int = field(default=1024, metadata={"help": "image height", "min": 16, "max": 4096, "multiple_of": 16})
    steps: int = field(
        default=15, metadata={"help": "denoising steps = frames of the trajectory", "min": 1, "max": 1000}
    )
    guidance: float | None = field(
        default=None,
        metadata={
            "help": "distilled guidance (null: the model's default, dev 3.5; ignored by schnell)",
            "min": 0,
            "max": 100,
        },
    )
    skip_layers: list[int] = field(
        default_factory=list,
        metadata={
            "help": "global layers to bypass at every step (double blocks first: 0..18, single 19..56 for dev); "
            "[] for the plain model",
            "min": 0,
        },
    )
    batch_size: int = field(default=1, metadata={"help": "samples denoised together", "min": 1, "max": 64})
    preview_size: int = field(
        default=256,
        metadata={
            "help": "longest side of each tile in grid.png and trajectory.gif (the per-step PNGs keep full size)",
            "min": 16,
            "max": 2048,
        },
    )
    gif_frame_ms: int = field(
        default=300, metadata={"help": "display time of one GIF frame in milliseconds", "min": 10, "max": 10000}
    )
    output_dir: str = field(default="outputs/demo_1_layer", metadata={"help": "folder for the outputs"})

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def seeds(self) -> list[int]:
        return list(self.seed) if isinstance(self.seed, list) else [self.seed]

    def check(self) -> list[str]:
        problems = super().check()
        if not self.prompts():
            problems.append("'prompt' is an empty list: give at least one prompt")
        if not self.seeds():
            problems.append("'seed' is an empty list: give at least one seed")
        if len(set(self.seeds())) != len(self.seeds()):
            problems.append(f"'seed' repeats a seed ({self.seeds()}): the same seed would make the same sample twice")
        p = model_spec(self.model).params
        try:
            check_layers(self.skip_layers, p.depth + p.depth_single_blocks, "'skip_layers'")
        except ValueError as e:
            problems.append(str(e))
        return problems


@dataclass
class Trajectory:
    """One sample's path through the sampler; latents are unpacked (16, h, w), on the CPU, in float32."""

    timesteps: list[float]  # t at the start of each step
    latents: list[torch.Tensor]  # x_t entering each step
    x0: list[torch.Tensor]  # predicted clean latent at each step
    final: torch.Tensor  # the sampler's output


def record_trajectories(
    models: FluxModels,
    text: Text,
    noise: torch.Tensor,
    timesteps: list[float],
    guidance: float,
    skip: list[frozenset[int]] | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> list[Trajectory]:
    """Denoise a batch and keep every step's x_t and predicted x0 (moved to the CPU as they come)."""
    height, width = noise.shape[2] * 8, noise.shape[3] * 8
    ts: list[float] = []
    latents: list[torch.Tensor] = []
    x0: list[torch.Tensor] = []

    def keep(step: Step) -> None:
        # Only CPU copies are kept: GPU memory stays that of a plain generation.
        ts.append(step.t)
        latents.append(unpack(step.latent, height, width).cpu())
        x0.append(unpack(step.x0, height, width).cpu())
        if on_step is not None:
            on_step(step)

    final = models.denoise(text, noise, timesteps, guidance, skip=skip, callback=keep).float().cpu()
    return [Trajectory(list(ts), [x[b] for x in latents], [x[b] for x in x0], final[b]) for b in range(len(noise))]


def sample_folder(prompt_index: int, prompt: str, seed: int) -> str:
    return f"{prompt_index:02d}_{slug(prompt)}_seed{seed}"


def sample_metadata(cfg: TrajectoryConfig, prompt: str, seed: int, guidance: float) -> dict:
    """What every PNG of a sample records (plus its step, t and kind), and the sample's entry in run.json."""
    return {
        "prompt": prompt,
        "seed": seed,
        "model": cfg.model,
        "width": cfg.width,
        "height": cfg.height,
        "steps": cfg.steps,
        "guidance": guidance,
        "skip_layers": sorted(cfg.skip_layers),
    }


def _preview(image: Image.Image, size: int) -> Image.Image:
    scale = size / max(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def _same_size(frames: list[Image.Image]) -> list[Image.Image]:
    """GIF frames on one canvas size (captions may wrap to a different number of lines)."""
    w, h = max(f.width for f in frames), max(f.height for f in frames)
    out = []
    for f in frames:
        canvas = Image.new("RGB", (w, h), "white")
        canvas.paste(f, (0, 0))
        out.append(canvas)
    return out


def write_trajectory(
    folder: Path, traj: Trajectory, models: FluxModels, meta: dict, preview_size: int, gif_frame_ms: int
) -> None:
    """Decode and write one sample's frames, final image, grid and (last, marking it complete) GIF."""
    n = len(traj.timesteps)
    labels, tiles, frames = [], [], []
    for k, t in enumerate(traj.timesteps):
        pair = []
        for kind, latent in (("x_t", traj.latents[k]), ("x0", traj.x0[k])):
            image = tensor_to_pil(models.decode(latent[None])[0])
            save_png(folder / kind / f"step_{k:02d}.png", image, {**meta, "step": k, "t": t, "kind": kind})
            pair.append(_preview(image, preview_size))
        caption = f"step {k + 1}/{n}, t={t:.3f}"
        pair_labels = [f"x_t {caption}", f"predicted x0 {caption}"]
        tiles += pair
        labels += pair_labels
        frames.append(make_grid(pair, pair_labels, cols=2))
    save_png(folder / "final.png", models.decode(traj.final[None])[0], {**meta, "kind": "final"})
    with atomic_open(folder / "grid.png") as f:
        make_grid(tiles, labels, cols=2).save(f, format="PNG")
    save_gif(folder / "trajectory.gif", _same_size(frames), duration_ms=gif_frame_ms)
