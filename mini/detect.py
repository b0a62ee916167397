"""Detector 2: an analytic reader of `mini.world` images (no learned model, so it can grade a generator honestly).

An image is a flat background with flat-coloured objects whose edges blend linearly into it, so every pixel is
`bg + alpha * (fg - bg)` for one palette colour fg. The detector works on that soft coverage `alpha`, never on one
hard threshold of it:

- background: the background colour nearest the median of the image border;
- objects: 8-connected components of pixels away from the background; each component's colour(s) by a vote of its
  well-covered pixels, each pixel's coverage `alpha` by projection on the segment background -> colour (a component
  that joins two colours, e.g. two blurred neighbours, is split by colour);
- mask: `alpha > 0.5`, the same rule as the ground truth of `mini.world.coverage`; blur keeps that contour in place;
- place: the cell of the coverage-weighted centroid (blur keeps the centroid exactly);
- shape, by discrete cues that survive blur and the deformations of generated shapes (rounded corners, fat star
  points, a narrowed hole, a stretched side): a ring has a hole at its centroid; a star is concave (low solidity);
  otherwise the strongest angular symmetry of the coverage decides - order 3 triangle, 4 square, 5 star (a blurred
  small star is nearly convex), none circle;
- size: the circumradius implied by the soft area (blur keeps it) for the detected shape, small below the
  geometric mean of the two radii.

Detector 1 fit rigid templates of equal area to a thresholded mask and kept the best IoU; on generated images the
equal-area circle won for fat stars, rounded squares and rings with a narrowed hole (see the history of this file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .world import BACKGROUNDS, COLOURS, PLACES, RADIUS, SHAPES, SIZE, shape_sdf

_FG = np.array(list(COLOURS.values()), dtype=np.float32) / 255
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32) / 255
AWAY = 0.1  # RGB distance (0..1 scale) from the background that puts a pixel into a component: above noise
MIN_AREA = 50.0  # soft area (pixels) of the smallest object kept: under half the smallest world object (115)
CORE = 0.6  # coverage from which a pixel votes for its component's colour
VOTE = 0.2  # share of the votes a colour needs to make an object of its own in a component
SEPARATE = SIZE / 6  # ... and the distance of its patch from a stronger colour's: world objects sit a cell apart
HOLE = 0.06  # a ring: a hole at the centroid of at least this share of its area (a clean ring's is a third)
SOLID = 0.78  # a star: solidity below this (a clean star's is 0.56-0.65; a triangle's over 0.86, a circle's 0.93)
# A triangle, square or star: its 3-, 4- or 5-fold symmetry at least this share of the clean shape's. A blurred circle
# keeps no 3- or 5-fold symmetry, but resampling on the pixel grid lends it some 4-fold symmetry.
SYMMETRY = {3: 0.3, 4: 0.6, 5: 0.12}


@dataclass(frozen=True)
class ObjDetection:
    colour: str
    shape: str
    place: str
    size: str
    mask: Tensor = field(repr=False)  # bool (H, W): coverage > 0.5
    area: float  # soft area: summed coverage, pixels
    centre: tuple[float, float]  # coverage-weighted centroid (x, y), pixels
    confidence: float  # in [0, 1]: the smallest margin of the colour vote and the shape cues from their thresholds


@dataclass(frozen=True)
class SceneDetection:
    background: str
    objects: tuple[ObjDetection, ...]  # in caption order (palette order of the colours), then by place

    def find(self, colour: str) -> ObjDetection | None:
        """The object of this colour (the largest, if a generator drew the colour twice)."""
        return max((o for o in self.objects if o.colour == colour), key=lambda o: o.area, default=None)


def to_images(images) -> np.ndarray:
    """(B, SIZE, SIZE, 3) float32 in [0, 1] from a tensor in [-1, 1] (C, H, W) or (B, C, H, W), a PIL image, a uint8
    array (H, W, 3), or a list of these."""
    if isinstance(images, (list, tuple)):
        return np.concatenate([to_images(i) for i in images])
    if isinstance(images, Tensor):
        x = images.detach().float().cpu()
        arr = ((x[None] if x.dim() == 3 else x).permute(0, 2, 3, 1).numpy() + 1) / 2
    else:
        arr = np.asarray(images.convert("RGB") if hasattr(images, "convert") else images)[None] / 255
    if arr.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"mini.detect reads {SIZE}x{SIZE} RGB world images, not an array of shape {arr.shape[1:]}")
    return arr.clip(0, 1).astype(np.float32)


def _components(away: np.ndarray) -> np.ndarray:
    """(B, H, W) labels of the 8-connected components of `away` (0 outside, else 1 + the largest index of the
    component's pixels), all images at once: each pixel takes the largest label among its neighbours, then follows
    labels as pointers (pointer jumping), until nothing changes."""
    b, h, w = away.shape
    pad = np.zeros((b, h + 2, w + 2), bool)  # a border of background keeps neighbours within their own image
    pad[:, 1:-1, 1:-1] = away
    at = np.flatnonzero(pad)
    index = np.zeros(pad.size, np.int64)
    index[at] = np.arange(len(at))
    offsets = np.array([dy * (w + 2) + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    nb = np.where(pad.ravel()[at[:, None] + offsets], index[at[:, None] + offsets], np.arange(len(at))[:, None])
    lab = np.arange(len(at))
    while True:
        new = lab[nb].max(1)
        while not np.array_equal(jump := new[new], new):
            new = jump
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.zeros(pad.size, np.int64)
    out[at] = lab + 1
    return out.reshape(pad.shape)[:, 1:-1, 1:-1]


def _clean(kind: str, r: float = 40.0) -> np.ndarray:
    """Coverage of a clean shape of circumradius r centred in a SIZE x SIZE image."""
    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5 - SIZE / 2
    p = torch.stack(torch.broadcast_tensors(coords[None, :], coords[:, None]), -1)[None]
    return (0.5 - shape_sdf(kind, p, torch.tensor([r]))[0]).clamp(0, 1).numpy()


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of a mask (monotone chain over each row's outer corners)."""
    rows = np.flatnonzero(mask.any(1))
    first, last = mask[rows].argmax(1), mask.shape[1] - mask[rows, ::-1].argmax(1)
    pts = sorted({(float(x), float(y)) for r, a, b in zip(rows, first, last) for x in (a, b) for y in (r, r + 1)})

    def chain(points):
        out: list[tuple[float, float]] = []
        for p in points:
            while (
                len(out) >= 2
                and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
                <= 0
            ):
                out.pop()
            out.append(p)
        return out[:-1]

    hull = chain(pts) + chain(pts[::-1])
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1])))


def _hole(mask: np.ndarray, x: int, y: int) -> int:
    """Size of the hole at pixel (x, y): the region outside the mask there, if the mask encloses it; else 0."""
    pad = np.pad(~mask, 1, constant_values=True)
    lab = _components(pad[None])[0]
    at = lab[y + 1, x + 1]
    return 0 if at in (0, lab[0, 0]) else int((lab == at).sum())


def _symmetry(cover: np.ndarray, cx: float, cy: float) -> dict[int, float]:
    """|sum a r^2 e^(-ik phi)| / sum a r^2 about (cx, cy), k = 3, 4, 5: the strength of each order of symmetry."""
    yy, xx = np.mgrid[: cover.shape[0], : cover.shape[1]]
    z = (xx + 0.5 - cx) + 1j * (yy + 0.5 - cy)
    w = cover * np.abs(z) ** 2
    phase = z / np.maximum(np.abs(z), 1e-6)
    return {k: float(np.abs((w * phase.conj() ** k).sum()) / max(w.sum(), 1e-9)) for k in (3, 4, 5)}


_UNIT_AREA = {k: float(_clean(k).sum()) / 40.0**2 for k in SHAPES}
_REF = {k: _symmetry(_clean(kind), SIZE / 2, SIZE / 2)[k] for k, kind in ((3, "triangle"), (4, "square"), (5, "star"))}
_R_MID = math.sqrt(RADIUS["small"] * RADIUS["large"])


def cues(cover: np.ndarray, cx: float, cy: float) -> dict[str, float]:
    """The shape cues of one object's coverage (H, W) with centroid (cx, cy): "hole", the hole of its mask at the
    centroid over its area; "solidity", the mask's area over its convex hull's; "sym3", "sym4", "sym5", the strength
    of each order of symmetry relative to a clean triangle's, square's and star's."""
    m = cover > 0.5
    ys, xs = m.nonzero()
    y0, x0 = ys.min(), xs.min()
    crop, m = cover[y0 : ys.max() + 1, x0 : xs.max() + 1], m[y0 : ys.max() + 1, x0 : xs.max() + 1]
    sym = _symmetry(crop, cx - x0, cy - y0)
    area = float(m.sum())
    # The centroid weighs the soft edge too, so a deformed object's can fall outside its mask's box: probe the box's
    # nearest pixel, which lies on the border and so encloses no hole.
    hole = _hole(m, int(np.clip(cx - x0, 0, m.shape[1] - 1)), int(np.clip(cy - y0, 0, m.shape[0] - 1)))
    return {"hole": hole / area, "solidity": area / _hull_area(m), **{f"sym{k}": sym[k] / _REF[k] for k in sym}}


def classify(c: dict[str, float]) -> tuple[str, float]:
    """Shape from `cues`, and the margin (0..1) of the deciding cues from their thresholds: a ring has an enclosed
    hole; a star is concave; otherwise the strongest of the 3-, 4- and 5-fold symmetries (each over its threshold)
    names a triangle, square or star, and none a circle."""
    if c["hole"] >= HOLE:
        return "ring", min(1.0, c["hole"] / HOLE - 1)
    margin = 1 - c["hole"] / HOLE
    if c["solidity"] < SOLID:
        return "star", min(margin, (SOLID - c["solidity"]) / SOLID * 4)
    strength = {k: c[f"sym{k}"] / t for k, t in SYMMETRY.items()}
    best, second = sorted(strength.values(), reverse=True)[:2]
    shape = {3: "triangle", 4: "square", 5: "star"}[max(strength, key=strength.get)] if best >= 1 else "circle"
    return shape, min(margin, abs(best - 1), best - second)


def _object(img: np.ndarray, bg: np.ndarray, ys: np.ndarray, xs: np.ndarray, c: int, purity: float):
    """One object from its pixels (ys, xs) and colour index c, or None if it is too faint to be one."""
    seg = _FG[c] - bg
    alpha = (((img[ys, xs] - bg) @ seg) / (seg @ seg)).clip(0, 1)
    area = float(alpha.sum())
    if area < MIN_AREA or not (alpha > 0.5).any():
        return None
    cx, cy = float((alpha * (xs + 0.5)).sum() / area), float((alpha * (ys + 0.5)).sum() / area)
    cover = np.zeros(img.shape[:2], np.float32)
    cover[ys, xs] = alpha
    shape, margin = classify(cues(cover, cx, cy))
    size = "small" if math.sqrt(area / _UNIT_AREA[shape]) < _R_MID else "large"
    col, row = min(max(int(cx * 3 / SIZE), 0), 2), min(max(int(cy * 3 / SIZE), 0), 2)
    conf = float(np.clip(min(margin, (purity - VOTE) / (1 - VOTE)), 0, 1))
    return ObjDetection(list(COLOURS)[c], shape, PLACES[row * 3 + col], size, torch.from_numpy(cover > 0.5), area,
                        (cx, cy), conf)  # fmt: skip


def _scene(img: np.ndarray, labels: np.ndarray, b: int) -> SceneDetection:
    bg = _BG[b]
    objects = []
    ys_all, xs_all = labels.nonzero()
    if len(ys_all):
        diff = img[ys_all, xs_all] - bg  # (N, 3)
        segs = _FG - bg  # (6, 3)
        proj = ((diff @ segs.T) / (segs**2).sum(1)).clip(0, 1)  # (N, 6): coverage if the pixel were of that colour
        resid = np.linalg.norm(diff[:, None] - proj[..., None] * segs, axis=-1)  # distance to each segment
        nearest = resid.argmin(1)
        core = proj[np.arange(len(nearest)), nearest] >= CORE
        comp = labels[ys_all, xs_all]
        for lab in np.unique(comp):
            in_c = comp == lab
            ys, xs = ys_all[in_c], xs_all[in_c]
            votes = np.bincount(nearest[in_c & core], minlength=len(_FG))
            cols: list[int] = []  # strongest first; a weaker colour counts only as a separate patch (see SEPARATE)
            where = {}
            for c in np.argsort(-votes):
                if votes[c] < max(VOTE * votes.sum(), 3):
                    break
                sel = (nearest[in_c] == c) & core[in_c]
                where[c] = np.array([xs[sel].mean(), ys[sel].mean()])
                if all(np.linalg.norm(where[c] - where[k]) >= SEPARATE for k in cols):
                    cols.append(c)
            if not cols:
                continue
            which = np.array(cols)[resid[in_c][:, cols].argmin(1)]  # each pixel to the nearest of the colours
            for c in cols:
                sel = which == c
                o = _object(img, bg, ys[sel], xs[sel], c, votes[c] / votes[cols].sum())
                if o is not None:
                    objects.append(o)
    order = list(COLOURS)
    objects.sort(key=lambda o: (order.index(o.colour), PLACES.index(o.place)))
    return SceneDetection(list(BACKGROUNDS)[b], tuple(objects))


def detect_batch(images) -> list[SceneDetection]:
    """Detections of images: a (B, 3, H, W) tensor in [-1, 1], or a list of tensors / PIL images."""
    imgs = to_images(images)
    border = np.concatenate([imgs[:, 0], imgs[:, -1], imgs[:, :, 0], imgs[:, :, -1]], 1)  # (B, 4*SIZE, 3)
    b = ((_BG[None] - np.median(border, 1)[:, None]) ** 2).sum(-1).argmin(1)
    away = np.linalg.norm(imgs - _BG[b][:, None, None], axis=-1) > AWAY
    labels = _components(away)
    return [_scene(img, lab, int(i)) for img, lab, i in zip(imgs, labels, b)]


def detect(image) -> SceneDetection:
    """Detection of one image: a (3, H, W) tensor in [-1, 1] or a PIL image."""
    return detect_batch(image)[0]


# ------------------------------------------------------------------------------------------------ comparing


def mask_iou(a: Tensor, b: Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def image_iou(img_a, img_b) -> float:
    """IoU of the union of all object masks of two images: whether the layout stayed, whatever the objects are."""
    a, b = (x if isinstance(x, SceneDetection) else detect(x) for x in (img_a, img_b))
    empty = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    return mask_iou(sum((o.mask for o in a.objects), empty), sum((o.mask for o in b.objects), empty))


def match(a: SceneDetection, b: SceneDetection) -> list[tuple[ObjDetection | None, ObjDetection | None]]:
    """Pairs of objects of two detections: by colour first, then the rest by shape, nearest centres first; an object
    left over is paired with None. Every object of either detection appears once."""
    left_a, left_b, pairs = list(a.objects), list(b.objects), []
    for same in (lambda x, y: x.colour == y.colour, lambda x, y: x.shape == y.shape):
        cands = sorted(
            ((math.dist(x.centre, y.centre), i, j) for i, x in enumerate(left_a) for j, y in enumerate(left_b)
             if same(x, y)), key=lambda t: t[0]
        )  # fmt: skip
        used_a, used_b = set(), set()
        for _, i, j in cands:
            if i not in used_a and j not in used_b:
                used_a.add(i)
                used_b.add(j)
                pairs.append((left_a[i], left_b[j]))
        left_a = [x for i, x in enumerate(left_a) if i not in used_a]
        left_b = [y for j, y in enumerate(left_b) if j not in used_b]
    return pairs + [(x, None) for x in left_a] + [(None, y) for y in left_b]


def semantic_similarity(img_a, img_b) -> float:
    """In [0, 1]: how much of image a's meaning image b keeps - the mean over matched object pairs (`match`) of
    mask IoU if colour and shape agree (else 0; an object missing from either side counts 0), times 1 if the
    backgrounds agree (else 0). 1 for identical images; a deleted, added or recoloured object counts as damage."""
    a = img_a if isinstance(img_a, SceneDetection) else detect(img_a)
    b = img_b if isinstance(img_b, SceneDetection) else detect(img_b)
    if a.background != b.background:
        return 0.0
    pairs = match(a, b)
    if not pairs:
        return 1.0
    scores = [
        mask_iou(x.mask, y.mask) if x and y and (x.colour, x.shape) == (y.colour, y.shape) else 0.0 for x, y in pairs
    ]
    return sum(scores) / len(scores)
