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
from typing import TYPE_CHECKING

import torch
from PIL import Image

from flux.model import check_layers
from flux.sampling import Step, unpack
from flux.util import model_spec

from .config import PromptsConfig
from .io import atomic_open, make_grid, save_gif, slug, tensor_to_pil

if TYPE_CHECKING:
    from flux.pipeline import FluxModels, Text

    from .runs import Run


@dataclass
class TrajectoryConfig(PromptsConfig):
    DEFAULT_STEPS = 15  # = frames of the trajectory

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

    def check(self) -> list[str]:
        problems = super().check()
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


def sample_files(folder: str, steps: int) -> tuple[str, ...]:
    """A sample's files besides final.png (which carries its record), relative to the run's folder."""
    frames = [f"{folder}/{kind}/step_{k:02d}.png" for k in range(steps) for kind in ("x_t", "x0")]
    return (*frames, f"{folder}/grid.png", f"{folder}/trajectory.gif")


def write_trajectory(run: Run, folder: str, traj: Trajectory, models: FluxModels, preview_size: int, gif_frame_ms: int):
    """Decode and write one sample's frames, final image (the PNGs on the run's writer, each with the sample's
    record), grid and GIF."""
    final, n = f"{folder}/final.png", len(traj.timesteps)
    labels, tiles, frames = [], [], []
    for k, t in enumerate(traj.timesteps):
        pair = []
        for kind, latent in (("x_t", traj.latents[k]), ("x0", traj.x0[k])):
            image = tensor_to_pil(models.decode(latent[None])[0])
            run.save(f"{folder}/{kind}/step_{k:02d}.png", image, {"step": k, "t": t, "kind": kind}, record=final)
            pair.append(_preview(image, preview_size))
        caption = f"step {k + 1}/{n}, t={t:.3f}"
        pair_labels = [f"x_t {caption}", f"predicted x0 {caption}"]
        tiles += pair
        labels += pair_labels
        frames.append(make_grid(pair, pair_labels, cols=2))
    run.save(final, models.decode(traj.final[None])[0], {"kind": "final"})
    with atomic_open(run.folder / folder / "grid.png") as f:
        make_grid(tiles, labels, cols=2).save(f, format="PNG")
    save_gif(run.folder / folder / "trajectory.gif", _same_size(frames), duration_ms=gif_frame_ms)
