"""demo_2_skip.py: the plan and its split over ranks, bad input, and real runs on flux-tiny — two ranks at once,
and a sweep killed with SIGKILL then restarted, which must end with exactly the files of an uninterrupted run."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo_2_skip import main, run_sweep
from flux.errors import UserError
from flux.pipeline import Text, tensor_to_pil
from stableflow.config import load_config, run_demo
from stableflow.io import read_png_metadata, save_png
from stableflow.sweep import (
    Dist,
    Item,
    PromptSpec,
    SkipConfig,
    SweepPlan,
    claim,
    load_prompts,
    merge_manifest,
    plan_batches,
    resolve_layers,
    select_prompts,
    shard,
)

REPO = Path(__file__).resolve().parents[1]  # launch() starts its sweeps there, with Popen: they are killed mid-way
TINY = REPO / "configs" / "tiny" / "demo_2_skip.json"
PROMPTS = [PromptSpec("fox", "a red fox in the snow", 11), PromptSpec("lamp", "a lighthouse at dusk, ünïcödé", 22)]
N_LAYERS = 6  # flux-tiny: 2 double + 4 single blocks
SETTINGS = ["num_prompts=null", "width=32", "height=48", "steps=2", "batch_size=3", "progress=false"]

# Runs demo_2_skip.py with save_png wrapped (test-only): it logs each written path and may sleep after it,
# so that a kill reliably lands mid-sweep. The sweep code itself is unchanged.
RUNNER = """
import os, runpy, sys, time
import stableflow.runs as runs
real, log, delay = runs.save_png, os.environ.get("SWEEP_LOG"), float(os.environ.get("SWEEP_DELAY", "0"))
def save_png(path, *args, **kwargs):
    real(path, *args, **kwargs)
    if log:
        with open(log, "a") as f:
            f.write(f"{path}\\n")
    time.sleep(delay)
runs.save_png = save_png
sys.argv = ["demo_2_skip.py", *sys.argv[1:]]
runpy.run_path("demo_2_skip.py", run_name="__main__")
"""


def expected_files(root: Path, prompts=PROMPTS, layers=range(N_LAYERS)) -> set[Path]:
    return {Item(p, layer).path(root) for p in prompts for layer in [None, *layers]}


def pngs(root: Path) -> set[Path]:
    return set(root.glob("*/*.png"))


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_prompts(tmp_path: Path, prompts=PROMPTS) -> Path:
    path = tmp_path / "prompts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"id": p.id, "prompt": p.prompt, "seed": p.seed} for p in prompts]))
    return path


def launch(args: list[str], rank: int | None = None, world: int | None = None, **env: str) -> subprocess.Popen:
    environ = plain_env(**env)
    if rank is not None:
        environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(TINY), *args],
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def plain_env(**env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)  # one thread: the runs share 2 CPU cores
    return environ


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return err


# ------------------------------------------------------------------------------------------ plan and split


@pytest.mark.parametrize("n_prompts,n_layers,batch,world", [(2, 6, 3, 2), (3, 5, 4, 3), (1, 0, 1, 4), (64, 57, 8, 8)])
def test_every_item_belongs_to_exactly_one_rank(n_prompts, n_layers, batch, world):
    prompts = [PromptSpec(f"p{i}", "x", i) for i in range(n_prompts)]
    batches = plan_batches(prompts, list(range(n_layers)), batch)
    shares = [{item for b in shard(batches, r, world) for item in b} for r in range(world)]
    everything = {Item(p, layer) for p in prompts for layer in [None, *range(n_layers)]}
    assert sum(len(s) for s in shares) == len(everything) == n_prompts * (n_layers + 1)
    assert set().union(*shares) == everything
    assert all(len(b) <= batch for b in batches)


def test_a_batch_bypasses_one_layer_in_every_sample_and_groups_of_prompts_finish_in_turn():
    prompts = [PromptSpec(f"p{i}", "x", i) for i in range(7)]
    batches = plan_batches(prompts, [0, 3, 5], 3)
    assert all(len({it.layer for it in b}) == 1 for b in batches[:8])  # two full groups: one variant per batch
    assert [[it.prompt.id for it in b] for b in batches[:4]] == [["p0", "p1", "p2"]] * 4
    assert [it.layer for b in batches[:4] for it in b[:1]] == [None, 0, 3, 5]  # the reference, then the layers
    assert {it.prompt.id for b in batches[4:8] for it in b} == {"p3", "p4", "p5"}
    last = [it for b in batches[8:] for it in b]  # one prompt left: its variants fill the last batches together
    assert [(it.prompt.id, it.layer) for it in last] == [("p6", None), ("p6", 0), ("p6", 3), ("p6", 5)]


def test_dist_from_env():
    assert Dist.from_env({}) == Dist(0, 1, 0)
    assert Dist.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Dist(5, 8, 1)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(UserError):
            Dist.from_env(bad)


class FakeModels:
    """Stands in for FluxModels: records what run_sweep asks for; images encode (prompt row, seed) in pixels."""

    device = torch.device("cpu")

    def __init__(self):
        self.encoded, self.batches, self.released = [], [], False

    def encode(self, prompts):
        self.encoded += prompts
        n = len(prompts)
        return Text(
            torch.zeros(n, 1, 1),
            torch.zeros(n, 1, 3),
            torch.arange(len(self.encoded) - n, len(self.encoded)).float()[:, None],
        )

    def release_text_encoders(self):
        self.released = True

    @contextlib.contextmanager
    def on_device(self, *modules):
        yield

    model = ae = None

    def schedule(self, steps, width, height):
        return [1.0, 0.0]

    def noise(self, seeds, width, height):
        return torch.tensor(seeds).float().view(-1, 1, 1, 1).expand(-1, 16, height // 8, width // 8)

    def denoise(self, text, noise, timesteps, guidance, skip):
        assert not self.released or len(self.encoded) > 0
        self.batches.append((text.vec[:, 0].tolist(), noise[:, 0, 0, 0].tolist(), [sorted(s) for s in skip]))
        return noise

    def decode(self, latent):
        return torch.zeros(latent.shape[0], 3, 8 * latent.shape[2], 8 * latent.shape[3])


def sweep_in_process(root: Path, dist: Dist, models: FakeModels | None = None, layers=(0, 3, 5)):
    loads = []

    def load(device):
        loads.append(device)
        return models

    result = run_sweep(small_plan(root, layers), load, "cpu", dist, progress=False)
    return result, loads


def small_plan(root: Path, layers=(0, 3, 5)) -> SweepPlan:
    return SweepPlan("flux-tiny", 2, 4, "fp32", tuple(PROMPTS), tuple(layers), 16, 16, 1, 3.5, 3, root)


def write_finished(plan: SweepPlan, paths: set[Path]) -> dict[Path, bytes]:
    """Finished images of `plan` at `paths` as a previous run wrote them (its record in each); their bytes."""
    for batch in plan.batches():
        for item in batch:
            if item.path(plan.output_dir) in paths:
                save_png(item.path(plan.output_dir), np.zeros((16, 16, 3), np.uint8), plan.output(item).record)
    return {p: p.read_bytes() for p in paths}


def composition(batch: list[Item]) -> tuple:
    """What a batch computes: the seed and the skip set of every sample, in order."""
    return [it.prompt.seed for it in batch], [sorted(it.skip) for it in batch]


def test_resumed_ranks_rerun_only_their_own_unfinished_batches_unchanged(tmp_path):
    layers = (0, 3, 5)
    plan = plan_batches(PROMPTS, list(layers), 3)
    fresh = FakeModels()
    sweep_in_process(tmp_path / "fresh", Dist(), fresh, layers)
    assert [tuple(b[1:]) for b in fresh.batches] == [composition(b) for b in plan]

    root = tmp_path / "resumed"
    done = set(sorted(expected_files(root, layers=layers))[::3])  # a previous run's work: the split ignores it
    before = write_finished(small_plan(root, layers), done)
    written = []
    for rank in (1, 0):  # started at different times, each sees another state of the folder
        models = FakeModels()
        result, loads = sweep_in_process(root, Dist(rank, 2, rank), models, layers)
        assert loads == ["cpu"] and models.released
        assert len(set(models.encoded)) == len(models.encoded)  # each prompt encoded once
        # Only its own share's unfinished batches, each exactly as planned (so a resumed run computes the same).
        assert [tuple(b[1:]) for b in models.batches] == [
            composition(b) for b in shard(plan, rank, 2) if any(it.path(root) not in done for it in b)
        ]
        written += result.written
    assert sorted(written) == sorted(expected_files(root, layers=layers) - done)
    assert {p: p.read_bytes() for p in done} == before  # finished files are never rewritten
    result, loads = sweep_in_process(root, Dist(0, 2, 0), FakeModels(), layers)
    assert loads == [] and result.written == []  # nothing left: the models are not even loaded


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ('[{"id": "a", "prompt": "x", "seed": 1},', "broken JSON at line 1"),
        ('{"id": "a"}', "JSON list"),
        ("[]", "empty list"),
        ('[{"id": "a", "prompt": "x", "seed": 1}, {"id": "a", "prompt": "y", "seed": 2}]', "appears twice"),
        ('[{"id": "../a", "prompt": "x", "seed": 1}]', "folder-safe"),
        ('[{"id": "a", "prompt": "x", "seed": -1}]', "'seed' must be an integer >= 0"),
        ('[{"id": "a", "prompt": "x", "seed": 1, "sed": 2}]', "unknown key"),
    ],
)
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_prompts(path)


def test_bad_selection():
    with pytest.raises(UserError, match=r"'fxo' \(did you mean 'fox'\?\)"):
        select_prompts(PROMPTS, ["fxo"])
    with pytest.raises(UserError, match="num_prompts"):
        select_prompts(PROMPTS, None, 3)
    assert select_prompts(PROMPTS, ["lamp", "fox"], 1) == [PROMPTS[1]]
    with pytest.raises(UserError, match=r"'layers': layers 6, 99 out of range: this model has layers 0\.\.5"):
        resolve_layers([0, 6, 99], 2, 4)
    assert resolve_layers([3, 1, 3], 2, 4) == [1, 3]
    assert resolve_layers(None, 19, 38) == list(range(57))


@pytest.mark.parametrize(
    "override,message",
    [
        ("layers=[1,6]", "out of range"),
        ('prompt_ids=["fox","nope"]', "unknown prompt id"),
        ("prompts_file=missing.json", "does not exist"),
    ],
)
def test_demo_rejects_bad_input_and_writes_nothing(tmp_path, capsys, override, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_demo(
            SkipConfig, main, [str(TINY), f"output_dir={out}", f"prompts_file={write_prompts(tmp_path)}", override]
        )
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def plan_of(tmp_path: Path, *overrides: str) -> SweepPlan:
    args = [f"output_dir={tmp_path / 'out'}", f"prompts_file={write_prompts(tmp_path)}", *SETTINGS, *overrides]
    return load_config(SkipConfig, TINY, args).plan()


def test_resuming_with_other_settings_is_refused(tmp_path):
    base = SweepPlan("flux-tiny", 2, 4, "fp32", tuple(PROMPTS), (0, 1), 32, 48, 2, 3.5, 3, tmp_path)
    merge_manifest(tmp_path, base.manifest())  # no manifest yet: fine
    (tmp_path / "manifest.json").write_text(json.dumps(base.manifest()))
    more = replace(base, prompts=(*PROMPTS, PromptSpec("cat", "a cat", 3)), layers=(4,))
    merged = merge_manifest(tmp_path, more.manifest())  # extending a sweep by prompts and layers is fine
    assert [p["id"] for p in merged["prompts"]] == ["fox", "lamp", "cat"] and merged["layers"] == [0, 1, 4]
    with pytest.raises(UserError, match="steps 2 -> 3"):
        merge_manifest(tmp_path, replace(base, steps=3).manifest())
    with pytest.raises(UserError, match="'fox' has another text or seed"):
        merge_manifest(tmp_path, replace(base, prompts=(PromptSpec("fox", "a red fox in the snow", 12),)).manifest())
    # A sweep whose manifest predates a recorded setting (here the weights) may have been made with other weights.
    legacy = {k: v for k, v in base.manifest().items() if k != "weights"}
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    with pytest.raises(UserError, match=r"weights \(not recorded\) -> null"):
        merge_manifest(tmp_path, base.manifest())


@pytest.mark.parametrize(
    "override,message",
    [
        ("model=flux-schnell", "model flux-tiny -> flux-schnell"),
        ("width=48", "width 32 -> 48"),
        ("height=32", "height 48 -> 32"),
        ("steps=3", "steps 2 -> 3"),
        ("guidance=4", "guidance 3.5 -> 4.0"),
        ("dtype=bf16", "dtype fp32 -> bf16"),
        ("flow_path", "weights.flow random (seed 0) -> 1 file(s), 11 bytes, sha256 sampled "),
        ("ae_path", "weights.ae random (seed 0) -> 1 file(s), 11 bytes, sha256 sampled "),
        ("seed", "prompt 'lamp' has another text or seed there"),
        ("prompt", "prompt 'fox' has another text or seed there"),
    ],
)
def test_demo_refuses_to_resume_with_any_other_setting(tmp_path, capsys, override, message):
    claim(plan_of(tmp_path), Dist())  # a sweep started with SETTINGS: its manifest.json is written
    before = (tmp_path / "out" / "manifest.json").read_text()
    prompts = {
        "seed": [PROMPTS[0], replace(PROMPTS[1], seed=23)],
        "prompt": [replace(PROMPTS[0], prompt="a grey fox"), PROMPTS[1]],
    }.get(override)
    if prompts is not None:  # the same ids with another seed or text
        override = f"prompts_file={write_prompts(tmp_path / 'changed', prompts)}"
    if override.endswith("_path"):  # other weights (refused before they are loaded: any file will do)
        (tmp_path / "weights.safetensors").write_bytes(b"not weights")
        override = f"{override}={tmp_path / 'weights.safetensors'}"
    with pytest.raises(SystemExit) as e:
        run_demo(
            SkipConfig,
            main,
            [
                str(TINY),
                f"output_dir={tmp_path / 'out'}",
                f"prompts_file={write_prompts(tmp_path)}",
                *SETTINGS,
                override,
            ],
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Choose another output_dir" in err
    assert (tmp_path / "out" / "manifest.json").read_text() == before and not pngs(tmp_path / "out")


# ------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Started together, to keep both CPU cores busy: the tiny sweep by two ranks at once (as `torchrun
    --nproc_per_node 2` would start them) into one folder, and a slowed single-process sweep into another,
    killed with SIGKILL once 3 images exist."""
    tmp = tmp_path_factory.mktemp("sweeps")
    prompts = write_prompts(tmp)
    ranks_root, killed_root = tmp / "two_ranks", tmp / "killed"
    procs = [
        launch(
            [f"output_dir={ranks_root}", f"prompts_file={prompts}", *SETTINGS],
            rank=r,
            world=2,
            SWEEP_LOG=str(tmp / f"rank{r}.log"),
        )
        for r in range(2)
    ]
    slow = launch([f"output_dir={killed_root}", f"prompts_file={prompts}", *SETTINGS], SWEEP_DELAY="0.5")
    try:
        deadline = time.monotonic() + 120
        while len(pngs(killed_root)) < 3:
            assert slow.poll() is None, slow.communicate()[1]
            assert time.monotonic() < deadline, "the sweep wrote nothing in 120 s"
            time.sleep(0.01)
        slow.send_signal(signal.SIGKILL)
        slow.communicate()
        survivors = {p: p.stat().st_ino for p in pngs(killed_root)}
        logs = [finish(p) for p in procs]
    finally:
        for p in (*procs, slow):
            if p.poll() is None:
                p.kill()
                p.communicate()
    written = [set(map(Path, (tmp / f"rank{r}.log").read_text().split())) for r in range(2)]
    return {
        "ranks_root": ranks_root,
        "written": written,
        "logs": logs,
        "killed_root": killed_root,
        "survivors": survivors,
        "prompts": prompts,
    }


@pytest.mark.slow
def test_two_ranks_make_every_image_exactly_once(sweeps):
    root, (rank0, rank1), logs = sweeps["ranks_root"], sweeps["written"], sweeps["logs"]
    assert rank0 and rank1 and not rank0 & rank1  # both worked, on disjoint items
    assert rank0 | rank1 == expected_files(root) == pngs(root)
    assert len(rank0) + len(rank1) == len(PROMPTS) * (N_LAYERS + 1)
    assert "[rank 1/2]" in logs[1]
    assert not leftovers(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest == {
        "model": "flux-tiny",
        "weights": {"flow": "random (seed 0)", "ae": "random (seed 0)", "t5": "random (tiny)", "clip": "random (tiny)"},
        "num_double": 2,
        "num_single": 4,
        "dtype": "fp32",
        "fp8": False,
        "width": 32,
        "height": 48,
        "steps": 2,
        "guidance": 3.5,
        "prompts": [{"id": p.id, "prompt": p.prompt, "seed": p.seed} for p in PROMPTS],
        "layers": list(range(N_LAYERS)),
    }
    meta = read_png_metadata(root / "lamp" / "layer_03.png")
    assert meta["prompt"] == PROMPTS[1].prompt and meta["seed"] == "22" and meta["layer"] == "3"
    assert meta["layer_name"] == "single_blocks.1 (layer 3)" and meta["steps"] == "2" and meta["guidance"] == "3.5"
    assert read_png_metadata(root / "fox" / "ref.png")["layer"] == "ref"
    with Image.open(root / "fox" / "ref.png") as im:
        assert im.size == (32, 48)
    # Every variant shares the prompt's noise, and the bypass changes the image.
    assert not np.array_equal(pixels(root / "fox" / "ref.png"), pixels(root / "fox" / "layer_00.png"))


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_files(sweeps, run_script):
    root, survivors = sweeps["killed_root"], sweeps["survivors"]
    args = [f"output_dir={root}", f"prompts_file={sweeps['prompts']}", *SETTINGS]
    assert 3 <= len(survivors) < len(expected_files(root))  # killed mid-way
    # What a kill during a write leaves: a temp file beside the image it was to become.
    missing = min(expected_files(root) - set(survivors))
    stale = missing.parent / f".{missing.name}.k1ll3d.tmp"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half a PNG")

    # The restart is the plain command a user would type again.
    result = run_script("demo_2_skip.py", TINY, *args, env=plain_env(), inherit_env=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{len(survivors)} already done" in result.stderr
    assert pngs(root) == expected_files(root)
    assert not leftovers(root)
    assert all(p.stat().st_ino == ino for p, ino in survivors.items())  # finished images were not redone
    for path in expected_files(root):
        same = sweeps["ranks_root"] / path.relative_to(root)
        assert np.array_equal(pixels(path), pixels(same)), path
        assert read_png_metadata(path) == read_png_metadata(same)


@pytest.mark.slow
def test_a_sweep_image_is_the_plain_generation_with_that_layer_bypassed(sweeps, tiny_models):
    """The independent path: FluxModels.generate for one prompt alone, its own seed, `skip=[{layer}]`.

    Not bytes: the sweep denoised this sample inside a batch of 3 with other prompts and skip sets, so its
    matmuls have other shapes than a batch of 1 and may sum in another order (float32, last bits). Such a
    difference can move a pixel across one 8-bit rounding boundary, never further. On flux-tiny a wrong
    layer or a missing bypass moves pixels by 6 or more levels, a wrong seed by hundreds (checked below, so the
    tolerance cannot hide them)."""
    root = sweeps["ranks_root"]
    cfg = load_config(SkipConfig, TINY, [f"prompts_file={sweeps['prompts']}", *SETTINGS])
    assert (cfg.model, cfg.dtype, cfg.device) == ("flux-tiny", "fp32", "cpu")  # the models of tiny_models
    fox, lamp = PROMPTS

    def generated(prompt: PromptSpec, skip: set[int]) -> np.ndarray:
        image = tiny_models.generate([prompt.prompt], [prompt.seed], 32, 48, 2, 3.5, skip=[skip])[0]
        return np.asarray(tensor_to_pil(image).convert("RGB")).astype(int)

    for prompt, layer in ((lamp, 3), (fox, 0), (fox, None)):
        expected = generated(prompt, set() if layer is None else {layer})
        got = pixels(Item(prompt, layer).path(root)).astype(int)
        assert np.abs(got - expected).max() <= 1, (prompt.id, layer)
    wrong = [
        (pixels(Item(lamp, 3).path(root)), generated(lamp, {2})),  # another layer bypassed
        (pixels(Item(lamp, 3).path(root)), generated(lamp, set())),  # none bypassed
        (pixels(Item(lamp, 3).path(root)), generated(replace(lamp, seed=21), {3})),
    ]  # another seed
    assert all(np.abs(a.astype(int) - b).max() > 1 for a, b in wrong)
