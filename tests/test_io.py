"""Output writing: atomic files (never half-written, never a stray temp file), PNG metadata, tensor -> pixels, grids."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stableflow import io
from stableflow.io import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    caption_lines,
    make_grid,
    read_png_metadata,
    save_gif,
    save_png,
    temp_files,
    tensor_to_pil,
)


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_atomic_writes_create_parents_and_leave_no_temp_file(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a" / "c.txt", "héllo\nworld\n")
    atomic_write_json(tmp_path / "a" / "d.json", {"x": [1, 2.5], "name": "日本"})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a" / "c.txt").read_bytes() == "héllo\nworld\n".encode()
    text = (tmp_path / "a" / "d.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"x": [1, 2.5], "name": "日本"} and text.endswith("}\n")
    assert names(tmp_path / "a") == ["b.bin", "c.txt", "d.json"]
    # overwriting replaces the content; the usual permissions, not the temp file's 0600
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"new")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"new"
    assert (tmp_path / "a" / "b.bin").stat().st_mode & 0o777 == 0o666 & ~io._UMASK
    assert names(tmp_path / "a") == ["b.bin", "c.txt", "d.json"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_write_failing_midway_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    target = tmp_path / "record.json"
    target.write_text("old")
    with pytest.raises(error), atomic_open(target, "w") as f:
        f.write('{"half": ')
        f.flush()
        # mid-write: the partial data sits in a temp file beside the target, which is untouched
        temps = [n for n in names(tmp_path) if n != "record.json"]
        assert len(temps) == 1 and temps[0].startswith(".record.json.") and temps[0].endswith(".tmp")
        assert (tmp_path / temps[0]).read_text() == '{"half": '
        assert target.read_text() == "old"
        raise error
    assert target.read_text() == "old" and names(tmp_path) == ["record.json"]


def test_json_serialiser_failing_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "run.json"
    atomic_write_json(target, {"done": [0, 1]})
    before = target.read_bytes()
    # the serialiser writes the first keys, then fails on the unserialisable one
    with pytest.raises(TypeError, match="cannot write a value of type object as JSON"):
        atomic_write_json(target, {"done": list(range(1000)), "bad": object()})
    assert target.read_bytes() == before and names(tmp_path) == ["run.json"]


def test_json_converts_numpy_torch_paths_and_sets(tmp_path):
    atomic_write_json(
        tmp_path / "r.json",
        {
            "a": np.float32(0.5),
            "b": np.arange(3),
            "c": torch.tensor([1.5, 2.0]),
            "d": Path("x/y"),
            "e": {3, 1},
            "f": torch.tensor(7),
        },
    )
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "a": 0.5,
        "b": [0, 1, 2],
        "c": [1.5, 2.0],
        "d": "x/y",
        "e": [1, 3],
        "f": 7,
    }


def test_temp_files_finds_the_temp_file_of_a_write_in_progress_and_nothing_else(tmp_path):
    """What a kill in the middle of `atomic_open` would leave is exactly what `temp_files` lists for the final name (the
    sweep and flux-mini's checkpoints delete those on the next run); finished files and other names' are not listed."""
    atomic_write_bytes(tmp_path / "ckpt-1.part0", b"done")
    with atomic_open(tmp_path / "ckpt-2.part0") as f, atomic_open(tmp_path / "other.json", "w"):
        f.write(b"half")
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt-2.part0")]
        assert temp_files(tmp_path, "ckpt-2.part0") == [tmp] and temp_files(tmp_path, "ckpt-*.part*") == [tmp]
        assert temp_files(tmp_path, "ckpt-1.part0") == [] and len(temp_files(tmp_path, "*")) == 2
    assert temp_files(tmp_path, "*") == []


def test_atomic_open_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError), atomic_open(tmp_path / "x", "a"):
        pass
    assert names(tmp_path) == []


def test_tensor_to_pil_clamps_and_maps_like_the_official_sampler():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0]).reshape(1, 1, 8).expand(3, 1, 8)
    pixels = np.asarray(tensor_to_pil(x))
    # 127.5 * (x + 1) truncated: -0.5 -> 63.75 -> 63, 0 -> 127.5 -> 127, 0.5 -> 191.25 -> 191
    assert pixels.shape == (1, 8, 3) and pixels.dtype == np.uint8
    assert pixels[0, :, 0].tolist() == [0, 0, 63, 127, 191, 254, 255, 255]
    assert (pixels[..., 0] == pixels[..., 2]).all()
    # channel order is kept, a batch of one is accepted, any dtype works
    rgb = torch.stack([torch.full((2, 2), -1.0), torch.zeros(2, 2), torch.ones(2, 2)])[None].bfloat16()
    assert np.asarray(tensor_to_pil(rgb))[0, 0].tolist() == [0, 127, 255]
    assert tensor_to_pil(torch.zeros(1, 4, 5)).mode == "L"
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4, 4\)"):
        tensor_to_pil(torch.zeros(2, 3, 4, 4))


def test_png_metadata_and_pixels_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    meta = {
        "prompt": "a fox in the snow, 日本語, é",
        "seed": 42,
        "guidance": 3.5,
        "model": "flux-dev",
        "layers": [0, 1],
    }
    save_png(tmp_path / "out" / "img.png", array, meta)
    assert read_png_metadata(tmp_path / "out" / "img.png") == {
        "prompt": "a fox in the snow, 日本語, é",
        "seed": "42",
        "guidance": "3.5",
        "model": "flux-dev",
        "layers": "[0, 1]",
    }
    with Image.open(tmp_path / "out" / "img.png") as im:
        assert im.format == "PNG" and (np.asarray(im) == array).all()
    assert names(tmp_path / "out") == ["img.png"]
    save_png(tmp_path / "t.png", torch.zeros(3, 16, 32))
    assert read_png_metadata(tmp_path / "t.png") == {}
    assert Image.open(tmp_path / "t.png").size == (32, 16)


def test_save_png_failing_midway_keeps_the_old_image(tmp_path, monkeypatch):
    target = tmp_path / "img.png"
    save_png(target, np.zeros((8, 8, 3), np.uint8), {"v": 1})
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(target, np.ones((8, 8, 3), np.uint8), {"v": 2})
    assert target.read_bytes() == before and names(tmp_path) == ["img.png"]


def test_save_png_rejects_what_is_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError):
        save_png(tmp_path / "x.png", [[0]])
    assert names(tmp_path) == []


def solid(color: tuple[int, int, int], size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_make_grid_places_tiles_and_captions():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    plain = make_grid([solid(c) for c in colors], cols=3, pad=8)
    # 3 columns x 2 rows of 40x30 tiles with 8 px padding, no caption space without labels
    assert plain.size == (3 * 48 + 8, 2 * 38 + 8)
    for i, c in enumerate(colors):
        x, y = 8 + (i % 3) * 48, 8 + (i // 3) * 38
        assert plain.getpixel((x, y)) == c and plain.getpixel((x + 39, y + 29)) == c
    assert plain.getpixel((8 + 2 * 48 + 20, 8 + 38 + 15)) == (255, 255, 255)  # the empty sixth cell

    labels = ["skip 0", "a long caption that has to wrap over more than one line", "c", "d", "e"]
    grid = make_grid([solid(c) for c in colors], labels, cols=3, pad=8)
    assert grid.width == plain.width and grid.height > plain.height
    pixels = np.asarray(grid)
    caption_h = (grid.height - 8) // 2 - 38
    under_first = pixels[8 + 30 : 8 + 30 + caption_h, 8:48]
    assert (under_first < 128).any()  # text is drawn under the first tile
    assert grid.getpixel((8, 8)) == colors[0]
    with pytest.raises(ValueError, match="5 images but 2 labels"):
        make_grid([solid(c) for c in colors], ["a", "b"])
    with pytest.raises(ValueError):
        make_grid([])


def test_make_grid_default_columns_and_mixed_inputs():
    grid = make_grid([solid((0, 0, 0)), torch.ones(3, 30, 40), np.full((30, 40, 3), 128, np.uint8), solid((9, 9, 9))])
    assert grid.size == (2 * 48 + 8, 2 * 38 + 8)  # 4 images -> 2 x 2
    assert grid.getpixel((8 + 48, 8)) == (255, 255, 255) and grid.getpixel((8, 8 + 38)) == (128, 128, 128)


PROMPT = (
    'a photo of a forest with mist swirling around the tree trunks. The word "FLUX" is painted over it in big, '
    "red brush strokes with visible texture"
)


def pixel_width(text: str, font_size: int) -> float:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=io._font(font_size))


@pytest.mark.parametrize("tile", [64, 1024])
def test_captions_wrap_between_words_and_stay_legible(tile):
    size = io.caption_font_size(tile)
    lines = caption_lines(PROMPT, tile, size)
    assert 1 <= len(lines) <= 3 and all(pixel_width(line, size) <= tile for line in lines)
    # Only whole words, in order: the lines read as the start of the prompt (then an ellipsis if cut short).
    words = " ".join(lines).removesuffix("…").split()
    assert words == PROMPT.split()[: len(words)] and len(words) >= 3
    if tile == 1024:
        assert words == PROMPT.split() and not lines[-1].endswith("…")  # room for the whole prompt
    else:
        assert lines[-1].endswith("…")
    assert size >= 12  # readable on a small tile, and larger on a large one
    assert io.caption_font_size(1024) >= 2 * io.caption_font_size(64)


def test_a_word_wider_than_the_tile_is_the_only_thing_cut():
    word = "supercalifragilistic"
    lines = caption_lines(f"a {word} b", 64, 12, max_lines=10)
    assert lines[0] == "a" and lines[-1].endswith("b")  # the short words stay whole
    pieces = " ".join(lines[1:]).removesuffix("b").split()
    assert "".join(pieces) == word and len(pieces) > 1
    assert all(pixel_width(p, 12) <= 64 for p in pieces)
    assert caption_lines("", 64, 12) == [""] and caption_lines("one\ntwo", 1024, 32) == ["one", "two"]


def test_save_gif(tmp_path):
    frames = [solid((i * 60, 0, 0)) for i in range(4)]
    save_gif(tmp_path / "anim" / "steps.gif", frames, duration_ms=120)
    with Image.open(tmp_path / "anim" / "steps.gif") as im:
        assert im.format == "GIF" and im.n_frames == 4 and im.info["duration"] == 120 and im.info["loop"] == 0
        im.seek(3)
        assert im.convert("RGB").getpixel((0, 0)) == (180, 0, 0)
    assert names(tmp_path / "anim") == ["steps.gif"]
