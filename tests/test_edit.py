"""Stable Flow editing (stableflow.edit, demo_4_edit.py) on flux-tiny, CPU, fp32.

Tolerances. "Equal" between two runs with different batch sizes means max |a - b| <= 1e-6 * max(1, max |b|): CPU
matmuls round differently for different batch sizes (measured 4-6e-7 on latents up to ~3 here), and that is the
only difference allowed. Runs with the same batch shape must agree exactly (torch.equal). The inversion test on a
velocity field that does not depend on x allows 1e-5 (fp32 rounding of x + a - a over the steps, measured 1.5e-7).
"""

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import demo_4_edit
from demo_4_edit import main as run
from flux import sampling
from flux.errors import UserError
from flux.model import Injection
from flux.sampling import image_ids, pack, unpack
from stableflow.clip_score import ClipScorer, tiny_clip
from stableflow.config import load_config, run_demo
from stableflow.edit import (
    GENERATED_GUIDANCE,
    RELEASE_VITAL_LAYERS,
    EditConfig,
    EditRequest,
    RealImage,
    choose_vital_layers,
    default_vital_layers,
    edit_chunks,
    edit_generated,
    edit_real,
    fit_image,
    invert,
    pil_to_tensor,
    scale_layers,
)
from stableflow.io import load_image, slug, tensor_to_pil
from stableflow.vitality import read_vital_layers

TINY_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
HOUSE = Path(__file__).resolve().parent / "data" / "house.png"  # 120x90
W, H, STEPS, SEED = 48, 32, 4, 7
REF = "a red fox in the snow"
EDITS = ["a white fox in the snow", "a red fox on green grass", "a red fox in the snow at night"]
ALL_LAYERS = list(range(6))  # flux-tiny: 2 double + 4 single blocks


def plain(models, prompt: str, seed: int = SEED, guidance: float = 3.5) -> torch.Tensor:
    """The latent (16, h, w) of an ordinary one-image generation."""
    text = models.encode([prompt])
    return models.denoise(text, models.noise([seed], W, H), models.schedule(STEPS, W, H), guidance)[0]


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= 1e-6 * max(1.0, b.abs().max().item()), diff


def edit(models, edits=EDITS, callback=None, **kw):
    return edit_generated(models, EditRequest(REF, edits, STEPS, GENERATED_GUIDANCE, **kw), SEED, W, H, callback)


# ----------------------------------------------------------------------------------------------- generated images


@pytest.mark.parametrize("layers", [None, ALL_LAYERS])
def test_reference_equals_plain_generation(tiny_models, layers):
    result = edit(tiny_models, layers=layers)
    assert result.latents.shape == (4, 16, H // 8, W // 8)
    assert_same(result.latents[0], plain(tiny_models, REF))
    assert result.reference.shape == (3, H, W) and result.edits.shape == (3, 3, H, W)
    # decoded in a batch of 4 vs 1: convolutions round differently, hence a tolerance
    assert torch.allclose(result.reference, tiny_models.decode(result.latents[:1])[0], rtol=0, atol=1e-5)


def test_without_injection_each_edit_is_a_plain_generation(tiny_models):
    result = edit(tiny_models, layers=[])
    for i, prompt in enumerate(EDITS):
        assert_same(result.latents[1 + i], plain(tiny_models, prompt))


def test_injection_changes_the_edits_and_only_them(tiny_models):
    free, injected = edit(tiny_models, layers=[]), edit(tiny_models, layers=[0])
    assert torch.equal(free.latents[0], injected.latents[0])
    for i in range(len(EDITS)):
        assert (free.latents[1 + i] - injected.latents[1 + i]).abs().max() > 1e-4


@pytest.mark.parametrize("batch_size", [None, 2, 3])
def test_full_injection_with_the_reference_prompt_gives_the_reference(tiny_models, batch_size):
    # The edit equal to the reference sits between two different ones: K/V taken from any sample but the
    # reference (a wrong source index, or a chunk that forgets its reference) would change it.
    result = edit(
        tiny_models, ["a blue fox in a desert", REF, "a fox made of glass"], layers=ALL_LAYERS, batch_size=batch_size
    )
    assert_same(result.latents[2], result.latents[0])
    assert (result.latents[1] - result.latents[0]).abs().max() > 1e-3
    assert (result.latents[3] - result.latents[0]).abs().max() > 1e-3


@pytest.mark.parametrize("batch_size", [2, 3, 4])
def test_chunks_carry_an_identical_reference_and_match_one_batch(tiny_models, batch_size):
    edits = EDITS + ["a red fox in the snow, oil painting", "two red foxes in the snow"]
    whole = edit(tiny_models, edits)
    finals = []

    def record(step):
        if step.index == STEPS - 1:
            finals.append(step.next_latent[0].clone())

    chunked = edit(tiny_models, edits, batch_size=batch_size, callback=record)
    assert len(finals) == len(chunked.chunks) == len(edit_chunks(len(edits), batch_size)) > 1
    assert all(torch.equal(f, finals[0]) for f in finals)
    assert chunked.reference_drift == 0.0
    for i in range(len(edits) + 1):
        assert_same(chunked.latents[i], whole.latents[i])


def test_edit_chunks_are_balanced_and_padded_to_one_shape():
    assert edit_chunks(5, None) == [[0, 1, 2, 3, 4]]
    assert edit_chunks(5, 3) == [[0, 1], [2, 3], [4, 4]]
    assert edit_chunks(7, 4) == [[0, 1, 2], [3, 4, 4], [5, 6, 6]]
    assert edit_chunks(10, 8) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for n in range(1, 12):
        for b in range(2, 9):
            chunks = edit_chunks(n, b)
            assert sorted(set(sum(chunks, []))) == list(range(n))
            assert len({len(c) for c in chunks}) == 1 and len(chunks[0]) <= b - 1
    with pytest.raises(UserError, match="at least one edit"):
        edit_chunks(0, None)


def test_library_rejects_an_empty_edit_list_and_bad_layers(tiny_models):
    with pytest.raises(UserError, match="empty"):
        edit(tiny_models, [])
    with pytest.raises(UserError, match=r"0\.\.5"):
        edit(tiny_models, layers=[0, 6])


# ----------------------------------------------------------------------------------------------- vital layers


def test_vital_layer_defaults():
    assert scale_layers(RELEASE_VITAL_LAYERS, 19, 38) == list(RELEASE_VITAL_LAYERS)
    assert default_vital_layers(2, 4) == [0, 1, 2, 3, 5]  # flux-tiny: double {0,1}, single {0,1,3}
    assert choose_vital_layers(None, None, 19, 38)[0] == list(RELEASE_VITAL_LAYERS)
    assert choose_vital_layers(None, None, 2, 4) == (
        [0, 1, 2, 3, 5],
        "default (the release's layers scaled from 19+38 to 2+4 blocks)",
    )
    assert choose_vital_layers([5, 0, 0], None, 2, 4)[0] == [0, 5]
    assert choose_vital_layers([], None, 2, 4)[0] == []
    with pytest.raises(UserError, match=r"layer 57 out of range: this model has layers 0\.\.56"):
        choose_vital_layers([0, 57], None, 19, 38)
    with pytest.raises(UserError, match="both"):
        choose_vital_layers([0], "x.json", 19, 38)


def test_vital_layers_file(tmp_path):
    good = tmp_path / "vital_layers.json"
    good.write_text(json.dumps({"vital_layers": [3, 0, 1], "num_double": 2, "model": "flux-tiny"}))
    assert read_vital_layers(good, 2, 4) == [0, 1, 3]
    assert choose_vital_layers(None, str(good), 2, 4) == ([0, 1, 3], f"file {good}")
    cases = {
        "broken.json": ('{"vital_layers": [0,', "not readable JSON"),
        "nokey.json": (json.dumps({"layers": [0]}), "malformed"),
        "strings.json": (json.dumps({"vital_layers": ["0"]}), "malformed"),
        "list.json": (json.dumps([0, 1]), "malformed"),
        "range.json": (json.dumps({"vital_layers": [0, 9]}), r"0\.\.5"),
        "dev.json": (json.dumps({"vital_layers": [0, 1], "num_double": 19}), "19 double blocks"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            read_vital_layers(tmp_path / name, 2, 4)
    assert read_vital_layers(tmp_path, 2, 4) == [0, 1, 3]  # demo_3_dino.py's output folder: its file
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is a folder without vital_layers.json"):
        read_vital_layers(tmp_path / "empty", 2, 4)
    # The file demo_3_dino.py writes (stableflow.vitality's payload) is read as it is.
    from stableflow.vitality import selection_dict, vital_layers_payload

    payload = vital_layers_payload(
        [], [5, 0], selection_dict(0.2, None), model="flux-tiny", dino_model="tiny-random", num_double=2
    )
    (tmp_path / "demo3.json").write_text(json.dumps(payload))
    assert read_vital_layers(tmp_path / "demo3.json", 2, 4) == [0, 5]
    with pytest.raises(UserError, match="does not exist"):
        read_vital_layers(tmp_path / "missing.json", 2, 4)


# ----------------------------------------------------------------------------------------------- real images


def test_fit_image_rule():
    house = load_image(HOUSE)
    assert house.size == (120, 90)
    assert fit_image(house, 40).size == (48, 32)  # 53x40, then cropped down to multiples of 16
    assert fit_image(house, None).size == (112, 80)  # crop only
    assert fit_image(house, 64).size == (80, 64)  # 85x64 -> 80x64
    tall = Image.new("RGB", (90, 120))
    assert fit_image(tall, 40).size == (32, 48)
    # The crop is centred: a 20x20 image cropped to 16x16 loses 2 pixels on each side.
    grid = Image.new("RGB", (20, 20))
    grid.putpixel((2, 2), (255, 0, 0))
    assert fit_image(grid, None).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(UserError, match="too small"):
        fit_image(Image.new("RGB", (40, 10)), None)
    x = pil_to_tensor(house)
    assert x.shape == (3, 90, 120) and x.min() >= -1 and x.max() <= 1
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    assert pixels.numpy().tobytes() == house.tobytes()


def test_load_image_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(UserError, match="is a folder"):
        load_image(tmp_path)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image"):
        load_image(tmp_path / "junk.png")
    (tmp_path / "cut.png").write_bytes(HOUSE.read_bytes()[:300])
    with pytest.raises(UserError, match="cannot read image"):
        load_image(tmp_path / "cut.png")


def _house(size: int = 40) -> torch.Tensor:
    return pil_to_tensor(fit_image(load_image(HOUSE), size))


def test_inversion_is_exact_where_the_velocity_does_not_depend_on_x(tiny_models):
    # With img_in's weight zeroed, v = v(t, prompt) only, and each inverse step x_i = x_{i+1} + (t_i - t_{i+1}) v(t_i)
    # is undone exactly by the Euler step from t_i. Evaluating v at the current time instead (the naive inversion)
    # leaves sum (v(t_i) - v(t_{i+1})) dt behind: the check below proves the test can tell the two apart.
    xm = dataclasses.replace(tiny_models, model=copy.deepcopy(tiny_models.model))
    with torch.no_grad():
        xm.model.img_in.weight.zero_()
    latent = xm.encode_image(_house()[None])
    text = xm.encode(["a red house"])
    ts = xm.schedule(STEPS, W, H)
    inversion = invert(xm, latent, text, ts, guidance=1.0)
    assert len(inversion.latents) == STEPS + 1 and torch.equal(inversion.latents[-1], pack(latent))
    rec = xm.denoise(text, unpack(inversion.noise, H, W), ts, guidance=1.0)
    assert (rec - latent).abs().max() <= 1e-5

    x = pack(latent)
    rev = ts[::-1]
    with torch.no_grad():
        for t_cur, t_next in zip(rev[:-1], rev[1:]):
            v = xm.model(
                img=x,
                img_ids=image_ids(1, H // 16, W // 16),
                txt=text.txt,
                txt_ids=text.txt_ids,
                y=text.vec,
                timesteps=torch.tensor([t_cur]),
                guidance=torch.tensor([1.0]),
            )
            x = x + (t_next - t_cur) * v
    naive = xm.denoise(text, unpack(x, H, W), ts, guidance=1.0)
    assert (naive - latent).abs().max() > 1e-3


def test_inversion_error_shrinks_like_euler_on_the_random_model(tiny_models):
    # The random tiny model's flow is far from straight, so few steps reconstruct badly; inverse Euler is first
    # order, so 4x the steps should cut the error about 4x (measured 3.7x; we ask for 3x).
    latent = tiny_models.encode_image(_house()[None])
    text = tiny_models.encode(["a red house"])

    def error(steps: int) -> float:
        ts = tiny_models.schedule(steps, W, H)
        rec = tiny_models.denoise(text, unpack(invert(tiny_models, latent, text, ts).noise, H, W), ts, guidance=1.0)
        return (rec - latent).norm().item() / latent.norm().item()

    coarse, fine = error(4), error(16)
    assert fine < coarse / 3, (coarse, fine)


def test_real_edit_overwrites_the_reference_with_the_matching_noise_level(tiny_models):
    calls = []

    def spy(module, args, kwargs):
        calls.append((kwargs["guidance"].tolist(), kwargs.get("inject"), kwargs["timesteps"][0].item()))

    seen = []  # (step index, latent of the reference that the model saw) during denoising
    hook = tiny_models.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        result = edit_real(
            tiny_models,
            EditRequest("a red house", ["a white house", "a red house in snow"], STEPS, 3.0, layers=[0, 5]),
            RealImage(_house(), nudge=1.15),
            callback=lambda s: s.t_prev < s.t and seen.append((s.index, s.latent[0].clone())),
        )
    finally:
        hook.remove()
    inv = result.inversion
    assert torch.equal(inv.latents[-1], pack(tiny_models.encode_image(_house()[None]) * 1.15))
    assert [i for i, _ in seen] == list(range(STEPS))
    for i, latent in seen:  # step i starts at t_i: the reference is the inversion latent at t_i, bit for bit
        assert torch.equal(latent, inv.latents[i][0])
    assert torch.equal(result.latents[0], unpack(inv.latents[-1], H, W)[0])  # the reconstruction: the last level
    # Inversion: one sample, guidance 1, velocity at the next (noisier) time, no injection.
    ts = result.timesteps
    assert [c[0] for c in calls[:STEPS]] == [[1.0]] * STEPS and all(c[1] is None for c in calls[:STEPS])
    assert [c[2] for c in calls[:STEPS]] == pytest.approx(ts[::-1][1:])
    # Edit: reference guidance 1, edits 3, injection from sample 0 in the given layers.
    for guidance, inject, _ in calls[STEPS:]:
        assert guidance == [1.0, 3.0, 3.0]
        assert inject.layers == frozenset({0, 5}) and inject.source == (0, 0, 0)
    assert [c[2] for c in calls[STEPS:]] == pytest.approx(ts[:-1])
    assert result.input.shape == (3, H, W) and result.edits.shape == (2, 3, H, W)


def test_real_edit_under_classifier_free_guidance_guides_the_edits_in_both_halves(tiny_models):
    """A model whose guidance is classifier-free (ModelSpec.cfg): the inversion runs at scale 1, so alone as before;
    the edit batch is [reference, edits | the same under the empty prompt], the guidance values repeated, each half's
    edits injected from that half's reference; the reconstruction is still the last inversion level."""
    models = dataclasses.replace(tiny_models, spec=dataclasses.replace(tiny_models.spec, cfg=True))
    calls = []

    def spy(module, args, kwargs):
        calls.append((kwargs["guidance"].tolist(), kwargs.get("inject"), kwargs["txt"].clone()))

    hook = models.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        request = EditRequest("a red house", ["a white house", "a red house in snow"], STEPS, 3.0, layers=[0, 5])
        result = edit_real(models, request, RealImage(_house(), nudge=1.15))
    finally:
        hook.remove()
    assert [c[0] for c in calls[:STEPS]] == [[1.0]] * STEPS and all(c[1] is None for c in calls[:STEPS])
    empty = models.encode([""]).txt[0]
    for guidance, inject, txt in calls[STEPS:]:
        assert guidance == [1.0, 3.0, 3.0] * 2 and inject.source == (0, 0, 0, 3, 3, 3)
        assert all(torch.equal(txt[i], empty) for i in (3, 4, 5)) and not torch.equal(txt[1], empty)
    assert len(calls) == 2 * STEPS
    assert torch.equal(result.latents[0], unpack(result.inversion.latents[-1], H, W)[0])
    plain_result = edit_real(tiny_models, request, RealImage(_house(), nudge=1.15))
    assert (result.latents[1:] - plain_result.latents[1:]).abs().max() > 1e-3  # guided edits differ


def test_real_edit_chunks_share_one_reference_path(tiny_models):
    edits = ["a white house", "a red house in snow", "a blue house"]
    whole = edit_real(tiny_models, EditRequest("a red house", edits, STEPS, 3.0, layers=[0, 1]), RealImage(_house()))
    chunked = edit_real(
        tiny_models, EditRequest("a red house", edits, STEPS, 3.0, layers=[0, 1], batch_size=2), RealImage(_house())
    )
    assert len(chunked.chunks) == 3 and chunked.reference_drift == 0.0
    assert torch.equal(chunked.latents[0], whole.latents[0])
    for i in range(1, 4):
        assert_same(chunked.latents[i], whole.latents[i])


@pytest.mark.parametrize("solver", ["rf-solver", "fireflow"])
def test_real_edit_with_another_solver_is_flux_sampling_with_that_solver(tiny_models, solver):
    """The solver reaches both loops: the edit equals flux.sampling's invert and denoise called directly with it
    (the reference overwritten with the inversion level, injection from sample 0), and differs from Euler's."""
    m, layers = tiny_models, [0, 5]
    request = EditRequest("a red house", ["a white house"], STEPS, 3.0, layers=layers)
    calls = []
    hook = m.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        result = edit_real(m, request, RealImage(_house(), nudge=1.15, solver=solver))
    finally:
        hook.remove()
    assert len(calls) == 2 * sampling.solver_nfe(solver, STEPS)  # inversion, then [reference, edit] denoising

    text, pixels = m.encode(["a red house", "a white house"]), _house()
    h, w = pixels.shape[-2:]
    ts = m.schedule(STEPS, w, h)
    levels = [pack(m.encode_image(pixels[None]) * 1.15)]
    src = text.select([0])
    ids = lambda b: image_ids(b, h // 16, w // 16, m.device)
    sampling.invert(
        m.model, levels[0], ids(1), src.txt, src.txt_ids, src.vec, ts, 1.0,
        callback=lambda s: levels.append(s.next_latent), solver=solver,
    )  # fmt: skip
    levels = levels[::-1]  # noise first

    def overwrite(step):
        out = step.next_latent.clone()
        out[0] = levels[step.index + 1][0]
        return out

    with torch.inference_mode():
        direct = sampling.denoise(
            m.model, levels[0].repeat(2, 1, 1), ids(2), text.txt, text.txt_ids, text.vec, ts, [1.0, 3.0],
            inject=Injection.from_reference(layers, 2), callback=overwrite, solver=solver,
        )  # fmt: skip
    assert_same(result.latents, unpack(direct, h, w))
    euler = edit_real(m, request, RealImage(_house(), nudge=1.15))
    assert (result.latents[1] - euler.latents[1]).abs().max() > 1e-2
    with pytest.raises(UserError, match="unknown solver 'rk4'"):
        edit_real(m, request, RealImage(_house(), solver="rk4"))


# ----------------------------------------------------------------------------------------------- scores


def test_clip_scores(tmp_path):
    model, processor = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    scorer = ClipScorer.load(str(tmp_path / "clip"))  # the path a real checkpoint takes
    house = load_image(HOUSE)
    other = Image.new("RGB", (64, 64), (20, 200, 30))
    scores = scorer.scores(house, "a red house", [house, other, other], ["a white house", "a red house", "a lawn"])
    assert scores[0]["clip_img"] == pytest.approx(1.0, abs=1e-6)
    assert scores[0]["clip_dir"] is None and scores[1]["clip_dir"] is None  # no image change / no text change
    assert scores[2]["clip_dir"] is not None and -1 <= scores[2]["clip_dir"] <= 1
    with torch.no_grad():  # CLIP_txt against the model used directly
        px = processor(images=[other], return_tensors="pt")["pixel_values"]
        tok = processor(text=["a lawn"], padding=True, return_tensors="pt")
        i, t = model.get_image_features(pixel_values=px), model.get_text_features(**tok)
        i, t = (x if torch.is_tensor(x) else x.pooler_output for x in (i, t))
    assert scores[2]["clip_txt"] == pytest.approx(torch.cosine_similarity(i, t).item(), abs=1e-5)
    with pytest.raises(UserError, match="does not exist"):
        ClipScorer.load(str(tmp_path / "missing"))


def test_slug():
    assert slug("A photo of a dog, wearing SUNGLASSES!") == "a-photo-of-a-dog-wearing-sunglasses"
    assert slug("a red house with a blue door on white snow") == "a-red-house-with-a-blue-door-on-white"
    assert slug("日本", fallback="edit") == "edit" and slug("日本") == "prompt"


# ----------------------------------------------------------------------------------------------- the demo


def _config(name: str, tmp_path: Path, **overrides) -> EditConfig:
    over = [f"output_dir={tmp_path / 'out'}"] + [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_config(EditConfig, TINY_CONFIGS / name, over)


@pytest.mark.slow
def test_real_run_writes_every_output(tiny_models, tmp_path):
    cfg = _config("demo_4_edit_real.json", tmp_path)
    results = run(cfg, tiny_models)
    out = tmp_path / "out"
    names = ["input.png", "reconstruction.png", "grid.png", "results.json"] + [e["file"] for e in results["edits"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert len(results["edits"]) == len(cfg.edits) == 2
    assert Image.open(out / "input.png").size == (48, 32)
    assert Image.open(out / "reconstruction.png").size == (48, 32)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["settings"]["mode"] == "real" and on_disk["settings"]["nudge"] == 1.15
    assert on_disk["settings"]["vital_layers"] == [0, 1, 5]
    assert all(set(e["scores"]) == {"clip_txt", "clip_img", "clip_dir"} for e in on_disk["edits"])


@pytest.mark.slow
def test_generated_run_outputs(tiny_models, tmp_path):
    cfg = _config("demo_4_edit.json", tmp_path, scores=False)
    results = run(cfg, tiny_models)
    out = tmp_path / "out"
    assert (out / "reference.png").is_file() and (out / "grid.png").is_file()
    assert [e["file"] for e in results["edits"]] == [
        "edit_00_a-white-fox-in-the-snow.png",
        "edit_01_a-red-fox-on-the-grass.png",
        "edit_02_a-red-fox-in-the-snow-at-night.png",
    ]
    s = results["settings"]
    assert (s["steps"], s["guidance"], s["seed"], s["chunks"], s["reference_drift"]) == (4, 3.5, 0, 2, 0.0)
    assert s["vital_layers"] == [0, 1, 2, 3, 5] and "scaled" in s["vital_layers_from"]
    assert "scores" not in results["edits"][0]
    # The PNG is the edit itself: equal to the reference pixels only where injection made it so, never by a mix-up.
    ref = edit_generated(tiny_models, EditRequest(cfg.source_prompt, cfg.edits, 4, 3.5, batch_size=3), cfg.seed, W, H)
    assert Image.open(out / "reference.png").tobytes() == tensor_to_pil(ref.reference).tobytes()
    assert Image.open(out / results["edits"][1]["file"]).tobytes() == tensor_to_pil(ref.edits[1]).tobytes()


BAD_INPUTS = [
    ("demo_4_edit_real.json", ["image=tests/data/missing.png"], "does not exist"),
    ("demo_4_edit_real.json", ["image=tests/data"], "is a folder"),
    ("demo_4_edit_real.json", ["image=configs/tiny/demo_4_edit.json"], "cannot read image"),
    ("demo_4_edit.json", ["edits=[]"], "'edits' is empty"),
    ("demo_4_edit.json", ["vital_layers=[0, 6]"], r"out of range: this model has layers 0\.\.5"),
    ("demo_4_edit.json", ["vital_layers_file=configs/tiny/demo_4_edit.json"], "malformed"),
    ("demo_4_edit.json", ["vital_layers=[0]", "vital_layers_file=x.json"], "both"),
    ("demo_4_edit.json", ["batch_size=1"], "at least 2"),
    (
        "demo_4_edit.json",
        ["inject_steps=[2, 5]"],
        r"inject_steps \[2, 5\] must be \[start, end\] with 0 <= start < end "
        r"<= steps \(4\)",
    ),
    ("demo_4_edit.json", ["inject_steps=[3, 3]"], "inject_steps"),
    ("demo_4_edit.json", ["inject_steps=[1]"], "inject_steps"),
    ("demo_4_edit_real.json", ["steps=null", "inject_steps=[0, 51]"], r"steps \(50\)"),
    ("demo_4_edit_real.json", ["solver=rf_solver"], r"'solver' must be one of .* did you mean \"rf-solver\""),
    ("demo_4_edit.json", ["solver=fireflow"], "'solver' fireflow applies to real images"),
]


@pytest.mark.parametrize("config,overrides,message", BAD_INPUTS)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, repo_root, config, overrides, message):
    out = tmp_path / "out"
    argv = [str(TINY_CONFIGS / config), f"output_dir={out}", *overrides]
    monkeypatch.chdir(repo_root)  # relative paths in the overrides, as a user would type them
    with pytest.raises(SystemExit) as exit_info:
        run_demo(EditConfig, lambda cfg: pytest.fail("main must not run"), argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("config", ["demo_4_edit.json", "demo_4_edit_real.json"])
@pytest.mark.slow
def test_tiny_configs_run_as_scripts(run_script, tmp_path, config):
    proc = run_script("demo_4_edit.py", f"configs/tiny/{config}", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert all((tmp_path / f).is_file() for f in results["files"].values())
    assert all((tmp_path / e["file"]).is_file() for e in results["edits"])


@pytest.mark.slow
def test_script_bad_image_exits_2(run_script, tmp_path):
    proc = run_script(
        "demo_4_edit.py", "configs/tiny/demo_4_edit_real.json", f"output_dir={tmp_path / 'out'}", "image=no/such.png"
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "no/such.png does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- injection steps


@pytest.mark.parametrize("start,end", [(0, 1), (0, 3), (1, 3)])
def test_injection_over_a_step_range_is_injection_there_and_plain_denoising_elsewhere(tiny_models, start, end):
    # Built by hand from the hooks on the same latents: plain steps before `start`, injected steps up to `end`,
    # plain steps after; one batch [reference, edits...] as the edit makes it.
    result = edit(tiny_models, layers=ALL_LAYERS, inject_steps=(start, end))
    assert result.inject_steps == (start, end)
    text, ts = tiny_models.encode([REF, *EDITS]), tiny_models.schedule(STEPS, W, H)
    inject = Injection.from_reference(ALL_LAYERS, 4)
    x = tiny_models.noise([SEED], W, H).repeat(4, 1, 1, 1)
    if start > 0:
        x = tiny_models.denoise(text, x, ts[: start + 1], GENERATED_GUIDANCE)
    x = tiny_models.denoise(text, x, ts[start : end + 1], GENERATED_GUIDANCE, inject=inject)
    x = tiny_models.denoise(text, x, ts[end:], GENERATED_GUIDANCE)
    assert torch.equal(result.latents, x)
    full = edit(tiny_models, layers=ALL_LAYERS)
    assert full.inject_steps == (0, STEPS)
    assert all((result.latents[i] - full.latents[i]).abs().max() > 1e-4 for i in range(1, 4))
    assert torch.equal(result.latents[0], full.latents[0])


def test_injection_over_every_step_is_the_default_and_bad_ranges_are_refused(tiny_models):
    every = edit(tiny_models, layers=[0, 5], inject_steps=(0, STEPS))
    assert torch.equal(every.latents, edit(tiny_models, layers=[0, 5]).latents)
    for bad in [(0, STEPS + 1), (2, 2), (3, 1), (-1, 2)]:
        with pytest.raises(UserError, match="inject_steps"):
            edit(tiny_models, inject_steps=bad)


# ----------------------------------------------------------------------------------------------- config and re-runs


def test_vital_layers_file_auto_takes_demo_3s_file_beside_output_dir(tmp_path):
    from stableflow.vitality import selection_dict, vital_layers_payload

    def layers(**over):
        overrides = [f"output_dir={tmp_path / 'demo_4_edit'}"] + [f"{k}={json.dumps(v)}" for k, v in over.items()]
        cfg = load_config(EditConfig, TINY_CONFIGS / "demo_4_edit.json", overrides)
        return cfg.injection_layers

    found = tmp_path / "demo_3_dino" / "vital_layers.json"
    assert EditConfig().vital_layers_file == "auto"
    assert layers() == (
        [0, 1, 2, 3, 5],
        f"default (the release's layers scaled from 19+38 to 2+4 blocks); no {found} from demo_3_dino.py (name "
        "demo_3's output folder in vital_layers_file)",
    )
    found.parent.mkdir()
    for model, expected in [
        ("flux-tiny", ([0, 5], f"file {found}")),
        ("flux-dev", ([0, 1, 2, 3, 5], f"; {found} was made for flux-dev, not flux-tiny")),
    ]:
        payload = vital_layers_payload(
            [], [5, 0], selection_dict(0.2, None), model=model, dino_model="tiny-random", num_double=2
        )
        found.write_text(json.dumps(payload))
        got = layers()
        assert got[0] == expected[0] and got[1].endswith(expected[1])
    assert layers(vital_layers=[1]) == ([1], "config")  # an explicit list wins over the automatic file
    # A sweep scored before it was finished: taken, and the printed line says so.
    payload |= {"model": "flux-tiny", "complete": False, "missing": {"p1": {"ref": True, "layers": []}}}
    found.write_text(json.dumps(payload))
    assert (
        layers()[1] == f"file {found}; from an incomplete sweep (1 prompt(s) lack images): run demo_2 and demo_3 again"
    )
    # An output_dir away from demo_3_dino/: the config names demo_3's output folder (or the file) instead.
    moved = tmp_path / "elsewhere" / "edits"
    cfg = load_config(EditConfig, TINY_CONFIGS / "demo_4_edit.json", [f"output_dir={moved}"])
    assert f"no {moved.parent / 'demo_3_dino' / 'vital_layers.json'}" in cfg.injection_layers[1]
    named = load_config(
        EditConfig, TINY_CONFIGS / "demo_4_edit.json", [f"output_dir={moved}", f"vital_layers_file={found.parent}"]
    )
    assert named.injection_layers == ([0, 5], f"file {found.parent}")
    assert layers(vital_layers_file=None)[1].startswith("default")


@pytest.mark.slow
def test_the_real_input_is_decoded_once(tiny_models, tmp_path, monkeypatch):
    import stableflow.edit

    calls = []
    monkeypatch.setattr(stableflow.edit, "load_image", lambda path: calls.append(path) or load_image(path))
    cfg = _config("demo_4_edit_real.json", tmp_path, scores=False)
    run(cfg, tiny_models)
    assert calls == ["tests/data/house.png"]


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png")) if p.name != "grid.png"}


@pytest.mark.slow
def test_rerun_skips_finished_edits_and_makes_only_the_new_ones(tiny_models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    first = run(_config("demo_4_edit.json", tmp_path, scores=False, edits=EDITS[:2]), tiny_models)
    assert first["already_done"] == 0 and "wrote 2 edit(s), reference.png, grid.png" in capsys.readouterr().out
    made = _pngs(out)
    # Everything there: no model is loaded, nothing is recomputed or rewritten.
    monkeypatch.setattr(demo_4_edit, "load_models_for", lambda cfg: pytest.fail("nothing was left to compute"))
    again = run(_config("demo_4_edit.json", tmp_path, edits=EDITS[:2]), None)  # scores on: from the PNGs
    assert again["already_done"] == 2 and again["settings"]["chunks"] == 0 and _pngs(out) == made
    assert "wrote 0 edit(s), no reference, grid.png and results.json to " in (said := capsys.readouterr().out)
    assert said.rstrip().endswith("(2 edit(s) already there)")
    assert [e["file"] for e in again["edits"]] == [e["file"] for e in first["edits"]]
    assert all("scores" in e for e in again["edits"])
    # One more edit: only it is made (every forward pass is the reference + that edit), beside the same reference.
    batches = []
    hook = tiny_models.model.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["img"].shape[0]), with_kwargs=True
    )
    try:
        third = run(_config("demo_4_edit.json", tmp_path, scores=False, edits=EDITS), tiny_models)
    finally:
        hook.remove()
    assert batches == [2] * 4 and third["already_done"] == 2
    now = _pngs(out)
    assert {k: now[k] for k in made} == made and len(now) == 4
    alone = edit_generated(tiny_models, EditRequest(REF, [EDITS[2]], 4, 3.5), 0, W, H)  # the same batch shape: exact
    new = third["edits"][2]["file"]
    assert Image.open(out / new).tobytes() == tensor_to_pil(alone.edits[0]).tobytes()


@pytest.mark.parametrize(
    "override,change",
    [
        ("steps=5", "steps 4 -> 5"),
        ("seed=1", "seed 0 -> 1"),
        ("vital_layers=[0]", "vital_layers [0, 1, 2, 3, 5] -> [0]"),
        ("inject_steps=[0, 2]", "inject_steps [0, 4] -> [0, 2]"),
    ],
)
@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_and_changes_nothing(tiny_models, tmp_path, capsys, override, change):
    out = tmp_path / "out"
    run(_config("demo_4_edit.json", tmp_path, scores=False, edits=EDITS[:1]), tiny_models)
    made, results = _pngs(out), (out / "results.json").read_bytes()
    capsys.readouterr()
    argv = [str(TINY_CONFIGS / "demo_4_edit.json"), f"output_dir={out}", override]
    with pytest.raises(SystemExit) as exit_info:
        run_demo(EditConfig, lambda cfg: run(cfg, tiny_models), argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "holds outputs made with other settings" in err and change in err and "another output_dir" in err
    assert _pngs(out) == made and (out / "results.json").read_bytes() == results
