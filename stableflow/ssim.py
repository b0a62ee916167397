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
    """SSIM of each (a, b) pair of image files, same sizes required (a sweep's images are)."""
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
        same = all(x.shape == a[0].shape for x in a)
        if same:
            out += ssim(torch.stack(a), torch.stack(b), data_range=255, size_average=False).tolist()
        else:
            out += [ssim(x[None], y[None], data_range=255).item() for x, y in zip(a, b)]
    return out
