"""stableflow.runs: one record of what decides an output, checked on every re-run of every demo; a damaged output
is remade, never counted as done."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo_0_test
import demo_1_layer
import demo_2_skip
import demo_4_edit
from flux.errors import UserError
from stableflow import runs
from stableflow.config import load_config, load_models_for, run_demo
from stableflow.edit import EditConfig
from stableflow.io import read_png_metadata, save_png
from stableflow.sweep import SkipConfig
from stableflow.text2img import Text2ImgConfig
from stableflow.trajectory import TrajectoryConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"


def png(path: Path, meta: dict, value: int = 0) -> bytes:
    save_png(path, np.full((8, 8, 3), value, np.uint8), meta)
    return path.read_bytes()


# ------------------------------------------------------------------------------------------------ the record


def test_changes_name_each_key_and_compare_as_the_png_stores_them():
    recorded = {"steps": "2", "guidance": "null", "prompt": "a fox", "weights": json.dumps({"flow": "a", "ae": "b"})}
    same = {"steps": 2, "guidance": None, "prompt": "a fox", "weights": {"flow": "a", "ae": "b"}}
    assert runs.changes(recorded, same) == []
    assert runs.changes(recorded, {"steps": 2, "guidance": None, "prompt": "a fox"}) == []
    assert runs.changes(
        recorded, {"steps": 3, "guidance": 3.5, "dtype": "fp32", "weights": {"flow": "c", "ae": "b"}}
    ) == [
        "steps 2 -> 3",
        "guidance null -> 3.5",
        "dtype (not recorded) -> fp32",
        "weights.flow a -> c",
    ]
    # JSON records (manifest.json) compare the same way as the PNG's text.
    assert runs.changes({"steps": 2, "guidance": None}, {"steps": 2, "guidance": None}) == []


def test_guidance_is_recorded_as_the_model_uses_it():
    assert runs.guidance_used("flux-dev", 3.5) == 3.5 and runs.guidance_used("flux-tiny", 4) == 4.0
    # No guidance embedding: the output does not depend on it, whatever was asked.
    assert runs.guidance_used("flux-schnell", 3.5) is None and runs.guidance_used("flux-mini", 0.0) is None


def test_classifier_free_guidance_is_recorded(monkeypatch):
    """A spec whose guidance is classifier-free (ModelSpec.cfg) samples differently for each guidance value, so the
    run record keeps it, or a finished output would count as done at another guidance."""
    import dataclasses

    mini = dataclasses.replace(runs.configs["flux-mini"], cfg=True)
    monkeypatch.setitem(runs.configs, "flux-mini", mini)
    assert runs.guidance_used("flux-mini", 3.0) == 3.0


def test_weights_identity(tmp_path, monkeypatch):
    cfg = load_config(Text2ImgConfig, None, ["model=flux-mini"])
    mini = runs.weights(cfg)
    manifest = json.loads((REPO / "flux/assets/mini/manifest.json").read_text())["sha256"]
    assert mini["flow"] == f"built-in mini/flow.safetensors sha256 {manifest['flow.safetensors'][:16]}"
    assert mini["t5"] == f"built-in mini/t5/model.safetensors sha256 {manifest['t5/model.safetensors'][:16]}"
    for var in ("FLUX_MODEL", "FLUX_DEV", "FLUX_AE", "AE"):
        monkeypatch.delenv(var, raising=False)
    dev = runs.weights(load_config(Text2ImgConfig, None, []))
    assert dev["flow"] == "hub black-forest-labs/FLUX.1-dev flux1-dev.safetensors"
    # A local file by content: a copy elsewhere is the same weights; a finetune (same size and header) is not.
    a = tmp_path / "a.safetensors"
    a.write_bytes(bytes(range(256)) * 40000)
    shutil.copy(a, tmp_path / "copy.safetensors")
    tuned = bytearray(a.read_bytes())
    tuned[len(tuned) // 2 + 5] ^= 1
    (tmp_path / "tuned.safetensors").write_bytes(bytes(tuned))
    assert runs.fingerprint(a) == runs.fingerprint(tmp_path / "copy.safetensors")
    assert runs.fingerprint(a) != runs.fingerprint(tmp_path / "tuned.safetensors")
    given = runs.weights(load_config(Text2ImgConfig, None, [f"flow_path={a}"]))
    assert given["flow"] == runs.fingerprint(a) and given["ae"] == dev["ae"]
    monkeypatch.setenv("FLUX_MODEL", str(tmp_path / "tuned.safetensors"))  # the loader takes the variable too
    assert runs.weights(load_config(Text2ImgConfig, None, []))["flow"] == runs.fingerprint(
        tmp_path / "tuned.safetensors"
    )


def test_a_png_counts_as_done_only_if_it_decodes_whole_and_records_the_settings(tmp_path):
    outs = [runs.Output(f"{i}.png", {"steps": 2, "prompt": f"p{i}"}) for i in range(5)]
    made = {o.name: png(tmp_path / o.name, o.record) for o in outs[:4]}
    (tmp_path / "1.png").write_bytes(made["1.png"][:-20])  # cut short after it was written
    flipped = bytearray(made["2.png"])
    flipped[len(flipped) // 2] ^= 1  # one bit inside the image data: the chunk's CRC catches it
    (tmp_path / "2.png").write_bytes(bytes(flipped))
    run = runs.Run(tmp_path, outs, {})
    assert [o.name for o in run.done] == ["0.png", "3.png"]
    assert run.todo_names == ["1.png", "2.png", "4.png"] and run.repaired == 2
    assert run.repairs() == ", 2 damaged files remade"
    with pytest.raises(UserError) as e:
        runs.Run(tmp_path, [runs.Output("0.png", {"steps": 3, "prompt": "p0"})], {})
    assert "made with other settings (steps 2 -> 3): 0.png" in str(e.value) and "another output_dir" in str(e.value)


def test_an_output_of_several_files_is_done_only_when_all_decode(tmp_path):
    out = runs.Output("s/final.png", {"steps": 1}, ("s/a.png", "s/b.gif"))
    png(tmp_path / "s/final.png", out.record)
    png(tmp_path / "s/a.png", {})
    assert runs.Run(tmp_path, [out], {}).repaired == 0  # the GIF not written yet: unfinished, not damaged
    Image.new("RGB", (4, 4)).save(tmp_path / "s/b.gif", save_all=True, append_images=[Image.new("RGB", (4, 4), "red")])
    assert len(runs.Run(tmp_path, [out], {}).done) == 1
    gif = (tmp_path / "s/b.gif").read_bytes()
    (tmp_path / "s/b.gif").write_bytes(gif[: len(gif) // 2])
    run = runs.Run(tmp_path, [out], {})
    assert run.todo_names == ["s/final.png"] and run.repaired == 1


def test_the_writer_writes_atomically_off_the_main_thread_and_raises_its_errors(tmp_path):
    with runs.PngWriter(2) as writer:
        for i in range(6):
            writer.submit(tmp_path / f"{i}.png", np.full((4, 4, 3), i, np.uint8), {"i": i})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.png" for i in range(6)]
    assert read_png_metadata(tmp_path / "5.png") == {"i": "5"}
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError), runs.PngWriter(1) as writer:
        writer.submit(tmp_path / "file" / "x.png", np.zeros((4, 4, 3), np.uint8))  # its folder is a file
    assert not list(tmp_path.glob("**/*.tmp")) and not list(tmp_path.glob("**/.x.png*"))


# ------------------------------------------------------------------------------------------ every demo, refusals

DEMOS = {  # demo -> (config class, main, tiny config, small overrides)
    "demo_0": (Text2ImgConfig, demo_0_test.main, "demo_0_test.json", ["prompt=a fox", "num_images=1", "steps=2"]),
    "demo_1": (TrajectoryConfig, demo_1_layer.main, "demo_1_layer.json", ["prompt=a fox", "steps=2"]),
    "demo_2": (SkipConfig, None, "demo_2_skip.json", ["num_prompts=1", "layers=[0]", "steps=2"]),
    "demo_4": (EditConfig, demo_4_edit.main, "demo_4_edit.json", ['edits=["a white fox"]', "steps=2", "scores=false"]),
}


def run_demo_2(cfg: SkipConfig, models) -> None:
    result = demo_2_skip.run_sweep(cfg.plan(), lambda device: models, "cpu", progress=False)
    print(f"wrote {len(result.written)} images ({result.skipped} already there, {result.repaired} repaired)")


def demo(name: str, out: Path, models, *overrides: str) -> int:
    cls, main, config, small = DEMOS[name]
    main = main or run_demo_2
    with pytest.raises(SystemExit) as e:
        run_demo(
            cls, lambda cfg: main(cfg, models) and None, [str(TINY / config), f"output_dir={out}", *small, *overrides]
        )
        raise SystemExit(0)
    return e.value.code


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_models):
    """Each demo's tiny run, finished, and the bytes of its files."""
    root = tmp_path_factory.mktemp("made")
    for name in DEMOS:
        assert demo(name, root / name, tiny_models) == 0
    return root


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


WEIGHTS = "1 file(s), 11 bytes, sha256 sampled"
CHANGES = [  # (demo, override, the change the refusal names)
    *(
        (d, o, c)
        for d in DEMOS
        for o, c in [
            ("dtype=bf16", "dtype fp32 -> bf16"),
            ("flow_path", f"weights.flow random (seed 0) -> {WEIGHTS}"),
            ("ae_path", f"weights.ae random (seed 0) -> {WEIGHTS}"),
            ("t5_path", "weights.t5 random (tiny) -> 0 file(s), 0 bytes"),
            ("guidance=4", "guidance 3.5 -> 4.0"),
            ("steps=3", "steps 2 -> 3"),
            ("width=80", " -> 80"),
            ("height=80", " -> 80"),
        ]
    ),
    ("demo_0", "prompt=a cat", "prompt a fox -> a cat"),
    ("demo_0", "fp8=true", "fp8 false -> true"),
    ("demo_1", "skip_layers=[5]", "skip_layers [] -> [5]"),
    ("demo_4", "source_prompt=a red fox", "source_prompt a red fox in the snow -> a red fox"),
    ("demo_4", "seed=3", "seed 0 -> 3"),
    ("demo_4", "vital_layers=[0]", "vital_layers [0, 1, 2, 3, 5] -> [0]"),
    ("demo_4", "inject_steps=[0, 1]", "inject_steps [0, 2] -> [0, 1]"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,override,change", CHANGES, ids=[f"{d}-{o.split('=')[0]}" for d, o, _ in CHANGES])
def test_every_demo_refuses_each_recorded_setting(made, tiny_models, tmp_path, capsys, name, override, change):
    if override.endswith("_path"):  # other weights: refused before anything is loaded, so any file will do
        weights = tmp_path / ("t5" if override == "t5_path" else "w.safetensors")
        weights.mkdir() if override == "t5_path" else weights.write_bytes(b"not weights")
        override = f"{override}={weights}"
    before = files(made / name)
    capsys.readouterr()
    assert demo(name, made / name, tiny_models, override) == 2
    err = capsys.readouterr().err
    assert "made with other settings (" in err and change in err and "another output_dir" in err, err
    assert files(made / name) == before  # nothing rewritten, nothing added


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,damage", [("demo_0", "img_000_seed0.png"), ("demo_2", "*/ref.png"), ("demo_4", "reference.png")]
)
def test_a_damaged_output_of_a_finished_run_is_remade(tiny_models, tmp_path, capsys, name, damage):
    out = tmp_path / name
    assert demo(name, out, tiny_models) == 0
    (path,) = out.glob(damage)
    good = path.read_bytes()
    path.write_bytes(good[:200])  # a copy cut short, a disk error: long after the atomic write
    capsys.readouterr()
    assert demo(name, out, tiny_models) == 0
    said = capsys.readouterr().out
    assert path.read_bytes() == good  # remade exactly (same settings, same seed)
    assert {"demo_0": "(0 already there, 1 damaged file remade)", "demo_2": "1 repaired"}.get(name, "damaged") in said


# -------------------------------------------------------------------------------------- guidance as the model uses it


@pytest.mark.slow
def test_a_model_without_guidance_embedding_records_null_in_every_demo(tmp_path, capsys):
    mini = ["model=flux-mini", "width=32", "height=32", "steps=1", "device=cpu", "dtype=fp32"]
    cfg = load_config(Text2ImgConfig, None, [*mini, "prompt=a red circle", f"output_dir={tmp_path / 'd0'}"])
    models = load_models_for(cfg)
    demo_0_test.main(cfg, models)
    assert read_png_metadata(tmp_path / "d0" / "img_000_seed0.png")["guidance"] == "null"
    record = json.loads((tmp_path / "d0" / "run.json").read_text())
    assert record["guidance"] is None and record["settings"]["guidance"] is None
    # Another guidance changes nothing for this model: the images stand.
    again = load_config(
        Text2ImgConfig, None, [*mini, "prompt=a red circle", "guidance=7", f"output_dir={tmp_path / 'd0'}"]
    )
    demo_0_test.main(again, models)
    assert "wrote 0 images" in capsys.readouterr().out
    sweep = load_config(
        SkipConfig, TINY / "demo_2_skip.json", [*mini, "num_prompts=1", "layers=[0]", f"output_dir={tmp_path / 'd2'}"]
    )
    assert sweep.plan().manifest()["guidance"] is None
    edit = load_config(
        EditConfig,
        TINY / "demo_4_edit.json",
        [*mini, "scores=false", "vital_layers=[0]", f"output_dir={tmp_path / 'd4'}"],
    )
    results = demo_4_edit.main(edit, models)
    assert results["settings"]["guidance"] is None
    assert read_png_metadata(tmp_path / "d4" / "reference.png")["guidance"] == "null"


def test_demo_0_records_guidance_and_refuses_a_change(tmp_path, tiny_models, capsys):
    out = tmp_path / "d0"
    assert demo("demo_0", out, tiny_models, "steps=1") == 0
    assert read_png_metadata(out / "img_000_seed0.png")["guidance"] == "3.5"
    assert demo("demo_0", out, tiny_models, "steps=1", "guidance=5") == 2
    assert "guidance 3.5 -> 5.0" in capsys.readouterr().err


def test_demo_4_records_the_real_image_solver_and_refuses_a_change(tmp_path, tiny_models, capsys):
    out = tmp_path / "real"
    small = [str(TINY / "demo_4_edit_real.json"), f"output_dir={out}", 'edits=["a white house"]', "steps=2"]

    def real(*overrides: str) -> int:
        with pytest.raises(SystemExit) as e:
            run_demo(EditConfig, lambda cfg: demo_4_edit.main(cfg, tiny_models) and None, [*small, *overrides])
            raise SystemExit(0)
        return e.value.code

    assert real("scores=false") == 0
    assert read_png_metadata(out / "reconstruction.png")["solver"] == "euler"
    assert json.loads((out / "results.json").read_text())["settings"]["solver"] == "euler"
    before = files(out)
    capsys.readouterr()
    assert real("scores=false", "solver=rf-solver") == 2
    err = capsys.readouterr().err
    assert "made with other settings (" in err and "solver euler -> rf-solver" in err, err
    assert files(out) == before  # nothing rewritten, nothing added
