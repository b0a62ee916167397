"""Stable Flow editing: image K/V injection from a reference into edits, in the vital layers.

Generated images: the batch [reference, edit_1, ..., edit_N] starts from one seed's noise; in every vital layer, at
every step (or the steps of `inject_steps`), each edit attends with the reference's image-token keys and values
(flux.model.Injection).

Real images: the input is VAE-encoded (latent mean), nudged (x lambda), inverted to noise with the inverse Euler ODE
(flux.sampling.invert) under the source prompt; all samples then start from that noise, and after every step the
reference's latent is overwritten with the inversion latent of the same noise level, so the edits inject the K/V of
the real image's path. The inversion and the denoising may use a second-order solver instead of Euler (RealImage's
`solver`: RF-Solver's or FireFlow's midpoint steps, flux.sampling.SOLVERS), a combination not in the paper.

demo_4_edit.py is the experiment; this module holds its pieces and EditConfig, the demo's keys.
"""

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from flux import sampling
from flux.accel import attention_backend
from flux.errors import UserError
from flux.model import Injection, check_layers, layer_name
from flux.pipeline import FluxModels, Text, check_size
from flux.sampling import SOLVERS, Step, StepRange, check_solver, image_ids, pack, unpack
from flux.util import model_spec

from . import TINY_RANDOM, runs
from .clip_score import DEFAULT_CLIP
from .config import SamplingConfig
from .io import load_image, slug
from .vitality import auto_vital_layers_file, read_vital_layers

# The official release's vital layers of FLUX.1-dev (the paper's set without layer 2): double blocks 0, 1, 17, 18
# and single blocks 6, 9, 34, 35, 37 (global index = 19 + j).
RELEASE_VITAL_LAYERS: tuple[int, ...] = (0, 1, 17, 18, 25, 28, 53, 54, 56)
_FLUX1 = model_spec("flux-dev").params
RELEASE_DEPTHS = (_FLUX1.depth, _FLUX1.depth_single_blocks)  # the model those indices belong to
NUDGE = 1.15  # latent nudging of real images (Stable Flow, Sec. 3.3)
GENERATED_STEPS, GENERATED_GUIDANCE = 15, 3.5  # the release's settings
REAL_STEPS, REAL_GUIDANCE, SOURCE_GUIDANCE = 50, 3.0, 1.0
AUTO = "auto"  # vital_layers_file: demo_3_dino.py's output next to this demo's, when there is one

# ----------------------------------------------------------------------------------------------- vital layers


def scale_layers(
    layers: Sequence[int], depth: int, depth_single: int, from_depths: tuple[int, int] = RELEASE_DEPTHS
) -> list[int]:
    """Layer indices of a (from_depths) model moved to the same relative depth of a (depth, depth_single) model.

    Each kind of block is scaled on its own: double block d -> round(d * (depth - 1) / (from_double - 1)), likewise
    for single blocks. Identity for FLUX.1's 19 + 38 layers; for flux-tiny (2 + 4) the release's set becomes
    [0, 1, 2, 3, 5]. Scaled layers are a stand-in: only a vitality sweep (demo_2/demo_3) finds a model's real ones.
    """
    from_double, from_single = from_depths

    def move(i: int, n_from: int, n_to: int) -> int:
        return 0 if n_from <= 1 or n_to <= 1 else math.floor(i * (n_to - 1) / (n_from - 1) + 0.5)

    out = {move(i, from_double, depth) for i in layers if i < from_double}
    out |= {depth + move(i - from_double, from_single, depth_single) for i in layers if i >= from_double}
    return sorted(out)


def default_vital_layers(depth: int, depth_single: int) -> list[int]:
    """The release's vital layers, scaled to the model's depth (unchanged for FLUX.1)."""
    return scale_layers(RELEASE_VITAL_LAYERS, depth, depth_single)


def checked_layers(layers: Sequence[int], depth: int, depth_single: int, where: str = "vital_layers") -> list[int]:
    """Sorted, de-duplicated layers; flux.model's range rule, its ValueError as the UserError of a bad request."""
    try:
        check_layers(layers, depth + depth_single, where)
    except ValueError as e:
        raise UserError(str(e)) from None
    return sorted(set(layers))


def choose_vital_layers(
    layers: Sequence[int] | None, file: str | None, depth: int, depth_single: int
) -> tuple[list[int], str]:
    """The injection layers and where they came from: the explicit list, else the file, else the scaled default."""
    if layers is not None and file is not None:
        raise UserError("both 'vital_layers' and 'vital_layers_file' are set: keep one (set the other to null)")
    if layers is not None:
        return checked_layers(layers, depth, depth_single), "config"
    if file is not None:
        return read_vital_layers(file, depth, depth_single), f"file {file}"
    if (depth, depth_single) == RELEASE_DEPTHS:
        return list(RELEASE_VITAL_LAYERS), "default (the official release's FLUX.1-dev layers)"
    return default_vital_layers(depth, depth_single), (
        f"default (the release's layers scaled from {RELEASE_DEPTHS[0]}+{RELEASE_DEPTHS[1]} to {depth}+{depth_single} "
        f"blocks)"
    )


# ----------------------------------------------------------------------------------------------- one edit job


@dataclass
class EditRequest:
    """What to edit and how: the reference prompt, one output per edit prompt, and the sampling settings."""

    source_prompt: str
    edits: list[str]
    steps: int
    guidance: float  # of the edits (and of a generated reference)
    layers: list[int] | None = None  # injection layers; None: the release's vital layers scaled to the model; []: none
    inject_steps: StepRange | None = None  # denoising steps [start, end) with injection; None: every step
    batch_size: int | None = None  # samples per forward pass, the reference included; None: all at once


@dataclass
class RealImage:
    """A real input (3, H, W) in [-1, 1], H and W multiples of 16, and how to invert it."""

    pixels: Tensor
    source_guidance: float = SOURCE_GUIDANCE  # of the inversion and the reference (reconstruction) sample
    nudge: float = NUDGE  # the VAE latent is multiplied by it before inversion
    solver: str = "euler"  # of the inversion and the denoising (flux.sampling.SOLVERS)


@dataclass
class EditResult:
    """Images in [-1, 1] and latents (16, h, w): the reference sample (for a real image: the reconstruction)
    first, then the edits in prompt order."""

    reference: Tensor  # (3, H, W)
    edits: Tensor  # (N, 3, H, W)
    latents: Tensor  # (1 + N, 16, H/8, W/8); [0] the reference
    layers: list[int]
    chunks: list[list[int]]  # edit indices per batch (padded)
    reference_drift: float  # max |difference| of the reference latent between chunks (0 by construction)
    timesteps: list[float]
    inject_steps: StepRange = (0, 0)  # the steps that injected (all of them unless the request limited them)
    input: Tensor | None = None  # real images: the fitted input (3, H, W) in [-1, 1], as the VAE saw it
    inversion: "Inversion | None" = None  # real images: the inversion path


ProgressCallback = Callable[[Step], None]


def check_inject_steps(inject_steps: Sequence[int] | None, steps: int) -> StepRange:
    """The denoising steps [start, end) with injection (None: all `steps`); a UserError unless 0 <= start < end <=
    steps."""
    if inject_steps is None:
        return 0, steps
    if len(inject_steps) != 2 or not 0 <= inject_steps[0] < inject_steps[1] <= steps:
        raise UserError(
            f"inject_steps {list(inject_steps)} must be [start, end] with 0 <= start < end <= steps ({steps}): "
            f"injection runs in the denoising steps start..end-1; [0, {steps}] or null is every step"
        )
    return int(inject_steps[0]), int(inject_steps[1])


def _checked(models: FluxModels, request: EditRequest) -> EditRequest:
    """The request with its layers and steps resolved, or a UserError before any work."""
    if isinstance(request.edits, str):
        raise UserError('edit prompts must be a list of strings, not one string: write ["..."]')
    if not request.edits:
        raise UserError("the edit list is empty: give at least one edit prompt")
    p = models.model.params
    layers = (
        default_vital_layers(p.depth, p.depth_single_blocks)
        if request.layers is None
        else checked_layers(request.layers, p.depth, p.depth_single_blocks, "layers")
    )
    edit_chunks(len(request.edits), request.batch_size)  # a bad batch_size fails before any work
    return replace(
        request,
        edits=list(request.edits),
        layers=layers,
        inject_steps=check_inject_steps(request.inject_steps, request.steps),
    )


def edit_chunks(num_edits: int, batch_size: int | None) -> list[list[int]]:
    """Edit indices per forward batch; every batch also carries the reference, so it holds batch_size - 1 edits.

    Chunks are balanced and the short ones padded by repeating their last edit, so every batch has the same shape:
    then the reference -- which no other sample influences -- comes out bit-identical in every chunk (kernels may
    round differently for different batch sizes). Padding costs fewer than one sample per chunk.
    """
    if num_edits < 1:
        raise UserError("no edits to make: give at least one edit prompt")
    per = num_edits if batch_size is None else batch_size - 1
    if per < 1:
        raise UserError(f"batch_size {batch_size} leaves no room for an edit next to the reference: use 2 or more")
    n = math.ceil(num_edits / per)
    q, r = divmod(num_edits, n)  # r chunks of q + 1 edits, then n - r of q
    starts = [k * q + min(k, r) for k in range(n + 1)]
    size = q + (r > 0)
    chunks = [list(range(starts[k], starts[k + 1])) for k in range(n)]
    return [c + [c[-1]] * (size - len(c)) for c in chunks]


def _denoise_chunks(
    models: FluxModels,
    request: EditRequest,
    text: Text,
    start: Tensor,
    timesteps: list[float],
    reference_guidance: float,
    overwrite: Callable[[Step], Tensor | None] | None,
    callback: ProgressCallback | None,
    solver: str = "euler",
) -> tuple[Tensor, list[list[int]], float]:
    """Denoise [reference, edits...] (text rows 0, 1..N) from `start` (1, 16, h, w), chunk by chunk."""
    chunks = edit_chunks(len(text) - 1, request.batch_size)
    reference, edits = None, {}
    drift = 0.0
    for chunk in chunks:
        rows = [0] + [1 + i for i in chunk]
        inject = Injection.from_reference(request.layers, len(rows)) if request.layers else None

        def step_hook(step: Step) -> Tensor | None:
            replaced = overwrite(step) if overwrite is not None else None
            if callback is not None:
                callback(step)
            return replaced

        out = models.denoise(
            text.select(rows),
            start.repeat(len(rows), 1, 1, 1),
            timesteps,
            guidance=[reference_guidance] + [request.guidance] * len(chunk),
            inject=inject,
            callback=step_hook,
            inject_steps=request.inject_steps,
            solver=solver,
        )
        if reference is None:
            reference = out[0]
        drift = max(drift, (out[0] - reference).abs().max().item())
        edits.update({i: out[1 + k] for k, i in enumerate(chunk)})
    latents = torch.stack([reference] + [edits[i] for i in range(len(text) - 1)])
    return latents, chunks, drift


def _encode_prompts(models: FluxModels, prompts: Sequence[str], free_text_encoders: bool) -> Text:
    text = models.encode(prompts)
    if free_text_encoders:
        models.release_text_encoders()
    return text


def edit_generated(
    models: FluxModels,
    request: EditRequest,
    seed: int,
    width: int,
    height: int,
    callback: ProgressCallback | None = None,
    free_text_encoders: bool = False,
) -> EditResult:
    """Generate the reference image of `request.source_prompt` from `seed` and one edit per edit prompt, injecting
    the reference's image K/V in `request.layers` ([]: plain generations).

    `callback` sees every step of every chunk; `free_text_encoders` moves T5 and CLIP off the GPU once used.
    """
    request = _checked(models, request)
    check_size(width, height)
    text = _encode_prompts(models, [request.source_prompt, *request.edits], free_text_encoders)
    timesteps = models.schedule(request.steps, width, height)
    latents, chunks, drift = _denoise_chunks(
        models, request, text, models.noise([seed], width, height), timesteps, request.guidance, None, callback
    )
    images = models.decode(latents)
    return EditResult(images[0], images[1:], latents, request.layers, chunks, drift, timesteps, request.inject_steps)


# ----------------------------------------------------------------------------------------------- real images


def fit_image(image: Image.Image, size: int | None, multiple: int = 16) -> Image.Image:
    """The rule for real inputs: resize so the shorter side is `size` (None: keep the size), keeping the aspect
    ratio, then centre-crop each side down to a multiple of `multiple` (at most 15 pixels lost per side)."""
    w, h = image.size
    if size is not None and min(w, h) != size:
        scale = size / min(w, h)
        w, h = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    cw, ch = w // multiple * multiple, h // multiple * multiple
    if cw == 0 or ch == 0:
        raise UserError(
            f"image of {w}x{h} pixels is too small: both sides must be at least {multiple} pixels (set 'size')"
        )
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def pil_to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL -> (3, H, W) float in [-1, 1] (the inverse of io.tensor_to_pil up to 8-bit rounding)."""
    x = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return x.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass
class Inversion:
    """The inversion path of one latent (inverse Euler, or another solver's). timesteps run 1 -> 0 (the denoising
    order); latents[i] is the packed latent (1, L, 64) at noise level timesteps[i]: latents[-1] the clean (nudged)
    input, latents[0] the noise."""

    timesteps: list[float]
    latents: list[Tensor]

    @property
    def noise(self) -> Tensor:
        return self.latents[0]


@torch.inference_mode()
def invert(
    models: FluxModels,
    latent: Tensor,
    text: Text,
    timesteps: list[float],
    guidance: float = SOURCE_GUIDANCE,
    callback: ProgressCallback | None = None,
    solver: str = "euler",
) -> Inversion:
    """flux.sampling.invert of one latent (1, 16, h, w) under one prompt with `solver`, keeping every level of the
    path."""
    if latent.shape[0] != 1 or len(text) != 1:
        raise ValueError("invert takes one latent and one prompt")
    _, _, h, w = latent.shape
    latents = [pack(latent.to(models.device, models.dtype))]

    def record(step: Step) -> None:
        if callback is not None:
            callback(step)
        latents.append(step.next_latent)

    with models.on_device(models.model), attention_backend(models.attention, models.device):
        sampling.invert(
            models.model,
            latents[0],
            image_ids(1, h // 2, w // 2, models.device),
            text.txt,
            text.txt_ids,
            text.vec,
            timesteps,
            guidance,
            callback=record,
            solver=solver,
            cfg=models.cfg(text, guidance),
        )
    return Inversion(list(timesteps), latents[::-1])


def edit_real(
    models: FluxModels,
    request: EditRequest,
    image: RealImage,
    callback: ProgressCallback | None = None,
    free_text_encoders: bool = False,
) -> EditResult:
    """Edit a real image: invert it under the source prompt, then denoise [reconstruction, edits...] from the noise.

    Inversion and the reference sample use `image.source_guidance` (1); the edits `request.guidance` (3). After every
    step the reference's latent is replaced by the inversion latent of the same noise level (the official release is
    one or two levels off; we match them), so the reference output -- the reconstruction -- is the nudged input
    latent, decoded: what the edits are anchored to.
    """
    request = _checked(models, request)
    check_solver(image.solver, UserError)
    pixels = image.pixels[0] if image.pixels.ndim == 4 else image.pixels
    height, width = pixels.shape[-2:]
    check_size(width, height)
    text = _encode_prompts(models, [request.source_prompt, *request.edits], free_text_encoders)
    latent = models.encode_image(pixels[None]) * image.nudge
    timesteps = models.schedule(request.steps, width, height)
    inversion = invert(models, latent, text.select([0]), timesteps, image.source_guidance, callback, image.solver)

    def overwrite_reference(step: Step) -> Tensor:
        # Step i moves t_i -> t_{i+1}; latents[i + 1] is the inversion at exactly that noise level.
        nxt = step.next_latent.clone()
        nxt[0] = inversion.latents[step.index + 1][0]
        return nxt

    start = unpack(inversion.noise, height, width).to(models.dtype)
    latents, chunks, drift = _denoise_chunks(
        models, request, text, start, timesteps, image.source_guidance, overwrite_reference, callback, image.solver
    )
    images = models.decode(latents)
    return EditResult(
        images[0],
        images[1:],
        latents,
        request.layers,
        chunks,
        drift,
        timesteps,
        request.inject_steps,
        input=pixels.float().cpu(),
        inversion=inversion,
    )


# ----------------------------------------------------------------------------------------------- the demo's config


@dataclass
class EditConfig(SamplingConfig):
    image: str | None = field(
        default=None,
        metadata={
            "help": "null: edit a generated image; a path: edit this real image (PNG/JPEG/WebP, any size; see 'size')"
        },
    )
    source_prompt: str = field(
        default="a photo of a small white dog sitting on a green sofa in a living room",
        metadata={
            "help": "the reference image's prompt; for a real image, a description of it that mentions the region "
            "to edit (edits that change nothing usually need a better source prompt)"
        },
    )
    edits: list[str] = field(
        default_factory=lambda: [
            "a photo of a small white dog wearing sunglasses sitting on a green sofa in a living room",
            "a photo of a small white cat sitting on a green sofa in a living room",
            "a photo of a small white dog sitting on a red leather sofa in a living room",
        ],
        metadata={"help": "edit prompts, one output each: the source prompt with the change written in"},
    )
    seed: int = field(
        default=0, metadata={"help": "noise seed of the generated reference (generated images only)", "min": 0}
    )
    size: int | None = field(
        default=1024,
        metadata={
            "help": "real image: resize so the shorter side has this many pixels, then centre-crop both sides down to "
            "multiples of 16 (null: keep the size, only crop)",
            "min": 16,
            "max": 4096,
        },
    )
    source_guidance: float = field(
        default=SOURCE_GUIDANCE,
        metadata={
            "help": "real image: guidance of the inversion and of the reference (reconstruction) sample",
            "min": 0,
            "max": 100,
        },
    )
    nudge: float = field(
        default=NUDGE,
        metadata={
            "help": "real image: latent nudging factor lambda, the VAE latent is multiplied by it before inversion "
            "(1: off)",
            "min": 0.1,
            "max": 10,
        },
    )
    solver: Literal[SOLVERS] = field(  # flux.sampling's list, so a new solver needs no second edit here
        default="euler",
        metadata={
            "help": "real image: ODE solver of the inversion and the edits: euler (the paper's), rf-solver or fireflow "
            "(second-order midpoint steps: 2 and about 1 model calls a step); a generated image uses euler"
        },
    )
    vital_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "global layer indices to inject in (0..18 double, 19..56 single for FLUX.1; [] = no injection); "
            "null: from vital_layers_file, else the release's [0, 1, 17, 18, 25, 28, 53, 54, 56] scaled to the "
            "model",
            "min": 0,
        },
    )
    vital_layers_file: str | None = field(
        default=AUTO,
        metadata={
            "help": "a vital_layers.json from demo_3_dino.py to take the layers from; 'auto': demo_3_dino/"
            "vital_layers.json beside output_dir (outputs/demo_3_dino/vital_layers.json for the default folders) "
            "when it exists and was made for this model, else the release's layers; null: the release's layers"
        },
    )
    inject_steps: list[int] | None = field(
        default=None,
        metadata={
            "help": "[start, end]: inject only in the denoising steps start..end-1 (0-based, 0 <= start < end <= steps; "
            "the release's percentage_of_steps as a step range), plain denoising in the others; null: every step "
            "(the release's default)",
            "min": 0,
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "samples per forward pass, the reference included (null: all edits at once); more edits run in "
            "chunks that each carry the reference",
            "min": 2,
            "max": 256,
        },
    )
    scores: bool = field(
        default=False, metadata={"help": "add CLIP_txt, CLIP_img and CLIP_dir of every edit to results.json"}
    )
    clip_model: str = field(
        default=DEFAULT_CLIP,
        metadata={
            "help": f"CLIP for the scores: hub id or local folder ('{TINY_RANDOM}': random tiny model for tests)"
        },
    )
    output_dir: str = field(default="outputs/demo_4_edit", metadata={"help": "folder for the images and results.json"})

    @property
    def real(self) -> bool:
        return self.image is not None

    @property
    def num_steps(self) -> int:
        """`steps`, or the release's for the mode (inversion included)."""
        return self.steps or (REAL_STEPS if self.real else GENERATED_STEPS)

    @property
    def guidance_value(self) -> float:
        """`guidance` of the edits (and of a generated reference), or the release's for the mode."""
        if self.guidance is not None:
            return self.guidance
        return REAL_GUIDANCE if self.real else GENERATED_GUIDANCE

    @property
    def image_size(self) -> tuple[int, int]:
        """The images' size: the fitted input's for a real image (width and height are ignored)."""
        return self.input_image.size if self.real else super().image_size

    @cached_property
    def injection_layers(self) -> tuple[list[int], str]:
        """The vital layers (read once) and where they came from: the list, the file, or the release's default."""
        p = model_spec(self.model).params
        file, why_not = self.vital_layers_file, ""
        if file == AUTO:
            file, why_not = (
                (None, "") if self.vital_layers is not None else auto_vital_layers_file(self.output_dir, self.model)
            )
        layers, source = choose_vital_layers(self.vital_layers, file, p.depth, p.depth_single_blocks)
        return layers, source + why_not

    @cached_property
    def input_image(self) -> Image.Image | None:
        """The real input, decoded and fitted once (check() reports a bad file before anything runs)."""
        return fit_image(load_image(self.image), self.size) if self.real else None

    def check(self) -> list[str]:
        problems = super().check()
        if not self.edits:
            problems.append("'edits' is empty: give at least one edit prompt")
        problems += [
            f"'edits[{i}]' is an empty string: write the edited prompt"
            for i, e in enumerate(self.edits)
            if not e.strip()
        ]
        if self.solver != "euler" and not self.real:
            problems.append(
                f"'solver' {self.solver} applies to real images: set 'image' to edit one, or solver to euler for a "
                "generated image"
            )
        for check in (
            lambda: self.injection_layers,
            lambda: check_inject_steps(self.inject_steps, self.num_steps),
            lambda: self.input_image,
        ):
            try:
                check()
            except UserError as e:
                problems.append(str(e))
        return problems

    def request(self) -> EditRequest:
        return EditRequest(
            self.source_prompt,
            list(self.edits),
            self.num_steps,
            self.guidance_value,
            self.injection_layers[0],
            check_inject_steps(self.inject_steps, self.num_steps),
            self.batch_size,
        )


# ----------------------------------------------------------------------------------------------- resuming


def edit_file(index: int, prompt: str) -> str:
    return f"edit_{index:02d}_{slug(prompt, fallback='edit')}.png"


def reference_files(cfg: EditConfig) -> list[str]:
    return ["input.png", "reconstruction.png"] if cfg.real else ["reference.png"]


def edit_settings(cfg: EditConfig) -> dict:
    """What decides the pictures: the run's settings (stableflow.runs) and the edit's own. Every PNG records it
    with its own prompt."""
    own = {
        "mode": "real" if cfg.real else "generated",
        "source_prompt": cfg.source_prompt,
        "vital_layers": cfg.injection_layers[0],
        "inject_steps": list(check_inject_steps(cfg.inject_steps, cfg.num_steps)),
    }
    if cfg.real:
        own |= {
            "input_sha256": hashlib.sha256(cfg.input_image.tobytes()).hexdigest(),
            "nudge": cfg.nudge,
            "solver": cfg.solver,
            "source_guidance": runs.guidance_used(cfg.model, cfg.source_guidance),
        }
    else:
        own |= {"seed": cfg.seed}
    return runs.settings_of(cfg) | own


def batching(cfg: EditConfig, chunks: int, reference_drift: float) -> dict:
    """results.json's account of where the layers came from and how this run batched the edits."""
    layers, layers_from = cfg.injection_layers
    depth = model_spec(cfg.model).params.depth
    out = {
        "vital_layers_from": layers_from,
        "vital_layer_names": [layer_name(i, depth) for i in layers],
        "batch_size": cfg.batch_size,
        "chunks": chunks,
        "reference_drift": reference_drift,
    }
    if cfg.real:
        return out | {
            "image": cfg.image,
            "size": cfg.size,
            "reference_overwrite": "inversion latent of the same noise level after every step",
        }
    return out
