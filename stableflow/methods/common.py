"""What every editing method shares: one case prepared once (the source latent, both prompts encoded, the noise),
the model calls on flux.sampling, and what a method returns.

NFE counts transformer evaluations of one sample: a batch of two samples in one forward pass counts two, so methods
that carry a reference sample beside the edit (Stable Flow, and our RF-Solver-Edit and FireFlow) pay for it here.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flux import sampling
from flux.accel import attention_backend
from flux.model import Injection
from flux.pipeline import FluxModels, Text, check_size
from flux.sampling import Step, StepCallback, StepRange, image_ids, pack, unpack


@dataclass
class EditCase:
    """One edit: a source image (3, H, W) in [-1, 1] with H, W multiples of 16, or None to generate the source from
    `seed` at width x height; the prompts without PIE-Bench's [ ] markers; `seed` also draws every method's noise."""

    source_prompt: str
    target_prompt: str
    image: Tensor | None = None
    seed: int = 0
    width: int = 512
    height: int = 512
    source_steps: int = 28  # generated sources: their denoising steps and guidance
    source_guidance: float = 3.5


@dataclass
class Case:
    """A case prepared once for all methods: the source latent (1, 16, h, w), the prompts encoded as rows
    [source, target], the initial noise (1, 16, h, w) of the seed, and the source image."""

    spec: EditCase
    latent: Tensor
    text: Text
    noise: Tensor
    image: Tensor  # (3, H, W) in [-1, 1]: the input, or the generated source

    @property
    def width(self) -> int:
        return self.image.shape[-1]

    @property
    def height(self) -> int:
        return self.image.shape[-2]

    @property
    def generated(self) -> bool:
        return self.spec.image is None

    def schedule(self, models: FluxModels, steps: int) -> list[float]:
        return models.schedule(steps, self.width, self.height)


@dataclass
class Edited:
    """A method's result: the edited image (3, H, W) in [-1, 1], its latent (16, h, w), and the transformer
    evaluations it took (per sample; a generated source's own generation not included)."""

    image: Tensor
    latent: Tensor
    nfe: int


def prepare(models: FluxModels, spec: EditCase) -> Case:
    """Encode both prompts, draw the seed's noise and get the source latent: the VAE latent mean of the input, or
    the generation of the source prompt from that same noise."""
    text = models.encode([spec.source_prompt, spec.target_prompt])
    if spec.image is None:
        noise = models.noise([spec.seed], spec.width, spec.height)
        latent = models.denoise(
            text.select([0]), noise, models.schedule(spec.source_steps, spec.width, spec.height), spec.source_guidance
        )
        image = models.decode(latent)[0]
    else:
        image = spec.image[0] if spec.image.ndim == 4 else spec.image
        height, width = image.shape[-2:]
        check_size(width, height)
        noise = models.noise([spec.seed], width, height)
        latent = models.encode_image(image[None])
    return Case(spec, latent.to(models.dtype), text, noise, image.float().cpu())


def finish(models: FluxModels, latent: Tensor, nfe: int) -> Edited:
    """Decode a (16, h, w) latent into the method's result."""
    return Edited(models.decode(latent[None])[0], latent, nfe)


class Counter:
    """A step callback that keeps the loop's evaluation count (Step.nfe) and passes each step on to `then`."""

    def __init__(self, then: StepCallback | None = None):
        self.then, self.nfe = then, 0

    def __call__(self, step: Step) -> Tensor | None:
        self.nfe = step.nfe
        return self.then(step) if self.then is not None else None


@torch.inference_mode()
def solve(
    models: FluxModels,
    latent: Tensor,
    text: Text,
    timesteps: list[float],
    guidance: float | Sequence[float],
    solver: str = "euler",
    backwards: bool = False,
    inject: Injection | None = None,
    inject_steps: StepRange | None = None,
    callback: StepCallback | None = None,
) -> tuple[Tensor, int]:
    """flux.sampling.denoise (or, backwards, invert) of (B, 16, h, w) latents under `text` (B rows); returns the
    latents and the evaluations per sample times B."""
    b, _, h, w = latent.shape
    count = Counter(callback)
    loop = sampling.invert if backwards else sampling.denoise
    with models.on_device(models.model), attention_backend(models.attention, models.device):
        out = loop(
            models.model,
            pack(latent.to(models.device, models.dtype)),
            image_ids(b, h // 2, w // 2, models.device),
            text.txt,
            text.txt_ids,
            text.vec,
            timesteps,
            guidance,
            inject=inject,
            callback=count,
            inject_steps=inject_steps,
            solver=solver,
        )
    return unpack(out, h * 8, w * 8).to(models.dtype), count.nfe * b


@torch.inference_mode()
def velocity(models: FluxModels, latent: Tensor, text: Text, t: float, guidance: Sequence[float]) -> Tensor:
    """The model's velocity (B, 16, h, w) at (B, 16, h, w) latents, time t and one guidance per sample."""
    b, _, h, w = latent.shape
    x = pack(latent.to(models.device, models.dtype))
    with models.on_device(models.model), attention_backend(models.attention, models.device):
        v = models.model(
            img=x,
            img_ids=image_ids(b, h // 2, w // 2, models.device),
            txt=text.txt,
            txt_ids=text.txt_ids,
            timesteps=torch.full((b,), t, dtype=x.dtype, device=x.device),
            y=text.vec,
            guidance=sampling.guidance_vector(list(guidance), b, x.device, x.dtype),
        )
    return unpack(v, h * 8, w * 8).to(models.dtype)


def single_blocks(models: FluxModels, first: int, last: int, of: int = 38) -> list[int]:
    """Global indices of single blocks first..last of a FLUX.1 model with `of` single blocks, moved to the same
    relative depth of this model (FLUX.1 itself: first + 19 .. last + 19)."""
    p = models.model.params
    n = p.depth_single_blocks
    move = lambda j: round(j * (n - 1) / (of - 1)) if of > 1 and n > 1 else 0
    return list(range(p.depth + move(first), p.depth + move(last) + 1))
