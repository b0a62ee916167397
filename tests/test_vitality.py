"""stableflow.vitality and demo_3_dino.py on a CPU with a tiny random Dinov2: similarity facts, statistics, the vital-set
rule, the feature cache, the output files agreeing with each other, partial sweeps, bad images, and the demo itself."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from PIL import Image

import demo_3_dino
from flux.errors import UserError
from flux.model import layer_name
from stableflow import TINY_RANDOM
from stableflow import dino as D
from stableflow import report as R
from stableflow import vitality as V
from stableflow.sweep import scan_sweep

# facebook/dinov2-base's preprocessor_config.json (small, large and giant ship the same values): the expected facts.
HUB_PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


@pytest.fixture(scope="module")
def embedder():
    return D.DinoEmbedder(D.load_dino(TINY_RANDOM), "cpu", batch_size=8, num_workers=2)


class CallCounter:
    """Counts images the model actually sees (a forward pre-hook, so nothing inside the library is mocked)."""

    def __init__(self, model):
        self.images = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.images += (kwargs.get("pixel_values") if "pixel_values" in kwargs else args[0]).shape[0]

    def close(self):
        self.handle.remove()


def gradient(seed: int, size=(64, 64)) -> np.ndarray:
    """A smooth synthetic 'photo' that differs per seed."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(1, 5, 3)
    return (np.stack([xx * a, yy * b, (xx + yy) * c], -1) + rng.integers(0, 255, 3)) % 256


def noise(seed: int, size=(64, 64)) -> np.ndarray:
    w, h = size
    return np.random.default_rng(1000 + seed).integers(0, 256, (h, w, 3))


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def make_sweep(
    root: Path, prompts=("p0", "p1", "p2"), layers=range(6), broken=(0, 3), num_double=2, num_single=4, manifest=True
) -> Path:
    """A synthetic sweep: bypassing a `broken` layer yields an unrelated (noise) image, any other layer a lightly
    noised copy of the reference -- the shape of a real sweep, where a few layers matter."""
    for i, pid in enumerate(prompts):
        ref = gradient(i)
        save(root / pid / "ref.png", ref)
        for layer in layers:
            rng = np.random.default_rng(100 * i + layer)
            img = noise(100 * i + layer) if layer in broken else ref + rng.normal(0, 3, ref.shape)
            save(root / pid / f"layer_{layer:02d}.png", img)
    if manifest:
        (root / "manifest.json").write_text(
            json.dumps(
                {
                    "model": "flux-tiny",
                    "num_double": num_double,
                    "num_single": num_single,
                    "width": 64,
                    "height": 64,
                    "steps": 2,
                    "guidance": 3.5,
                    "prompts": [{"id": p, "prompt": f"prompt {p}", "seed": i} for i, p in enumerate(prompts)],
                    "layers": list(layers),
                }
            )
        )
    return root


def analyse(sweep, embedder, cache, tau=V.DEFAULT_TAU, top_k=None, n_bootstrap=1000, seed=0) -> V.Analysis:
    """demo_3_dino.main's scoring steps: similarities -> per-layer vitality -> the vital set, with its notes."""
    sweep.require_pairs()
    sims = V.similarities(sweep.pairs(), D.dino_similarity(embedder, cache))
    scores = V.layer_scores(sims, sweep.num_double, n_bootstrap=n_bootstrap, seed=seed)
    vital = V.select_vital(scores, tau=tau, top_k=top_k)
    return V.Analysis(
        sweep,
        sims,
        scores,
        vital,
        V.selection_dict(tau, top_k),
        {"samples": n_bootstrap, "seed": seed, "confidence": 0.95},
        sweep.notes + (cache.notes() if cache is not None else []),
    )


def score(lv: dict[int, float]) -> list[V.LayerScore]:
    return [
        V.LayerScore(
            layer=l,
            name=layer_name(l, 19),
            mean_similarity=1 - v,
            std=0.0,
            ci_low=1 - v,
            ci_high=1 - v,
            vitality=v,
            num_prompts=1,
        )
        for l, v in sorted(lv.items())
    ]


# ----------------------------------------------------------------------------------------------- preprocessing


def test_preprocessing_values_equal_the_hubs():
    pp = D.HUB_PREPROCESS
    hub = HUB_PREPROCESSOR_CONFIG
    assert pp.shortest_edge == hub["size"]["shortest_edge"]
    assert (pp.crop_size, pp.crop_size) == (hub["crop_size"]["height"], hub["crop_size"]["width"])
    assert int(pp.resample) == hub["resample"] == int(Image.Resampling.BICUBIC)
    assert pp.rescale_factor == pytest.approx(hub["rescale_factor"], rel=1e-15)
    assert list(pp.image_mean) == hub["image_mean"] and list(pp.image_std) == hub["image_std"]


def test_preprocessing_matches_transformers_configured_like_the_hub():
    # The oracle is transformers' own PIL pipeline given the hub's file; a wrong resize rule, crop offset or
    # mean/std would show here. Non-square and odd sizes exercise the rounding of the long edge and the crop.
    try:
        from transformers import BitImageProcessorPil
    except ImportError:
        pytest.skip("this transformers has no BitImageProcessorPil")
    oracle = BitImageProcessorPil(**{k: v for k, v in HUB_PREPROCESSOR_CONFIG.items() if k != "image_processor_type"})
    for size in [(300, 200), (97, 64), (257, 256), (64, 480)]:
        im = Image.fromarray(noise(size[0], size).astype(np.uint8))
        expected = oracle([im], return_tensors="pt")["pixel_values"]
        got = D.preprocess([im])
        assert got.shape == expected.shape == (1, 3, 224, 224)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- similarity


def test_image_against_itself_scores_one(tmp_path, embedder):
    a = save(tmp_path / "a.png", gradient(0, (120, 90)))
    b = save(tmp_path / "copy_of_a.png", gradient(0, (120, 90)))
    c = save(tmp_path / "c.png", gradient(5, (120, 90)))
    sims = D.compare_files(embedder, [(a, a), (a, b), (a, c)])
    assert sims[0] == pytest.approx(1.0, abs=1e-9)
    assert sims[1] == pytest.approx(1.0, abs=1e-9)
    assert sims[2] < 1 - 1e-4


def test_similarity_ordering_on_synthetic_pairs(embedder):
    ref = gradient(1, (300, 200))
    # Guaranteed by construction: 300x200 -> 384x256, center crop keeps x in [80, 304) of the resized image, so the
    # leftmost 40 original columns (51 resized, plus the bicubic kernel's reach) never reach the model.
    outside, inside = ref.copy(), ref.copy()
    outside[:, :40] = 255 - outside[:, :40]
    inside[60:140, 110:190] = 255 - inside[60:140, 110:190]
    slight = ref + np.random.default_rng(0).normal(0, 3, ref.shape)
    images = [
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
        for x in (ref, outside, inside, slight, noise(1, (300, 200)))
    ]
    f = embedder.embed(images)
    sim = D.cosine(f[:1].expand_as(f), f).tolist()
    assert sim[1] == pytest.approx(1.0, abs=1e-9)  # change outside the crop: invisible
    assert sim[2] < 1 - 1e-4  # the same change inside the crop: seen
    # The identical image beats a slightly noised copy, which beats an unrelated image (fixed seeds; with this
    # tiny model the gaps are ~3e-5 and ~0.2, far above float32 noise).
    assert sim[0] > sim[3] > sim[4]
    assert sim[3] - sim[4] > 0.05


# ----------------------------------------------------------------------------------------------- statistics and rule


def test_layer_scores_mean_std_interval():
    sims = {0: {"a": 0.2, "b": 0.4, "c": 0.6}, 20: {"a": 1.0}}
    s0, s20 = V.layer_scores(sims, num_double=19, n_bootstrap=2000, seed=0)
    assert (s0.layer, s0.name, s20.name) == (0, "double_blocks.0", "single_blocks.1 (layer 20)")
    assert s0.mean_similarity == pytest.approx(0.4) and s0.vitality == pytest.approx(0.6)
    assert s0.std == pytest.approx(0.2)  # sample std (ddof=1)
    assert 0.2 <= s0.ci_low < 0.4 < s0.ci_high <= 0.6 and s0.num_prompts == 3
    assert (s20.std, s20.ci_low, s20.ci_high, s20.num_prompts) == (0.0, 1.0, 1.0, 1)
    # Seeded and per layer: the same run repeats exactly, and another layer's arrival changes nothing.
    again = V.layer_scores({**sims, 7: {"a": 0.5, "b": 0.9}}, num_double=19, n_bootstrap=2000, seed=0)
    assert again[0] == s0
    wide = {0: {f"p{i}": v for i, v in enumerate(np.linspace(0, 1, 10))}}  # n=3 has too few distinct resamples
    assert V.layer_scores(wide, n_bootstrap=200, seed=0) != V.layer_scores(wide, n_bootstrap=200, seed=1)


def test_bootstrap_interval_matches_normal_theory():
    x = np.random.default_rng(3).normal(0.8, 0.1, 64)
    (s,) = V.layer_scores({5: {f"p{i}": v for i, v in enumerate(x)}}, n_bootstrap=4000, seed=0)
    half = 1.96 * x.std(ddof=0) / np.sqrt(len(x))
    assert s.ci_high - s.ci_low == pytest.approx(2 * half, rel=0.15)
    assert (s.ci_low + s.ci_high) / 2 == pytest.approx(x.mean(), abs=0.3 * half)


def test_select_vital_threshold_and_top_k():
    scores = score({0: 0.9, 1: 0.2, 2: 0.19999, 25: 0.5, 40: 0.02, 41: 0.5})
    assert V.select_vital(scores, tau=0.2) == [0, 1, 25, 41]  # vitality >= tau: the boundary is in
    assert V.select_vital(scores, tau=0.95) == []
    assert V.select_vital(scores, top_k=1) == [0]
    assert V.select_vital(scores, top_k=2) == [0, 25]  # 25 and 41 tie: the lower index wins
    assert V.select_vital(scores, top_k=3) == [0, 25, 41]
    assert V.select_vital(scores, top_k=6) == [0, 1, 2, 25, 40, 41]
    for bad in ({}, {"tau": 0.2, "top_k": 2}):
        with pytest.raises(UserError, match="exactly one"):
            V.select_vital(scores, **bad)
    with pytest.raises(UserError, match="top_k=7 but only 6"):
        V.select_vital(scores, top_k=7)
    low, high = V.tau_interval_for(scores, 3)
    assert (low, high) == (0.2, 0.5)
    assert V.select_vital(scores, tau=high) == V.select_vital(scores, top_k=3)
    assert V.tau_interval_for(scores, 2) is None  # 25 and 41 tie: no tau picks exactly two


def test_borderline_layers_are_those_whose_interval_of_vitality_contains_tau():
    """Hand-built similarities over 20 prompts: layer 0 always 0.5 (vitality 0.5, no spread); layer 1 alternates 0.8
    and 1.0 (vitality 0.1, standard error 0.1 / sqrt(20) = 0.022, so its 95% interval is about 0.1 +- 0.044); layer 2
    alternates 0.7 and 0.9 (vitality 0.2 +- 0.044); layer 3 always 0.95 (0.05, no spread). At tau 0.1 only layer 1
    is undecided by this sample; at 0.2 only layer 2; at 0.15 neither (each interval ends within 0.05 of its mean)."""
    sims = {
        0: {f"p{i:02d}": 0.5 for i in range(20)},
        1: {f"p{i:02d}": (0.8, 1.0)[i % 2] for i in range(20)},
        2: {f"p{i:02d}": (0.7, 0.9)[i % 2] for i in range(20)},
        3: {f"p{i:02d}": 0.95 for i in range(20)},
    }
    scores = V.layer_scores(sims, num_double=2, n_bootstrap=2000, seed=0)
    for s in scores[1:3]:
        assert 0.025 < (s.ci_high - s.ci_low) / 2 < 0.05, s  # the normal approximation's 0.044, resampled
    assert V.borderline_layers(scores, V.selection_dict(0.1, None)) == [1]
    assert V.borderline_layers(scores, V.selection_dict(0.2, None)) == [2]
    assert V.borderline_layers(scores, V.selection_dict(0.15, None)) == []
    assert V.borderline_layers(scores, V.selection_dict(0.5, None)) == [0]  # no spread: undecided only at its value
    assert V.borderline_layers(scores, V.selection_dict(None, 2)) == []  # top_k has no tau


def test_summary_and_vital_layers_json_name_the_borderline_layers(tmp_path, embedder):
    """demo_3's summary says which vital-set decisions the prompts' sample leaves open, and vital_layers.json keeps
    them; under top_k (no threshold) there are none."""
    sweep = scan_sweep(make_sweep(tmp_path / "sweep", prompts=("a", "b", "c", "d"), layers=[0, 1, 2]))
    a = analyse(sweep, embedder, None, n_bootstrap=200)
    lo, hi = 1 - a.scores[1].ci_high, 1 - a.scores[1].ci_low
    assert lo < hi  # the tiny sweep's layer 1 has spread over its prompts
    a = analyse(sweep, embedder, None, tau=(lo + hi) / 2, n_bootstrap=200)
    expected = V.borderline_layers(a.scores, a.selection)
    assert 1 in expected
    assert any(line.startswith(f"borderline: layer(s) {expected}, whose 95% interval") for line in R.summary_lines(a))
    out = R.write_sweep_outputs(a, tmp_path / "out", dino_model=TINY_RANDOM)
    assert json.loads(out["json"].read_text())["borderline_layers"] == expected
    a = analyse(sweep, embedder, None, tau=None, top_k=1, n_bootstrap=200)
    assert not any(line.startswith("borderline") for line in R.summary_lines(a))
    out = R.write_sweep_outputs(a, tmp_path / "out2", dino_model=TINY_RANDOM)
    assert json.loads(out["json"].read_text())["borderline_layers"] == []


# ----------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_and_extended(tmp_path, embedder):
    root = make_sweep(tmp_path / "sweep", prompts=("p0", "p1"), layers=[0, 1], broken=[0])
    file = D.cache_path(root, TINY_RANDOM)
    assert file == root / "dino_features" / "tiny-random-seed0.safetensors"
    counter = CallCounter(embedder.model)
    try:

        def run():
            counter.images = 0
            sweep = scan_sweep(root)
            return analyse(sweep, embedder, D.FeatureCache(file, root), n_bootstrap=10)

        first = run()
        assert counter.images == 6 and file.is_file()  # 2 refs + 4 ablations, each once
        second = run()  # a fresh cache object: everything comes from the file
        assert counter.images == 0 and second.sims == first.sims

        for i, pid in enumerate(("p0", "p1")):  # the sweep grows by a layer
            save(root / pid / "layer_02.png", gradient(i) + 2)
        third = run()
        assert counter.images == 2 and set(third.sims) == {0, 1, 2}
        assert {l: third.sims[l] for l in (0, 1)} == first.sims

        path = root / "p1" / "layer_01.png"  # an image regenerated in place (new content, new mtime) is re-embedded
        save(path, noise(7))
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        fourth = run()
        assert counter.images == 1 and fourth.sims[1]["p1"] < third.sims[1]["p1"] - 0.05

        uncached = analyse(scan_sweep(root), embedder, None, n_bootstrap=10)
        for layer in fourth.sims:
            for pid in fourth.sims[layer]:
                assert fourth.sims[layer][pid] == pytest.approx(uncached.sims[layer][pid], abs=1e-6)

        file.write_bytes(b"not a safetensors file")  # a damaged cache is recomputed, never fatal
        fifth = run()
        assert counter.images == 8 and any("unreadable" in n for n in fifth.notes)
    finally:
        counter.close()


def test_a_cache_damaged_after_it_was_written_is_recomputed(tmp_path):
    """A flipped bit in the features (the file still parses) must not pass as a cached embedding."""
    root = make_sweep(tmp_path / "sweep", prompts=("p0",), layers=[0])
    images = sorted(root.rglob("*.png"))
    cache = D.FeatureCache(D.cache_path(root, TINY_RANDOM), root)
    for i, path in enumerate(images):
        cache.put(path, torch.full((8,), float(i + 1)))
    cache.save()
    assert D.FeatureCache(cache.file, root).holds(images) == len(images)
    data = bytearray(cache.file.read_bytes())
    data[-3] ^= 0x10  # inside the last feature's float32 values
    cache.file.write_bytes(bytes(data))
    damaged = D.FeatureCache(cache.file, root)
    assert damaged.holds(images) == 0 and "damaged" in damaged.notes()[0] and "recomputing" in damaged.notes()[0]


# ----------------------------------------------------------------------------------------------- outputs


def test_outputs_written_and_agree(tmp_path, embedder):
    root = make_sweep(tmp_path / "sweep", num_double=2, num_single=4)
    a = analyse(scan_sweep(root), embedder, None, tau=0.2, n_bootstrap=50)
    paths = R.write_sweep_outputs(
        a, tmp_path / "out", dino_model=TINY_RANDOM, contact_sheet_prompts=2, contact_sheet_columns=3
    )
    data = json.loads(paths["json"].read_text())
    assert data["vital_layers"] == [0, 3]  # the two layers whose bypass gives noise
    assert data["selection"] == {"rule": "threshold", "tau": 0.2}
    assert (data["model"], data["dino_model"], data["num_double"], data["num_prompts"]) == (
        "flux-tiny",
        "tiny-random",
        2,
        3,
    )
    assert data["complete"] is True and data["missing"] == {}
    assert data["vital_layer_names"] == ["double_blocks.0", "single_blocks.1 (layer 3)"]
    from stableflow.vitality import read_vital_layers  # demo_4_edit.py's reader takes the file as written

    assert read_vital_layers(paths["json"], 2, 4) == [0, 3]
    layers = data["layers"]
    assert [l["layer"] for l in layers] == list(range(6))
    for l in layers:
        assert set(l) == {"layer", "name", "mean_similarity", "std", "ci_low", "ci_high", "vitality", "num_prompts"}
        assert l["vitality"] == pytest.approx(1 - l["mean_similarity"]) and l["num_prompts"] == 3
        assert (l["vitality"] >= 0.2) == (l["layer"] in data["vital_layers"])

    rows = list(csv.DictReader(paths["csv"].open()))
    assert [int(r["layer"]) for r in rows] == [l["layer"] for l in layers]
    for r, l in zip(rows, layers):
        for key in ("mean_similarity", "std", "ci_low", "ci_high", "vitality"):
            assert float(r[key]) == l[key]
        assert r["name"] == l["name"] and int(r["num_prompts"]) == l["num_prompts"]
        assert int(r["vital"]) == (l["layer"] in data["vital_layers"])
        assert r["block"] == ("double" if l["layer"] < 2 else "single")

    # The plot: one bar per layer at the JSON's vitality, colour by block, vital bars opaque and outlined, tau drawn.
    fig = R.vitality_figure(a.scores, a.vital, 2, tau=0.2)
    ax = fig.axes[0]
    bars = {p.get_gid(): p for p in ax.patches if (p.get_gid() or "").startswith("layer_")}
    assert len(bars) == 6
    for l in layers:
        vital = l["layer"] in data["vital_layers"]
        bar = bars[f"layer_{l['layer']}{'_vital' if vital else ''}"]
        assert bar.get_height() == pytest.approx(l["vitality"])
        want = R.DOUBLE_COLOUR if l["layer"] < 2 else R.SINGLE_COLOUR
        assert bar.get_facecolor()[:3] == pytest.approx(to_rgb(want))
        assert (bar.get_alpha() == 1.0) == vital and (bar.get_linewidth() > 0) == vital
    assert any(list(line.get_ydata()) == [0.2, 0.2] for line in ax.get_lines())
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.width > 400
    with Image.open(paths["contact_sheet"]) as im:
        assert im.format == "PNG" and 4 * 192 < im.width < 5 * 192 and 2 * 192 < im.height < 3 * 192  # 4 x 2
    assert not list((tmp_path / "out").glob(".*"))  # no temp files left


# ----------------------------------------------------------------------------------------------- partial and bad sweeps


def test_partial_sweep_is_scored_and_reported(tmp_path, embedder):
    root = tmp_path / "sweep"
    make_sweep(root, prompts=("a", "b"), layers=[0, 1, 2, 19], broken=[0], num_double=19, num_single=38)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["prompts"].append({"id": "c", "prompt": "prompt c", "seed": 2})
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "b" / "layer_02.png").unlink()
    (root / "b" / "layer_19.png").unlink()
    save(root / "c" / "layer_00.png", noise(3))  # an orphan: no ref.png yet
    (root / "a" / "notes.txt").write_text("not an image")
    save(root / "a" / "grid.png", gradient(0))
    save(root / "a" / "layer_99.png", gradient(0))  # beyond the model's 57 layers
    (root / "a" / ".layer_03.png.x1y2.tmp").write_bytes(b"half")  # a write in flight: silently not there yet
    save(root / "b" / "layer_01.png", gradient(1, (80, 64)))  # another size than its reference

    sweep = scan_sweep(root)
    assert sweep.missing() == {"b": {"ref": False, "layers": [2, 19]}, "c": {"ref": True, "layers": [1, 2, 19]}}
    assert sweep.missing_report() == ["b: missing layers 2, 19", "c: missing ref.png and layers 1-2, 19"]
    notes = "\n".join(sweep.notes)
    assert "a/notes.txt" in notes and "a/grid.png" in notes and "a/layer_99.png" in notes and "c" in notes
    assert ".tmp" not in notes

    a = analyse(sweep, embedder, None, n_bootstrap=20)
    assert {s.layer: s.num_prompts for s in a.scores} == {0: 2, 1: 2, 2: 1, 19: 1}
    assert any("b/layer_01.png 80x64 vs ref 64x64" in n for n in a.notes)
    out = R.write_sweep_outputs(a, tmp_path / "out", dino_model=TINY_RANDOM)
    data = json.loads(out["json"].read_text())
    assert data["complete"] is False and data["missing"]["c"] == {"ref": True, "layers": [1, 2, 19]}


def test_manifest_less_sweep_and_num_double(tmp_path):
    root = make_sweep(tmp_path / "sweep", layers=[0, 20], manifest=False)
    sweep = scan_sweep(root)
    assert (sweep.num_double, sweep.expected_layers, sweep.missing()) == (19, [0, 20], {})
    assert scan_sweep(root, num_double=2).num_double == 2
    make_sweep(root, layers=[0, 20], num_double=2, num_single=30)
    with pytest.raises(UserError, match="num_double is 19 in the config but 2 in"):
        scan_sweep(root, num_double=19)
    (root / "manifest.json").write_text("{broken")
    with pytest.raises(UserError, match="manifest.json is not valid JSON"):
        scan_sweep(root)
    with pytest.raises(UserError, match="does not exist"):
        scan_sweep(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no \\(ref.png, layer_XX.png\\) pairs"):
        scan_sweep(empty).require_pairs()


def test_corrupt_image_names_the_file_and_keeps_finished_work(tmp_path):
    root = make_sweep(tmp_path / "sweep", prompts=("p0", "p1"), layers=[0, 1])
    bad = root / "p1" / "layer_01.png"  # embedded last
    bad.write_bytes(bad.read_bytes()[:100])  # truncated mid-stream: the header still parses
    embedder = D.DinoEmbedder(D.load_dino(TINY_RANDOM), "cpu", batch_size=1, num_workers=1)
    cache = D.FeatureCache(D.cache_path(root, TINY_RANDOM), root)
    with pytest.raises(UserError, match=r"cannot read image .*p1/layer_01\.png"):
        analyse(scan_sweep(root), embedder, cache, n_bootstrap=10)
    saved = D.FeatureCache(cache.file, root)
    assert len(saved.entries) == 5 and "p1/layer_01.png" not in saved.entries
    (root / "p0" / "layer_00.png").write_text("hello")  # not an image at all, found when sizes are read
    with pytest.raises(UserError, match=r"cannot read image .*p0/layer_00\.png"):
        analyse(scan_sweep(root), embedder, cache, n_bootstrap=10)


# ----------------------------------------------------------------------------------------------- plain mode and demo


def test_plain_mode_folders(tmp_path, embedder):
    fa, fb = tmp_path / "a", tmp_path / "b"
    for name, seed in (("x.png", 0), ("y.png", 1)):
        save(fa / name, gradient(seed))
    save(fb / "x.png", gradient(0))
    save(fb / "y.png", noise(1))
    save(fb / "z.png", gradient(2))
    (fb / "readme.txt").write_text("x")
    matched, notes = D.match_folders(fa, fb)
    assert [n for n, _, _ in matched] == ["x.png", "y.png"]
    assert any("only in" in n and "z.png" in n for n in notes) and any("readme.txt" in n for n in notes)
    sims = D.compare_files(embedder, [(a, b) for _, a, b in matched])
    assert sims[0] == pytest.approx(1.0, abs=1e-9) and sims[1] < 0.9


@pytest.mark.slow
def test_demo_config_and_plain_mode_in_process(tmp_path, capsys, repo_root):
    from stableflow.config import ConfigError, load_config

    a, b = save(tmp_path / "a.png", gradient(0)), save(tmp_path / "b.png", gradient(1))
    cfg = load_config(
        V.DinoConfig,
        repo_root / "configs" / "tiny" / "demo_3_dino.json",
        [f"image_a={a}", f"image_b={b}", f"output_dir={tmp_path / 'out'}"],
    )
    demo_3_dino.main(cfg)
    data = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert data["pairs"][0]["similarity"] == pytest.approx(float(capsys.readouterr().out.split()[0]), abs=1e-4)
    assert (tmp_path / "out" / "similarity.csv").read_text().startswith("name,a,b,similarity\n")
    with pytest.raises(ConfigError, match="either image_a/image_b or folder_a/folder_b"):
        load_config(
            V.DinoConfig, None, [f"image_a={a}", f"image_b={b}", f"folder_a={tmp_path}", f"folder_b={tmp_path}"]
        )
    with pytest.raises(ConfigError, match="needs both image_a and image_b"):
        load_config(V.DinoConfig, None, [f"image_a={a}"])
    load_config(V.DinoConfig, repo_root / "configs" / "demo_3_dino.json")  # the real config is valid

    from stableflow.config import (
        run_demo,  # bad input: one message naming the problem, exit status 2, nothing written
    )

    with pytest.raises(SystemExit) as exit_:
        run_demo(
            V.DinoConfig,
            demo_3_dino.main,
            [
                str(repo_root / "configs" / "tiny" / "demo_3_dino.json"),
                f"sweep_dir={tmp_path / 'nowhere'}",
                f"output_dir={tmp_path / 'out2'}",
            ],
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nowhere" in err and not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_demo_runs_on_the_tiny_config(tmp_path, capsys, monkeypatch, repo_root, run_script):
    sweep = make_sweep(tmp_path / "sweep", broken=(1, 4))
    out, cache = sweep / "scores", sweep / "features"  # both inside the sweep: they must not be taken for prompts
    args = ["configs/tiny/demo_3_dino.json", f"sweep_dir={sweep}", f"output_dir={out}", f"cache_dir={cache}"]
    run = run_script("demo_3_dino.py", *args)
    assert run.returncode == 0, run.stderr
    data = json.loads((out / "vital_layers.json").read_text())
    assert data["vital_layers"] == [1, 4] and data["selection"] == {"rule": "top_k", "k": 2}
    assert data["complete"] is True and data["notes"] == []
    assert {p.name for p in out.iterdir()} == {"vital_layers.json", "vitality.csv", "vitality.png", "contact_sheet.png"}
    assert "vital layers (top 2): [1, 4]" in run.stdout and "note:" not in run.stdout
    assert (cache / "tiny-random-seed0.safetensors").is_file()

    # Again, in process, with the cache's images counted: nothing is re-embedded, the answer is the same.
    monkeypatch.chdir(repo_root)
    from stableflow.config import run_demo

    built = D.load_dino
    counters = []
    monkeypatch.setattr(D, "load_dino", lambda *a: counters.append(CallCounter(m := built(*a))) or m)
    run_demo(V.DinoConfig, demo_3_dino.main, args)
    assert counters[0].images == 0 and "note:" not in capsys.readouterr().out
    assert json.loads((out / "vital_layers.json").read_text())["layers"] == data["layers"]


def test_load_dino_from_a_local_folder(tmp_path):
    from transformers import ViTConfig, ViTModel

    D.tiny_dino().save_pretrained(tmp_path / "dino")
    model = D.load_dino(str(tmp_path / "dino"))
    x = D.preprocess([Image.fromarray(gradient(0).astype(np.uint8))])
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).pooler_output, D.tiny_dino()(pixel_values=x).pooler_output)
    assert D.model_slug(str(tmp_path / "dino")) != D.model_slug(TINY_RANDOM)
    assert D.model_slug("facebook/dinov2-base") == "facebook--dinov2-base"

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "vit")
    with pytest.raises(UserError, match="is a 'vit' model, not DINOv2"):
        D.load_dino(str(tmp_path / "vit"))
    (tmp_path / "weights_only").mkdir()
    with pytest.raises(UserError, match="without a config.json"):
        D.load_dino(str(tmp_path / "weights_only"))


def test_demo_3_writes_only_what_demo_4_reads(tmp_path):
    """One owner of vital_layers.json: the writer applies the reader's rules, so demo_3 cannot leave a file that
    demo_4 refuses."""
    from stableflow.vitality import read_vital_layers, selection_dict, vital_layers_payload, write_vital_layers

    def payload(vital):
        return vital_layers_payload(
            [], vital, selection_dict(None, 2), model="flux-tiny", dino_model=None, num_double=2
        )

    path = write_vital_layers(tmp_path, payload([5, 0]), num_single=4)
    assert path == tmp_path / "vital_layers.json" and read_vital_layers(path, 2, 4) == [0, 5]
    with pytest.raises(ValueError, match="0..5"):
        write_vital_layers(tmp_path / "bad", payload([0, 6]), num_single=4)
    assert not (tmp_path / "bad").exists()
