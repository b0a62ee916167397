"""An analytic detector for `mini.world` images: no learned model, so it can grade a generator honestly.

Background = the palette colour nearest the border's median; the shape mask = pixels far from the background;
colour = the palette colour nearest the median of the mask; place = the grid cell of the mask's centroid; shape =
the kind whose template, rendered at that centroid with the mask's area, overlaps the mask best (IoU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .world import BACKGROUNDS, COLOURS, PLACES, RADIUS, SHAPES, SIZE, shape_sdf

_FG = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255
_BG = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 255
MASK_THRESHOLD = 0.25  # RGB distance (0..1 scale) from the background; AA edges under ~half coverage fall outside


@dataclass(frozen=True)
class Detection:
    shape: str | None  # None when no shape is found
    colour: str | None
    place: str | None
    size: str | None
    background: str
    area: float  # mask pixels
    iou: float  # IoU of the mask with the best template (how shape-like the blob is)


def to_tensor(image) -> Tensor:
    """(3, H, W) float in [0, 1] from a tensor in [-1, 1] (C, H, W) or a PIL image / uint8 array (H, W, 3)."""
    if isinstance(image, Tensor):
        return ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def _nearest(colour: Tensor, palette: Tensor) -> int:
    return int(((palette - colour) ** 2).sum(-1).argmin())


def background_of(img: Tensor) -> int:
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)  # (3, 4*SIZE)
    return _nearest(border.median(dim=1).values, _BG)


def shape_mask(image) -> Tensor:
    """Bool (H, W): pixels far from the background colour."""
    img = to_tensor(image)
    bg = _BG[background_of(img)]
    return (img - bg[:, None, None]).norm(dim=0) > MASK_THRESHOLD


def _template(kind: str, cx: float, cy: float, area: float, x0: int, y0: int, w: int) -> Tensor:
    """Mask of `kind` centred at (cx, cy) with area `area` (pixels), on the w x w window at (x0, y0)."""
    r = math.sqrt(area / _UNIT_AREA[kind])
    coords = torch.arange(w, dtype=torch.float32) + 0.5
    p = torch.stack(torch.broadcast_tensors(coords[None, :] + x0 - cx, coords[:, None] + y0 - cy), -1)[None]
    return shape_sdf(kind, p, torch.tensor([r]))[0] < 0


def _unit_area(kind: str) -> float:
    r = 40.0
    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5 - SIZE / 2
    p = torch.stack(torch.broadcast_tensors(coords[None, :], coords[:, None]), -1)[None]
    return float((shape_sdf(kind, p, torch.tensor([r]))[0] < 0).sum()) / r**2


_UNIT_AREA = {k: _unit_area(k) for k in SHAPES}


def mask_iou(a: Tensor, b: Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def image_iou(image_a, image_b) -> float:
    """IoU of the shape masks of two images (1 for the same shape in the same spot, ~0 for moved shapes)."""
    return mask_iou(shape_mask(image_a), shape_mask(image_b))


def detect(image) -> Detection:
    img = to_tensor(image)
    bg = background_of(img)
    mask = (img - _BG[bg][:, None, None]).norm(dim=0) > MASK_THRESHOLD
    area = float(mask.sum())
    bg_name = list(BACKGROUNDS)[bg]
    if area < 10:  # nothing drawn
        return Detection(None, None, None, None, bg_name, area, 0.0)
    colour = list(COLOURS)[_nearest(img[:, mask].median(dim=1).values, _FG)]
    ys, xs = mask.nonzero(as_tuple=True)
    cx, cy = float(xs.float().mean()) + 0.5, float(ys.float().mean()) + 0.5
    col, row = min(int(cx * 3 / SIZE), 2), min(int(cy * 3 / SIZE), 2)
    # Templates only on a window around the centroid (speed); mask pixels outside it still count in the union.
    w = 64
    x0, y0 = min(max(int(cx) - w // 2, 0), SIZE - w), min(max(int(cy) - w // 2, 0), SIZE - w)
    crop = mask[y0 : y0 + w, x0 : x0 + w]
    outside = area - float(crop.sum())
    ious = {}
    for k in SHAPES:
        t = _template(k, cx, cy, area, x0, y0, w)
        ious[k] = float((crop & t).sum()) / (float((crop | t).sum()) + outside)
    shape = max(ious, key=ious.get)
    # Size: circumradius implied by the area for the detected kind, against the midpoint of the two sizes.
    r = math.sqrt(area / _UNIT_AREA[shape])
    size = "small" if r < (RADIUS["small"] + RADIUS["large"]) / 2 else "large"
    return Detection(shape, colour, PLACES[row * 3 + col], size, bg_name, area, ious[shape])
