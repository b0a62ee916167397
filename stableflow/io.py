"""Writing the demos' outputs: every file appears complete or not at all, so a killed run never leaves a
half-written PNG or JSON behind, and a resumed run can trust every file it finds."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin, UnidentifiedImageError

from flux.pipeline import tensor_to_pil

if TYPE_CHECKING:
    import torch

    ImageLike = Image.Image | np.ndarray | torch.Tensor

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "caption_lines",
    "make_grid",
    "read_png_metadata",
    "save_gif",
    "save_png",
    "tensor_to_pil",
    "to_pil",
]

# The process umask, read once: temp files are created 0600, and the final file should get the usual permissions.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file next to `path` for writing; on success it is fsynced and renamed onto `path`.

    If the body raises (or the process dies), `path` keeps its old content and the temp file is removed.
    `mode` is "wb" or "w" (text, UTF-8, "\\n" newlines). Missing parent folders are created.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target: os.replace is atomic only within one filesystem.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": "\n"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temp file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def temp_files(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """The temp files `atomic_open` makes in `folder` for final names matching the glob `pattern`: what a write that a
    kill cut short leaves behind (an exception removes its own)."""
    return sorted(Path(folder).glob(f".{pattern}.*.tmp"))


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible or needed on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the data itself is already synced
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def _json_default(obj: Any) -> Any:
    """JSON for what records commonly hold besides plain data: numpy/torch numbers and arrays, paths, dataclasses."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return obj.tolist()
    raise TypeError(f"cannot write a value of type {type(obj).__name__} as JSON")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON (UTF-8, trailing newline) to `path` atomically.

    Numpy and torch numbers/arrays, paths, sets and dataclasses are converted; anything else raises TypeError
    and leaves `path` as it was.
    """
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, default=_json_default)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# Images


def slug(text: str, max_len: int = 40, fallback: str = "prompt") -> str:
    """A file-name-safe short form of a prompt: lowercase ASCII words joined by dashes, cut at a word boundary."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(s) > max_len:
        cut = s[: max_len + 1].rfind("-")
        s = s[: cut if cut > 0 else max_len]
    return s or fallback


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def load_image(path: str | os.PathLike, fix: str = "give a PNG, JPEG or WebP file") -> Image.Image:
    """Decode an image file fully, as RGB; a missing, folder or unreadable path is a UserError naming it and `fix`."""
    from flux.errors import UserError

    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(x.name for x in p.iterdir() if x.suffix.lower() in IMAGE_SUFFIXES)[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise UserError(f"image {path} is a folder: give the path of one image file{hint}")
    try:
        with Image.open(p) as im:
            im.load()  # decode now: PIL is lazy, and a truncated file would otherwise fail far from its name
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(
            f"image {path} does not exist: fix the path (relative paths start from the working folder)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({e}): {fix}") from None


def to_pil(image: ImageLike) -> Image.Image:
    """A PIL image, a uint8 numpy array (H, W) or (H, W, C), or a torch tensor in [-1, 1] (C, H, W), as PIL."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"expected a uint8 array (H, W) or (H, W, C), got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    if hasattr(image, "detach"):
        return tensor_to_pil(image)
    raise TypeError(f"cannot make an image from a {type(image).__name__}")


def save_png(
    path: str | os.PathLike, image: ImageLike, metadata: Mapping[str, str | int | float] | None = None
) -> None:
    """Save `image` as a PNG atomically, with `metadata` in its text chunks.

    Strings are stored as they are; other values as JSON (3 -> "3", 3.5 -> "3.5", [0, 1] -> "[0, 1]").
    Text that Latin-1 cannot hold (most prompts outside English) goes into a UTF-8 iTXt chunk.
    """
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    pil = to_pil(image)
    with atomic_open(path, "wb") as f:
        pil.save(f, format="PNG", pnginfo=info)


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG as a dict of strings."""
    with Image.open(path) as im:
        im.load()  # text chunks after the image data are only read with it
        return dict(getattr(im, "text", {}))


def examples(items: Sequence[str], n: int = 5) -> str:
    """The first `n` of `items` for a message, and how many more there are."""
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans where installed (wide character coverage), else Pillow's built-in font."""
    with contextlib.suppress(OSError):
        return ImageFont.truetype("DejaVuSans.ttf", size)
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def caption_font_size(tile_width: int) -> int:
    """Captions scale with the tile (about 20 characters a line) but never below 12 px, the smallest size that
    stays readable, nor above 32 px, where a 1024-px tile would spend its caption room on a few words."""
    return max(12, min(32, tile_width // 20))


def caption_lines(text: str, width: int, font_size: int, max_lines: int = 3) -> list[str]:
    """`text` broken between words into lines at most `width` pixels wide in the caption font.

    A word is cut only where it alone is wider than `width`. Text beyond `max_lines` lines is dropped at a word
    boundary and the last line ends in an ellipsis.
    """
    font = _font(font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= width

    def pieces(word: str) -> list[str]:  # the longest prefixes that fit, for a word wider than the line
        out = []
        while not fits(word) and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and not fits(word[:cut]):
                cut -= 1
            out.append(word[:cut])
            word = word[cut:]
        return out + [word]

    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            if fits(f"{line} {word}" if line else word):
                line = f"{line} {word}" if line else word
                continue
            if line:
                lines.append(line)
            *whole, line = pieces(word)
            lines += whole
        lines.append(line)
    if len(lines) <= max_lines:
        return lines
    words = lines[max_lines - 1].split(" ")
    while words and not fits(" ".join(words) + "…"):
        words.pop()  # whole words only: a caption never ends in half a word
    return lines[: max_lines - 1] + [" ".join(words) + "…"]


def make_grid(
    images: Sequence[ImageLike],
    labels: Sequence[str] | None = None,
    cols: int | None = None,
    font_size: int | None = None,
    pad: int = 8,
) -> Image.Image:
    """The images in a grid of `cols` columns (default: nearly square), each with its label underneath.

    Tiles keep their size (smaller images are centred on a tile as large as the largest); labels wrap between words
    to the tile width, at most 3 lines (see `caption_lines`). White background, black text.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"make_grid got {len(images)} images but {len(labels)} labels")
    pils = [to_pil(im).convert("RGB") for im in images]
    cols = cols or math.ceil(math.sqrt(len(pils)))
    rows = math.ceil(len(pils) / cols)
    tile_w, tile_h = max(p.width for p in pils), max(p.height for p in pils)
    font_size = font_size or caption_font_size(tile_w)
    font = _font(font_size)
    wrapped = [caption_lines(label, tile_w, font_size) for label in labels] if labels is not None else None
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (10, 2)
    line_h = ascent + descent + 2
    caption_h = (max(len(w) for w in wrapped) * line_h + pad // 2) if wrapped else 0
    cell_w, cell_h = tile_w + pad, tile_h + caption_h + pad
    grid = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, pil in enumerate(pils):
        x0, y0 = pad + (i % cols) * cell_w, pad + (i // cols) * cell_h
        grid.paste(pil, (x0 + (tile_w - pil.width) // 2, y0 + (tile_h - pil.height) // 2))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            x = x0 + (tile_w - draw.textlength(line, font=font)) / 2
            draw.text((x, y0 + tile_h + pad // 2 + j * line_h), line, fill="black", font=font)
    return grid


def save_gif(path: str | os.PathLike, frames: Sequence[ImageLike], duration_ms: int = 100, loop: int = 0) -> None:
    """Save `frames` as an animated GIF atomically; `loop` 0 repeats forever."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    pils = [to_pil(f).convert("RGB") for f in frames]
    with atomic_open(path, "wb") as f:
        pils[0].save(f, format="GIF", save_all=True, append_images=pils[1:], duration=duration_ms, loop=loop)
