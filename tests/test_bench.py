"""demo_5_bench.py and stableflow.bench: the bootstrap interval against a hand computation, the CSV/NaN rule, the case
readers' bad-case handling (a fake PIE-Bench copy, a JSON list), world masks, and the tiny demo end to end (resume
after a kill, a damaged file remade, a changed setting refused)."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from flux.errors import UserError
from stableflow.bench import (
    BenchConfig,
    bootstrap,
    read_list,
    read_pie,
    read_table,
    summary_md,
    table_csv,
    world_mask,
)
from stableflow.config import load_config


def test_bootstrap_interval_matches_the_exact_resampling_distribution():
    # Resampling [0, 0, 0, 10]: the mean is 10 k / 4 with k ~ Binomial(4, 1/4): P(k <= 0) = 0.316, P(k <= 2) = 0.949,
    # P(k <= 3) = 0.996. So the 2.5% quantile is 0 and the 97.5% quantile is 10 * 3 / 4 = 7.5.
    b = bootstrap([0, 0, 0, 10], resamples=4000, seed=1)
    assert (b["mean"], b["lo"], b["hi"], b["n"], b["nan"]) == (2.5, 0.0, 7.5, 4, 0)
    # A constant sample has a degenerate interval; NaNs are counted and left out of the mean, never averaged as 0.
    assert bootstrap([3.0] * 5)["lo"] == bootstrap([3.0] * 5)["hi"] == 3.0
    b = bootstrap([1.0, math.nan, 3.0, math.nan])
    assert (b["mean"], b["n"], b["nan"]) == (2.0, 2, 2)
    assert math.isnan(bootstrap([math.nan])["mean"])


def test_csv_keeps_every_row_and_its_nans_and_the_summary_counts_them():
    rows = [
        {"case": "a", "edit_type": "t", "method": "m", "nfe": 4.0, "seconds": 0.5, "psnr": 20.0, "clip": math.nan},
        {"case": "b", "edit_type": "t", "method": "m", "nfe": 4.0, "seconds": 1.5, "psnr": math.nan, "clip": math.nan},
        {"case": "c", "edit_type": "t", "method": "m", "nfe": 4.0, "seconds": 1.0, "psnr": 30.0, "clip": 0.25},
    ]
    text = table_csv(rows, ["psnr", "clip"])
    assert text.count("\n") == 4  # header + every row, the all-NaN one included
    back = read_table(text)
    assert [r["case"] for r in back] == ["a", "b", "c"]
    assert math.isnan(back[1]["psnr"]) and math.isnan(back[0]["clip"]) and back[2]["clip"] == 0.25
    md = summary_md(back, ["m"], ["psnr", "clip"], 100, "# t")
    line = next(x for x in md.splitlines() if x.startswith("| m |"))
    assert "| 4 | 1.00 | 25 [20, 30] (nan 1) | 0.25 [0.25, 0.25] (nan 2) |" in line


def _png(path: Path, size: tuple[int, int], colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_list_reader_skips_each_bad_case_by_id(tmp_path):
    _png(tmp_path / "ok.png", (40, 36))  # cropped to 32x32
    _png(tmp_path / "mask.png", (40, 36), (255, 255, 255))
    _png(tmp_path / "small_mask.png", (20, 20), (255, 255, 255))
    entries = [
        {
            "id": "good",
            "image": "ok.png",
            "source_prompt": "a red box",
            "edit_prompt": "a blue box",
            "mask": "mask.png",
        },
        {"id": "gen", "seed": 3, "source_prompt": "a red box", "edit_prompt": "a [blue] box", "mask": [0, 10]},
        {"id": "gone", "image": "nowhere.png", "source_prompt": "a red box", "edit_prompt": "a blue box"},
        {"id": "wrong-mask", "image": "ok.png", "source_prompt": "a", "edit_prompt": "b", "mask": "small_mask.png"},
        {"id": "same", "seed": 0, "source_prompt": "a red box", "edit_prompt": "a [red] box"},
        {"id": "no-edit", "seed": 0, "source_prompt": "a red box"},
    ]
    (tmp_path / "cases.json").write_text(json.dumps(entries))
    found = read_list(tmp_path / "cases.json", (32, 32))
    assert [c.id for c in found.cases] == ["good", "gen"]
    assert found.cases[0].image.size == (32, 32) and found.cases[0].mask.shape == (32, 32)
    assert found.cases[1].image is None and found.cases[1].mask.shape == (32, 32)
    why = dict(s.split(": ", 1) for s in found.skipped)
    assert list(why) == ["gone", "wrong-mask", "same", "no-edit"]
    assert "missing image" in why["gone"] and "20x20" in why["wrong-mask"]
    assert "changes nothing" in why["same"] and "edit_prompt" in why["no-edit"]


def fake_pie(root: Path) -> Path:
    """A tiny copy of PIE-Bench's published layout: two good entries, a missing image, a wrong-size image, an
    entry whose edit changes nothing."""
    entry = lambda path, src, tgt, mask, kind: {
        "image_path": path,
        "original_prompt": src,
        "editing_prompt": tgt,
        "editing_instruction": "",
        "editing_type_id": kind,
        "blended_word": "",
        "mask": mask,
    }
    mapping = {
        "000000000000": entry("0_random_140/000000000000.jpg", "a cat [sitting] on a mat", "a cat [lying] on a mat",
                              [512 * 100 + 50, 20], "0"),
        "111000000000": entry("1_change_object_80/111000000000.jpg", "a [cat]", "a [dog]", [0, 3], "1"),
        "222000000000": entry("2_add_object_80/222000000000.jpg", "a table", "a [vase on a] table", [0, 1], "2"),
        "333000000000": entry("3_delete_object_80/333000000000.jpg", "a cat", "a dog", [0, 1], "3"),
        "444000000000": entry("4_change_attribute_content_40/444000000000.jpg", "a [red] car", "a red car", [], "4"),
    }  # fmt: skip
    for key, e in mapping.items():
        if key != "222000000000":
            _png(root / "annotation_images" / e["image_path"], (256, 256) if key == "333000000000" else (512, 512))
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


def test_pie_reader_on_a_fake_copy(tmp_path):
    found = read_pie(fake_pie(tmp_path))
    assert [c.id for c in found.cases] == ["000000000000", "111000000000"]
    first = found.cases[0]
    assert first.target_prompt == "a cat [lying] on a mat"  # markers kept in the record, removed before use
    assert [c.edit_type for c in found.cases] == ["random", "change object"]
    mask = first.mask
    assert mask.shape == (512, 512) and mask[100, 50:70].all() and not mask[100, 70] and not mask[101, 50:70].any()
    assert mask[0].all() and mask[:, -1].all()  # the reference's frame
    why = dict(s.split(": ", 1) for s in found.skipped)
    assert "missing image" in why["222000000000"] and "256x256" in why["333000000000"]
    assert "changes nothing" in why["444000000000"]


def test_a_source_without_measurable_cases_is_refused_before_anything_runs(tmp_path):
    from stableflow.bench import read_cases

    (tmp_path / "cases.json").write_text(json.dumps([{"id": "x", "seed": 0, "source_prompt": "a", "edit_prompt": "a"}]))
    cfg = BenchConfig(model="flux-tiny", cases="list", cases_path=str(tmp_path / "cases.json"))
    with pytest.raises(UserError, match=r"no case to measure .*x: the edit prompt changes nothing"):
        read_cases(cfg)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the case list"):
        read_list(tmp_path / "bad.json", (32, 32))
    with pytest.raises(UserError, match="mapping_file.json"):
        read_pie(tmp_path)
    (tmp_path / "mapping_file.json").write_text("[]")
    with pytest.raises(UserError, match="not a JSON object of cases by id"):
        read_pie(tmp_path)


def test_config_names_unknown_methods_and_metrics():
    with pytest.raises(UserError, match=r"(?s)unknown 'sdedt'.*unknown 'psnr'"):
        load_config(BenchConfig, None, ["cases=world", 'methods=["sdedt"]', 'metrics=["psnr"]'])


def test_world_masks_cover_exactly_what_the_edit_may_change():
    from mini.edits import edit_cases, source_scenes
    from mini.world import SceneBatch, coverage

    for family in ("attribute", "replacement", "size", "background", "addition"):
        scenes, edits = source_scenes(6, 0, family), [e for _, _, e in edit_cases(6, 0, family)]
        for scene, edit in zip(scenes, edits):
            if edit.place in {o.place for o in scene.objects}:
                continue  # an addition named an occupied cell: reference_ok rules that case out of edit success
            mask = world_mask(scene, edit)
            cover = coverage(SceneBatch.of([scene]))[0].numpy() > 0
            for k, o in enumerate(scene.objects):
                inside = mask[cover[k]]
                edited = family not in ("background", "addition") and o.colour == edit.colour
                assert inside.all() if edited else not inside.any(), (family, o)
            if family == "background":
                assert mask.sum() == (~cover.any(0)).sum()


@pytest.mark.slow
def test_tiny_bench_end_to_end_resumes_and_refuses_changes(run_script, tmp_path):
    out = tmp_path / "bench"
    args = ("demo_5_bench.py", "configs/tiny/demo_5_bench.json", f"output_dir={out}")
    first = run_script(*args)
    assert first.returncode == 0, first.stderr
    assert "wrote 27 edit(s) of 3 cases x 9 methods, metrics.csv (27 rows" in first.stdout
    rows = read_table((out / "metrics.csv").read_text())
    assert len(rows) == 27 and {r["method"] for r in rows} >= {"stable-flow", "fireflow", "stable-flow/non-vital"}
    assert all(math.isnan(r["clip_similarity_target_image_edit_part"]) for r in rows if r["case"] == "fox-white")
    for name in ("summary.md", "tradeoff.png", "contact_sheet.png", "run.json"):
        assert (out / name).is_file()
    before = (out / "metrics.csv").read_text()

    # A kill leaves some edits missing (writes are atomic: a file is whole or absent); a damaged one is remade.
    (out / "cases/ring/flowedit.png").unlink()
    (out / "cases/ring/source.png").unlink()
    damaged = out / "cases/fox-grass/sdedit.png"
    damaged.write_bytes(damaged.read_bytes()[:-40])
    again = run_script(*args)
    assert again.returncode == 0, again.stderr
    assert "wrote 2 edit(s)" in again.stdout and "1 damaged file remade" in again.stdout
    drop = lambda text: [line.split(",")[:4] + line.split(",")[5:] for line in text.splitlines()]  # seconds aside
    assert drop((out / "metrics.csv").read_text()) == drop(before)

    changed = run_script(*args, "steps=5")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "steps 4 -> 5" in changed.stderr and "params.n_max 3 -> 4" in changed.stderr


@pytest.mark.slow
def test_bad_cases_are_reported_and_skipped_not_raised(run_script, tmp_path):
    cases = [
        {"id": "ok", "seed": 0, "source_prompt": "a red fox", "edit_prompt": "a white fox"},
        {"id": "lost", "image": "lost.png", "source_prompt": "a red fox", "edit_prompt": "a white fox"},
        {"id": "big-mask", "seed": 0, "source_prompt": "a red fox", "edit_prompt": "a [white] fox", "mask": "m.png"},
    ]
    _png(tmp_path / "m.png", (64, 64))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "bench"
    done = run_script(
        "demo_5_bench.py", "configs/tiny/demo_5_bench.json", f"cases_path={tmp_path / 'cases.json'}",
        f"output_dir={out}", 'methods=["sdedit"]',
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "skipped case lost: missing image" in done.stdout and "skipped case big-mask: ValueError mask" in done.stdout
    assert "wrote 1 edit(s) of 1 cases x 1 methods" in done.stdout and "2 bad case(s) skipped" in done.stdout
    assert json.loads((out / "run.json").read_text())["skipped"][0].startswith("lost: missing image")


@pytest.mark.slow
def test_torchrun_ranks_share_the_cases_and_the_last_writes_the_table(run_script, tmp_path):
    out = tmp_path / "bench"
    args = ("demo_5_bench.py", "configs/tiny/demo_5_bench.json", f"output_dir={out}", 'methods=["sdedit","fireflow"]')
    first = run_script(*args, env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert first.returncode == 0, first.stderr
    assert "[rank 1/2] wrote 2 edit(s); 6 output(s) of other processes still missing" in first.stdout
    assert not (out / "metrics.csv").exists() and sorted(p.name for p in (out / "cases").iterdir()) == ["fox-grass"]
    last = run_script(*args, env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert last.returncode == 0, last.stderr
    assert "[rank 0/2] wrote 4 edit(s) of 3 cases x 2 methods, metrics.csv (6 rows" in last.stdout


def test_method_params_apply_the_bench_steps_in_each_methods_own_terms():
    from stableflow.bench import METHOD_NAMES, method_params, model_shape
    from stableflow.methods.flowedit import FlowEditParams

    shape = model_shape("flux-tiny")
    every = {m: method_params(shape, m, 7, None) for m in METHOD_NAMES}
    assert every["flowedit"] == FlowEditParams(steps=7, n_max=6)  # 24 of 28 steps -> 6 of 7
    assert every["fireflow"].inject == 1 and every["rf-solver-edit"].inject == 3 and every["sdedit"].steps == 7
    assert every["stable-flow/no-injection"].layers == [] and every["stable-flow/no-nudging"].nudge == 1.0
    assert len(every["stable-flow/all-layers"].layers) == shape.model.num_layers
    assert method_params(shape, "stable-flow", None, [0, 2]).layers == [0, 2]
    assert method_params(shape, "fireflow", 8, None) == method_params(shape, "fireflow", None, None)


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(repo_root, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "bench"
    args = [sys.executable, "demo_5_bench.py", "configs/tiny/demo_5_bench.json", f"output_dir={out}", "steps=12"]
    args += ["source_steps=12"]
    proc = subprocess.Popen(args, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("cases/*/sdedit.png")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    made = len(list(out.glob("cases/*/*.png")))
    assert 0 < made < 30 and not (out / "metrics.csv").exists()
    done = subprocess.run(args, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "metrics.csv (27 rows" in done.stdout and "wrote 27 edit(s)" not in done.stdout
