"""mini.detect (detector 2) against ground truth that does not come from the detector: the sampled scenes and the
world's exact coverage masks, on clean renders and on renders degraded the way an autoencoder round trip and a
generator degrade them (blur, noise, JPEG, 2x down/up-sampling, soft edges, deformed shapes)."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mini.detect import detect, detect_batch, image_iou, mask_iou, match, semantic_similarity
from mini.world import (
    BACKGROUNDS,
    COLOURS,
    PLACES,
    SHAPES,
    SIZE,
    Obj,
    Scene,
    SceneBatch,
    _polygon,
    _sdf_polygon,
    centres,
    coverage,
    render,
    sample_scenes,
)  # fmt: skip

ATTRS = ("colour", "shape", "place", "size")


# ------------------------------------------------------------------------------------------------ degradations


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7).expand(3, 1, 1, 7), groups=3)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1).expand(3, 1, 7, 1), groups=3)


def down_up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), scale_factor=2,
                         mode="bilinear")  # fmt: skip


def jpeg(x: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG quantisation without chroma subsampling (an autoencoder has none)."""
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(((im.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(
            buf, format="JPEG", quality=quality, subsampling=0
        )
        out.append(torch.from_numpy(np.asarray(Image.open(buf)).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def degrade(x: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """blur: gaussian sigma 0.7-1 px + noise + JPEG; resample: bilinear 2x down/up + noise + JPEG; all: both."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("resample", "all"):
        x = down_up(x)
    if kind in ("blur", "all"):
        x = torch.cat([blur(im[None], 0.7 + 0.3 * float(torch.rand(1, generator=g))) for im in x])
    x = x + 0.04 * torch.randn(x.shape, generator=g)  # sigma 0.02 on the 0..1 scale
    return jpeg(x).clamp(-1, 1)


def render_custom(scenes: list[Scene], sdf, edge: float = 1.0) -> torch.Tensor:
    """Render with a caller's signed distance function sdf(kind, p, r) and an anti-aliased edge `edge` px wide."""
    b = SceneBatch.of(scenes)
    cx, cy, r = centres(b)
    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5
    out = []
    for i, s in enumerate(scenes):
        img = torch.tensor(BACKGROUNDS[s.background], dtype=torch.float32)[:, None, None].expand(3, SIZE, SIZE) / 255
        for k, o in enumerate(s.sorted().objects):
            p = torch.stack(torch.broadcast_tensors(coords[None, :] - cx[i, k], coords[:, None] - cy[i, k]), -1)[None]
            cov = (0.5 - sdf(o.shape, p, r[i, k : k + 1]) / edge).clamp(0, 1)
            img = img * (1 - cov) + torch.tensor(COLOURS[o.colour])[:, None, None] / 255 * cov
        out.append(img * 2 - 1)
    return torch.stack(out)


def world_sdf(kind, p, r):
    from mini.world import shape_sdf

    return shape_sdf(kind, p, r)[0]


def deformed_sdf(kind, p, r):
    """Shapes the way a generator draws them: stars fat (inner radius 0.62, not 0.45) with rounded points; squares
    and triangles 15% taller than wide with rounded corners; rings with a narrow hole (0.35 of the radius, not 0.5)."""
    rr, q = float(r[0]), p[0].clone()
    if kind == "ring":
        return (q.norm(dim=-1) - 0.675 * rr).abs() - 0.325 * rr
    if kind == "circle":
        return q.norm(dim=-1) - rr
    if kind == "star":
        ang = (torch.arange(10) * 36.0 - 90.0) * math.pi / 180
        verts = torch.stack([ang.cos(), ang.sin()], 1) * torch.where(torch.arange(10) % 2 == 0, 1.0, 0.62)[:, None]
    else:
        q[..., 1] = q[..., 1] / 1.15
        verts = _polygon(kind)
    core = 0.7 * rr  # shrink, then round the corners back out by 0.3 of that
    return _sdf_polygon(q / core, verts) * core - 0.3 * core


def accuracy(scenes: list[Scene], images: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy per object (an object missing from the detection counts wrong in every attribute),
    object count and background per scene."""
    dets = detect_batch(images)
    right = dict.fromkeys(ATTRS, 0)
    for s, d in zip(scenes, dets):
        for o in s.objects:
            got = d.find(o.colour)
            for a in ATTRS:
                right[a] += got is not None and getattr(got, a) == getattr(o, a)
    n = sum(len(s.objects) for s in scenes)
    acc = {a: v / n for a, v in right.items()}
    acc["count"] = sum(len(d.objects) == len(s.objects) for s, d in zip(scenes, dets)) / len(scenes)
    acc["background"] = sum(d.background == s.background for s, d in zip(scenes, dets)) / len(scenes)
    return acc


def mask_ious(scenes: list[Scene], images: torch.Tensor) -> list[float]:
    """IoU of each detected object's mask with the world's exact mask (coverage > 0.5)."""
    truth = coverage(SceneBatch.of(scenes)) > 0.5
    out = []
    for i, (s, d) in enumerate(zip(scenes, detect_batch(images))):
        for k, o in enumerate(s.sorted().objects):
            got = d.find(o.colour)
            out.append(mask_iou(got.mask, truth[i, k]) if got else 0.0)
    return out


@pytest.fixture(scope="module")
def quick() -> tuple[list[Scene], torch.Tensor]:
    scenes = sample_scenes(30, seed=5, split="test")
    return scenes, render(scenes)


# ------------------------------------------------------------------------------------------------ accuracy


def test_every_shape_colour_background_clean():
    scenes = [
        Scene((Obj(shape, colour, PLACES[(i * 7) % 9], ("small", "large")[i % 2], dx=1.5, dy=-1.0, scale=0.95),), bg)
        for i, (shape, colour, bg) in enumerate((s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS)
    ]
    acc = accuracy(scenes, render(scenes))
    assert min(acc.values()) == 1.0, acc


def test_clean_quick(quick):
    scenes, x = quick
    assert min(accuracy(scenes, x).values()) == 1.0
    assert min(mask_ious(scenes, x)) >= 0.9


@pytest.mark.parametrize("kind", ["blur", "resample"])
def test_degraded_quick(quick, kind):
    scenes, x = quick
    acc = accuracy(scenes, degrade(x, kind))
    assert min(acc.values()) >= 0.97, acc


@pytest.mark.slow
def test_clean_accuracy_and_masks_600():
    scenes = sample_scenes(600, seed=11, split="test")
    x = render(scenes)
    acc = accuracy(scenes, x)
    assert min(acc.values()) >= 0.99, acc
    ious = mask_ious(scenes, x)
    assert min(ious) >= 0.9, min(ious)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["blur", "resample", "all"])
def test_degraded_accuracy_600(kind):
    scenes = sample_scenes(600, seed=12, split="test")
    acc = accuracy(scenes, degrade(render(scenes), kind, seed=3))
    assert min(acc.values()) >= 0.97, acc


@pytest.mark.slow
def test_soft_edges_and_deformed_shapes_600():
    scenes = sample_scenes(600, seed=13, split="test")
    acc = accuracy(scenes, render_custom(scenes, world_sdf, edge=3.0))
    assert min(acc.values()) >= 0.97, acc
    acc = accuracy(scenes, degrade(render_custom(scenes, deformed_sdf), "blur"))
    assert min(acc[a] for a in ("colour", "shape", "place", "count", "background")) >= 0.97, acc  # sizes change


def test_deformed_shapes_keep_their_names():
    # Detector 1 fit rigid equal-area templates and kept the best IoU: it read all these rings and most of these
    # stars as circles (63% right).
    scenes = [Scene((Obj(k, c, "center", z),), b) for k in SHAPES for c in ("red", "blue", "yellow")
              for z in ("small", "large") for b in ("gray", "white")]  # fmt: skip
    dets = detect_batch(render_custom(scenes, deformed_sdf))
    assert [d.objects[0].shape for d in dets] == [s.objects[0].shape for s in scenes]


def test_neighbours_that_blur_into_each_other_stay_two_objects():
    # Two large circles in adjacent cells, pushed together: the gap is under 3 px, and blur bridges it.
    a = Obj("circle", "orange", "center", "large", dx=-2.0, scale=1.06)
    b = Obj("circle", "red", "left", "large", dx=2.0, scale=1.06)
    s = Scene((a, b), "white")
    d = detect(degrade(render([s]), "all")[0])
    assert [(o.colour, o.shape, o.place) for o in d.objects] == [
        ("red", "circle", "left"),
        ("orange", "circle", "center"),
    ]


def test_inputs_tensor_pil_and_batch_agree():
    scenes = sample_scenes(3, seed=2, split="test")
    x = render(scenes)
    pil = Image.fromarray(((x[1].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    one, from_pil, batch = detect(x[1]), detect(pil), detect_batch(x)[1]
    key = [(o.colour, o.shape, o.place, o.size) for o in one.objects]
    assert key == [(o.colour, o.shape, o.place, o.size) for o in from_pil.objects]
    assert key == [(o.colour, o.shape, o.place, o.size) for o in batch.objects]
    assert one.objects[0].mask.dtype == torch.bool and one.objects[0].mask.shape == (SIZE, SIZE)


def test_other_sizes_are_refused():
    with pytest.raises(ValueError, match="reads 128x128 RGB world images"):
        detect(torch.zeros(3, 64, 64))


def test_blank_image_has_no_objects():
    x = render([Scene((Obj("circle", "red", "center", "small"),), "black")])
    blank = torch.full_like(x[0], -1 + 2 * 15 / 255)
    d = detect(blank)
    assert d.background == "black" and d.objects == ()


# ------------------------------------------------------------------------------------------------ comparing


def test_mask_iou_and_match():
    square = torch.zeros(10, 10, dtype=torch.bool)
    square[:4, :4] = True
    shifted = torch.zeros_like(square)
    shifted[2:6, :4] = True
    assert mask_iou(square, square) == 1.0 and mask_iou(square, shifted) == pytest.approx(8 / 24)
    a = detect(
        render([Scene((Obj("circle", "red", "left", "large"), Obj("star", "blue", "right", "small")), "gray")])[0]
    )
    b = detect(
        render([Scene((Obj("circle", "green", "left", "large"), Obj("star", "blue", "top", "small")), "gray")])[0]
    )
    pairs = [(x and (x.colour, x.shape), y and (y.colour, y.shape)) for x, y in match(a, b)]
    # The layout alone: the circle kept its pixels (recoloured), the star moved to another cell.
    circle, stars = a.find("red").mask.sum(), a.find("blue").mask.sum() + b.find("blue").mask.sum()
    assert image_iou(a, b) == pytest.approx(float(circle / (circle + stars)), abs=1e-6)
    assert pairs == [(("blue", "star"), ("blue", "star")), (("red", "circle"), ("green", "circle"))]


def test_semantic_similarity_sees_meaning():
    red = Obj("circle", "red", "center", "large")
    blue, green = Obj("square", "blue", "left", "small"), Obj("star", "green", "top right", "large")
    one = render([Scene((red,), "gray")])[0]
    three = render([Scene((red, blue, green), "gray")])[0]
    assert semantic_similarity(one, one) == 1.0 and semantic_similarity(three, three) == 1.0
    deleted = torch.full_like(one, 128 / 255 * 2 - 1)  # the gray background alone
    assert semantic_similarity(one, deleted) <= 0.7
    recoloured = render([Scene((Obj("circle", "orange", "center", "large"),), "gray")])[0]
    assert semantic_similarity(one, recoloured) <= 0.5
    reshaped = render([Scene((Obj("square", "red", "center", "large"),), "gray")])[0]
    assert semantic_similarity(one, reshaped) <= 0.5
    assert semantic_similarity(one, render([Scene((red,), "white")])[0]) == 0.0
    # One object of three deleted: about two thirds; moved: less than kept; a degraded copy: nearly all.
    two = render([Scene((red, blue), "gray")])[0]
    assert semantic_similarity(three, two) == pytest.approx(2 / 3, abs=0.02)
    assert semantic_similarity(three, two) == pytest.approx(semantic_similarity(two, three), abs=1e-9)
    moved = render([Scene((red, blue, Obj("star", "green", "bottom", "large")), "gray")])[0]
    assert semantic_similarity(three, moved) == pytest.approx(2 / 3, abs=0.02)
    assert semantic_similarity(three, degrade(three[None], "blur")[0]) >= 0.85


def test_centroid_outside_the_mask_box_is_no_hole():
    """A generated blob's soft coverage can pull its centroid outside its mask's bounding box (seen in the ablation on
    flux-mini 2); the hole probe then looks at the box's nearest border pixel, which encloses nothing."""
    from mini.detect import cues

    cover = np.zeros((128, 128), np.float32)
    cover[40:51, 40:51] = 1.0  # the mask: an 11x11 square
    cover[:, :31] = 0.49  # a wide faint smear left of it, under the mask threshold
    yy, xx = np.mgrid[:128, :128]
    cx, cy = float((cover * (xx + 0.5)).sum() / cover.sum()), float((cover * (yy + 0.5)).sum() / cover.sum())
    assert cx < 40  # left of the box
    c = cues(cover, cx, cy)
    assert c["hole"] == 0 and c["solidity"] == pytest.approx(1.0)
