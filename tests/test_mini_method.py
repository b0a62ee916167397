"""Stable Flow on flux-mini 2: issue 18's claims measured with the world's detector (mini.detect) and edit graders
(mini.edits), on the CPU, through the toolkit's own pipeline (mini.evaluate's functions, the README's numbers).

Targets the shipped model misses are strict xfails with the measured number (never a lowered target); beside each, a
regression guard a little under the measured level keeps what the model does reach from slipping.
"""

import json

import pytest
import torch

from mini.evaluate import ablation_generated, ablation_real, psnr, text2img
from mini.world import render, sample_scenes

# Measured by `python -m mini.evaluate` / `--ablation` with the shipped weights (README); guards sit under them.
MEASURED_TEXT2IMG = {"colour": 0.845, "shape": 0.313, "place": 0.373, "count": 0.76, "background": 1.0}
TEXT2IMG_TARGETS = {"colour": 0.95, "shape": 0.90, "place": 0.90, "count": 0.95}


@pytest.fixture(scope="module")
def mini():
    from flux.pipeline import load_models

    return load_models("flux-mini", "cpu", torch.float32)


def test_autoencoder_reconstructs_world_scenes(mini):
    x = render(sample_scenes(64, 11, "heldout"))
    db = psnr(mini.decode(mini.encode_image(x)), x)
    assert db.mean() >= 30.0 and db.min() >= 28.0


@pytest.fixture(scope="module")
def heldout(mini):
    """100 held-out prompts (each holds a colour x shape or shape x place pair never trained on), 20 steps, graded
    per object; the same prompts and seeds as `python -m mini.evaluate`."""
    return text2img(mini, "heldout", 100, 1, 50)[0]["accuracy"]


@pytest.mark.slow
def test_text_to_image_regression_guard(heldout):
    for attr, measured in MEASURED_TEXT2IMG.items():
        assert heldout[attr] >= measured - 0.06, (attr, heldout[attr])


@pytest.mark.slow
@pytest.mark.parametrize("attr", sorted(TEXT2IMG_TARGETS))
@pytest.mark.xfail(strict=True, reason="flux-mini 2 has had 4.5k of its training steps (loss 0.137; flux-mini 1 "
                   "reached 0.049 at 20.7k): held-out colour 84.5%, shape 31%, named place 37%, count 76%")  # fmt: skip
def test_text_to_image_targets(heldout, attr):
    assert heldout[attr] >= TEXT2IMG_TARGETS[attr]


@pytest.fixture(scope="module")
def vitality(tmp_path_factory, run_script):
    """demo_2 then demo_3 on flux-mini's shipped configs, as a user runs them; returns vital_layers.json."""
    root = tmp_path_factory.mktemp("mini")
    sweep, scores = root / "sweep", root / "scores"
    r = run_script("demo_2_skip.py", "configs/mini/demo_2_skip.json", f"output_dir={sweep}", "progress=false")
    assert r.returncode == 0, r.stderr
    r = run_script("demo_3_dino.py", "configs/mini/demo_3_dino.json", f"sweep_dir={sweep}", f"output_dir={scores}")
    assert r.returncode == 0, r.stderr
    assert (scores / "vitality.png").is_file() and (scores / "contact_sheet.png").is_file()
    return json.loads((scores / "vital_layers.json").read_text())


@pytest.mark.slow
def test_ablation_finds_a_minority_of_vital_layers(vitality):
    layers = {entry["layer"]: entry["vitality"] for entry in vitality["layers"]}
    vital = vitality["vital_layers"]
    assert len(layers) == 12 and 1 <= len(vital) <= len(layers) / 3
    assert vitality["vital_layer_names"] and len(vitality["vital_layer_names"]) == len(vital)


@pytest.fixture(scope="module")
def ablation(mini, vitality):
    """Each edit family under injection in the vital layers, none, all and the non-vital ones (16 cases a family:
    the README's table uses 64), and real world pictures with and without nudging."""
    vital = vitality["vital_layers"]
    return {"generated": ablation_generated(mini, vital, 16, 1), "real": ablation_real(mini, vital, 10, 1, 30)}


def _mean(ablation: dict, config: str, key: str) -> float:
    vals = [f[config][key] for f in ablation["generated"].values() if f[config][key] is not None]
    return sum(vals) / len(vals)


@pytest.mark.slow
def test_real_images_reconstruct(ablation):
    assert ablation["real"]["nudge"]["reconstruction_db"] >= 30.0


@pytest.mark.slow
def test_phenomenon_edits_move_untouched_objects_without_injection(ablation):
    assert _mean(ablation, "none", "untouched_iou") <= 0.6


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="see the README's ablation table: with 11-26% of references right the weak "
                   "model leaves too few cases, and vital-layer injection does not yet hold untouched objects at 0.85")  # fmt: skip
def test_vital_layer_injection_holds_untouched_objects(ablation):
    assert _mean(ablation, "vital", "untouched_iou") >= max(0.85, _mean(ablation, "none", "untouched_iou") + 0.25)
