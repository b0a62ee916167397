"""mini.edits: the caption transforms change exactly what their family says, and the grader tells a done edit from
an undone one, a kept object from a moved or recoloured one, on rendered scenes with hand-made edits."""

import random
from dataclasses import replace

import pytest
from test_mini_detect import degrade

from mini.edits import FAMILIES, Edit, edit_cases, grade, make_edit, reference_ok, shows
from mini.world import MAX_OBJECTS, PLACES, Obj, Scene, parse_caption, render, sample_scenes


def named(scene: Scene) -> dict[str, tuple]:
    """colour -> (shape, place, size) as a caption names them."""
    return {o.colour: (o.shape, o.place, o.size) for o in scene.objects}


@pytest.mark.parametrize("family", FAMILIES)
def test_transforms_change_only_their_target(family):
    cases = edit_cases(40, seed=0, family=family)
    assert len(cases) == 40
    for src_cap, edit_cap, e in cases:
        src, tgt = parse_caption(src_cap), parse_caption(edit_cap)
        assert (src, tgt) == (e.source, e.target) and src_cap != edit_cap
        a, b = named(src), named(tgt)
        if family == "background":
            assert a == b and src.background != tgt.background == e.new
            continue
        assert src.background == tgt.background
        if family == "addition":
            assert len(src.objects) < MAX_OBJECTS and set(b) == set(a) | {e.colour} and e.colour not in a
            assert b[e.colour] == (e.new, e.place, None)
            assert e.place is None or e.place not in {p for _, p, _ in a.values()}
            assert {c: b[c] for c in a} == a
            continue
        assert e.colour in a
        for c in a.keys() - {e.colour}:  # untouched objects keep their phrase
            assert b[c] == a[c]
        assert set(e.untouched) == a.keys() - {e.colour}
        shape, place, size = a[e.colour]
        if family == "attribute":
            assert e.new not in a and b[e.new] == (shape, place, size) and e.colour not in b
        elif family == "replacement":
            assert b[e.colour] == (e.new, place, size) and e.new != shape
        else:  # size: flipped if named, else named now
            assert b[e.colour] == (shape, place, e.new) and size != e.new
    # Both kinds of addition and of size edit occur.
    if family == "addition":
        assert {e.place is None for *_, e in cases} == {True, False}
    if family == "size":
        assert {e.source.objects[[o.colour for o in e.source.objects].index(e.colour)].size is None
                for *_, e in cases} == {True, False}  # fmt: skip


def test_edit_cases_are_deterministic():
    assert edit_cases(20, 3, "attribute") == edit_cases(20, 3, "attribute")
    assert edit_cases(20, 3, "attribute") != edit_cases(20, 4, "attribute")
    assert [c[0] for c in edit_cases(10, 3, "size", "heldout")] != [c[0] for c in edit_cases(10, 3, "size", "test")]


def test_bad_requests():
    full = Scene(tuple(Obj("circle", c, p, "small") for c, p in zip(("red", "green", "blue"), PLACES)), "white")
    with pytest.raises(ValueError, match="fewer than 3"):
        make_edit(full, "addition", random.Random(0))
    with pytest.raises(ValueError, match="unknown edit family 'recolor'"):
        make_edit(full, "recolor", random.Random(0))


# ------------------------------------------------------------------------------------------------ grading


def realise(full: Scene, e: Edit, free_place: str | None = None) -> Scene:
    """The fully specified scene a perfect edit of `full` shows: the target changed, everything else in place."""
    objs = list(full.objects)
    if e.family == "background":
        return replace(full, background=e.new)
    if e.family == "addition":
        place = e.place or free_place or next(p for p in PLACES if p not in {o.place for o in objs})
        return Scene((*objs, Obj(e.new, e.colour, place, "small")), full.background)
    i = [o.colour for o in objs].index(e.colour)
    field = {"attribute": "colour", "replacement": "shape", "size": "size"}[e.family]
    objs[i] = replace(objs[i], **{field: e.new})
    return Scene(tuple(objs), full.background)


@pytest.mark.parametrize("family", FAMILIES)
def test_grader_on_perfect_and_undone_edits(family):
    rng = random.Random(1)
    scenes = [s for s in sample_scenes(60, seed=2, split="test") if family != "addition" or len(s.objects) < 3][:12]
    graded = 0
    for full in scenes:
        e = make_edit(full, family, rng)
        if e.place in {o.place for o in full.objects}:  # the named cell is taken: the reference cannot measure it
            assert not reference_ok(render([full])[0], e)
            continue
        ref, done = render([full, realise(full, e)])
        ok = reference_ok(ref, e)  # a size edit may name the size the reference already has
        assert ok == (family != "size" or named(full)[e.colour][2] != e.new)
        assert shows(ref, e.source) and shows(done, e.target)
        graded += 1
        g = grade(ref, done, e)
        assert g.success and g.untouched_kept
        assert g.untouched_iou is None if not e.untouched else g.untouched_iou == 1.0
        assert g.open_iou in (None, 1.0)
        undone = grade(ref, ref, e)  # the edit ignored: nothing changed
        assert undone.success != ok and undone.untouched_kept
        # An autoencoder-like round trip of a perfect edit still grades as done and kept.
        g = grade(degrade(ref[None], "blur")[0], degrade(done[None], "blur")[0], e)
        assert g.success and g.untouched_kept and (g.untouched_iou is None or g.untouched_iou >= 0.85)
    assert graded >= 8


def test_grader_sees_drift_and_damage():
    red, blue = Obj("circle", "red", "left", "large"), Obj("square", "blue", "top right", "small")
    full = Scene((red, blue), "gray")
    e = Edit("attribute", parse_caption("a red circle and a blue square on a gray background"),
             parse_caption("a red circle and a green square on a gray background"), "blue", "green")  # fmt: skip
    ref = render([full])[0]
    moved = render([Scene((replace(red, place="bottom"), replace(blue, colour="green")), "gray")])[0]
    g = grade(ref, moved, e)
    assert g.success and g.untouched_kept and g.untouched_iou == 0.0  # recoloured, but the red circle moved a cell
    nudged = render([Scene((replace(red, dx=6.0), replace(blue, colour="green")), "gray")])[0]
    assert 0.3 < grade(ref, nudged, e).untouched_iou < 0.85
    reshaped = render([Scene((replace(red, shape="star"), replace(blue, colour="green")), "gray")])[0]
    assert not grade(ref, reshaped, e).untouched_kept
    lost = render([Scene((replace(blue, colour="green"),), "gray")])[0]
    g = grade(ref, lost, e)
    assert g.success and not g.untouched_kept and g.untouched_iou == 0.0
    # A recolour that also changed the shape, or left the old colour behind, is not the edit asked for.
    assert not grade(ref, render([Scene((red, replace(blue, colour="green", shape="star")), "gray")])[0], e).success
    both = Scene((red, blue, Obj("square", "green", "bottom", "small")), "gray")
    assert not grade(ref, render([both])[0], e).success


def test_open_iou_counts_only_objects_whose_place_the_caption_leaves_open():
    """Three objects, the blue square recoloured: the red circle's place is named, the yellow star's is not. A drift
    of the star shows in open_iou alone; a drift of the circle in untouched_iou but not in open_iou."""
    red, blue = Obj("circle", "red", "left", "large"), Obj("square", "blue", "top right", "small")
    star = Obj("star", "yellow", "bottom", "large")
    src = "a red circle on the left and a blue square and a yellow star on a gray background"
    e = Edit("attribute", parse_caption(src), parse_caption(src.replace("blue", "green")), "blue", "green")
    ref = render([Scene((red, blue, star), "gray")])[0]
    green = replace(blue, colour="green")
    star_moved = grade(ref, render([Scene((red, green, replace(star, place="bottom left")), "gray")])[0], e)
    assert (star_moved.untouched_iou, star_moved.open_iou) == (0.5, 0.0)
    circle_moved = grade(ref, render([Scene((replace(red, place="center"), green, star), "gray")])[0], e)
    assert (circle_moved.untouched_iou, circle_moved.open_iou) == (0.5, 1.0)
    named_only = Edit("attribute", parse_caption("a red circle on the left and a blue square on a gray background"),
                      parse_caption("a red circle on the left and a green square on a gray background"), "blue",
                      "green")  # fmt: skip
    g = grade(render([Scene((red, blue), "gray")])[0], render([Scene((red, green), "gray")])[0], named_only)
    assert g.untouched_iou == 1.0 and g.open_iou is None


def test_reference_checks():
    full = Scene((Obj("star", "red", "center", "large"), Obj("ring", "blue", "left", "small")), "white")
    ref = render([full])[0]
    assert shows(ref, "a red star and a blue ring on a white background")
    assert shows(ref, "a large red star in the center and a small blue ring on the left on a white background")
    assert not shows(ref, "a red star on a white background")  # an object too many
    assert not shows(ref, "a red circle and a blue ring on a white background")
    assert not shows(ref, "a small red star and a blue ring on a white background")
    assert not shows(ref, "a red star at the top and a blue ring on a white background")
    assert not shows(ref, "a red star and a blue ring on a black background")
    src = parse_caption("a red star and a blue ring on a white background")
    size = Edit("size", src, parse_caption("a small red star and a blue ring on a white background"), "red", "small")
    assert reference_ok(ref, size)
    assert not reference_ok(ref, replace(size, new="large"))  # already large: the edit would change nothing
    added = parse_caption("a red star and a green circle on the left and a blue ring on a white background")
    add = Edit("addition", src, added, "green", "circle", "left")
    assert not reference_ok(ref, add)  # the named cell is taken
    assert reference_ok(ref, replace(add, place="top"))
    assert not reference_ok(render([replace(full, background="gray")])[0], size)
