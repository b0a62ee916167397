"""demo_1_layer.py on its tiny config, run as the README says: every step's x_t and predicted x0, grid, GIF."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo_1_layer import main
from stableflow.config import run_demo
from stableflow.io import read_png_metadata
from stableflow.trajectory import TrajectoryConfig

TINY = Path("configs/tiny/demo_1_layer.json")  # relative to the repository root, where the demos run


@pytest.fixture
def demo(run_script, repo_root):
    env = {"PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    return lambda *args: run_script("demo_1_layer.py", TINY, *args, env=env, timeout=120)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_trajectory_outputs(tmp_path, repo_root, demo):
    steps, seeds = 4, [0, 5]
    result = demo(
        f"output_dir={tmp_path}", f"steps={steps}", f"seed={json.dumps(seeds)}", "skip_layers=[3]", "batch_size=3"
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((repo_root / TINY).read_text())
    run = json.loads((tmp_path / "run.json").read_text())
    assert len(run["samples"]) == len(config["prompt"]) * len(seeds)
    # Batches of 3 and 1: the progress bar still ends at every sample's every step.
    done, total = re.findall(r"(\d+)/(\d+) \[", result.stderr)[-1]
    assert int(done) == int(total) == len(run["samples"]) * steps
    assert result.stdout.splitlines()[-1] == f"wrote 4 trajectories ({steps} steps) to {tmp_path} (0 already there)"
    assert len(run["timesteps"]) == steps + 1 and run["timesteps"][0] == 1.0 and run["timesteps"][-1] == 0.0
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [f.name for f in folders] == sorted(s["folder"] for s in run["samples"])
    assert folders[0].name == "00_a-red-fox-in-the-snow_seed0"
    for folder in folders:
        for kind in ("x_t", "x0"):
            frames = sorted((folder / kind).iterdir())
            assert [f.name for f in frames] == [f"step_{k:02d}.png" for k in range(steps)]
            with Image.open(frames[0]) as im:
                assert im.size == (config["width"], config["height"])
        with Image.open(folder / "trajectory.gif") as gif:
            assert gif.n_frames == steps
        with Image.open(folder / "grid.png") as grid:
            assert grid.height > grid.width  # `steps` rows of two columns
        # The prediction at the last step (t -> 0) is the final image itself.
        assert np.array_equal(pixels(folder / "final.png"), pixels(folder / "x0" / f"step_{steps - 1:02d}.png"))
        # x_t at the first step is pure noise, so it differs from the prediction made from it.
        assert not np.array_equal(pixels(folder / "x_t" / "step_00.png"), pixels(folder / "x0" / "step_00.png"))
        meta = read_png_metadata(folder / "x0" / "step_01.png")
        assert meta["step"] == "1" and float(meta["t"]) == run["timesteps"][1] and meta["skip_layers"] == "[3]"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial"))]

    # A re-run finds every sample complete (its GIF, written last, exists): nothing is rewritten.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    (folders[-1] / "trajectory.gif").unlink()  # as if killed while writing the last sample
    again = demo(f"output_dir={tmp_path}", f"steps={steps}", f"seed={json.dumps(seeds)}", "skip_layers=[3]")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "run.json").read_text())["generated_this_run"] == 1
    assert json.loads((tmp_path / "run.json").read_text())["already_done"] == 3
    assert again.stdout.splitlines()[-1] == f"wrote 1 trajectory ({steps} steps) to {tmp_path} (3 already there)"
    assert json.loads((tmp_path / "run.json").read_text())["samples"] == run["samples"]
    assert (folders[-1] / "trajectory.gif").exists()
    after = {p: p.stat().st_mtime_ns for p in before}
    assert all(after[p] == before[p] for p in before if folders[-1] not in p.parents)
    assert any(after[p] != before[p] for p in before if folders[-1] in p.parents)


def test_bad_layer_is_refused_before_anything_is_written(tmp_path, capsys, repo_root):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # in-process: the config check runs before any model is loaded
        run_demo(TrajectoryConfig, main, [str(repo_root / TINY), f"output_dir={out}", "skip_layers=[0,6]"])
    assert e.value.code == 2
    assert "'skip_layers': layer 6 out of range: this model has layers 0..5" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_a_rerun_with_other_skip_layers_is_refused(tmp_path, demo):
    """The sample folder is named by prompt and seed: a re-run bypassing a layer must not pass the plain
    trajectory off as the ablated one."""
    args = [f"output_dir={tmp_path}", "prompt=a fox", "steps=2"]
    assert demo(*args).returncode == 0
    r = demo(*args, "skip_layers=[5]")
    assert r.returncode == 2 and "made with other settings (skip_layers [] -> [5])" in r.stderr
