"""stableflow.report's figures stay legible at any size, and demo_3's DINOv2 feature is exactly the model's CLS
token after the final LayerNorm."""

import pytest
import torch
from PIL import Image, ImageDraw

from stableflow import dino as D
from stableflow import io as sio
from stableflow import report as R
from stableflow.sweep import scan_sweep
from stableflow.vitality import LayerScore

from test_vitality import analyse, gradient, make_sweep, save, score


@pytest.mark.parametrize("vitality", [{0: 1e-4, 1: 3e-5, 2: 2e-4}, {0: -0.05, 1: 0.3, 2: 0.1}, {0: 1.4, 1: 0.2}])
def test_the_vitality_axis_fits_the_data(vitality):
    scores = score(vitality)
    ax = R.vitality_figure(scores, [0], 19).axes[0]
    low, high = ax.get_ylim()
    values = list(vitality.values())
    assert low <= min(0.0, *values) and high >= max(values)
    # The data fill most of the axis: the tallest bar is at least 3/4 of its height (a fixed 0..1 axis would make
    # 1e-4 values invisible), and no room is wasted below zero when nothing is negative.
    assert (max(values) - min(0.0, *values)) / (high - low) > 0.75
    assert low == 0.0 or min(values) < 0


def test_a_threshold_off_the_axis_is_named_in_the_legend():
    ax = R.vitality_figure(score({0: 1e-4, 1: 2e-4}), [], 19, tau=0.2).axes[0]
    assert ax.get_ylim()[1] < 1e-3
    assert any("above every layer" in t.get_text() for t in ax.get_legend().get_texts())


def test_contact_sheet_captions_break_only_at_word_boundaries(tmp_path, monkeypatch):
    pid = "p00_a_red_fox_sitting_in_deep_snow"
    root = make_sweep(tmp_path / "sweep", prompts=(pid, "p1"), layers=range(3), broken=(0,))
    embedder = D.DinoEmbedder(D.load_dino(D.TINY_RANDOM), "cpu", batch_size=8, num_workers=1)
    a = analyse(scan_sweep(root), embedder, None, n_bootstrap=10)
    seen = {}
    real = R.make_grid

    def grid(images, labels, **kw):
        seen.update(labels=labels, width=max(sio.to_pil(im).width for im in images), **kw)
        return real(images, labels, **kw)

    monkeypatch.setattr(R, "make_grid", grid)
    for thumb in (96, 192):
        R.contact_sheet(a.sweep, a.scores, a.vital, a.sims, prompts=2, columns=3, thumb=thumb)
        font = sio._font(seen["font_size"])  # what make_grid draws with
        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        for label in seen["labels"]:
            for line in label.splitlines():  # each line fits the tile: make_grid never has to cut a word
                assert draw.textlength(line, font=font) <= seen["width"], (thumb, line)
        ref = seen["labels"][0].splitlines()
        assert ref[0] == "reference" and "".join(ref[1:]) == pid  # the id, broken only after its underscores
        assert all(line.endswith("_") for line in ref[1:-1])


def test_the_dino_feature_is_the_cls_token_after_the_final_layernorm(tmp_path):
    """Pinned against transformers' Dinov2Model run here, outside stableflow.dino: the similarity of two files is
    the cosine of last_hidden_state[:, 0] (the CLS token after the final LayerNorm), not of the CLS token the
    last block emits before that LayerNorm."""
    a, b = save(tmp_path / "a.png", gradient(0, (96, 80))), save(tmp_path / "b.png", gradient(3, (96, 80)))
    model = D.tiny_dino()
    pixels = D.preprocess([Image.open(a).convert("RGB"), Image.open(b).convert("RGB")])
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    after_ln, before_ln = out.last_hidden_state[:, 0].double(), out.hidden_states[-1][:, 0].double()
    expected = torch.nn.functional.cosine_similarity(after_ln[:1], after_ln[1:]).item()
    before = torch.nn.functional.cosine_similarity(before_ln[:1], before_ln[1:]).item()

    embedder = D.DinoEmbedder(D.load_dino(D.TINY_RANDOM), "cpu", batch_size=2, num_workers=1)
    torch.testing.assert_close(embedder.embed([Image.open(a), Image.open(b)]).double(), after_ln, rtol=0, atol=1e-6)
    (got,) = D.dino_similarity(embedder)([(a, b)])
    assert got == pytest.approx(expected, abs=1e-6)
    assert abs(before - expected) > 1e-5  # 10x the tolerance: the other CLS token fails the line above


def test_layer_score_fields_reach_the_plot():
    s = LayerScore(
        layer=4, name="x", mean_similarity=0.9999, std=0.0, ci_low=0.9998, ci_high=1.0, vitality=1e-4, num_prompts=2
    )
    ax = R.vitality_figure([s], [4], 2).axes[0]
    assert ax.get_ylim()[1] >= 1 - s.ci_low  # the interval's top end is on the axis too
