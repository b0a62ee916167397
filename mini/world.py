"""World 2: one to three coloured shapes on a plain background, with an English caption that may leave the layout open.

Scenes are deterministic from a seed and rendered on the fly (no files): they are sampled as small index tensors
on a CPU generator, and `render_batch` draws them with signed-distance fields (1 px anti-aliasing) on any device, so
training renders its images on the GPU.

Grammar of a caption (the parser below is its reference):

    caption  := object (" and " object)* " on a " background " background"
    object   := article " " [size " "] colour " " shape [" " place-phrase]
    article  := "a" | "an"                    ("an" before a vowel)
    size     := "small" | "large"             (named with probability SAY_SIZE)
    place    := "at the top left" | "at the top" | ... | "in the center" | ...   (named with probability SAY_PLACE)

Objects are named in palette order of their colours (red, green, blue, yellow, purple, orange): colours are distinct
within a scene, so the order is total and carries no layout. Objects sit in distinct cells of a 3x3 grid and never
overlap. A caption that omits an object's place or size leaves it to the noise, which is what makes a same-seed edit
prompt move things the edit should not touch: the phenomenon Stable Flow's injection exists to prevent.

Some colour x shape and shape x place pairs are held out: no object of the train split has one, every heldout scene
has at least one object with one, so text-to-image accuracy on heldout prompts measures composition, not memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

SIZE = 128  # image side in pixels
MAX_OBJECTS = 3
COUNT_PROBS = (0.25, 0.35, 0.40)  # one, two, three objects
SAY_PLACE = 0.3  # probability that a caption names an object's place
SAY_SIZE = 0.5  # ... and its size

SHAPES = ("circle", "square", "triangle", "star", "ring")
# Foreground colours, far apart in RGB and from every background colour, so the detector's nearest-colour rule is safe.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 200),
    "orange": (250, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
# 3x3 grid, row-major; the caption phrase of each place.
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PLACE_PHRASE = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}  # fmt: skip
SIZES = ("small", "large")
RADIUS = {"small": 10.0, "large": 17.0}  # circumradius in pixels
JITTER = 2.0  # centre offset within the cell, pixels
SCALE_JITTER = 0.06  # relative radius jitter; 17 * 1.06 + 2 = 20.0 < 21.3 (half a cell): objects never overlap

# Never in the train split (see module docstring).
HELDOUT_COLOUR_SHAPE = {
    ("red", "star"),
    ("blue", "ring"),
    ("green", "triangle"),
    ("yellow", "square"),
    ("purple", "circle"),
}
HELDOUT_SHAPE_PLACE = {("circle", "top right"), ("square", "bottom left"), ("star", "center"), ("triangle", "left")}

# Every word a caption can use: the text encoders' vocabulary (mini.tokenizers makes word-level tokenizers of it).
VOCABULARY = sorted(
    {"a", "an", "and", "on", "background", *SIZES, *COLOURS, *SHAPES, *BACKGROUNDS}
    | {w for p in PLACE_PHRASE.values() for w in p.split()}
)


@dataclass(frozen=True)
class Obj:
    """One object. In a parsed caption, a place or size the caption does not name is None."""

    shape: str
    colour: str
    place: str | None
    size: str | None
    say_place: bool = True
    say_size: bool = True
    dx: float = 0.0  # jitter of the centre within the cell, pixels
    dy: float = 0.0
    scale: float = 1.0  # jitter of the radius


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in caption order: palette order of the colours
    background: str

    def __post_init__(self) -> None:
        cols = [o.colour for o in self.objects]
        if not 1 <= len(cols) <= MAX_OBJECTS or len(set(cols)) != len(cols):
            raise ValueError(f"a scene holds 1-{MAX_OBJECTS} objects of distinct colours, not {cols}")
        places = [o.place for o in self.objects if o.place is not None]
        if len(set(places)) != len(places):
            raise ValueError(f"two objects share a place: {places}")

    def sorted(self) -> Scene:
        """The same scene with its objects in caption order."""
        order = list(COLOURS)
        return replace(self, objects=tuple(sorted(self.objects, key=lambda o: order.index(o.colour))))


def object_phrase(o: Obj) -> str:
    size = f"{o.size} " if o.say_size and o.size else ""
    article = "an" if (size or o.colour)[0] in "aeiou" else "a"
    place = f" {PLACE_PHRASE[o.place]}" if o.say_place and o.place else ""
    return f"{article} {size}{o.colour} {o.shape}{place}"


def caption(scene: Scene) -> str:
    objects = " and ".join(object_phrase(o) for o in scene.sorted().objects)
    return f"{objects} on a {scene.background} background"


_OBJECT_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+)(?: (?:at|on|in) the (?P<place>[a-z ]+))?$"
)
_CAPTION_RE = re.compile(r"^(?P<objects>.+) on a (?P<bg>\w+) background$")


def parse_caption(text: str) -> Scene:
    """The scene a caption describes: places and sizes it does not name are None, jitter zero."""
    m = _CAPTION_RE.match(text.strip())
    if not m or m["bg"] not in BACKGROUNDS:
        raise ValueError(f"not a caption of this world: {text!r}")
    objects = []
    for phrase in m["objects"].split(" and "):
        o = _OBJECT_RE.match(phrase)
        if not o or o["colour"] not in COLOURS or o["shape"] not in SHAPES or (o["place"] or "top") not in PLACES:
            raise ValueError(f"not a caption of this world: {text!r} (at {phrase!r})")
        objects.append(
            Obj(o["shape"], o["colour"], o["place"], o["size"], o["place"] is not None, o["size"] is not None)
        )
    try:
        return Scene(tuple(objects), m["bg"])
    except ValueError as e:
        raise ValueError(f"not a caption of this world: {text!r} ({e})") from None


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class SceneBatch:
    """Scenes as index tensors (CPU), the form training samples and renders without Python loops. Object fields are
    (B, MAX_OBJECTS), slots in caption order; slots at or past `count` are unused."""

    count: Tensor  # (B,)
    shape: Tensor
    colour: Tensor
    place: Tensor
    size: Tensor
    say_place: Tensor  # bool
    say_size: Tensor  # bool
    dx: Tensor
    dy: Tensor
    scale: Tensor
    background: Tensor  # (B,)

    def __len__(self) -> int:
        return self.count.shape[0]

    @property
    def present(self) -> Tensor:
        """(B, MAX_OBJECTS) bool: which slots hold an object."""
        return torch.arange(MAX_OBJECTS) < self.count[:, None]

    def select(self, idx: Tensor) -> SceneBatch:
        return SceneBatch(*(t[idx] for t in self.__dict__.values()))

    def scenes(self) -> list[Scene]:
        cols, bgs = list(COLOURS), list(BACKGROUNDS)
        rows = [t.tolist() for t in self.__dict__.values()]
        out = []
        for n, s, c, p, z, wp, wz, x, y, k, b in zip(*rows):
            objs = tuple(
                Obj(SHAPES[s[i]], cols[c[i]], PLACES[p[i]], SIZES[z[i]], wp[i], wz[i], x[i], y[i], k[i])
                for i in range(n)
            )
            out.append(Scene(objs, bgs[b]))
        return out

    @staticmethod
    def of(scenes: list[Scene]) -> SceneBatch:
        """Scenes (fully specified: every place and size given) as a batch, objects in caption order."""
        cols, bgs = list(COLOURS), list(BACKGROUNDS)
        pad = Obj(SHAPES[0], cols[0], PLACES[0], SIZES[0], False, False)

        def field(get) -> Tensor:
            return torch.tensor([[get(o) for o in s.sorted().objects + (pad,) * (MAX_OBJECTS - len(s.objects))]
                                 for s in scenes])  # fmt: skip

        if any(o.place is None or o.size is None for s in scenes for o in s.objects):
            raise ValueError("rendering needs every object's place and size")
        return SceneBatch(
            torch.tensor([len(s.objects) for s in scenes]),
            field(lambda o: SHAPES.index(o.shape)),
            field(lambda o: cols.index(o.colour)),
            field(lambda o: PLACES.index(o.place)),
            field(lambda o: SIZES.index(o.size)),
            field(lambda o: o.say_place),
            field(lambda o: o.say_size),
            field(lambda o: float(o.dx)),
            field(lambda o: float(o.dy)),
            field(lambda o: float(o.scale)),
            torch.tensor([bgs.index(s.background) for s in scenes]),
        )

    def captions(self) -> list[str]:
        return [caption(s) for s in self.scenes()]


def _mask(pairs: set[tuple[str, str]], first: tuple[str, ...], second: tuple[str, ...]) -> Tensor:
    m = torch.zeros(len(first), len(second), dtype=torch.bool)
    for a, b in pairs:
        m[first.index(a), second.index(b)] = True
    return m


_COLOUR_SHAPE = _mask(HELDOUT_COLOUR_SHAPE, tuple(COLOURS), SHAPES)
_SHAPE_PLACE = _mask(HELDOUT_SHAPE_PLACE, SHAPES, PLACES)
_SPLIT_OFFSET = {"train": 0, "heldout": 1_000_003, "test": 2_000_003}  # disjoint seed streams per split


def heldout_objects(b: SceneBatch) -> Tensor:
    """(B, MAX_OBJECTS) bool: present objects with a held-out colour x shape or shape x place pair."""
    return (_COLOUR_SHAPE[b.colour, b.shape] | _SHAPE_PLACE[b.shape, b.place]) & b.present


def _uniform_batch(m: int, g: torch.Generator) -> SceneBatch:
    """m scenes with every choice uniform (counts by COUNT_PROBS), slots sorted into caption order."""
    k = MAX_OBJECTS
    count = torch.multinomial(torch.tensor(COUNT_PROBS), m, replacement=True, generator=g) + 1
    colour = torch.rand(m, len(COLOURS), generator=g).argsort(1)[:, :k]  # distinct colours
    place = torch.rand(m, len(PLACES), generator=g).argsort(1)[:, :k]  # distinct cells
    present = torch.arange(k) < count[:, None]
    order = torch.where(present, colour, len(COLOURS) + torch.arange(k)).argsort(1)  # caption order, unused slots last

    def u(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(m, k, generator=g)

    fields = dict(
        shape=torch.randint(len(SHAPES), (m, k), generator=g),
        colour=colour,
        place=place,
        size=torch.randint(len(SIZES), (m, k), generator=g),
        say_place=torch.rand(m, k, generator=g) < SAY_PLACE,
        say_size=torch.rand(m, k, generator=g) < SAY_SIZE,
        dx=u(-JITTER, JITTER),
        dy=u(-JITTER, JITTER),
        scale=u(1 - SCALE_JITTER, 1 + SCALE_JITTER),
    )
    fields = {n: t.gather(1, order) for n, t in fields.items()}
    return SceneBatch(count, **fields, background=torch.randint(len(BACKGROUNDS), (m,), generator=g))


def sample_batch(n: int, generator: torch.Generator, split: str = "train") -> SceneBatch:
    """n random scenes. train: no object with a held-out pair; heldout: at least one; test: any scene."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}: train, heldout or test")
    parts: list[SceneBatch] = []
    have = 0
    while have < n:  # rejection sampling; either side keeps a large share of uniform scenes, so this ends fast
        b = _uniform_batch(2 * (n - have) + 16, generator)
        held = heldout_objects(b).any(1)
        keep = {"train": ~held, "heldout": held, "test": torch.ones_like(held)}[split]
        idx = keep.nonzero()[:, 0][: n - have]
        parts.append(b.select(idx))
        have += len(idx)
    return SceneBatch(*(torch.cat(ts) for ts in zip(*(p.__dict__.values() for p in parts))))


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """n scenes, the same for the same (seed, split); see `sample_batch` for the splits."""
    g = torch.Generator().manual_seed(seed + _SPLIT_OFFSET.get(split, 0))
    return sample_batch(n, g, split).scenes()


# ------------------------------------------------------------------------------------------------ rendering


def _polygon(kind: str) -> Tensor:
    """Unit-circumradius vertices (x right, y down) of the polygon shapes, pointing up."""
    if kind == "square":
        a = math.sqrt(0.5)  # square inscribed in the unit circle
        return torch.tensor([[-a, -a], [a, -a], [a, a], [-a, a]])
    if kind == "triangle":
        ang = torch.tensor([-90.0, 30.0, 150.0]) * math.pi / 180
        return torch.stack([ang.cos(), ang.sin()], 1)
    if kind == "star":
        ang = (torch.arange(10) * 36.0 - 90.0) * math.pi / 180
        r = torch.where(torch.arange(10) % 2 == 0, 1.0, 0.45)
        return torch.stack([r * ang.cos(), r * ang.sin()], 1)
    raise ValueError(kind)


def _sdf_polygon(p: Tensor, verts: Tensor) -> Tensor:
    """Signed distance (negative inside) from points p (..., 2) to a closed polygon; crossing rule for the sign.
    Works on x and y separately: reductions over a size-2 last axis are slow on CPU."""
    x, y = p[..., 0], p[..., 1]
    vs = verts.tolist()
    d2 = torch.full_like(x, float("inf"))
    inside = torch.zeros_like(x, dtype=torch.bool)
    for (ax, ay), (bx, by) in zip(vs, vs[1:] + vs[:1]):
        ex, ey, wx, wy = bx - ax, by - ay, x - ax, y - ay
        h = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        d2 = torch.minimum(d2, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
        if ey != 0:  # the edge crosses the horizontal ray to the right of p
            inside ^= ((ay <= y) != (by <= y)) & (x < ax + wy * (ex / ey))
    return torch.where(inside, -d2.sqrt(), d2.sqrt())


def shape_sdf(kind: str, p: Tensor, radius: Tensor) -> Tensor:
    """Signed distance in pixels of offsets p (N, H, W, 2) from the centre to a shape of circumradius (N,)."""
    r = radius[:, None, None]
    if kind == "circle":
        return p.norm(dim=-1) - r
    if kind == "ring":  # annulus between 0.5 r and r
        return (p.norm(dim=-1) - 0.75 * r).abs() - 0.25 * r
    return _sdf_polygon(p / r[..., None], _polygon(kind).to(p)) * r  # polygon SDF scales with r


def centres(b: SceneBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Centre x, y and circumradius in pixels of each object slot, (B, MAX_OBJECTS) each."""
    cell = SIZE / 3
    cx = (b.place % 3 + 0.5) * cell + b.dx
    cy = (b.place // 3 + 0.5) * cell + b.dy
    r = torch.tensor([RADIUS[s] for s in SIZES])[b.size] * b.scale
    return cx, cy, r


def coverage(b: SceneBatch, device: torch.device | str = "cpu") -> Tensor:
    """(B, MAX_OBJECTS, 128, 128) in [0, 1]: each object's anti-aliased coverage (zero for unused slots); also the
    exact ground-truth masks (> 0.5) the graders compare against."""
    cx, cy, r = (t.to(device, torch.float32).flatten() for t in centres(b))
    coords = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5  # pixel centres
    cover = torch.zeros(len(cx), SIZE, SIZE, device=device)
    shape, present = b.shape.flatten().to(device), b.present.flatten().to(device)
    for k, kind in enumerate(SHAPES):  # each kind computed only for its own objects
        idx = ((shape == k) & present).nonzero()[:, 0]
        if len(idx):
            p = torch.stack(torch.broadcast_tensors(coords[None, None, :] - cx[idx, None, None],
                                                    coords[None, :, None] - cy[idx, None, None]), -1)  # fmt: skip
            cover[idx] = (0.5 - shape_sdf(kind, p, r[idx])).clamp(0, 1)
    return cover.view(len(b), MAX_OBJECTS, SIZE, SIZE)


def render_batch(b: SceneBatch, device: torch.device | str = "cpu") -> Tensor:
    """Images (B, 3, 128, 128) in [-1, 1]. Coverage = clamp(0.5 - sdf) gives a 1 px anti-aliased edge."""
    cover = coverage(b, device)[:, :, None]  # (B, K, 1, H, W)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device) / 255
    fg = palette[b.colour.to(device)][..., None, None]  # (B, K, 3, 1, 1)
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32, device=device)[b.background.to(device)] / 255
    img = bg[:, :, None, None].expand(-1, -1, SIZE, SIZE)
    for k in range(MAX_OBJECTS):  # objects never overlap, so the order of compositing does not matter
        img = img * (1 - cover[:, k]) + fg[:, k] * cover[:, k]
    return img * 2 - 1


def render(scenes: list[Scene], device: torch.device | str = "cpu") -> Tensor:
    return render_batch(SceneBatch.of(scenes), device)


# ------------------------------------------------------------------------------------------------ words

_WORD = {w: i for i, w in enumerate(VOCABULARY)}
_PLACE_WORDS = torch.tensor([[_WORD[w] for w in PLACE_PHRASE[p].split()] + [-1] * (4 - len(PLACE_PHRASE[p].split()))
                             for p in PLACES])  # fmt: skip
_SEGMENT = 9  # "and", article, size, colour, shape, up to four place words


def caption_words(b: SceneBatch) -> Tensor:
    """(B, L) indices into VOCABULARY of each caption's words, left-aligned, -1 after the end: exactly the words of
    `caption` (a test pins the two against each other), built with tensor ops so training needs no strings."""
    n, k = len(b), MAX_OBJECTS
    cols, sizes = torch.tensor([_WORD[c] for c in COLOURS]), torch.tensor([_WORD[s] for s in SIZES])
    shapes, bgs = torch.tensor([_WORD[s] for s in SHAPES]), torch.tensor([_WORD[g] for g in BACKGROUNDS])
    an = ~b.say_size & (b.colour == list(COLOURS).index("orange"))  # the only word of the world that starts a vowel
    seg = torch.full((n, k, _SEGMENT), -1)
    seg[:, 1:, 0] = _WORD["and"]
    seg[..., 1] = torch.where(an, _WORD["an"], _WORD["a"])
    seg[..., 2] = torch.where(b.say_size, sizes[b.size], -1)
    seg[..., 3] = cols[b.colour]
    seg[..., 4] = shapes[b.shape]
    seg[..., 5:] = torch.where(b.say_place[..., None], _PLACE_WORDS[b.place], -1)
    seg[~b.present] = -1
    tail = torch.stack([torch.full((n,), _WORD["on"]), torch.full((n,), _WORD["a"]), bgs[b.background],
                        torch.full((n,), _WORD["background"])], 1)  # fmt: skip
    words = torch.cat([seg.flatten(1), tail], 1)
    order = torch.sort((words < 0).int(), dim=1, stable=True).indices  # valid words first, in their order
    return words.gather(1, order)
