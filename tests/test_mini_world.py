"""mini.world (world 2): sampling, splits, the caption grammar, and rendering against independent computations."""

import math

import pytest
import torch

from mini.world import (
    BACKGROUNDS,
    COLOURS,
    COUNT_PROBS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SHAPE_PLACE,
    MAX_OBJECTS,
    PLACES,
    RADIUS,
    SAY_PLACE,
    SAY_SIZE,
    SHAPES,
    SIZE,
    VOCABULARY,
    Obj,
    Scene,
    SceneBatch,
    caption,
    coverage,
    heldout_objects,
    parse_caption,
    render,
    render_batch,
    sample_batch,
    sample_scenes,
)  # fmt: skip


def is_heldout(o: Obj) -> bool:
    return (o.colour, o.shape) in HELDOUT_COLOUR_SHAPE or (o.shape, o.place) in HELDOUT_SHAPE_PLACE


def test_deterministic_from_seed():
    a, b = sample_scenes(64, seed=3), sample_scenes(64, seed=3)
    assert a == b and a != sample_scenes(64, seed=4)
    assert torch.equal(render(a[:4]), render(b[:4]))
    img = render(a[:2])
    assert img.shape == (2, 3, SIZE, SIZE) and img.min() >= -1 and img.max() <= 1


def test_scenes_follow_the_rules_and_the_stated_frequencies():
    scenes = sample_scenes(3000, seed=0, split="test")
    for s in scenes:
        assert 1 <= len(s.objects) <= MAX_OBJECTS
        assert len({o.colour for o in s.objects}) == len(s.objects) == len({o.place for o in s.objects})
        assert [o.colour for o in s.objects] == [c for c in COLOURS if c in {o.colour for o in s.objects}]
    counts = torch.bincount(torch.tensor([len(s.objects) for s in scenes]), minlength=4)[1:] / len(scenes)
    assert torch.allclose(counts, torch.tensor(COUNT_PROBS), atol=0.03)
    objs = [o for s in scenes for o in s.objects]
    assert abs(sum(o.say_place for o in objs) / len(objs) - SAY_PLACE) < 0.03
    assert abs(sum(o.say_size for o in objs) / len(objs) - SAY_SIZE) < 0.03
    for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("place", PLACES)):
        assert {getattr(o, attr) for o in objs} == set(values)
    assert {s.background for s in scenes} == set(BACKGROUNDS)


def test_splits():
    train = sample_scenes(2000, seed=0, split="train")
    assert not any(is_heldout(o) for s in train for o in s.objects)
    held = sample_scenes(400, seed=0, split="heldout")
    assert all(any(is_heldout(o) for o in s.objects) for s in held)
    objs = [o for s in held for o in s.objects]
    assert HELDOUT_COLOUR_SHAPE <= {(o.colour, o.shape) for o in objs}
    assert HELDOUT_SHAPE_PLACE <= {(o.shape, o.place) for o in objs}
    # The train split still has every single attribute value, and the splits draw different scenes.
    for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("place", PLACES)):
        assert {getattr(o, attr) for s in train for o in s.objects} == set(values)
    assert sample_scenes(50, 0, "test") != sample_scenes(50, 0, "train")
    b = sample_batch(500, torch.Generator().manual_seed(0), "test")
    flags = heldout_objects(b)
    assert flags.tolist() == [[i < len(s.objects) and is_heldout(s.objects[i]) for i in range(MAX_OBJECTS)]
                              for s in b.scenes()]  # fmt: skip
    assert 0 < flags.any(1).float().mean() < 1
    with pytest.raises(ValueError, match="unknown split"):
        sample_scenes(1, 0, "valid")


def test_batch_round_trip():
    scenes = sample_scenes(100, seed=7, split="test")
    b = SceneBatch.of(scenes)
    assert b.scenes() == scenes and len(b) == 100
    assert b.captions() == [caption(s) for s in scenes]
    assert torch.equal(render_batch(b), render(scenes))


def test_caption_grammar():
    red = Obj("circle", "red", "top left", "small")
    orange = Obj("ring", "orange", "center", "large", say_size=False)
    blue = Obj("star", "blue", "bottom", "large", say_place=False)
    assert caption(Scene((red,), "white")) == "a small red circle at the top left on a white background"
    # Objects in palette order, whatever order the scene lists them in; "an" before a vowel.
    assert (caption(Scene((orange, blue, red), "black"))
            == "a small red circle at the top left and a large blue star and an orange ring in the center"
               " on a black background")  # fmt: skip
    assert caption(Scene((Obj("square", "orange", "left", "small", False, False),), "gray")) == (
        "an orange square on a gray background"
    )
    p = parse_caption("a large blue star and an orange ring in the center on a black background")
    assert p == Scene((Obj("star", "blue", None, "large", False, True), Obj("ring", "orange", "center", None, True,
                                                                              False)), "black")  # fmt: skip


def test_captions_parse_back():
    for s in sample_scenes(300, seed=1, split="test"):
        text = caption(s)
        assert set(text.split()) <= set(VOCABULARY)
        p = parse_caption(text)
        assert p.background == s.background and len(p.objects) == len(s.objects)
        for q, o in zip(p.objects, s.objects):
            assert (q.shape, q.colour, q.say_place, q.say_size) == (o.shape, o.colour, o.say_place, o.say_size)
            assert q.place == (o.place if o.say_place else None) and q.size == (o.size if o.say_size else None)


@pytest.mark.parametrize(
    "text",
    [
        "a red circle",  # no background
        "a red circle on a pink background",
        "a red circle and a red square on a white background",  # colours repeat
        "a red circle at the top and a blue square at the top on a white background",  # places repeat
        "a red hexagon on a white background",
        "a huge red circle on a white background",
        "a red circle at the middle on a white background",
    ],
)
def test_parser_rejects(text):
    with pytest.raises(ValueError, match="not a caption of this world"):
        parse_caption(text)


def test_scene_rules():
    with pytest.raises(ValueError, match="distinct colours"):
        Scene((Obj("circle", "red", "top", "small"), Obj("star", "red", "left", "small")), "white")
    with pytest.raises(ValueError, match="share a place"):
        Scene((Obj("circle", "red", "top", "small"), Obj("star", "blue", "top", "small")), "white")
    with pytest.raises(ValueError, match="every object's place and size"):
        SceneBatch.of([parse_caption("a red circle on a white background")])


def test_render_is_the_composite_of_the_coverage():
    scenes = sample_scenes(40, seed=9, split="test")
    b = SceneBatch.of(scenes)
    cov = coverage(b)  # (B, K, H, W)
    assert cov.min() >= 0 and cov.max() <= 1
    assert ((cov > 0).sum(1) <= 1).all()  # no two objects share a pixel, anti-aliased edges included
    img = render(scenes)
    for i, s in enumerate(scenes):
        want = torch.tensor(BACKGROUNDS[s.background], dtype=torch.float32)[:, None, None] / 255 * (1 - cov[i].sum(0))
        for k, o in enumerate(s.objects):
            want = want + torch.tensor(COLOURS[o.colour], dtype=torch.float32)[:, None, None] / 255 * cov[i, k]
        assert torch.allclose(img[i], want * 2 - 1, atol=1e-5)
        assert (cov[i, len(s.objects) :] == 0).all()


def test_coverage_masks_sit_in_their_cells_with_the_right_area():
    cell = SIZE / 3
    scenes = sample_scenes(200, seed=10, split="test")
    cov = coverage(SceneBatch.of(scenes))
    unit = {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4, "ring": 0.75 * math.pi,
            "star": 10 * 0.5 * 0.45 * math.sin(math.radians(36))}  # fmt: skip
    for i, s in enumerate(scenes):
        for k, o in enumerate(s.objects):
            ys, xs = (cov[i, k] > 0).nonzero(as_tuple=True)
            col, row = PLACES.index(o.place) % 3, PLACES.index(o.place) // 3
            assert col * cell <= xs.min() and xs.max() + 1 <= (col + 1) * cell
            assert row * cell <= ys.min() and ys.max() + 1 <= (row + 1) * cell
            r = RADIUS[o.size] * o.scale
            assert float(cov[i, k].sum()) == pytest.approx(unit[o.shape] * r**2, rel=0.03)


def test_the_64_prompt_file_is_the_worlds_own_sample(repo_root):
    """prompts/mini_64.json (the paper's sweep size, for a vitality sweep of flux-mini whose sample of prompts settles
    the borderline layers) is 64 captions of training-split scenes, seeds 500 on, as the README says it was made: a
    change of the world's sampler or grammar shows here."""
    from stableflow.sweep import load_prompts

    prompts = load_prompts(repo_root / "prompts" / "mini_64.json")
    scenes = sample_scenes(64, 2026, "train")
    assert [(p.id, p.prompt, p.seed) for p in prompts] == [
        (f"w{i:02d}", caption(s), 500 + i) for i, s in enumerate(scenes)
    ]
