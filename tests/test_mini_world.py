"""mini.world (the procedural world) and mini.detect (its analytic detector)."""

import itertools

import torch
from PIL import Image

from mini.detect import detect, image_iou
from mini.world import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SHAPE_PLACE,
    PLACES,
    SHAPES,
    SIZES,
    Scene,
    caption,
    is_heldout,
    parse_caption,
    render,
    sample_batch,
    sample_scenes,
)  # fmt: skip


def test_deterministic_from_seed():
    a, b = sample_scenes(64, seed=3), sample_scenes(64, seed=3)
    assert a == b and a != sample_scenes(64, seed=4)
    assert torch.equal(render(a[:4]), render(b[:4]))
    img = render(a[:2])
    assert img.shape == (2, 3, 128, 128) and img.min() >= -1 and img.max() <= 1


def test_splits():
    train = sample_scenes(2000, seed=0, split="train")
    assert not any(
        (s.colour, s.shape) in HELDOUT_COLOUR_SHAPE or (s.shape, s.place) in HELDOUT_SHAPE_PLACE for s in train
    )
    held = sample_scenes(300, seed=0, split="heldout")
    assert all((s.colour, s.shape) in HELDOUT_COLOUR_SHAPE or (s.shape, s.place) in HELDOUT_SHAPE_PLACE for s in held)
    # Every held-out pair shows up in the heldout split, and the train split still covers every single attribute.
    assert HELDOUT_COLOUR_SHAPE <= {(s.colour, s.shape) for s in held}
    assert HELDOUT_SHAPE_PLACE <= {(s.shape, s.place) for s in held}
    for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("place", PLACES), ("background", BACKGROUNDS)):
        assert {getattr(s, attr) for s in train} == set(values)
    test = sample_batch(500, torch.Generator().manual_seed(0), "test")
    assert 0 < is_heldout(test).float().mean() < 1


def test_detector_on_every_kind_colour_place():
    # Every shape x colour x place once, with random size, background and jitter.
    g = torch.Generator().manual_seed(0)
    scenes = [
        Scene(shape, colour, place, SIZES[int(torch.randint(2, (1,), generator=g))],
              list(BACKGROUNDS)[int(torch.randint(3, (1,), generator=g))],
              dx=float(torch.rand(1, generator=g) * 6 - 3), dy=float(torch.rand(1, generator=g) * 6 - 3),
              scale=float(1 + (torch.rand(1, generator=g) * 2 - 1) * 0.08))
        for shape, colour, place in itertools.product(SHAPES, COLOURS, PLACES)
    ]  # fmt: skip
    right = 0
    for s, img in zip(scenes, render(scenes)):
        d = detect(img)
        right += (d.shape, d.colour, d.place, d.size, d.background) == (
            s.shape,
            s.colour,
            s.place,
            s.size,
            s.background,
        )
    assert right / len(scenes) >= 0.99


def test_detector_reads_pil_images():
    s = Scene("star", "orange", "bottom right", "small", "gray")
    arr = ((render([s])[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    d = detect(Image.fromarray(arr))
    assert (d.shape, d.colour, d.place, d.size, d.background) == ("star", "orange", "bottom right", "small", "gray")


def test_iou():
    a = render([Scene("square", "red", "center", "large", "white")])[0]
    moved = render([Scene("square", "red", "left", "large", "white")])[0]
    nudged = render([Scene("square", "red", "center", "large", "white", dx=12)])[0]
    assert image_iou(a, a) == 1.0
    assert image_iou(a, moved) < 0.5 and image_iou(a, nudged) < 0.5


def test_captions_parse_back():
    for s in sample_scenes(200, seed=1, split="test"):
        text = caption(s)
        assert text.startswith(("a ", "an ")) and text.endswith(f"on a {s.background} background")
        p = parse_caption(text)
        assert (p.shape, p.colour, p.place, p.background, p.say_size) == (
            s.shape,
            s.colour,
            s.place,
            s.background,
            s.say_size,
        )
        assert p.size == s.size or not s.say_size
    assert (
        caption(Scene("circle", "red", "top left", "small", "white"))
        == "a small red circle at the top left on a white background"
    )
    assert (
        caption(Scene("ring", "orange", "center", "large", "black", say_size=False))
        == "an orange ring in the center on a black background"
    )
