"""Stable Flow on flux-mini 2: issue 18's claims measured with the world's detector (mini.detect) and edit graders
(mini.edits), on the CPU, through the toolkit's own pipeline (mini.evaluate's functions, the README's numbers):
text to image, demo_3's vital layers (and that the editing configs use them), the evaluation's tables. The ablation's
claims are in test_mini_ablation.py.

Targets the shipped model misses are strict xfails with the measured number (never a lowered target); beside each, a
regression guard a little under the measured level keeps what the model does reach from slipping.
"""

import json

import pytest

from mini.evaluate import MIXES, STEPS, mixed_edits, psnr, text2img
from mini.world import render, sample_scenes
from stableflow.edit import EditRequest, edit_generated

# Measured by `python -m mini.evaluate` / `--ablation` with the shipped weights (README); guards sit under them.
MEASURED_TEXT2IMG = {"colour": 0.987, "shape": 0.94, "place": 0.988, "count": 0.96, "background": 1.0}
TEXT2IMG_TARGETS = {"colour": 0.95, "shape": 0.90, "place": 0.90, "count": 0.95}


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
    r = run_script("demo_2_skip.py", "configs/mini/demo_2_skip.json", f"output_dir={sweep}", "progress=false")
    assert r.returncode == 0, r.stderr
    r = run_script("demo_3_dino.py", "configs/mini/demo_3_dino.json", f"sweep_dir={sweep}", f"output_dir={scores}")
    assert r.returncode == 0, r.stderr
    assert (scores / "vitality.png").is_file() and (scores / "contact_sheet.png").is_file()
    return json.loads((scores / "vital_layers.json").read_text())


@pytest.mark.slow
def test_vitality_scores_every_layer(vitality):
    layers = {entry["layer"]: entry["vitality"] for entry in vitality["layers"]}
    assert sorted(layers) == list(range(22)) and vitality["metric"] == "mini-detector"
    assert vitality["vital_layer_names"] and len(vitality["vital_layer_names"]) == len(vitality["vital_layers"])
    # As in FLUX (the paper's layer 0), the first double block is the most vital. Its bypass no longer destroys the
    # picture (vitality 0.59 after the seventh training stage, 0.36 after the eighth): layer dropout trains every block
    # to be dispensable, which is what made the vital set a minority (README).
    assert max(layers, key=layers.get) == 0 and layers[0] >= 0.30  # measured 0.36


@pytest.mark.slow
def test_ablation_finds_a_minority_of_vital_layers_and_demo_4_uses_them(vitality, repo_root):
    """demo_3's semantic metric finds a minority (at most a third) of the 22 layers vital, and the mini configs that
    edit (demo_4's two, demo_5's) inject in exactly those layers."""
    assert 1 <= len(vitality["vital_layers"]) <= 22 / 3
    for name in ("demo_4_edit", "demo_4_edit_real", "demo_5_bench"):
        config = json.loads((repo_root / "configs" / "mini" / f"{name}.json").read_text())
        assert config["vital_layers"] == vitality["vital_layers"], name


def test_ablation_without_vital_layers_file_is_one_clear_error(run_script, tmp_path):
    """No vital_layers.json yet: one line naming the file and the fix, exit 2, before any model loads."""
    r = run_script("-m", "mini.evaluate", "--ablation", "--vital-layers", str(tmp_path / "none.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "none.json does not exist: run demo_3_dino.py" in r.stderr and "weights:" not in r.stdout


def test_ablation_with_a_layer_out_of_range_is_one_clear_error(run_script):
    """A listed layer flux-mini lacks is refused by the model's range rule before any model loads."""
    r = run_script("-m", "mini.evaluate", "--ablation", "--vital-layers", "0,22")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--vital-layers: layer 22 out of range: this model has layers 0..21" in r.stderr
    assert "weights:" not in r.stdout


def test_layer_sweep_edits_with_each_layer_alone_and_tabulates_per_family(tmp_path, monkeypatch):
    """The sweep's layer sets are no injection and each of flux-mini's 12 layers alone; its table has one row per set
    and one column per family, each cell success/untouched IoU/open IoU of that family's summary (hand-built here), and
    its figure a row of success-against-IoU panels per IoU, a dash in the table and no point in the figure where no
    object measured one."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from mini.edits import FAMILIES
    from mini.evaluate import single_layers, sweep_figure, sweep_table

    models = SimpleNamespace(model=SimpleNamespace(num_layers=12))
    sets = single_layers(models)
    assert sets == {"none": [], **{f"layer {i}": [i] for i in range(12)}}
    cell = {"references_right": 7, "success": 0.5, "untouched_iou": 0.25, "open_iou": 0.125, "untouched_kept": 1.0,
            "cases": 8}  # fmt: skip
    sweep = {"generated": {f: {c: {**cell, "success": i / 20} for i, c in enumerate(sets)} for f in FAMILIES}}
    sweep["generated"]["background"]["layer 3"]["untouched_iou"] = None  # no untouched object: a dash
    sweep["generated"]["size"]["layer 3"]["open_iou"] = None  # no untouched object left unplaced: a dash
    sweep["generated"]["addition"]["layer 5"]["open_iou"] = 0.875
    rows = sweep_table(sweep).splitlines()
    assert rows[0] == "| injection: success / IoU / open IoU | " + " | ".join(f"{f} (7 refs)" for f in FAMILIES) + " |"
    assert rows[1] == "|---|" + "---|" * len(FAMILIES)
    assert len(rows) == 2 + 13 and rows[2].startswith("| none | 0%/0.25/0.12 |")
    assert rows[2 + 4] == "| layer 3 | 20%/0.25/0.12 | 20%/0.25/0.12 | 20%/0.25/0.12 | 20%/-/0.12 | 20%/0.25/- |"
    assert rows[2 + 6].split(" | ")[FAMILIES.index("addition") + 1] == "30%/0.25/0.88"

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its points
    sweep_figure(sweep, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    axes = figures[0].axes
    assert len(axes) == 2 * len(FAMILIES)
    assert [a.get_xlabel() for a in axes[:: len(FAMILIES)]] == [
        "untouched-object IoU", "IoU of untouched objects left unplaced"]  # fmt: skip

    def points(row: int, family: str) -> list[tuple[float, float]]:
        ax = axes[row * len(FAMILIES) + FAMILIES.index(family)]
        return sorted(tuple(map(float, c.get_offsets()[0])) for c in ax.collections)

    ys = [i / 20 for i in range(13)]  # each set's success: none, then layers 0..11
    assert points(0, "attribute") == [(0.25, y) for y in ys]
    assert points(1, "attribute") == [(0.125, y) for y in ys]
    assert points(0, "background") == [(0.25, y) for y in ys if y != ys[4]]  # layer 3: no point
    assert points(1, "size") == [(0.125, y) for y in ys if y != ys[4]]
    assert (0.875, ys[6]) in points(1, "addition") and (0.125, ys[6]) not in points(1, "addition")
    close(figures[0])


def test_conditioning_table_gives_success_iou_and_open_iou_per_mix(tmp_path):
    """The conditioning run's table (`sweep_table` of its record): a row per layer set and MIXES entry, in the run's
    order, each cell success/untouched IoU/open IoU of that family's summary (hand-built here)."""
    from mini.edits import FAMILIES
    from mini.evaluate import MIXES, sweep_table

    keys = [f"{c}, {m}" for c in ("vital", "none", "all") for m in MIXES]
    cell = {"references_right": 13, "success": 0.25, "untouched_iou": 0.5, "open_iou": 0.75, "cases": 16}
    record = {"generated": {f: {k: dict(cell) for k in keys} for f in FAMILIES}}
    record["generated"]["background"]["none, source's pooled vector"] |= {"success": 1.0, "open_iou": 0.0625}
    record["generated"]["attribute"]["all, edit caption"]["open_iou"] = None
    rows = sweep_table(record).splitlines()
    assert rows[0] == "| injection: success / IoU / open IoU | " + " | ".join(f"{f} (13 refs)" for f in FAMILIES) + " |"
    assert [r.split(" | ")[0] for r in rows[2:]] == [f"| {k}" for k in keys]
    assert rows[2] == "| vital, edit caption | " + " | ".join(["25%/0.50/0.75"] * len(FAMILIES)) + " |"
    row = rows[2 + keys.index("none, source's pooled vector")].split(" | ")
    assert row[1 + FAMILIES.index("background")] == "100%/0.50/0.06" and row[1] == "25%/0.50/0.75"
    assert rows[2 + keys.index("all, edit caption")].split(" | ")[1] == "25%/0.50/-"


def test_every_run_summarises_open_iou_over_the_grades_that_measured_one():
    """The one summary the ablation, layer sweep and conditioning runs share: the IoUs are means over the grades
    whose edit left such an object (None where none did), success over all of them."""
    from mini.edits import EditGrade
    from mini.evaluate import _summary

    grades = [EditGrade(True, 0.5, True, 0.25), EditGrade(False, 1.0, True, None), EditGrade(True, None, True, None),
              EditGrade(False, 0.75, False, 0.75)]  # fmt: skip
    s = _summary(grades, 4, 5)
    assert s == {"cases": 5, "references_right": 4, "success": 0.5, "untouched_iou": 0.75, "open_iou": 0.5,
                 "untouched_kept": 0.75}  # fmt: skip
    assert _summary(grades[1:3], 2, 2)["open_iou"] is None


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
