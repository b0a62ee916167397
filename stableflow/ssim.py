"""SSIM, the weight-free similarity demo_3 can score a sweep with instead of DINOv2.

On flux-mini's procedural images (flat shapes on flat backgrounds) structural similarity is meaningful and needs no
learned weights; real photographs keep DINOv2, whose features follow content rather than pixels. SSIM itself comes
from pytorch-msssim (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K = (0.01, 0.03), valid convolution), over
8-bit RGB, averaged over pixels and channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pytorch_msssim import ssim

from flux.errors import UserError

from .io import load_image

WINDOW = 11  # pytorch-msssim's default Gaussian window: images must be at least this large


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(load_image(path).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)


def ssim_pairs(pairs: Sequence[tuple[Path, Path]], batch_size: int = 64) -> list[float]:
    """SSIM of each (a, b) pair of image files; the two images of a pair must have one size, pairs may differ."""
    out: list[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        a, b = [_pixels(p) for p, _ in chunk], [_pixels(q) for _, q in chunk]
        for (p, q), x, y in zip(chunk, a, b):
            if x.shape != y.shape:
                raise UserError(
                    f"SSIM compares images of one size: {p} is {x.shape[2]}x{x.shape[1]}, {q} is "
                    f"{y.shape[2]}x{y.shape[1]}; use metric=dinov2 for images of different sizes"
                )
            if min(x.shape[1:]) < WINDOW:
                raise UserError(f"{p} is smaller than SSIM's {WINDOW}-pixel window: use larger images or metric=dinov2")
        # Pairs of one size are stacked and scored in one call: the only call, so every size gets the same settings.
        scores = [0.0] * len(chunk)
        for shape in dict.fromkeys(x.shape for x in a):
            rows = [k for k, x in enumerate(a) if x.shape == shape]
            batch = ssim(
                torch.stack([a[k] for k in rows]), torch.stack([b[k] for k in rows]), data_range=255, size_average=False
            )
            for k, s in zip(rows, batch.tolist()):
                scores[k] = s
        out += scores
    return out
