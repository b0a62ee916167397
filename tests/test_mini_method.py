"""Stable Flow on flux-mini 2: issue 18's claims measured with the world's detector (mini.detect) and edit graders
(mini.edits), on the CPU, through the toolkit's own pipeline (mini.evaluate's functions, the README's numbers).

Targets the shipped model misses are strict xfails with the measured number (never a lowered target); beside each, a
regression guard a little under the measured level keeps what the model does reach from slipping.
"""

import json

import pytest
import torch

from mini.evaluate import MIXES, STEPS, ablation_generated, ablation_real, layer_sets, mixed_edits, psnr, text2img
from mini.world import render, sample_scenes
from stableflow.edit import EditRequest, edit_generated

# Measured by `python -m mini.evaluate` / `--ablation` with the shipped weights (README); guards sit under them.
MEASURED_TEXT2IMG = {"colour": 0.987, "shape": 0.948, "place": 0.988, "count": 0.97, "background": 1.0}
TEXT2IMG_TARGETS = {"colour": 0.95, "shape": 0.90, "place": 0.90, "count": 0.95}


@pytest.fixture(scope="module")
def mini():
    from flux.pipeline import load_models

    return load_models("flux-mini", "cpu", torch.float32)


@pytest.mark.slow
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
def test_text_to_image_targets(heldout, attr):
    assert heldout[attr] >= TEXT2IMG_TARGETS[attr]


@pytest.fixture(scope="module")
def vitality(tmp_path_factory, run_script):
    """demo_2 then demo_3 on flux-mini's shipped configs, as a user runs them; returns vital_layers.json."""
    root = tmp_path_factory.mktemp("mini")
    sweep, scores = root / "sweep", root / "scores"
    # The config's first 8 prompts (of 16): the README's vitality plot uses all of them.
    r = run_script("demo_2_skip.py", "configs/mini/demo_2_skip.json", f"output_dir={sweep}", "num_prompts=8",
                   "progress=false")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_script("demo_3_dino.py", "configs/mini/demo_3_dino.json", f"sweep_dir={sweep}", f"output_dir={scores}")
    assert r.returncode == 0, r.stderr
    assert (scores / "vitality.png").is_file() and (scores / "contact_sheet.png").is_file()
    return json.loads((scores / "vital_layers.json").read_text())


@pytest.mark.slow
def test_vitality_scores_every_layer(vitality):
    layers = {entry["layer"]: entry["vitality"] for entry in vitality["layers"]}
    assert sorted(layers) == list(range(12)) and vitality["metric"] == "mini-detector"
    assert vitality["vital_layer_names"] and len(vitality["vital_layer_names"]) == len(vitality["vital_layers"])
    # As in FLUX (the paper's layer 0), the first double block is the most vital: its bypass destroys the picture.
    assert max(layers, key=layers.get) == 0 and layers[0] >= 0.8  # measured 0.98 on 16 prompts


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the detector's similarity finds 11 of 12 layers vital at tau 0.1 (vitality "
                   "0.07-0.98 on 16 prompts): any bypass but the last changes some object this model draws")  # fmt: skip
def test_ablation_finds_a_minority_of_vital_layers(vitality):
    assert 1 <= len(vitality["vital_layers"]) <= 12 / 3


# demo_3's detector metric calls all 12 layers vital on flux-mini 2 (test above), which would make "vital" the same
# as "all"; the ablation contrasts the minority SSIM finds (configs/mini/demo_3_dino_ssim.json), as the README does.
SSIM_VITAL = [0, 1, 3]


@pytest.fixture(scope="module")
def ablation(mini):
    """Each edit family under injection in the vital layers, none, all and the non-vital ones (12 cases a family:
    the README's table uses 64), and real world pictures with and without nudging."""
    return {
        "generated": ablation_generated(mini, layer_sets(mini, SSIM_VITAL), 12, 1),
        "real": ablation_real(mini, SSIM_VITAL, 6, 1, 30),
    }


# The IoU targets are measured on the untouched objects whose place the source caption leaves open: the issue's
# phenomenon is about under-specified captions, and a named place holds its object whatever the injection, so
# counting those objects would dilute both the drift and the hold (the README gives both numbers).
OPEN = "open_iou"


def _mean(ablation: dict, config: str, key: str) -> float:
    vals = [f[config][key] for f in ablation["generated"].values() if f[config][key] is not None]
    return sum(vals) / len(vals) if vals else float("nan")


@pytest.mark.slow
def test_real_images_reconstruct(ablation):
    assert ablation["real"]["nudge"]["reconstruction_db"] >= 30.0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="without injection, untouched objects left unplaced keep mean IoU 0.66 over "
                   "the README's 64 cases a family (background changes 0.18; every untouched object 0.72): the "
                   "trained model keeps more of a same-seed layout than the target's 0.6")  # fmt: skip
def test_phenomenon_edits_move_untouched_objects_without_injection(ablation):
    assert _mean(ablation, "none", OPEN) <= 0.6


@pytest.mark.slow
def test_vital_layers_let_more_edits_through_than_all_layers(ablation):
    """Regression guard for the target below: injection in every layer reproduces the reference, in the vital ones
    edits still happen (measured +27 points on these 12 cases a family)."""
    assert _mean(ablation, "vital", "success") >= _mean(ablation, "all", "success") + 0.20


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="+33 points over the README's 64 cases a family (43% vs 10%) but +27 on this "
                   "test's 12: the paper's ablation (c) holds, the +30 target only narrowly")  # fmt: skip
def test_vital_layers_let_edits_through_where_all_layers_do_not(ablation):
    assert _mean(ablation, "vital", "success") >= _mean(ablation, "all", "success") + 0.30


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="README's ablation table: vital-layer injection lets 43% of edits through "
                   "(additions 7%, size 0%) and holds untouched objects left unplaced at IoU 0.82, +0.16 over "
                   "none")  # fmt: skip
def test_vital_layer_injection_holds_untouched_objects_and_lets_the_edit_through(ablation):
    gen = ablation["generated"]
    assert _mean(ablation, "vital", OPEN) >= max(0.85, _mean(ablation, "none", OPEN) + 0.25)
    assert all(gen[f]["vital"]["success"] >= 0.85 for f in ("attribute", "replacement", "background"))
    assert all(gen[f]["vital"]["success"] >= 0.70 for f in ("addition", "size"))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="README's ablation table: injection in the nine non-vital layers blocks the "
                   "edit (25% success) and so keeps more (open-place IoU 0.84 against the vital layers' 0.82)")  # fmt: skip
def test_vital_layers_hold_more_than_non_vital_ones(ablation):
    assert _mean(ablation, "vital", OPEN) >= _mean(ablation, "non-vital", OPEN) + 0.15


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="README's ablation table: real pictures edited in the vital layers 30% / "
                   "open-place IoU 0.84 with nudging, 45% / 0.76 without: nudging edits less")  # fmt: skip
def test_real_image_edits_hold_and_nudging_helps(ablation):
    nudge, plain = ablation["real"]["nudge"], ablation["real"]["no nudge"]
    assert nudge["success"] >= 0.80 and nudge[OPEN] >= 0.85
    assert nudge["success"] > plain["success"]


def test_ablation_without_vital_layers_file_is_one_clear_error(run_script, tmp_path):
    """No vital_layers.json yet: one line naming the file and the fix, exit 2, before any model loads."""
    r = run_script("-m", "mini.evaluate", "--ablation", "--vital-layers", str(tmp_path / "none.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "none.json does not exist: run demo_3_dino.py" in r.stderr and "weights:" not in r.stdout


def test_ablation_with_a_layer_out_of_range_is_one_clear_error(run_script):
    """A listed layer flux-mini lacks is refused by the model's range rule before any model loads."""
    r = run_script("-m", "mini.evaluate", "--ablation", "--vital-layers", "0,12")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--vital-layers: layer 12 out of range: this model has layers 0..11" in r.stderr
    assert "weights:" not in r.stdout


def test_layer_sweep_edits_with_each_layer_alone_and_tabulates_per_family(tmp_path):
    """The sweep's layer sets are no injection and each of flux-mini's 12 layers alone; its table has one row per set
    and one column per family, each cell success/IoU of that family's summary (hand-built here)."""
    from types import SimpleNamespace

    from mini.edits import FAMILIES
    from mini.evaluate import single_layers, sweep_figure, sweep_table

    models = SimpleNamespace(model=SimpleNamespace(num_layers=12))
    sets = single_layers(models)
    assert sets == {"none": [], **{f"layer {i}": [i] for i in range(12)}}
    cell = {"references_right": 7, "success": 0.5, "untouched_iou": 0.25, "untouched_kept": 1.0, "cases": 8}
    sweep = {"generated": {f: {c: {**cell, "success": i / 20} for i, c in enumerate(sets)} for f in FAMILIES}}
    sweep["generated"]["background"]["layer 3"]["untouched_iou"] = None  # no untouched object: a dash
    rows = sweep_table(sweep).splitlines()
    assert rows[0] == "| injection | " + " | ".join(f"{f} (7 refs)" for f in FAMILIES) + " |"
    assert len(rows) == 2 + 13 and rows[2].startswith("| none | 0%/0.25 |")
    assert rows[2 + 4] == "| layer 3 | 20%/0.25 | 20%/0.25 | 20%/0.25 | 20%/- | 20%/0.25 |"
    sweep_figure(sweep, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_ablation_table_gives_success_iou_and_open_iou_per_family_and_layer_set(tmp_path):
    """The README's ablation table: a row per family and per real-image run, a column per layer set, each cell
    success/untouched IoU/open IoU (a dash where no untouched object's place is open), from hand-built summaries."""
    from mini.edits import FAMILIES
    from mini.evaluate import CONFIGS, figure, table

    cell = {"references_right": 9, "success": 0.5, "untouched_iou": 0.75, "open_iou": 0.5, "cases": 10}
    gen = {f: {c: dict(cell) for c in CONFIGS} for f in FAMILIES}
    gen["size"]["none"] |= {"success": 1.0, "open_iou": None}
    real = {"nudge": {**cell, "reconstruction_db": 36.04}, "no nudge": {**cell, "reconstruction_db": 37.0}}
    result = {"ablation": {"vital_layers": [0, 1, 3], "generated": gen, "real": real}}
    rows = table(result).splitlines()
    assert rows[0] == "| edit family | " + " | ".join(f"{c}: success / IoU / open IoU" for c in CONFIGS) + " |"
    assert rows[2] == "| attribute (9 refs) | " + " | ".join(["50%/0.75/0.50"] * 4) + " |"
    assert rows[2 + FAMILIES.index("size")].split(" | ")[2] == "100%/0.75/-"
    assert rows[-2] == "| real images, nudge | 50%/0.75/0.50 (reconstruction 36.0 dB) |||"
    assert len(rows) == 2 + len(FAMILIES) + 2
    figure(result, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").stat().st_size > 0


def test_ablation_and_layer_sweep_are_one_or_the_other(run_script):
    r = run_script("-m", "mini.evaluate", "--ablation", "--layer-sweep")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr and "Traceback" not in r.stderr


def test_mixed_edits_edit_caption_sample_is_stable_flows_edit(mini):
    """`--conditioning`'s "edit caption" sample is Stable Flow's edit (`edit_generated`, the same seed and layers), so
    its other samples differ from that edit only in where their conditioning comes from."""
    source = "a red circle and a blue square on a white background"
    target = "a red circle and a blue square on a black background"
    images = mixed_edits(mini, source, target, 5, [0, 1])
    r = edit_generated(mini, EditRequest(source, [target], STEPS, 0.0, [0, 1]), 5, 128, 128)
    assert len(images) == 1 + len(MIXES) and list(MIXES)[0] == "edit caption"
    assert (images[0] - r.reference.cpu()).abs().max() < 1e-4 and (images[1] - r.edits[0].cpu()).abs().max() < 1e-4
    assert all((images[i] - images[1]).abs().max() > 0.1 for i in (2, 3))  # each swap changes the picture
