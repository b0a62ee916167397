"""demo_3's weight-free metric: SSIM pinned against an independent computation, and a sweep scored with it."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from flux.errors import UserError
from stableflow.ssim import ssim_pairs


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM as Wang et al. (2004) define it, written out with loops: an 11x11 Gaussian window (sigma 1.5) at every
    position where it fits, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 255, averaged over positions, then channels."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    h, wd, channels = a.shape
    per_channel = []
    for c in range(channels):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        values = []
        for i in range(h - 10):
            for j in range(wd - 10):
                px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
                cov = (w * px * py).sum() - mx * my
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


def write(path, pixels: np.ndarray):
    Image.fromarray(pixels).save(path)
    return path


def test_ssim_equals_the_definition(tmp_path):
    rng = np.random.RandomState(0)
    a = rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.randint(-40, 41, a.shape), 0, 255).astype(np.uint8)
    shifted = np.roll(a, 3, axis=1)
    pa, pn, ps = (write(tmp_path / f"{n}.png", x) for n, x in (("a", a), ("n", noisy), ("s", shifted)))
    got = ssim_pairs([(pa, pa), (pa, pn), (pa, ps)])
    assert got[0] == pytest.approx(1.0, abs=1e-6)
    assert got[1] == pytest.approx(reference_ssim(a, noisy), abs=1e-4)
    assert got[2] == pytest.approx(reference_ssim(a, shifted), abs=1e-4)
    assert got[1] > got[2]  # mild noise keeps more structure than moving the picture


def test_ssim_of_pairs_of_different_sizes_equals_the_definition(tmp_path):
    """A list mixing sizes (a sweep of one size, scored with another's pairs) scores every pair as on its own,
    in its input order."""
    rng = np.random.RandomState(1)
    images = {}
    for name, shape in (("s1", (16, 20, 3)), ("b1", (24, 18, 3)), ("s2", (16, 20, 3))):
        a = rng.randint(0, 256, shape, dtype=np.uint8)
        b = np.clip(a.astype(int) + rng.randint(-60, 61, shape), 0, 255).astype(np.uint8)
        images[name] = (a, b, write(tmp_path / f"{name}a.png", a), write(tmp_path / f"{name}b.png", b))
    got = ssim_pairs([(pa, pb) for _, _, pa, pb in images.values()], batch_size=3)
    want = [reference_ssim(a, b) for a, b, _, _ in images.values()]
    assert got == pytest.approx(want, abs=1e-4)


def test_ssim_refuses_images_it_cannot_compare(tmp_path):
    a = write(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
    b = write(tmp_path / "b.png", np.zeros((16, 32, 3), np.uint8))
    tiny = write(tmp_path / "t.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="one size"):
        ssim_pairs([(a, b)])
    with pytest.raises(UserError, match="window"):
        ssim_pairs([(tiny, tiny)])


@pytest.mark.slow
def test_demo3_scores_a_sweep_with_ssim_without_any_weights(tmp_path, run_script):
    sweep, out = tmp_path / "sweep", tmp_path / "scores"
    r = run_script(
        "demo_2_skip.py", "configs/tiny/demo_2_skip.json", f"output_dir={sweep}", "num_prompts=2", "progress=false"
    )
    assert r.returncode == 0, r.stderr
    r = run_script(
        "demo_3_dino.py",
        "configs/tiny/demo_3_dino.json",
        f"sweep_dir={sweep}",
        f"output_dir={out}",
        "metric=ssim",
        "dino_model=facebook/no-such-model",  # never loaded: SSIM needs no weights
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "scored with ssim" in r.stdout
    payload = json.loads((out / "vital_layers.json").read_text())
    assert payload["metric"] == "ssim" and payload["dino_model"] is None and "SSIM" in payload["similarity"]
    # Each layer's vitality is 1 - the mean SSIM of its ablated images against their references.
    manifest = json.loads((sweep / "manifest.json").read_text())
    prompt_ids = [p["id"] for p in manifest["prompts"]]
    layer = payload["layers"][3]
    pairs = [(sweep / pid / "ref.png", sweep / pid / f"layer_{layer['layer']:02d}.png") for pid in prompt_ids]
    assert math.isclose(layer["vitality"], 1 - np.mean(ssim_pairs(pairs)), abs_tol=1e-6)
    assert not (sweep / "dino_features").exists()


@pytest.mark.parametrize("which", ["dino", "clip"])
def test_scoring_models_fail_fast_without_network(tmp_path, monkeypatch, which):
    """No network and an empty cache: one clear error within seconds, not half a minute of retries."""
    import time

    from huggingface_hub import constants

    from stableflow.clip_score import ClipScorer
    from stableflow.dino import load_dino

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        load_dino("facebook/dinov2-base") if which == "dino" else ClipScorer.load("openai/clip-vit-large-patch14")
    assert time.perf_counter() - start < 5
    assert "HF_HUB_OFFLINE" in str(e.value)
