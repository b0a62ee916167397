"""PIE-Bench's edit metrics, as its reference evaluation computes them (cure-lab/PnPInversion, evaluation/evaluate.py
and evaluation/matrics_calculator.py), on 8-bit RGB images (PIL images or uint8 arrays of shape (H, W, 3)).

The reference's rules, kept here so our numbers compare with published ones:
- Prompts: the `[ ]` markers around the edited words are removed before any CLIP score (clean_prompt).
- Masks: run-length pairs (start, length) over the flattened 512x512 image, each run clipped to the image; then the
  outer one-pixel frame is set to 1 (edited), "to avoid annotation errors in boundary" (decode_mask).
- "Unedited part" metrics multiply both images by 1 - mask and compute the metric over the whole frame, the zeroed
  edited pixels included (so PSNR/MSE/SSIM/LPIPS of the unedited part are not means over its pixels alone); a mask
  that covers everything gives NaN, which callers keep and count, never drop.
- PSNR, MSE, SSIM (data range 1) and LPIPS (SqueezeNet, inputs scaled to [-1, 1]) are torchmetrics', on pixels / 255.
- Structure distance: MSE between the self-similarity maps (cosine of every pair of tokens, CLS included) of the
  last layer's keys of DINO ViT-B/8, of the two images resized to 224 on the shorter side (at most 480 on the longer,
  bilinear, no antialiasing: torchvision's tensor Resize of the reference's time) and ImageNet-normalised. The
  reference feeds pixels in 0..255 to that normalisation, not 0..1; we do the same, or our numbers would not be
  theirs.
- CLIP score: torchmetrics' CLIPScore with openai/clip-vit-large-patch14, 100 * max(cos(image, text), 0); of the whole
  edited image with the target prompt, and of the edited region (the image times the mask, zeros outside) with it.

torchmetrics (and torchvision for LPIPS) are optional extras (requirements-bench.txt), imported when first used; model
weights load from the Hugging Face cache first, with one clear error when they are neither cached nor reachable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from flux.errors import UserError
from flux.util import hub_pretrained

if TYPE_CHECKING:
    from .clip_score import ClipScorer

PIE_SIZE = (512, 512)
DINO = "facebook/dino-vitb8"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BENCH_EXTRAS = "pip install -r requirements-bench.txt"


def clean_prompt(prompt: str) -> str:
    """A PIE-Bench prompt without its [ ] markers (the reference removes them before scoring)."""
    return prompt.replace("[", "").replace("]", "")


def decode_mask(rle: Sequence[int], shape: tuple[int, int] = PIE_SIZE) -> np.ndarray:
    """PIE-Bench's run-length mask: (start, length) pairs over the flattened image, runs clipped at its end, and the
    outer frame set to 1 as the reference does. Returns float (H, W) in {0, 1}, 1 = edited."""
    if len(rle) % 2:
        raise UserError(f"a PIE-Bench mask needs (start, length) pairs, got {len(rle)} numbers")
    n = shape[0] * shape[1]
    flat = np.zeros(n)
    for start, length in zip(rle[::2], rle[1::2]):
        flat[start : start + max(0, min(length, n - start))] = 1
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def _pixels(image) -> np.ndarray:
    """An 8-bit RGB image as float32 (H, W, 3) in 0..255."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
    return a.astype(np.float32)


def _masked(image, keep: np.ndarray | None, scale: float) -> Tensor:
    """(1, 3, H, W) float: pixels / scale, times `keep` (H, W) where given."""
    a = _pixels(image) / scale
    if keep is not None:
        a = a * np.asarray(keep, dtype=np.float32)[..., None]
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def _pair(a, b, keep: np.ndarray | None, scale: float = 255.0) -> tuple[Tensor, Tensor] | None:
    """Both images masked alike; None where `keep` keeps nothing (the metric is NaN)."""
    if _pixels(a).shape != _pixels(b).shape:
        raise ValueError(f"images of different sizes: {_pixels(a).shape} and {_pixels(b).shape}")
    if keep is not None and not np.asarray(keep).any():
        return None
    return _masked(a, keep, scale), _masked(b, keep, scale)


def mse(a, b, keep: np.ndarray | None = None) -> float:
    """Mean squared error of pixels / 255 over the whole frame, both images times `keep`."""
    pair = _pair(a, b, keep)
    return math.nan if pair is None else F.mse_loss(*pair).item()


def psnr(a, b, keep: np.ndarray | None = None) -> float:
    """10 log10(1 / MSE) with data range 1 (torchmetrics' PeakSignalNoiseRatio); inf for identical images."""
    e = mse(a, b, keep)
    return e if math.isnan(e) else (math.inf if e == 0 else 10 * math.log10(1 / e))


def _torchmetrics():
    try:
        import torchmetrics.functional.image as tm
    except ImportError:
        raise UserError(f"SSIM and LPIPS need torchmetrics: {BENCH_EXTRAS}") from None
    return tm


def ssim(a, b, keep: np.ndarray | None = None) -> float:
    """torchmetrics' SSIM (Gaussian window 11, sigma 1.5, data range 1) of pixels / 255, both times `keep`."""
    pair = _pair(a, b, keep)
    if pair is None:
        return math.nan
    return _torchmetrics().structural_similarity_index_measure(*pair, data_range=1.0).item()


@functools.cache
def load_lpips(net: str = "squeeze") -> torch.nn.Module:
    """torchmetrics' LPIPS (the reference's SqueezeNet), inputs in [-1, 1]; loaded once."""
    _torchmetrics()
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type=net).eval()
    except ImportError:
        raise UserError(
            "LPIPS needs torchvision besides torchmetrics: install the torchvision that matches your torch "
            "(https://pytorch.org), or leave LPIPS out"
        ) from None
    except (OSError, RuntimeError) as e:  # torchvision fetches the backbone's weights on first use
        raise UserError(
            f"cannot load LPIPS' {net} backbone ({str(e).splitlines()[0]}): its weights come from torchvision's "
            f"download on first use; run once with network access, or leave LPIPS out"
        ) from None


@torch.no_grad()
def lpips(a, b, keep: np.ndarray | None = None, net: torch.nn.Module | None = None) -> float:
    """LPIPS of pixels / 255 scaled to [-1, 1], both times `keep` first (so the zeroed region reads as -1)."""
    pair = _pair(a, b, keep)
    if pair is None:
        return math.nan
    net = net or load_lpips()
    return float(net(pair[0] * 2 - 1, pair[1] * 2 - 1))


# ----------------------------------------------------------------------------------------------- structure distance


@functools.cache
def load_dino(name: str = DINO) -> torch.nn.Module:
    """DINO ViT-B/8 as a transformers ViTModel, from the HF cache first; loaded once."""
    from transformers import ViTModel

    load = lambda **hub: ViTModel.from_pretrained(name, add_pooling_layer=False, **hub)
    try:
        return hub_pretrained(load, name, hint="give a local folder of a DINO ViT").eval()
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load {name} for the structure distance ({str(e).splitlines()[0]}): download it once with "
            f"network access, or leave structure_distance out"
        ) from None


def _last_keys(vit: torch.nn.Module) -> torch.nn.Module:
    """The last layer's key projection (transformers 5 names it k_proj; 4: attention.attention.key)."""
    layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
    attention = layers[-1].attention
    return attention.k_proj if hasattr(attention, "k_proj") else attention.attention.key


def resize_size(h: int, w: int, size: int = 224, max_size: int = 480) -> tuple[int, int]:
    """torchvision's Resize(size, max_size) output size: the shorter side to `size`, the longer at most max_size."""
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if h <= w else (new_long, new_short)


@torch.no_grad()
def key_self_similarity(vit: torch.nn.Module, image, keep: np.ndarray | None = None) -> Tensor:
    """(T, T) cosine similarities of the last layer's keys (all heads side by side), CLS token included, of an
    image as the reference prepares it: pixels in 0..255 (sic) times `keep`, resized, ImageNet-normalised."""
    x = _masked(image, keep, 1.0)
    x = F.interpolate(x, size=resize_size(*x.shape[-2:]), mode="bilinear", align_corners=False, antialias=False)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    x = (x - mean) / std
    keys = []
    hook = _last_keys(vit).register_forward_hook(lambda m, i, out: keys.append(out))
    try:
        p = next(vit.parameters())
        vit(pixel_values=x.to(p.device, p.dtype), interpolate_pos_encoding=True)
    finally:
        hook.remove()
    k = keys[0][0].float()
    n = k.norm(dim=-1, keepdim=True)
    return (k @ k.T) / (n @ n.T).clamp(min=1e-8)


def structure_distance(a, b, keep: np.ndarray | None = None, vit: torch.nn.Module | None = None) -> float:
    """MSE between the DINO key self-similarity maps of the two images (PIE-Bench's structure distance)."""
    if keep is not None and not np.asarray(keep).any():
        return math.nan
    vit = vit or load_dino()
    return F.mse_loss(key_self_similarity(vit, b, keep), key_self_similarity(vit, a, keep)).item()


# ----------------------------------------------------------------------------------------------- CLIP score


def clip_score(scorer: ClipScorer, image, prompt: str, mask: np.ndarray | None = None) -> float:
    """100 * max(cos(CLIP image, CLIP text), 0) of the image (times `mask`, 8-bit) and the prompt, [ ] removed."""
    a = _pixels(image)
    if mask is not None:
        if not np.asarray(mask).any():
            return math.nan
        a = a * np.asarray(mask, dtype=np.float32)[..., None]
    picture = Image.fromarray(np.uint8(a))
    cos = (scorer.embed_images([picture])[0] @ scorer.embed_texts([clean_prompt(prompt)])[0]).item()
    return 100 * max(cos, 0.0)


# ----------------------------------------------------------------------------------------------- all of PIE-Bench's

PIE_METRICS = (
    "structure_distance",
    "psnr_unedit_part",
    "lpips_unedit_part",
    "mse_unedit_part",
    "ssim_unedit_part",
    "clip_similarity_source_image",
    "clip_similarity_target_image",
    "clip_similarity_target_image_edit_part",
)


def pie_metrics(
    source,
    edited,
    mask: np.ndarray,
    source_prompt: str,
    target_prompt: str,
    clip: ClipScorer | None = None,
    vit: torch.nn.Module | None = None,
    lpips_net: torch.nn.Module | None = None,
    metrics: Sequence[str] = PIE_METRICS,
) -> dict[str, float]:
    """The reference evaluation's default metrics of one edit, by its names; NaN where a region is empty. The
    structure distance is of the whole images, the others as their names say."""
    keep = 1 - np.asarray(mask, dtype=np.float32)
    run = {
        "structure_distance": lambda: structure_distance(source, edited, None, vit),
        "psnr_unedit_part": lambda: psnr(source, edited, keep),
        "lpips_unedit_part": lambda: lpips(source, edited, keep, lpips_net),
        "mse_unedit_part": lambda: mse(source, edited, keep),
        "ssim_unedit_part": lambda: ssim(source, edited, keep),
        "clip_similarity_source_image": lambda: clip_score(clip, source, source_prompt),
        "clip_similarity_target_image": lambda: clip_score(clip, edited, target_prompt),
        "clip_similarity_target_image_edit_part": lambda: clip_score(clip, edited, target_prompt, mask),
    }
    unknown = [m for m in metrics if m not in run]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(PIE_METRICS)}")
    return {m: run[m]() for m in metrics}
