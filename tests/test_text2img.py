"""demo_0_test.py and `python -m flux`, run exactly as the README says, on flux-tiny."""

import json
import re

import pytest
import torch
from PIL import Image

from stableflow.io import read_png_metadata, tensor_to_pil

pytestmark = pytest.mark.slow  # every test runs the demo or the CLI as a script


def final_progress(stderr: str) -> tuple[int, int]:
    """The last "done/total" a tqdm bar printed."""
    done, total = re.findall(r"(\d+)/(\d+) \[", stderr)[-1]
    return int(done), int(total)


def test_tiny_config_end_to_end_and_resume(tmp_path, repo_root, run_script, tiny_models):
    out = tmp_path / "out"
    r = run_script("demo_0_test.py", "configs/tiny/demo_0_test.json", f"output_dir={out}")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((repo_root / "configs/tiny/demo_0_test.json").read_text())
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(cfg["prompt"]) * cfg["num_images"]
    # The progress bar counts every image's steps to the end, also in batches (batch_size 2 stopped at half).
    assert cfg["batch_size"] > 1 and final_progress(r.stderr) == (len(pngs) * cfg["steps"],) * 2
    assert r.stdout.splitlines()[-1] == f"wrote {len(pngs)} images to {out} (0 already there)"
    meta = read_png_metadata(out / "img_001_seed1.png")
    assert meta["prompt"] == cfg["prompt"][1] and meta["seed"] == "1" and meta["model"] == "flux-tiny"
    assert Image.open(pngs[0]).size == (cfg["width"], cfg["height"])
    record = json.loads((out / "run.json").read_text())
    assert record["generated_this_run"] == len(pngs) and record["config"]["width"] == cfg["width"]
    # The batched demo (prompts encoded once, rows selected per batch) gives the one-image generate() result.
    alone = tiny_models.generate([cfg["prompt"][1]], [1], cfg["width"], cfg["height"], cfg["steps"], 3.5)[0]
    got = torch.tensor(list(Image.open(out / "img_001_seed1.png").getdata()), dtype=torch.float32)
    want = torch.tensor(list(tensor_to_pil(alone).getdata()), dtype=torch.float32)
    assert (got - want).abs().max() <= 1  # batch-size-dependent CPU rounding may move a pixel by one level
    # Same seed, same image; a second run finds everything done and regenerates nothing.
    assert Image.open(out / "img_000_seed0.png").tobytes() != Image.open(out / "img_001_seed0.png").tobytes()
    before = {p.name: p.read_bytes() for p in pngs}
    r = run_script("demo_0_test.py", "configs/tiny/demo_0_test.json", f"output_dir={out}")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "run.json").read_text())["generated_this_run"] == 0
    assert json.loads((out / "run.json").read_text())["already_done"] == len(pngs)
    assert r.stdout.splitlines()[-1] == f"wrote 0 images to {out} ({len(pngs)} already there)"
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before


def test_bad_config_exits_2_and_writes_nothing(tmp_path, run_script):
    bad = tmp_path / "bad.json"
    out = tmp_path / "out"
    bad.write_text(json.dumps({"model": "flux-tni", "widht": 64, "height": 50, "steps": "4", "output_dir": str(out)}))
    r = run_script("demo_0_test.py", str(bad))
    assert r.returncode == 2
    for expected in [
        'did you mean "flux-tiny"',
        "unknown key 'widht' — did you mean 'width'?",
        "'height' must be a multiple of 16, got 50",
        "'steps' must be an integer or null, got \"4\"",
    ]:
        assert expected in r.stderr
    assert not out.exists()


def test_print_config_is_loadable(tmp_path, run_script):
    r = run_script("demo_0_test.py", "--print-config")
    assert r.returncode == 0
    cfg = json.loads(r.stdout)
    assert cfg["width"] is None and "_help" in cfg  # the model's native size (below)
    (tmp_path / "c.json").write_text(r.stdout)
    assert run_script("demo_0_test.py", str(tmp_path / "c.json"), "--print-config").returncode == 0


def test_size_steps_and_guidance_default_to_the_models():
    """One defaults rule per model, the same in every demo: flux-mini draws at its native 128², FLUX.1 at 1024²."""
    from stableflow.config import load_config
    from stableflow.edit import EditConfig
    from stableflow.sweep import SkipConfig
    from stableflow.text2img import Text2ImgConfig
    from stableflow.trajectory import TrajectoryConfig

    for cls in (Text2ImgConfig, TrajectoryConfig, SkipConfig, EditConfig):
        mini, dev = load_config(cls, None, ["model=flux-mini"]), load_config(cls, None, [])
        assert (mini.image_size, dev.image_size) == ((128, 128), (1024, 1024)), cls
        assert load_config(cls, None, ["model=flux-mini", "width=64"]).image_size == (64, 128)
    assert load_config(Text2ImgConfig, None, ["model=flux-mini"]).num_steps == 20  # the model's
    assert load_config(Text2ImgConfig, None, ["model=flux-schnell"]).num_steps == 4
    assert load_config(TrajectoryConfig, None, ["model=flux-mini"]).num_steps == 15  # the demo's (Stable Flow's)
    assert load_config(SkipConfig, None, ["model=flux-krea-dev"]).guidance_value == 4.5


def test_official_cli_flags(tmp_path, run_script):
    r = run_script(
        "-m",
        "flux",
        "--name",
        "flux-tiny",
        "--width",
        "40",
        "--height",
        "32",
        "--prompt",
        "a fox",
        "--seed",
        "3",
        "--num_steps",
        "2",
        "--guidance",
        "3.5",
        "--output_dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    assert r.returncode == 0, r.stderr
    (png,) = tmp_path.glob("*.png")
    assert Image.open(png).size == (32, 32)  # floored to multiples of 16, as the official CLI does
    assert read_png_metadata(png)["prompt"] == "a fox"


def test_speed_options_from_the_config(tmp_path, run_script):
    """stream_blocks is lossless (same PNG bytes); FP8 runs (this torch has CPU FP8 matmuls); bad combinations
    and FP8 in an ablation sweep are one clear error."""
    base = ["demo_0_test.py", "configs/tiny/demo_0_test.json", "prompt=a fox", "num_images=1", "steps=2"]
    # Both with the math attention kernel: then streaming is the only difference, and it moves weights, not numbers
    # (with the default kernel on one side, equal bytes held only because seed 0 happened to round the same).
    assert run_script(*base, f"output_dir={tmp_path / 'plain'}", "attention=math").returncode == 0
    r = run_script(*base, f"output_dir={tmp_path / 'stream'}", "stream_blocks=true", "attention=math")
    assert r.returncode == 0, r.stderr
    plain, streamed = (Image.open(tmp_path / d / "img_000_seed0.png") for d in ("plain", "stream"))
    assert plain.tobytes() == streamed.tobytes()
    r = run_script(*base, f"output_dir={tmp_path / 'x'}", "compile=true", "stream_blocks=true", "offload=true")
    assert r.returncode == 2 and "'compile' and 'stream_blocks' do not combine" in r.stderr
    assert "'offload' and 'stream_blocks' do not combine" in r.stderr
    r = run_script(*base, f"output_dir={tmp_path / 'fp8'}", "fp8=true")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "fp8" / "img_000_seed0.png").size == plain.size
    r = run_script("demo_2_skip.py", "configs/tiny/demo_2_skip.json", "fp8=true", f"output_dir={tmp_path / 'sweep'}")
    assert r.returncode == 2 and "confound" in r.stderr and not (tmp_path / "sweep").exists()


def test_official_cli_numbers_images_after_the_highest_and_refuses_zero_steps(tmp_path, run_script):
    base = ["-m", "flux", "--name", "flux-tiny", "--width", "32", "--height", "32", "--device", "cpu"]
    base += ["--dtype", "fp32", "--output_dir", str(tmp_path)]
    (tmp_path / "img_1.png").write_bytes(b"an earlier image")  # img_0 deleted by the user, say
    assert run_script(*base, "--num_steps", "1").returncode == 0
    assert (tmp_path / "img_1.png").read_bytes() == b"an earlier image" and (tmp_path / "img_2.png").is_file()
    r = run_script(*base, "--num_steps", "0")
    assert r.returncode == 2 and "--num_steps must be at least 1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused_not_kept(tmp_path, run_script):
    """An image already in output_dir counts as done only when it was made with the same settings."""
    base = ["demo_0_test.py", "configs/tiny/demo_0_test.json", "prompt=a fox", "num_images=1", f"output_dir={tmp_path}"]
    assert run_script(*base, "steps=2").returncode == 0
    before = (tmp_path / "img_000_seed0.png").read_bytes()
    r = run_script(*base, "steps=3")
    assert r.returncode == 2 and "made with other settings (steps 2 -> 3)" in r.stderr
    assert (tmp_path / "img_000_seed0.png").read_bytes() == before
    r = run_script(*base, "seed=[1, 1]")
    assert r.returncode == 2 and "'seed' repeats a seed" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "args", "size", "guidance"),
    [
        ("flux-mini", [], (128, 128), "null"),  # its native size; no guidance embedding, so no guidance recorded
        ("flux-mini", ["--guidance", "5"], (128, 128), "null"),
        ("flux-tiny", ["--height", "48", "--guidance", "2.5"], (1360, 48), "2.5"),  # FLUX.1's defaults otherwise
    ],
)
def test_official_cli_defaults_and_guidance_follow_the_model(tmp_path, name, args, size, guidance):
    from flux.__main__ import main

    argv = ["--name", name, "--device", "cpu", "--dtype", "fp32", "--num_steps", "1", "--seed", "0"]
    assert main([*argv, *args, "--output_dir", str(tmp_path)]) == 0
    with Image.open(tmp_path / "img_0.png") as im:
        assert im.size == size and im.text["guidance"] == guidance and im.text["model"] == name
