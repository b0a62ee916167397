"""Stable Flow editing (demo_4_edit.py): image K/V injection from a reference into edits, in the vital layers.

Generated images: the batch [reference, edit_1, ..., edit_N] starts from one seed's noise; in every vital layer,
at every step, each edit attends with the reference's image-token keys and values (flux.model.Injection).

Real images: the input is VAE-encoded (latent mean), nudged (x lambda), inverted to noise with the inverse Euler ODE
under the source prompt; all samples then start from that noise, and after every step the reference's latent is
overwritten with the inversion latent of the same noise level, so the edits inject the K/V of the real image's path.
"""

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from flux.accel import attention_backend
from .config import BaseConfig, config_to_dict, load_models_for
from flux.errors import UserError
from .io import atomic_write_json, load_image, make_grid, save_png, slug, tensor_to_pil
from flux.model import Injection, layer_name
from flux.pipeline import FluxModels, Text, check_size
from flux.sampling import Step, guidance_vector, image_ids, pack, unpack
from flux.util import model_spec

# The official release's vital layers of FLUX.1-dev (the paper's set without layer 2): double blocks 0, 1, 17, 18
# and single blocks 6, 9, 34, 35, 37 (global index = 19 + j).
RELEASE_VITAL_LAYERS: tuple[int, ...] = (0, 1, 17, 18, 25, 28, 53, 54, 56)
RELEASE_DEPTHS = (19, 38)  # double, single blocks of FLUX.1 dev/schnell
NUDGE = 1.15  # latent nudging of real images (Stable Flow, Sec. 3.3)
GENERATED_STEPS, GENERATED_GUIDANCE = 15, 3.5  # the release's settings
REAL_STEPS, REAL_GUIDANCE, SOURCE_GUIDANCE = 50, 3.0, 1.0
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
TINY_RANDOM = "tiny-random"  # a seeded random tiny CLIP for tests and CPU smoke runs; its scores mean nothing

# ----------------------------------------------------------------------------------------------- vital layers


def scale_layers(layers: Sequence[int], depth: int, depth_single: int, from_depths: tuple[int, int] = RELEASE_DEPTHS) -> list[int]:
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


def check_layers(layers: Sequence[int], num_layers: int, where: str = "vital_layers") -> list[int]:
    """Sorted, de-duplicated layers; any index outside 0..num_layers-1 is a UserError naming the valid range."""
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise UserError(
            f"{where}: layer {', '.join(map(str, bad))} out of range: this model has layers 0..{num_layers - 1} "
            f"(double blocks first, then single blocks)"
        )
    return sorted(set(layers))


def read_vital_layers(path: str | Path, depth: int, depth_single: int) -> list[int]:
    """The "vital_layers" of a vital_layers.json written by demo_3_dino.py, checked against the model."""
    p = Path(path).expanduser()
    if p.is_dir():
        hint = " (it holds vital_layers.json: give that file)" if (p / "vital_layers.json").is_file() else ""
        raise UserError(f"vital_layers_file {path} is a folder: give the path of a vital_layers.json{hint}")
    if not p.is_file():
        raise UserError(f"vital_layers_file {path} does not exist: run demo_3_dino.py, or fix the path")
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"vital_layers_file {path} is not readable JSON ({e}): rewrite it or run demo_3_dino.py again") from None
    layers = data.get("vital_layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise UserError(
            f"vital_layers_file {path} is malformed: expected a JSON object with \"vital_layers\": [integers], "
            f"as demo_3_dino.py writes it"
        )
    num_double = data.get("num_double")
    if num_double is not None and num_double != depth:
        raise UserError(
            f"vital_layers_file {path} was made for a model with {num_double} double blocks, but this model has "
            f"{depth}: its layer indices mean other layers here. Use the file made for this model."
        )
    return check_layers(layers, depth + depth_single, f"vital_layers_file {path}")


def choose_vital_layers(layers: Sequence[int] | None, file: str | None, depth: int, depth_single: int) -> tuple[list[int], str]:
    """The injection layers and where they came from: the explicit list, else the file, else the scaled default."""
    if layers is not None and file is not None:
        raise UserError("both 'vital_layers' and 'vital_layers_file' are set: keep one (set the other to null)")
    if layers is not None:
        return check_layers(layers, depth + depth_single), "config"
    if file is not None:
        return read_vital_layers(file, depth, depth_single), f"file {file}"
    if (depth, depth_single) == RELEASE_DEPTHS:
        return list(RELEASE_VITAL_LAYERS), "default (the official release's FLUX.1-dev layers)"
    return default_vital_layers(depth, depth_single), (
        f"default (the release's layers scaled from {RELEASE_DEPTHS[0]}+{RELEASE_DEPTHS[1]} to {depth}+{depth_single} blocks)")


# ----------------------------------------------------------------------------------------------- batching


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
    input: Tensor | None = None  # real images: the fitted input (3, H, W) in [-1, 1], as the VAE saw it
    inversion: "Inversion | None" = None  # real images: the inversion path


ProgressCallback = Callable[[Step], None]


def _denoise_chunks(
    models: FluxModels,
    text: Text,
    start: Tensor,
    timesteps: list[float],
    guidance: tuple[float, float],
    layers: Sequence[int],
    batch_size: int | None,
    overwrite: Callable[[Step], Tensor | None] | None,
    callback: ProgressCallback | None,
) -> tuple[Tensor, list[list[int]], float]:
    """Denoise [reference, edits...] (text rows 0, 1..N) from `start` (1, 16, h, w), chunk by chunk."""
    chunks = edit_chunks(len(text) - 1, batch_size)
    reference, edits = None, {}
    drift = 0.0
    for chunk in chunks:
        rows = [0] + [1 + i for i in chunk]
        inject = Injection.from_reference(layers, len(rows)) if layers else None

        def step_hook(step: Step) -> Tensor | None:
            replaced = overwrite(step) if overwrite is not None else None
            if callback is not None:
                callback(step)
            return replaced

        out = models.denoise(
            text.select(rows), start.repeat(len(rows), 1, 1, 1), timesteps,
            guidance=[guidance[0]] + [guidance[1]] * len(chunk), inject=inject, callback=step_hook,
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


def _injection_layers(models: FluxModels, layers: Sequence[int] | None) -> list[int]:
    p = models.model.params
    if layers is None:
        return default_vital_layers(p.depth, p.depth_single_blocks)
    return check_layers(layers, models.model.num_layers)


def _check_edits(edit_prompts: Sequence[str]) -> list[str]:
    if isinstance(edit_prompts, str):
        raise UserError("edit prompts must be a list of strings, not one string: write [\"...\"]")
    if not edit_prompts:
        raise UserError("the edit list is empty: give at least one edit prompt")
    return list(edit_prompts)


def edit_generated(
    models: FluxModels,
    source_prompt: str,
    edit_prompts: Sequence[str],
    seed: int,
    width: int,
    height: int,
    steps: int = GENERATED_STEPS,
    guidance: float = GENERATED_GUIDANCE,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    callback: ProgressCallback | None = None,
    free_text_encoders: bool = False,
) -> EditResult:
    """Generate the reference image of `source_prompt` and one edit per prompt, injecting the reference's image
    K/V in `layers` (None: the release's vital layers, scaled to the model; []: no injection, plain generations).

    `batch_size` bounds the samples per forward pass (reference included); `callback` sees every step of every chunk.
    """
    edit_prompts = _check_edits(edit_prompts)
    check_size(width, height)
    layers = _injection_layers(models, layers)
    edit_chunks(len(edit_prompts), batch_size)  # a bad batch_size fails before any work
    text = _encode_prompts(models, [source_prompt, *edit_prompts], free_text_encoders)
    timesteps = models.schedule(steps, width, height)
    latents, chunks, drift = _denoise_chunks(
        models, text, models.noise([seed], width, height), timesteps, (guidance, guidance), layers, batch_size,
        None, callback,
    )
    images = models.decode(latents)
    return EditResult(images[0], images[1:], latents, list(layers), chunks, drift, timesteps)


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
        raise UserError(f"image of {w}x{h} pixels is too small: both sides must be at least {multiple} pixels (set 'size')")
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def pil_to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL -> (3, H, W) float in [-1, 1] (the inverse of io.tensor_to_pil up to 8-bit rounding)."""
    x = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return x.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass
class Inversion:
    """The inverse-Euler path of one latent. timesteps run 1 -> 0 (the denoising order); latents[i] is the packed
    latent (1, L, 64) at noise level timesteps[i]: latents[-1] the clean (nudged) input, latents[0] the noise."""

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
) -> Inversion:
    """Integrate the flow backwards, t = 0 -> 1 over the reversed schedule, with the velocity at the next, noisier
    time: x <- x + (t_next - t_cur) * v(x, t_next) (Stable Flow's inverse Euler). `latent` is (1, 16, h, w)."""
    if latent.shape[0] != 1 or len(text) != 1:
        raise ValueError("invert takes one latent and one prompt")
    _, _, h, w = latent.shape
    x = pack(latent.to(models.device, models.dtype))
    ids = image_ids(1, h // 2, w // 2, models.device)
    g = guidance_vector(guidance, 1, models.device, models.dtype)
    latents = [x]
    rev = timesteps[::-1]
    with models.on_device(models.model), attention_backend(models.attention, models.device):
        for i, (t_cur, t_next) in enumerate(zip(rev[:-1], rev[1:])):
            t = torch.full((1,), t_next, dtype=x.dtype, device=x.device)
            v = models.model(img=x, img_ids=ids, txt=text.txt, txt_ids=text.txt_ids, y=text.vec, timesteps=t, guidance=g)
            nxt = x + (t_next - t_cur) * v
            if callback is not None:
                callback(Step(i, t_cur, t_next, x, v, x - t_cur * v, nxt))
            x = nxt
            latents.append(x)
    return Inversion(list(timesteps), latents[::-1])


def edit_real(
    models: FluxModels,
    image: Tensor,
    source_prompt: str,
    edit_prompts: Sequence[str],
    steps: int = REAL_STEPS,
    guidance: float = REAL_GUIDANCE,
    source_guidance: float = SOURCE_GUIDANCE,
    nudge: float = NUDGE,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    callback: ProgressCallback | None = None,
    free_text_encoders: bool = False,
) -> EditResult:
    """Edit a real image (3, H, W) in [-1, 1], H and W multiples of 16.

    Inversion and the reference sample use `source_guidance` (1); the edits `guidance` (3). After every step the
    reference's latent is replaced by the inversion latent of the same noise level (the official release is one
    or two levels off; we match them), so the reference output -- the reconstruction -- is the nudged input
    latent, decoded: what the edits are anchored to.
    """
    edit_prompts = _check_edits(edit_prompts)
    if image.ndim == 4:
        image = image[0]
    height, width = image.shape[-2:]
    check_size(width, height)
    layers = _injection_layers(models, layers)
    edit_chunks(len(edit_prompts), batch_size)
    text = _encode_prompts(models, [source_prompt, *edit_prompts], free_text_encoders)
    latent = models.encode_image(image[None]) * nudge
    timesteps = models.schedule(steps, width, height)
    inversion = invert(models, latent, text.select([0]), timesteps, source_guidance, callback)

    def overwrite_reference(step: Step) -> Tensor:
        # Step i moves t_i -> t_{i+1}; latents[i + 1] is the inversion at exactly that noise level.
        nxt = step.next_latent.clone()
        nxt[0] = inversion.latents[step.index + 1][0]
        return nxt

    start = unpack(inversion.noise, height, width).to(models.dtype)
    latents, chunks, drift = _denoise_chunks(
        models, text, start, timesteps, (source_guidance, guidance), layers, batch_size, overwrite_reference, callback,
    )
    images = models.decode(latents)
    return EditResult(images[0], images[1:], latents, list(layers), chunks, drift, timesteps,
                          input=image.float().cpu(), inversion=inversion)


# ----------------------------------------------------------------------------------------------- CLIP scores


class ClipScorer:
    """CLIP_txt, CLIP_img and CLIP_dir (Stable Flow's evaluation) with a transformers CLIPModel + CLIPProcessor."""

    def __init__(self, model, processor, device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def load(cls, name: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> "ClipScorer":
        """A hub repo id or a local folder (CLIPModel + CLIPProcessor files); TINY_RANDOM builds a tiny random one."""
        from transformers import CLIPModel, CLIPProcessor

        if name == TINY_RANDOM:
            return cls(*tiny_clip(), device)
        path = Path(name).expanduser()
        if path.is_file():
            raise UserError(f"clip_model {name} is a file: give a folder with config.json and the processor files, or a hub id")
        if name.startswith(("/", ".", "~")) and not path.exists():
            raise UserError(f"clip_model folder {name} does not exist: fix the path, or give a hub id like {DEFAULT_CLIP}")
        try:
            model = CLIPModel.from_pretrained(str(path) if path.exists() else name)
            processor = CLIPProcessor.from_pretrained(str(path) if path.exists() else name)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load CLIP model {name} for the scores ({str(e).splitlines()[0]}): give a hub id "
                            f"such as {DEFAULT_CLIP} or a local folder, or set scores=false") from None
        return cls(model, processor, device)

    @staticmethod
    def _features(out) -> Tensor:
        # transformers 5 returns an output object whose pooler_output is the projected embedding; 4 a tensor
        x = out if torch.is_tensor(out) else out.pooler_output
        return torch.nn.functional.normalize(x.double(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        self.model.to(self.device)
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self._features(self.model.get_image_features(pixel_values=pixels)).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        self.model.to(self.device)
        tokens = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        return self._features(self.model.get_text_features(input_ids=ids, attention_mask=mask)).cpu()

    def scores(self, source: Image.Image, source_prompt: str, edits: Sequence[Image.Image],
               edit_prompts: Sequence[str]) -> list[dict[str, float | None]]:
        """Per edit: CLIP_txt = cos(edit image, edit prompt); CLIP_img = cos(edit image, source image);
        CLIP_dir = cos(edit image - source image, edit prompt - source prompt) on unit embeddings
        (None where a direction is zero, e.g. an edit prompt equal to the source prompt)."""
        img = self.embed_images([source, *edits])
        txt = self.embed_texts([source_prompt, *edit_prompts])
        out = []
        for k in range(1, len(img)):
            d_img, d_txt = img[k] - img[0], txt[k] - txt[0]
            norm = d_img.norm() * d_txt.norm()
            out.append({
                "clip_txt": float(img[k] @ txt[k]),
                "clip_img": float(img[k] @ img[0]),
                "clip_dir": float((d_img @ d_txt) / norm) if norm > 1e-12 else None,
            })
        return out


def tiny_clip(seed: int = 0):
    """A seeded random CLIP (width 32, 32x32 images) with the tiny tokenizer in flux/assets; for tests only."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from flux.modules.conditioner import TINY_ASSETS

    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_ASSETS / "clip"))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------- the demo


@dataclass
class EditConfig(BaseConfig):
    image: str | None = field(default=None, metadata={
        "help": "null: edit a generated image; a path: edit this real image (PNG/JPEG/WebP, any size; see 'size')"})
    source_prompt: str = field(default="a photo of a small white dog sitting on a green sofa in a living room", metadata={
        "help": "the reference image's prompt; for a real image, a description of it that mentions the region "
                "to edit (edits that change nothing usually need a better source prompt)"})
    edits: list[str] = field(default_factory=lambda: [
        "a photo of a small white dog wearing sunglasses sitting on a green sofa in a living room",
        "a photo of a small white cat sitting on a green sofa in a living room",
        "a photo of a small white dog sitting on a red leather sofa in a living room",
    ], metadata={"help": "edit prompts, one output each: the source prompt with the change written in"})
    seed: int = field(default=0, metadata={"help": "noise seed of the generated reference (generated images only)", "min": 0})
    width: int = field(default=1024, metadata={
        "help": "generated image width in pixels (ignored for a real image)", "min": 16, "max": 4096, "multiple_of": 16})
    height: int = field(default=1024, metadata={
        "help": "generated image height in pixels (ignored for a real image)", "min": 16, "max": 4096, "multiple_of": 16})
    size: int | None = field(default=1024, metadata={
        "help": "real image: resize so the shorter side has this many pixels, then centre-crop both sides down to "
                "multiples of 16 (null: keep the size, only crop)", "min": 16, "max": 4096})
    steps: int | None = field(default=None, metadata={
        "help": f"denoising (and inversion) steps; null: {GENERATED_STEPS} for generated, {REAL_STEPS} for real images",
        "min": 1, "max": 1000})
    guidance: float | None = field(default=None, metadata={
        "help": f"guidance of the edits (and of the generated reference); null: {GENERATED_GUIDANCE} for generated, "
                f"{REAL_GUIDANCE} for real images", "min": 0, "max": 100})
    source_guidance: float = field(default=SOURCE_GUIDANCE, metadata={
        "help": "real image: guidance of the inversion and of the reference (reconstruction) sample", "min": 0, "max": 100})
    nudge: float = field(default=NUDGE, metadata={
        "help": "real image: latent nudging factor lambda, the VAE latent is multiplied by it before inversion "
                "(1: off)", "min": 0.1, "max": 10})
    vital_layers: list[int] | None = field(default=None, metadata={
        "help": "global layer indices to inject in (0..18 double, 19..56 single for FLUX.1; [] = no injection); "
                "null: vital_layers_file, else the release's [0, 1, 17, 18, 25, 28, 53, 54, 56] scaled to the model",
        "min": 0})
    vital_layers_file: str | None = field(default=None, metadata={
        "help": "a vital_layers.json from demo_3_dino.py (e.g. outputs/demo_3_dino/vital_layers.json) to take the "
                "layers from"})
    batch_size: int | None = field(default=None, metadata={
        "help": "samples per forward pass, the reference included (null: all edits at once); more edits run in "
                "chunks that each carry the reference", "min": 2, "max": 256})
    scores: bool = field(default=False, metadata={
        "help": "add CLIP_txt, CLIP_img and CLIP_dir of every edit to results.json"})
    clip_model: str = field(default=DEFAULT_CLIP, metadata={
        "help": f"CLIP for the scores: hub id or local folder ('{TINY_RANDOM}': random tiny model for tests)"})
    output_dir: str = field(default="outputs/demo_4_edit", metadata={"help": "folder for the images and results.json"})

    def check(self) -> list[str]:
        problems = super().check()
        if not self.edits:
            problems.append("'edits' is empty: give at least one edit prompt")
        problems += [f"'edits[{i}]' is an empty string: write the edited prompt" for i, e in enumerate(self.edits) if not e.strip()]
        p = model_spec(self.model).params
        for check in (
            lambda: choose_vital_layers(self.vital_layers, self.vital_layers_file, p.depth, p.depth_single_blocks),
            lambda: self.image is not None and fit_image(load_image(self.image), self.size),
        ):
            try:
                check()
            except UserError as e:
                problems.append(str(e))
        return problems


def edit_file(index: int, prompt: str) -> str:
    return f"edit_{index:02d}_{slug(prompt, fallback='edit')}.png"


def run(cfg: EditConfig, models: FluxModels | None = None) -> dict:
    """Everything demo_4_edit.py does; returns the results.json object. All checks and computation come before the
    first file is written, so bad input or a failed model load leaves output_dir untouched."""
    real = cfg.image is not None
    p = model_spec(cfg.model).params
    layers, layers_from = choose_vital_layers(cfg.vital_layers, cfg.vital_layers_file, p.depth, p.depth_single_blocks)
    fitted = fit_image(load_image(cfg.image), cfg.size) if real else None
    models = models or load_models_for(cfg)
    scorer = ClipScorer.load(cfg.clip_model) if cfg.scores else None
    steps = cfg.steps or (REAL_STEPS if real else GENERATED_STEPS)
    guidance = cfg.guidance if cfg.guidance is not None else (REAL_GUIDANCE if real else GENERATED_GUIDANCE)
    chunks = edit_chunks(len(cfg.edits), cfg.batch_size)
    bar = tqdm(total=steps * (len(chunks) + real), unit="step", desc="editing")
    start = time.perf_counter()
    common = dict(layers=layers, batch_size=cfg.batch_size, callback=lambda s: bar.update(1), free_text_encoders=True)
    if real:
        result = edit_real(models, pil_to_tensor(fitted), cfg.source_prompt, cfg.edits, steps, guidance,
                           cfg.source_guidance, cfg.nudge, **common)
    else:
        result = edit_generated(models, cfg.source_prompt, cfg.edits, cfg.seed, cfg.width, cfg.height, steps, guidance,
                                **common)
    bar.close()
    seconds = time.perf_counter() - start
    source_png = fitted if real else tensor_to_pil(result.reference)
    edit_pngs = [tensor_to_pil(e) for e in result.edits]
    if scorer is not None:
        scorer.device = models.device
        scores = scorer.scores(source_png, cfg.source_prompt, edit_pngs, cfg.edits)
    height, width = result.reference.shape[-2:]
    settings = {
        "mode": "real" if real else "generated", "model": cfg.model, "width": width, "height": height,
        "steps": steps, "guidance": guidance, "vital_layers": layers, "vital_layers_from": layers_from,
        "vital_layer_names": [layer_name(i, p.depth) for i in layers], "batch_size": cfg.batch_size,
        "chunks": len(result.chunks), "reference_drift": result.reference_drift,
    }
    if real:
        settings |= {"image": cfg.image, "size": cfg.size, "nudge": cfg.nudge, "source_guidance": cfg.source_guidance,
                     "reference_overwrite": "inversion latent of the same noise level after every step"}
    else:
        settings["seed"] = cfg.seed
    meta = {k: settings[k] for k in ("model", "steps", "guidance")} | {"vital_layers": layers}

    out = Path(cfg.output_dir).expanduser()
    files: dict[str, object] = {}
    if real:
        files |= {"input": "input.png", "reconstruction": "reconstruction.png"}
        save_png(out / "input.png", fitted, {"image": cfg.image, "size": cfg.size or 0})
        save_png(out / "reconstruction.png", result.reference, meta | {"prompt": cfg.source_prompt, "nudge": cfg.nudge})
    else:
        files["reference"] = "reference.png"
        save_png(out / "reference.png", result.reference, meta | {"prompt": cfg.source_prompt, "seed": cfg.seed})
    edits = []
    for i, (prompt, png) in enumerate(zip(cfg.edits, edit_pngs)):
        name = edit_file(i, prompt)
        save_png(out / name, png, meta | {"prompt": prompt, "source_prompt": cfg.source_prompt})
        edits.append({"index": i, "prompt": prompt, "file": name} | ({"scores": scores[i]} if scorer else {}))
    tiles = ([fitted, result.reference] if real else [result.reference]) + edit_pngs
    labels = ["input", f"reconstruction: {cfg.source_prompt}"] if real else [f"reference: {cfg.source_prompt}"]
    labels += [f"edit {i}: {e}" for i, e in enumerate(cfg.edits)]
    save_png(out / "grid.png", make_grid(tiles, labels, cols=min(len(tiles), 5)))
    files["grid"] = "grid.png"
    results = {"settings": settings, "source_prompt": cfg.source_prompt, "files": files, "edits": edits,
               "seconds": round(seconds, 2), "config": config_to_dict(cfg)}
    if scorer is not None:
        results["scores_model"] = cfg.clip_model
        results["mean_scores"] = {k: _mean([e["scores"][k] for e in edits]) for k in ("clip_txt", "clip_img", "clip_dir")}
    atomic_write_json(out / "results.json", results)
    return results


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
