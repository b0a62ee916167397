"""A procedural world of one coloured shape on a plain background, with an English caption.

Everything is deterministic from a seed and rendered on the fly (no files): scenes are sampled as small index
tensors on a CPU generator, and `render_batch` draws them with signed-distance fields (1 px anti-aliasing) on any
device, so training renders its images on the GPU.

Some colour x shape and shape x place pairs are held out: the train split never contains them, the heldout split
always contains at least one, so text-to-image accuracy on heldout prompts measures composition, not memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

SIZE = 128  # image side in pixels

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
RADIUS = {"small": 10.0, "large": 17.0}  # circumradius in pixels; a large shape still fits its 42.7 px cell

# Never in the train split (see module docstring).
HELDOUT_COLOUR_SHAPE = {
    ("red", "star"),
    ("blue", "ring"),
    ("green", "triangle"),
    ("yellow", "square"),
    ("purple", "circle"),
}
HELDOUT_SHAPE_PLACE = {("circle", "top right"), ("square", "bottom left"), ("star", "center"), ("triangle", "left")}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    place: str
    size: str
    background: str
    say_size: bool = True  # whether the caption names the size
    dx: float = 0.0  # jitter of the centre within the place, pixels
    dy: float = 0.0
    scale: float = 1.0  # jitter of the radius


def caption(scene: Scene) -> str:
    size = f"{scene.size} " if scene.say_size else ""
    article = "an" if (size or scene.colour)[0] in "aeiou" else "a"
    return (
        f"{article} {size}{scene.colour} {scene.shape} {PLACE_PHRASE[scene.place]} on a {scene.background} background"
    )


_CAPTION_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+) (?:at|on|in) the (?P<place>[a-z ]+?) "
    r"on a (?P<bg>\w+) background$"
)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (jitter zero; size 'large' when the caption does not say)."""
    m = _CAPTION_RE.match(text.strip())
    if (
        not m
        or m["colour"] not in COLOURS
        or m["shape"] not in SHAPES
        or m["place"] not in PLACES
        or m["bg"] not in BACKGROUNDS
    ):
        raise ValueError(f"not a caption of this world: {text!r}")
    return Scene(m["shape"], m["colour"], m["place"], m["size"] or "large", m["bg"], say_size=m["size"] is not None)


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class SceneBatch:
    """Scenes as index tensors (CPU), the form training samples and renders without Python loops."""

    shape: Tensor
    colour: Tensor
    place: Tensor
    size: Tensor
    background: Tensor
    say_size: Tensor  # bool
    dx: Tensor
    dy: Tensor
    scale: Tensor

    def __len__(self) -> int:
        return self.shape.shape[0]

    def scenes(self) -> list[Scene]:
        cols, bgs = list(COLOURS), list(BACKGROUNDS)
        return [
            Scene(SHAPES[s], cols[c], PLACES[p], SIZES[z], bgs[b], bool(w), float(x), float(y), float(k))
            for s, c, p, z, b, w, x, y, k in zip(*(t.tolist() for t in self.__dict__.values()))
        ]

    @staticmethod
    def of(scenes: list[Scene]) -> SceneBatch:
        cols, bgs = list(COLOURS), list(BACKGROUNDS)
        return SceneBatch(
            torch.tensor([SHAPES.index(s.shape) for s in scenes]),
            torch.tensor([cols.index(s.colour) for s in scenes]),
            torch.tensor([PLACES.index(s.place) for s in scenes]),
            torch.tensor([SIZES.index(s.size) for s in scenes]),
            torch.tensor([bgs.index(s.background) for s in scenes]),
            torch.tensor([s.say_size for s in scenes]),
            torch.tensor([s.dx for s in scenes]),
            torch.tensor([s.dy for s in scenes]),
            torch.tensor([s.scale for s in scenes]),
        )

    def caption_index(self) -> Tensor:
        """Index of each caption in `all_captions()` (jitter does not change a caption)."""
        size_word = torch.where(self.say_size, self.size + 1, torch.zeros_like(self.size))  # 0 none, 1 small, 2 large
        idx = self.shape
        for t, n in (
            (self.colour, len(COLOURS)),
            (self.place, len(PLACES)),
            (size_word, 3),
            (self.background, len(BACKGROUNDS)),
        ):
            idx = idx * n + t
        return idx


def all_captions() -> list[str]:
    """Every caption of the world, in `SceneBatch.caption_index` order (2430 strings), so training can tokenize once."""
    out = []
    for shape in SHAPES:
        for colour in COLOURS:
            for place in PLACES:
                for size_word in (None, "small", "large"):
                    for bg in BACKGROUNDS:
                        out.append(
                            caption(Scene(shape, colour, place, size_word or "large", bg, size_word is not None))
                        )
    return out


def _mask(pairs: set[tuple[str, str]], first: tuple[str, ...], second: tuple[str, ...]) -> Tensor:
    m = torch.zeros(len(first), len(second), dtype=torch.bool)
    for a, b in pairs:
        m[first.index(a), second.index(b)] = True
    return m


_COLOUR_SHAPE = _mask({(c, s) for c, s in HELDOUT_COLOUR_SHAPE}, tuple(COLOURS), SHAPES)
_SHAPE_PLACE = _mask(HELDOUT_SHAPE_PLACE, SHAPES, PLACES)
_SPLIT_OFFSET = {"train": 0, "heldout": 1_000_003, "test": 2_000_003}  # disjoint seed streams per split


def is_heldout(b: SceneBatch) -> Tensor:
    """True where a scene contains a held-out pair."""
    return _COLOUR_SHAPE[b.colour, b.shape] | _SHAPE_PLACE[b.shape, b.place]


def sample_batch(n: int, generator: torch.Generator, split: str = "train") -> SceneBatch:
    """n random scenes. train: no held-out pair; heldout: at least one; test: any scene (for the autoencoder)."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}: train, heldout or test")
    parts: list[SceneBatch] = []
    have = 0
    while have < n:  # rejection sampling: ~24% of uniform scenes hold a held-out pair, so this ends fast
        m = 2 * (n - have) + 16
        g = generator

        def ri(k: int) -> Tensor:
            return torch.randint(k, (m,), generator=g)

        b = SceneBatch(
            ri(len(SHAPES)), ri(len(COLOURS)), ri(len(PLACES)), ri(len(SIZES)), ri(len(BACKGROUNDS)),
            torch.rand(m, generator=g) < 0.7,
            (torch.rand(m, generator=g) * 2 - 1) * 3.0, (torch.rand(m, generator=g) * 2 - 1) * 3.0,
            1 + (torch.rand(m, generator=g) * 2 - 1) * 0.08,
        )  # fmt: skip
        keep = {"train": ~is_heldout(b), "heldout": is_heldout(b), "test": torch.ones(m, dtype=torch.bool)}[split]
        idx = keep.nonzero()[:, 0][: n - have]
        parts.append(SceneBatch(*(t[idx] for t in b.__dict__.values())))
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
    """Signed distance in pixels of offsets p (B, H, W, 2) from the centre to a shape of circumradius (B,)."""
    r = radius[:, None, None]
    if kind == "circle":
        return p.norm(dim=-1) - r
    if kind == "ring":  # annulus between 0.5 r and r
        return (p.norm(dim=-1) - 0.75 * r).abs() - 0.25 * r
    return _sdf_polygon(p / r[..., None], _polygon(kind).to(p)) * r  # polygon SDF scales with r


def centres(b: SceneBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Centre x, y and circumradius in pixels of each scene."""
    cell = SIZE / 3
    cx = (b.place % 3 + 0.5) * cell + b.dx
    cy = (b.place // 3 + 0.5) * cell + b.dy
    r = torch.tensor([RADIUS[s] for s in SIZES])[b.size] * b.scale
    return cx, cy, r


def render_batch(b: SceneBatch, device: torch.device | str = "cpu") -> Tensor:
    """Images (B, 3, 128, 128) in [-1, 1]. Coverage = clamp(0.5 - sdf) gives a 1 px anti-aliased edge."""
    cx, cy, r = (t.to(device, torch.float32) for t in centres(b))
    coords = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5  # pixel centres
    p = torch.stack(
        torch.broadcast_tensors(coords[None, None, :] - cx[:, None, None], coords[None, :, None] - cy[:, None, None]),
        -1,
    )
    cover = torch.zeros(len(b), SIZE, SIZE, device=device)
    shape = b.shape.to(device)
    for k, kind in enumerate(SHAPES):  # each kind computed only for its own images
        idx = (shape == k).nonzero()[:, 0]
        if len(idx):
            cover[idx] = (0.5 - shape_sdf(kind, p[idx], r[idx])).clamp(0, 1)
    fg = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device)[b.colour.to(device)] / 255
    bg = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32, device=device)[b.background.to(device)] / 255
    cover = cover[:, None]
    img = bg[:, :, None, None] * (1 - cover) + fg[:, :, None, None] * cover
    return img * 2 - 1


def render(scenes: list[Scene], device: torch.device | str = "cpu") -> Tensor:
    return render_batch(SceneBatch.of(scenes), device)
