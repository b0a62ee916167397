"""Stable Flow on flux-mini 2, the paper's ablation: issue 18's editing claims measured with the world's detector and
edit graders through mini.evaluate's functions (the README's numbers), on the CPU.

The ablation injects in the layers the mini configs name; test_mini_method.py pins those to what demo_3 finds on the
shipped weights. The two files run on separate workers, so the ablation (the suite's longest fixture) need not wait
for demo_2's sweep. Targets the shipped model misses are strict xfails with the measured number (never a lowered
target); beside each, a regression guard a little under the measured level keeps what the model reaches from slipping.
"""

import json

import pytest

from mini.evaluate import ablation_generated, ablation_real, layer_sets
from mini.train import read_manifest


def _configured_vital_layers(repo_root) -> list[int]:
    """The layers the mini editing configs inject in (test_mini_method.py: all three name demo_3's result)."""
    return json.loads((repo_root / "configs" / "mini" / "demo_4_edit.json").read_text())["vital_layers"]


@pytest.fixture(scope="module")
def ablation(mini, repo_root):
    """Each edit family under injection in the mini configs' vital layers, none, all and the non-vital ones (12 cases
    a family: the README's table uses 64), and real world pictures with and without nudging."""
    vital = _configured_vital_layers(repo_root)
    return {
        "generated": ablation_generated(mini, layer_sets(mini, vital), 12, 1),
        "real": ablation_real(mini, vital, 6, 1, 30),
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
def test_without_injection_edits_move_untouched_objects(ablation):
    """Regression guard for the target below: same-seed edits of under-specified captions move the untouched objects
    left unplaced (measured open IoU 0.58 on these 12 cases a family; a model whose layout ignored the caption would
    keep them near 1)."""
    assert _mean(ablation, "none", OPEN) <= 0.75


def _recorded_ablation(repo_root) -> dict:
    """The README's ablation (`mini.evaluate --ablation --cases 64 --update-manifest`), recorded in the shipped
    weights' manifest; an export of other weights drops the record, so it is these weights' measurement."""
    return read_manifest(repo_root / "flux" / "assets" / "mini")["evaluation"]["ablation"]["ablation"]


def test_manifest_records_the_readmes_ablation_of_demo_3s_layers(repo_root):
    record = _recorded_ablation(repo_root)
    assert record["cases_per_family"] == 64 and record["vital_layers"] == _configured_vital_layers(repo_root)
    assert all(record["generated"][f]["none"][OPEN] is not None for f in record["generated"])


# The drift sits within the 12 cases' sampling spread of the target (open IoU 0.58 on this test's cases, 0.67 on the
# README's 64 and on the layer sweep's 16), so the target is decided on the README's 64 cases a family.
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="without injection, untouched objects left unplaced "
                   "keep mean IoU 0.67 over the README's 64 cases a family (background changes 0.18; every untouched "
                   "object 0.74): the trained model keeps more of a same-seed layout than the target's 0.6")  # fmt: skip
def test_phenomenon_edits_move_untouched_objects_without_injection(repo_root):
    assert _mean(_recorded_ablation(repo_root), "none", OPEN) <= 0.6


@pytest.mark.slow
def test_vital_layers_let_more_edits_through_than_all_layers(ablation):
    """Regression guard for the target below: injection in every layer reproduces the reference, in the vital ones
    more edits still happen (measured +20 points on these 12 cases a family, +21 on the README's 64)."""
    assert _mean(ablation, "vital", "success") >= _mean(ablation, "all", "success") + 0.12


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="+21 points over the README's 64 cases a family (36% vs 15%), +20 on this "
                   "test's 12: the vital layers block additions and size changes as all layers do")  # fmt: skip
def test_vital_layers_let_edits_through_where_all_layers_do_not(ablation):
    assert _mean(ablation, "vital", "success") >= _mean(ablation, "all", "success") + 0.30


@pytest.mark.slow
def test_vital_layer_injection_holds_more_than_none(ablation):
    """Regression guard for the target below: injection in the vital layers keeps untouched objects left unplaced
    where they were (measured +0.27 open-place IoU over no injection on these 12 cases a family, +0.20 on the
    README's 64)."""
    assert _mean(ablation, "vital", OPEN) >= _mean(ablation, "none", OPEN) + 0.12


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="README's ablation table: vital-layer injection lets 36% of edits through "
                   "(additions 11%, size 0%) and holds untouched objects left unplaced at IoU 0.87, +0.20 over "
                   "none")  # fmt: skip
def test_vital_layer_injection_holds_untouched_objects_and_lets_the_edit_through(ablation):
    gen = ablation["generated"]
    assert _mean(ablation, "vital", OPEN) >= max(0.85, _mean(ablation, "none", OPEN) + 0.25)
    assert all(gen[f]["vital"]["success"] >= 0.85 for f in ("attribute", "replacement", "background"))
    assert all(gen[f]["vital"]["success"] >= 0.70 for f in ("addition", "size"))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="README's ablation table: injection in the 17 non-vital layers blocks the "
                   "edit as much (32% success) and keeps as much (open-place IoU 0.84 against the vital layers' "
                   "0.87)")  # fmt: skip
def test_vital_layers_hold_more_than_non_vital_ones(ablation):
    assert _mean(ablation, "vital", OPEN) >= _mean(ablation, "non-vital", OPEN) + 0.15


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="README's ablation table: real pictures edited in the vital layers 35% / "
                   "open-place IoU 0.79 with nudging, 40% / 0.75 without")  # fmt: skip
def test_real_image_edits_hold_and_nudging_helps(ablation):
    nudge, plain = ablation["real"]["nudge"], ablation["real"]["no nudge"]
    assert nudge["success"] >= 0.80 and nudge[OPEN] >= 0.85
    assert nudge["success"] > plain["success"]
