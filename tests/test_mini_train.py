"""mini.train on a CPU: a few steps of each stage, checkpoints, and an exact kill-and-resume."""

import io
import json
import shutil
import threading
import time

import pytest
import torch

import mini.train
from flux.errors import UserError
from flux.sampling import image_ids
from mini.evaluate import load_mini
from mini.train import (
    SPEC,
    FlowStack,
    LatentPool,
    WorldTokens,
    drop_captions,
    drop_layers,
    drop_pooled,
    flow_loss,
    fresh_batch,
    grow,
    load_checkpoint,
    load_tokenizers,
    load_trained_ae,
    lr_at,
    main,
    make_tokenizers,
    record_evaluation,
    save_checkpoint,
    stack_params,
)
from mini.world import VOCABULARY, sample_batch


def _tensors(state: dict) -> dict:
    return {f"{part}.{k}": v for part in ("model", "ema") for k, v in state[part].items()}


@pytest.mark.slow
def test_stages_checkpoint_and_resume(tmp_path):
    small = ["--batch", "1", "--log-every", "1", "--device", "cpu", "--measure-n", "64"]
    # AE: 2 steps, then resume to 4, against 4 straight: the same weights, EMA, optimizer state and RNG.
    main(["ae", "--out", str(tmp_path / "a"), "--steps", "2", *small])
    first = load_checkpoint(tmp_path / "a" / "ae")
    assert first["step"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in first["history"])
    main(["ae", "--out", str(tmp_path / "a"), "--steps", "2", "--resume", *small])
    main(["ae", "--out", str(tmp_path / "b"), "--steps", "4", *small])
    resumed, straight = load_checkpoint(tmp_path / "a" / "ae"), load_checkpoint(tmp_path / "b" / "ae")
    assert resumed["step"] == straight["step"] == 4
    a, b = _tensors(resumed), _tensors(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(resumed["rng_cpu"], straight["rng_cpu"])
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert json.loads((tmp_path / "a" / "ae" / "ae.json").read_text())["scale_factor"] > 0

    # Flow on top of that AE: loss finite, checkpoint written, resume continues the step count and Adam's state.
    main(["flow", "--out", str(tmp_path / "a"), "--steps", "1", *small])
    main(["flow", "--out", str(tmp_path / "a"), "--steps", "1", "--resume", "--caption-dropout", "0.5",
          "--pooled-dropout", "0.25", *small])  # fmt: skip
    state = load_checkpoint(tmp_path / "a" / "flow")
    assert state["step"] == 2 and [h["step"] for h in state["history"]] == [1, 2]
    assert state["hparams"]["caption_dropout"] == 0.5 and state["hparams"]["pooled_dropout"] == 0.25
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["history"])
    assert all(int(s["step"]) == 2 for s in state["opt"]["state"].values())
    flow = tmp_path / "a" / "flow"
    named = [p["file"] for f in ("ckpt.json", "ckpt.prev.json") for p in json.loads((flow / f).read_text())["parts"]]
    assert sorted(p.name for p in flow.glob("ckpt-*.part*")) == sorted(named)


def test_damaged_checkpoint_falls_back_to_the_previous_and_then_refuses(tmp_path, capsys):
    """Each shard's SHA-256 is checked on load: a flipped byte in the newest checkpoint resumes from the one before
    (saying so), never from the damaged bytes; with both damaged, one clear error."""
    folder = tmp_path / "ckpt"
    states = [{"step": s, "w": torch.full((3_000_000,), float(s))} for s in (1, 2)]  # 12 MB: a multi-shard file
    for state in states:
        save_checkpoint(folder, state)
    assert torch.equal(load_checkpoint(folder)["w"], states[1]["w"])

    def damage(index: str) -> None:
        part = folder / json.loads((folder / index).read_text())["parts"][0]["file"]
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))

    damage("ckpt.json")
    state = load_checkpoint(folder)
    assert state["step"] == 1 and torch.equal(state["w"], states[0]["w"])
    assert "ckpt.json" in capsys.readouterr().out
    damage("ckpt.prev.json")
    with pytest.raises(UserError, match="every checkpoint .* is damaged.*SHA-256.*--resume"):
        load_checkpoint(folder)


def test_saves_keep_exactly_two_checkpoints(tmp_path):
    """And nothing else: a shard's temp file that a kill left behind goes with the next save."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".ckpt-0000002-0123456789ab.part0.k3j2l1.tmp").write_bytes(b"half a shard")
    for step in (1, 2, 3, 3):  # the last save of a stage repeats its newest step
        save_checkpoint(folder, {"step": step, "w": torch.tensor([float(step)])})
    named = [p["file"] for f in ("ckpt.json", "ckpt.prev.json") for p in json.loads((folder / f).read_text())["parts"]]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*named, "ckpt.json", "ckpt.prev.json"])
    assert json.loads((folder / "ckpt.prev.json").read_text())["step"] == 2


def test_world_tokens_equal_the_tokenizers(tmp_path):
    """Training builds caption token ids with tensor ops; HFEmbedder tokenizes the strings. They must agree exactly,
    or the shipped model would be prompted with other ids than it was trained on."""
    folder = make_tokenizers(tmp_path / "tok")
    t5_tok, clip_tok = load_tokenizers(folder)
    for word in VOCABULARY:  # word level: every caption word is one token in both
        assert len(t5_tok(word, add_special_tokens=False)["input_ids"]) == 1
        assert len(clip_tok(word, add_special_tokens=False)["input_ids"]) == 1
    batch = sample_batch(400, torch.Generator().manual_seed(2), "test")
    t5_ids, clip_ids = WorldTokens(folder, torch.device("cpu"))(batch)
    captions = batch.captions()
    assert any(" an orange" in c for c in captions) and any(len(c.split(" and ")) == 3 for c in captions)
    kw = dict(truncation=True, padding="max_length", return_attention_mask=False, return_tensors="pt")
    assert torch.equal(t5_ids, t5_tok(captions, max_length=SPEC.max_length, **kw)["input_ids"])
    assert torch.equal(clip_ids, clip_tok(captions, max_length=77, **kw)["input_ids"])
    t5_empty, clip_empty = WorldTokens(folder, torch.device("cpu")).empty(2)  # caption dropout's "", as prompted
    assert torch.equal(t5_empty, t5_tok(["", ""], max_length=SPEC.max_length, **kw)["input_ids"])
    assert torch.equal(clip_empty, clip_tok(["", ""], max_length=77, **kw)["input_ids"])


def test_caption_dropout_replaces_whole_captions_with_the_empty_one():
    """Each sample keeps both its captions or takes both empty ones, at about the given rate; at rate 0 nothing
    changes and no random number is drawn, so runs without dropout reproduce the runs made before it existed."""
    n = 4000
    t5, clip = torch.randint(5, 50, (n, 32)), torch.randint(5, 50, (n, 77))
    empty = (torch.zeros(n, 32, dtype=torch.long), torch.ones(n, 77, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert drop_captions(t5, clip, empty, 0.0, g) == (t5, clip) and torch.equal(g.get_state(), before)
    t5_d, clip_d = drop_captions(t5, clip, empty, 0.25, g)
    dropped = (t5_d == 0).all(1)
    assert torch.equal(dropped, (clip_d == 1).all(1))  # both captions of a sample, or neither
    assert torch.equal(t5_d[~dropped], t5[~dropped]) and torch.equal(clip_d[~dropped], clip[~dropped])
    assert 0.22 < dropped.float().mean() < 0.28  # 0.25 +- 4.4 standard deviations of 4000 draws


def test_pooled_dropout_replaces_only_the_clip_caption():
    """The CLIP ids (whose pooled vector modulates every block) become the empty caption's at about the given rate,
    whole or not at all; at rate 0 nothing changes and no random number is drawn."""
    n = 4000
    clip, empty = torch.randint(5, 50, (n, 77)), torch.ones(n, 77, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert drop_pooled(clip, empty, 0.0, g) is clip and torch.equal(g.get_state(), before)
    out = drop_pooled(clip, empty, 0.5, g)
    dropped = (out == 1).all(1)
    assert torch.equal(out[~dropped], clip[~dropped]) and ((out == 1).any(1) == dropped).all()
    assert 0.46 < dropped.float().mean() < 0.54  # 0.5 +- 5 standard deviations of 4000 draws


def test_layer_drop_bypasses_blocks_per_sample_through_the_skip_hook(repo_root):
    """Each sample's set of bypassed blocks is drawn at about the given rate (none and no random number at rate 0);
    `flow_loss` hands the sets to the transformer's skip hook, so a sample with an empty set has exactly the loss
    it has without layer dropout, and one that bypasses a trained block does not."""
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert drop_layers(8, 12, 0.0, g) is None and torch.equal(g.get_state(), before)
    sets = drop_layers(2000, 12, 0.1, g)
    assert all(s <= set(range(12)) for s in sets)
    assert 0.09 < sum(map(len, sets)) / (2000 * 12) < 0.11  # 0.1 +- 3.6 standard deviations of 24000 draws

    ckpt = repo_root / "mini" / "checkpoint"
    stack = FlowStack(0, ckpt / "tokenizers")
    stack.load_state_dict(load_checkpoint(ckpt / "flow")["ema"])
    tokens = WorldTokens(ckpt / "tokenizers", torch.device("cpu"))
    t5, clip = tokens(sample_batch(2, torch.Generator().manual_seed(1), "train"))
    x0 = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, plain, _ = flow_loss(stack, x0, t5, clip, torch.Generator().manual_seed(3))
        _, dropped, _ = flow_loss(stack, x0, t5, clip, torch.Generator().manual_seed(3), skip=[set(), {2}])
    assert dropped[0] == plain[0] and abs(dropped[1] - plain[1]) > 1e-3


@pytest.mark.parametrize("flag", ["--caption-dropout", "--pooled-dropout", "--layer-drop"])
@pytest.mark.parametrize("rate", ["1", "-0.1"])
def test_caption_dropout_out_of_range_is_one_clear_error(flag, rate, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["flow", "--out", str(tmp_path), "--steps", "1", flag, rate])
    assert e.value.code == 2 and f"{flag} is a probability in [0, 1)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_compact_checkpoint_resumes_with_fresh_moments(tmp_path, capsys):
    """`compact` keeps the EMA alone, rounded to bf16; `flow --resume` from it continues the step count from the
    EMA's weights (not the raw model's), and warms the learning rate up again. A checkpoint from a GPU (its noise
    generator's state is CUDA's, 16 bytes) resumes on a CPU with a fresh noise stream, saying so."""
    small = ["--batch", "1", "--log-every", "1", "--device", "cpu", "--measure-n", "64"]
    main(["ae", "--out", str(tmp_path / "a"), "--steps", "1", *small])
    main(["flow", "--out", str(tmp_path / "a"), "--steps", "2", *small])
    main(["compact", "--out", str(tmp_path / "a"), "--dest", str(tmp_path / "c" / "flow")])
    full, small_state = load_checkpoint(tmp_path / "a" / "flow"), load_checkpoint(tmp_path / "c" / "flow")
    assert "opt" not in small_state and small_state["step"] == 2
    index = json.loads((tmp_path / "c" / "flow" / "ckpt.json").read_text())
    raw = torch.load(io.BytesIO(b"".join((tmp_path / "c" / "flow" / p["file"]).read_bytes() for p in index["parts"])))
    assert sorted(raw) == sorted(k for k in full if k not in ("model", "opt"))  # the EMA, no model, no moments
    assert all(v.dtype == torch.bfloat16 for v in small_state["ema"].values() if v.is_floating_point())
    assert all(torch.equal(full["ema"][k].to(torch.bfloat16), v) for k, v in small_state["ema"].items())
    assert all(torch.equal(v.float(), small_state["model"][k]) for k, v in small_state["ema"].items())
    assert not all(torch.equal(full["model"][k], v) for k, v in small_state["model"].items())  # not the raw model
    main(["compact", "--out", str(tmp_path / "c"), "--dest", str(tmp_path / "d" / "flow")])  # compact again: the same
    again = load_checkpoint(tmp_path / "d" / "flow")
    assert again["step"] == 2 and all(torch.equal(small_state["ema"][k], v) for k, v in again["ema"].items())
    (tmp_path / "c" / "ae").symlink_to(tmp_path / "a" / "ae")
    (tmp_path / "c" / "tokenizers").symlink_to(tmp_path / "a" / "tokenizers")
    save_checkpoint(tmp_path / "c" / "flow", {**small_state, "rng_dev": torch.zeros(16, dtype=torch.uint8)})
    capsys.readouterr()
    main(["flow", "--out", str(tmp_path / "c"), "--steps", "1", "--resume", *small])
    assert "the checkpoint's noise generator is another device's: cpu's starts afresh" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "c" / "flow")
    assert state["step"] == 3 and state["hparams"]["warmup_from"] == 2
    assert all(int(s["step"]) == 1 for s in state["opt"]["state"].values())  # Adam restarted
    assert lr_at(2, state["hparams"]) == lr_at(0, {**state["hparams"], "warmup_from": 0})


def test_latent_pool_holds_encoded_scenes_and_refreshes_them(repo_root, tmp_path):
    """The pool's entries are exactly what `fresh_batch` makes from the same scene stream (latents rounded to bf16);
    a draw is rows of the pool; each draw replaces at most `refresh` entries, with new scenes."""
    ckpt = repo_root / "mini" / "checkpoint"
    ae, tokens = load_trained_ae(ckpt, torch.device("cpu")), WorldTokens(ckpt / "tokenizers", torch.device("cpu"))
    pool = LatentPool(ae, tokens, torch.Generator().manual_seed(5), size=6, refresh=2)
    x0, t5, clip = fresh_batch(ae, tokens, torch.Generator().manual_seed(5), 6)
    assert torch.equal(pool.x0, x0.to(torch.bfloat16)) and torch.equal(pool.t5, t5) and torch.equal(pool.clip, clip)
    before = pool.x0.clone()
    dx, dt5, dclip = pool.draw(4, torch.Generator().manual_seed(0))
    changed = (pool.x0 != before).flatten(1).any(1)
    assert 1 <= int(changed.sum()) <= 2
    for x, a, b in zip(dx, dt5, dclip, strict=True):  # each drawn sample is one row of the pool
        row = [i for i in range(6) if torch.equal(pool.x0[i].float(), x)]
        assert row and torch.equal(pool.t5[row[0]], a) and torch.equal(pool.clip[row[0]], b)


@pytest.mark.slow
def test_compiled_training_keeps_checkpoint_keys(tmp_path, monkeypatch):
    """`flow --compile` compiles the transformer in place (`nn.Module.compile`), so its checkpoint has the keys of an
    uncompiled run (torch.compile's wrapper would prefix them `_orig_mod.`) and each side resumes from the other.
    Dynamo traces for real here; only its backend is `eager`, as inductor takes minutes on a CPU."""
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    small = ["--batch", "1", "--log-every", "1", "--device", "cpu", "--measure-n", "64"]
    main(["ae", "--out", str(tmp_path / "a"), "--steps", "1", *small])
    main(["flow", "--out", str(tmp_path / "a"), "--steps", "1", *small])
    plain = load_checkpoint(tmp_path / "a" / "flow")
    main(["flow", "--out", str(tmp_path / "a"), "--steps", "1", "--resume", "--compile", *small])
    compiled = load_checkpoint(tmp_path / "a" / "flow")
    assert compiled["step"] == 2 and _tensors(compiled).keys() == _tensors(plain).keys()
    assert not all(torch.equal(compiled["model"][k], v) for k, v in plain["model"].items())  # it trained
    main(["flow", "--out", str(tmp_path / "a"), "--steps", "1", "--resume", *small])
    assert load_checkpoint(tmp_path / "a" / "flow")["step"] == 3
    # With layer dropout the blocks are compiled one by one; the keys stay the same.
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: (compiled.append(type(self).__name__), compile_(self, backend="eager")))  # fmt: skip
    main(["flow", "--out", str(tmp_path / "a"), "--steps", "1", "--resume", "--compile", "--layer-drop", "0.5", *small])
    assert (
        compiled == ["DoubleStreamBlock"] * SPEC.params.depth + ["SingleStreamBlock"] * SPEC.params.depth_single_blocks
    )
    layer_dropped = load_checkpoint(tmp_path / "a" / "flow")
    assert layer_dropped["step"] == 4 and _tensors(layer_dropped).keys() == _tensors(plain).keys()


@pytest.mark.slow
def test_grow_keeps_the_function_then_trains_exports_and_loads_deeper(repo_root, tmp_path):
    """`grow` deepens the shipped 6 + 16 checkpoint to 8 + 24: each old block's weights land at its spread position
    (i * new // old, worked out by hand below), the new blocks' adaLN gates are zero, so the grown transformer's output
    equals the old one's exactly (model and EMA). `flow --resume` then trains the deeper stack, `export` records its
    shape, and `mini.evaluate.load_mini` builds it."""
    run = tmp_path / "run"
    shutil.copytree(repo_root / "mini" / "checkpoint", run)
    before = load_checkpoint(run / "flow")
    assert (stack_params(before).depth, stack_params(before).depth_single_blocks) == (6, 16)
    main(["grow", "--out", str(run), "--depth", "8", "--depth-single", "24"])
    after = load_checkpoint(run / "flow")
    assert after["step"] == before["step"] and after["flow_params"]["depth"] == 8 and "opt" not in after
    for old_i, new_i in enumerate([0, 1, 2, 4, 5, 6]):
        key = f"flow.double_blocks.{old_i}.img_attn.qkv.weight"
        assert torch.equal(after["model"][key.replace(f".{old_i}.", f".{new_i}.")], before["model"][key])
    for old_i, new_i in enumerate([0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22]):
        key = f"flow.single_blocks.{old_i}.linear1.weight"
        assert torch.equal(after["model"][key.replace(f".{old_i}.", f".{new_i}.")], before["model"][key])
    for new_i in (3, 7):
        assert not after["model"][f"flow.double_blocks.{new_i}.img_mod.lin.weight"].any()
    for new_i in range(2, 24, 3):
        assert not after["model"][f"flow.single_blocks.{new_i}.modulation.lin.bias"].any()
        assert after["model"][f"flow.single_blocks.{new_i}.linear1.weight"].any()  # random, only gated off
    g = torch.Generator().manual_seed(0)
    inputs = {"img": torch.randn(2, 64, 64, generator=g), "img_ids": image_ids(2, 8, 8, "cpu"),
              "txt": torch.randn(2, 32, 128, generator=g), "txt_ids": torch.zeros(2, 32, 3),
              "timesteps": torch.rand(2, generator=g), "y": torch.randn(2, 128, generator=g)}  # fmt: skip
    for part in ("model", "ema"):
        outputs = []
        for state in (before, after):
            stack = FlowStack(0, run / "tokenizers", stack_params(state))
            stack.load_state_dict(state[part])
            outputs.append(stack.flow(**inputs))
        assert torch.equal(*outputs)
    with pytest.raises(UserError, match="grow only deepens: the checkpoint has 8 double and 24 single"):
        grow(run / "flow", 6, 24)

    main(["flow", "--out", str(run), "--steps", "1", "--resume", "--batch", "1", "--device", "cpu"])
    trained = load_checkpoint(run / "flow")
    assert trained["step"] == before["step"] + 1 and trained["flow_params"] == after["flow_params"]
    main(["export", "--out", str(run), "--assets", str(tmp_path / "assets")])
    manifest = json.loads((tmp_path / "assets" / "manifest.json").read_text())
    assert (manifest["flow_params"]["depth"], manifest["flow_params"]["depth_single_blocks"]) == (8, 24)
    models = load_mini(str(tmp_path / "assets"), "cpu")
    assert (len(models.model.double_blocks), len(models.model.single_blocks)) == (8, 24)
    assert models.spec.params.depth_single_blocks == 24
    stack = FlowStack(0, run / "tokenizers", stack_params(trained))
    stack.load_state_dict(trained["ema"])
    want = {k: v.to(torch.bfloat16).float() for k, v in stack.flow.state_dict().items()}
    assert all(torch.equal(v, want[k]) for k, v in models.model.state_dict().items())


def test_grow_needs_both_depths(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["grow", "--out", str(tmp_path), "--depth", "6"])
    assert e.value.code == 2 and "grow needs --depth and --depth-single" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_export_empty_pooled_gives_every_caption_the_empty_captions_vector(repo_root, tmp_path):
    """`export --empty-pooled` writes a CLIP whose pooled vector, read the way the pipeline reads it (HFEmbedder), is
    for every caption what the plainly exported CLIP gives the empty caption; T5 and the transformer are the same."""
    from flux.modules.conditioner import HFEmbedder

    run = tmp_path / "run"
    shutil.copytree(repo_root / "mini" / "checkpoint", run)
    main(["export", "--out", str(run), "--assets", str(tmp_path / "plain")])
    main(["export", "--out", str(run), "--assets", str(tmp_path / "held"), "--empty-pooled"])
    captions = [
        "a red circle on a white background",
        "a large blue star at the top and a green ring on a gray background",
    ]
    with torch.no_grad():
        plain = HFEmbedder(str(tmp_path / "plain" / "clip"), 77)(["", *captions])
        held = HFEmbedder(str(tmp_path / "held" / "clip"), 77)(["", *captions])
    assert (plain[1:] - plain[0]).abs().amax() > 1e-2  # the plain vector does depend on the caption
    assert torch.allclose(held, plain[0].expand_as(held), atol=1e-6, rtol=0)
    manifests = [json.loads((tmp_path / f / "manifest.json").read_text()) for f in ("plain", "held")]
    assert [m["empty_pooled"] for m in manifests] == [False, True]
    assert manifests[0]["sha256"]["flow.safetensors"] == manifests[1]["sha256"]["flow.safetensors"]
    assert manifests[0]["sha256"]["t5/model.safetensors"] == manifests[1]["sha256"]["t5/model.safetensors"]


@pytest.mark.slow
def test_export_keeps_an_evaluation_only_for_the_weights_it_measured(repo_root, tmp_path):
    """`mini.evaluate --update-manifest` stores its results in the manifest; an export of the same weights keeps them,
    an export of other weights (here a CLIP changed by --empty-pooled) drops them instead of claiming them."""
    run, assets = tmp_path / "run", tmp_path / "assets"
    shutil.copytree(repo_root / "mini" / "checkpoint", run)
    main(["export", "--out", str(run), "--assets", str(assets)])
    path = assets / "manifest.json"
    measured = {"text2img": {"heldout": {"accuracy": {"colour": 0.5}}}}
    path.write_text(json.dumps({**json.loads(path.read_text()), "evaluation": measured}))
    main(["export", "--out", str(run), "--assets", str(assets)])
    assert json.loads(path.read_text())["evaluation"] == measured
    main(["export", "--out", str(run), "--assets", str(assets), "--empty-pooled"])
    assert json.loads(path.read_text())["evaluation"] is None


def test_record_evaluation_merges_and_a_failed_write_leaves_the_old_manifest(tmp_path):
    """`mini.evaluate --update-manifest` adds its result beside the others; a write that dies half-way (here a value
    JSON cannot hold, met after most of the manifest is written out; a kill or a full disk alike) leaves the previous
    manifest whole, not a truncated one the next reader cannot parse."""
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "flux-mini", "evaluation": None}))
    record_evaluation(tmp_path, "text2img", {"colour": 0.5})
    record_evaluation(tmp_path, "ablation", {"cases": 64})
    before = (tmp_path / "manifest.json").read_text()
    assert json.loads(before) == {
        "model": "flux-mini",
        "evaluation": {"text2img": {"colour": 0.5}, "ablation": {"cases": 64}},
    }
    with pytest.raises(TypeError):
        record_evaluation(tmp_path, "layer_sweep", {"cases": 16, "zz": object()})
    assert (tmp_path / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


def test_evaluations_recorded_side_by_side_both_land(tmp_path, monkeypatch):
    """Two evaluations finishing at once (docs/gallery.sh runs two at a time) each read the manifest, add their record
    and write it: without the lock the later write drops the earlier record. A slowed read widens the window."""
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "flux-mini", "evaluation": None}))
    read = mini.train.read_manifest

    def slow_read(folder):
        manifest = read(folder)
        time.sleep(0.3)
        return manifest

    monkeypatch.setattr(mini.train, "read_manifest", slow_read)
    threads = [threading.Thread(target=record_evaluation, args=(tmp_path, k, {"k": k})) for k in ("ablation", "sweep")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads((tmp_path / "manifest.json").read_text())["evaluation"] == {
        "ablation": {"k": "ablation"},
        "sweep": {"k": "sweep"},
    }
