"""The paper's edit families on world 2, each a caption transform plus a grader (mini.detect reads the images).

    attribute    recolour one object to a colour not in the scene
    replacement  change one object's shape
    addition     add an object of a new colour and shape, its place named or left open
    background   change the background
    size         the non-rigid analogue: flip the size of an object whose size the caption names, or name a size
                 the caption leaves open

An `Edit` holds the source and edited scenes as their captions name them (places and sizes the caption leaves open
are None). The edited object is known by its source colour (colours are distinct within a scene), the added one by
its own. Grading (`grade`) compares the reference image with the edited one:

- success: the target has the new attribute and keeps the others (recolour: same shape; replacement: same colour;
  size: same colour and shape), the new object is there (at its place, if named), or the background changed;
- untouched_iou: mean mask IoU between reference and edit of every object the edit does not touch (matched by
  colour; a missing one counts 0), None when there is none;
- open_iou: the same over the untouched objects whose place the source caption leaves open, the ones a same-seed
  edit is free to move (a named place holds its object whatever the injection); None when there is none;
- untouched_kept: every untouched object is still there with its colour and shape.

Measure edit success only on references that are right (`reference_ok`): they show the source caption, and the
edit changes something in them (a size edit names a size the reference does not already have; an addition's named
cell is free).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .detect import SceneDetection, detect, mask_iou
from .world import (
    BACKGROUNDS,
    COLOURS,
    MAX_OBJECTS,
    PLACES,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    caption,
    parse_caption,
    sample_scenes,
)

FAMILIES = ("attribute", "replacement", "addition", "background", "size")
SAY_ADDED_PLACE = 0.5  # probability that an addition names the new object's place


@dataclass(frozen=True)
class Edit:
    family: str
    source: Scene  # as the source caption names it
    target: Scene  # as the edit caption names it
    colour: str | None  # the edited object's colour in the source; the added object's; None for a background edit
    new: str  # the new colour, shape, size or background; for an addition, the new object's shape
    place: str | None = None  # an addition's named place

    @property
    def source_caption(self) -> str:
        return caption(self.source)

    @property
    def edit_caption(self) -> str:
        return caption(self.target)

    @property
    def untouched(self) -> tuple[str, ...]:
        """Colours of the source objects the edit must leave as they are."""
        return tuple(o.colour for o in self.source.objects if self.family == "addition" or o.colour != self.colour)


def _named(scene: Scene | str) -> Scene:
    """The scene as its caption names it: places and sizes the caption leaves open become None."""
    return parse_caption(scene if isinstance(scene, str) else caption(scene))


def make_edit(scene: Scene | str, family: str, rng: random.Random) -> Edit:
    """An edit of the family for a scene (or caption). Raises ValueError for an addition to a full scene."""
    src = _named(scene)
    objs = list(src.objects)
    i = rng.randrange(len(objs))
    o = objs[i]
    free_colours = [c for c in COLOURS if c not in {x.colour for x in objs}]
    if family == "attribute":
        new = rng.choice(free_colours)
        objs[i] = replace(o, colour=new)
    elif family == "replacement":
        new = rng.choice([s for s in SHAPES if s != o.shape])
        objs[i] = replace(o, shape=new)
    elif family == "size":
        new = rng.choice(SIZES) if o.size is None else SIZES[1 - SIZES.index(o.size)]
        objs[i] = replace(o, size=new, say_size=True)
    elif family == "background":
        new = rng.choice([b for b in BACKGROUNDS if b != src.background])
        return Edit(family, src, replace(src, background=new), None, new)
    elif family == "addition":
        if len(objs) >= MAX_OBJECTS:
            raise ValueError(f"an addition needs a scene of fewer than {MAX_OBJECTS} objects")
        colour, new = rng.choice(free_colours), rng.choice(SHAPES)
        named = [x.place for x in objs if x.place is not None]
        place = rng.choice([p for p in PLACES if p not in named]) if rng.random() < SAY_ADDED_PLACE else None
        added = Obj(new, colour, place, None, place is not None, False)
        return Edit(family, src, Scene((*objs, added), src.background).sorted(), colour, new, place)
    else:
        raise ValueError(f"unknown edit family {family!r}: one of {', '.join(FAMILIES)}")
    return Edit(family, src, Scene(tuple(objs), src.background).sorted(), o.colour, new)


def source_scenes(n: int, seed: int, family: str, split: str = "test") -> list[Scene]:
    """The n whole scenes (every place and size) that `edit_cases` edits, in its order: its ground truth."""
    scenes = [s for s in sample_scenes(4 * n + 16, seed, split) if family != "addition" or len(s.objects) < MAX_OBJECTS]
    return scenes[:n]


def edit_cases(n: int, seed: int, family: str, split: str = "test") -> list[tuple[str, str, Edit]]:
    """n (source caption, edit caption, edit) of one family, the same for the same arguments. Source scenes come
    from `mini.world.sample_scenes(., seed, split)`; an addition draws only scenes with room for one more object."""
    rng = random.Random(f"{seed}-{family}-{split}")
    edits = [make_edit(s, family, rng) for s in source_scenes(n, seed, family, split)]
    return [(e.source_caption, e.edit_caption, e) for e in edits]


# ------------------------------------------------------------------------------------------------ grading


def shows(image, scene: Scene | str) -> bool:
    """Whether an image shows what a caption (or scene, as its caption names it) says: the background, exactly its
    objects by colour and shape, and each named place and size."""
    d = image if isinstance(image, SceneDetection) else detect(image)
    want = _named(scene)
    if d.background != want.background or len(d.objects) != len(want.objects):
        return False
    for o in want.objects:
        got = d.find(o.colour)
        if got is None or got.shape != o.shape or o.place not in (None, got.place) or o.size not in (None, got.size):
            return False
    return True


def reference_ok(reference, edit: Edit) -> bool:
    """Whether a reference image can measure this edit: it shows the source caption and the edit would change it."""
    d = reference if isinstance(reference, SceneDetection) else detect(reference)
    if not shows(d, edit.source):
        return False
    if edit.family == "size":
        return d.find(edit.colour).size != edit.new
    if edit.family == "addition" and edit.place is not None:
        return all(o.place != edit.place for o in d.objects)
    return True


@dataclass(frozen=True)
class EditGrade:
    success: bool
    untouched_iou: float | None  # None: the edit leaves no object untouched
    untouched_kept: bool
    open_iou: float | None = None  # None: no untouched object's place is left open


def grade(reference, edited, edit: Edit) -> EditGrade:
    """Grade an edited image against its reference (images or their detections); see the module docstring."""
    ref = reference if isinstance(reference, SceneDetection) else detect(reference)
    out = edited if isinstance(edited, SceneDetection) else detect(edited)
    if edit.family == "background":
        success = out.background == edit.new
    elif edit.family == "addition":
        new = out.find(edit.colour)
        success = new is not None and new.shape == edit.new and edit.place in (None, new.place)
    else:
        was = ref.find(edit.colour)
        now = out.find(edit.new if edit.family == "attribute" else edit.colour)
        if was is None or now is None:
            success = False
        elif edit.family == "attribute":  # the new colour on the same shape, and the old colour gone
            success = now.shape == was.shape and out.find(edit.colour) is None
        elif edit.family == "replacement":
            success = now.shape == edit.new
        else:  # size: the same shape at the new size
            success = now.shape == was.shape and now.size == edit.new
    ious, open_ious, kept = [], [], True
    for o in edit.source.objects:
        if o.colour not in edit.untouched:
            continue
        a, b = ref.find(o.colour), out.find(o.colour)
        if a is None:  # the reference lacks it: nothing to keep (reference_ok rules such references out)
            continue
        ious.append(mask_iou(a.mask, b.mask) if b is not None else 0.0)
        if o.place is None:
            open_ious.append(ious[-1])
        kept &= b is not None and b.shape == a.shape
    return EditGrade(success, mean(ious), kept, mean(open_ious))


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None (an IoU no object measured); None when there is none."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
