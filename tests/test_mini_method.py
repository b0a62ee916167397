"""The Stable Flow method on flux-mini, a model that has learned its world: each claim measured with the world's
analytic detector (mini.detect), on the CPU, against the targets the toolkit sets itself.

Targets missed by the shipped model are kept as strict xfails with the measured number (never a lowered target);
beside each, a regression guard at the measured level keeps what the model does reach from slipping.
"""

import dataclasses
import json

import pytest
import torch

from mini.detect import detect, image_iou
from mini.world import COLOURS, caption, render, sample_scenes
from stableflow.edit import EditRequest, RealImage, edit_generated, edit_real

STEPS = 20  # flux-mini's default


@pytest.fixture(scope="module")
def mini():
    from flux.pipeline import load_models

    return load_models("flux-mini", "cpu", torch.float32)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / ((a.clamp(-1, 1) - b) ** 2).mean()))


def recoloured(scene, k: int):
    """The same scene in another colour (k picks which)."""
    others = [c for c in COLOURS if c != scene.colour]
    return dataclasses.replace(scene, colour=others[k % len(others)])


def test_autoencoder_reconstructs_heldout_images(mini):
    x = render(sample_scenes(64, 11, "heldout"))
    rec = mini.decode(mini.encode_image(x))
    assert psnr(rec, x) >= 30.0


@pytest.fixture(scope="module")
def heldout_generations(mini):
    """100 held-out prompts (each holds a colour x shape or shape x place pair never trained on), 20 steps."""
    scenes = sample_scenes(100, 1, "heldout")
    images = torch.cat(
        [
            mini.generate([caption(s) for s in scenes[i : i + 50]], list(range(i, i + 50)), 128, 128, STEPS, 0.0)
            for i in range(0, 100, 50)
        ]
    )
    found = [detect(img) for img in images]
    return {
        a: sum(getattr(d, a) == getattr(s, a) for d, s in zip(found, scenes)) / 100
        for a in ("shape", "colour", "place")
    }


def test_text_to_image_gets_colour_and_place_of_unseen_combinations(heldout_generations):
    assert heldout_generations["colour"] >= 0.9 and heldout_generations["place"] >= 0.9


def test_text_to_image_shape_of_unseen_combinations_regression_guard(heldout_generations):
    assert heldout_generations["shape"] >= 0.75  # measured 0.80 (the target, 0.9, is the xfail below)


@pytest.mark.xfail(strict=True, reason="flux-mini draws 80% of held-out shapes right (target 90%): for unseen pairs it "
                   "falls back to a shape seen in that context, e.g. a blue ring becomes a circle")  # fmt: skip
def test_text_to_image_shape_of_unseen_combinations(heldout_generations):
    assert heldout_generations["shape"] >= 0.9


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
    assert len(layers) == 8 and 1 <= len(vital) < len(layers) / 2
    assert vitality["vital_layer_names"] and len(vitality["vital_layer_names"]) == len(vital)
    # Clearly separated, not a threshold through noise: every vital layer does several times the damage of any other.
    assert min(layers[v] for v in vital) > 3 * max(x for k, x in layers.items() if k not in vital)


@pytest.fixture(scope="module")
def colour_edits(mini, vitality):
    """24 generated pictures, each recoloured with injection in demo_3's vital layers and without any injection."""
    out = {"with": [], "without": [], "colour_right": []}
    for i, scene in enumerate(sample_scenes(24, 5, "train")):
        edit = recoloured(scene, i)
        for key, layers in (("with", vitality["vital_layers"]), ("without", [])):
            request = EditRequest(caption(scene), [caption(edit)], STEPS, 0.0, layers=layers)
            result = edit_generated(mini, request, seed=i, width=128, height=128)
            out[key].append(image_iou(result.reference, result.edits[0]))
            if key == "with":
                out["colour_right"].append(detect(result.edits[0]).colour == edit.colour)
    return {k: sum(v) / len(v) for k, v in out.items()}


@pytest.mark.slow
def test_generated_edit_changes_the_colour(colour_edits):
    assert colour_edits["colour_right"] >= 0.8


@pytest.mark.slow
def test_generated_edit_layout_regression_guard(colour_edits):
    assert colour_edits["with"] >= 0.78  # measured 0.81 (the target, 0.15 above no injection, is the xfail below)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="on flux-mini the caption fixes the place, so recolouring with the same seed "
                   "keeps the layout nearly as well without injection (mask IoU 0.77) as with it (0.81); size and jitter "
                   "follow the prompt through the pooled text vector, which injection does not touch")  # fmt: skip
def test_generated_edit_keeps_the_layout_because_of_injection(colour_edits):
    assert colour_edits["with"] >= 0.8 and colour_edits["with"] >= colour_edits["without"] + 0.15


@pytest.mark.slow
def test_real_image_inverts_and_edits(mini, vitality):
    """Held-out world pictures (never-trained pairs), inverted and regenerated with their own caption, then
    recoloured with injection in the vital layers: the reconstruction comes back, the edit changes the colour and
    keeps the place."""
    psnrs, colour_right, place_kept = [], [], []
    for i, scene in enumerate(sample_scenes(6, 9, "heldout")):
        x = render([scene])[0]
        edit = recoloured(scene, i)
        request = EditRequest(caption(scene), [caption(edit)], STEPS, 0.0, layers=vitality["vital_layers"])
        result = edit_real(mini, request, RealImage(x, source_guidance=0.0, nudge=1.0))
        psnrs.append(psnr(result.reference, x))
        found = detect(result.edits[0])
        colour_right.append(found.colour == edit.colour)
        place_kept.append(found.place == scene.place)
    assert min(psnrs) >= 24.0
    assert sum(colour_right) / 6 >= 0.8 and sum(place_kept) / 6 >= 0.8
