"""T5 and CLIP from a FLUX.1 repo's own folders (text_encoder_2/ + tokenizer_2/, text_encoder/ + tokenizer/), from a
local copy or the HF cache, with the google/openai repos as the fallback; no network fails fast."""

import os
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import torch

from flux.errors import UserError
from flux.modules.conditioner import HFEmbedder
from flux.util import CLIP_FALLBACK, T5_FALLBACK, configs, load_clip, load_t5

PROMPTS = ["a fox in the snow", "a lighthouse at dusk, oil painting"]


@pytest.fixture(scope="module")
def encoders():
    return HFEmbedder.tiny("t5", 16, seed=3), HFEmbedder.tiny("clip", 77, seed=4)


@pytest.fixture(scope="module")
def flux_repo(encoders, tmp_path_factory) -> Path:
    """A folder laid out like FLUX.1-dev, written by transformers' save_pretrained (T5 sharded, as in the repo)."""
    root = tmp_path_factory.mktemp("FLUX.1-test")
    t5, clip = encoders
    t5.hf_module.save_pretrained(root / "text_encoder_2", max_shard_size="30KB", safe_serialization=True)
    t5.tokenizer.save_pretrained(root / "tokenizer_2")
    clip.hf_module.save_pretrained(root / "text_encoder", safe_serialization=True)
    clip.tokenizer.save_pretrained(root / "tokenizer")
    return root


def test_the_fake_repo_is_laid_out_like_flux(flux_repo):
    assert len(list((flux_repo / "text_encoder_2").glob("model-*-of-*.safetensors"))) > 1
    assert (flux_repo / "text_encoder_2" / "model.safetensors.index.json").is_file()
    assert not list(flux_repo.rglob("*.bin"))


def test_local_repo_copy_embeds_like_the_models(flux_repo, encoders):
    t5, clip = encoders
    assert torch.equal(load_t5("cpu", 16, str(flux_repo), torch.float32)(PROMPTS), t5(PROMPTS))
    assert torch.equal(load_clip("cpu", str(flux_repo), torch.float32)(PROMPTS), clip(PROMPTS))


def test_default_specs_use_the_models_own_repo():
    for name in ("flux-dev", "flux-schnell", "flux-krea-dev"):
        spec = configs[name]
        assert spec.t5_version == spec.clip_version == spec.repo_id
    assert (T5_FALLBACK, CLIP_FALLBACK) == ("google/t5-v1_1-xxl", "openai/clip-vit-large-patch14")


def put_in_cache(cache: Path, repo_id: str, files: Path, only: tuple[str, ...] = ()) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    rev = "c" * 40
    base = cache / f"models--{repo_id.replace('/', '--')}"
    snap = base / "snapshots" / rev
    if only:
        for sub in only:
            shutil.copytree(files / sub, snap / sub)
    else:
        shutil.copytree(files, snap)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)


@pytest.fixture
def run_isolated(run_script, tmp_path):
    """Python with an HF cache of its own and an unreachable Hub: any request would fail."""
    env = {k: None for k in os.environ if k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    return lambda code: run_script("-c", textwrap.dedent(code), env=env)


def test_hub_ids_served_from_the_hf_cache(flux_repo, encoders, tmp_path, run_isolated):
    """With an unreachable Hub: a cached FLUX repo gives its own encoders; a cached FLUX repo that lacks them
    (only transformer/) falls back to the google/openai repos (cached here too, with the tiny models)."""
    t5, clip = encoders
    cache = tmp_path / "hf" / "hub"
    put_in_cache(cache, "acme/FLUX.1-test", flux_repo)
    (tmp_path / "bare" / "transformer").mkdir(parents=True)
    (tmp_path / "bare" / "transformer" / "config.json").write_text("{}")
    put_in_cache(cache, "acme/FLUX.1-bare", tmp_path / "bare")
    # The cache knows the bare repo lacks the encoders (huggingface_hub records the Hub's 404s in .no_exist/).
    for missing in ("text_encoder_2/config.json", "text_encoder/config.json", "config.json"):
        marker = cache / "models--acme--FLUX.1-bare" / ".no_exist" / ("c" * 40) / missing
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    for repo, enc in ((T5_FALLBACK, t5), (CLIP_FALLBACK, clip)):  # transformers repos: everything at the root
        folder = tmp_path / repo.replace("/", "_")
        enc.hf_module.save_pretrained(folder)
        enc.tokenizer.save_pretrained(folder)
        put_in_cache(cache, repo, folder)
    torch.save({"t5": t5(PROMPTS), "clip": clip(PROMPTS)}, tmp_path / "expected.pt")
    r = run_isolated(f"""
        import torch
        from flux.util import load_clip, load_t5
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        prompts = {PROMPTS!r}
        for repo in ("acme/FLUX.1-test", "acme/FLUX.1-bare"):
            assert torch.equal(load_t5("cpu", 16, repo, torch.float32)(prompts), expected["t5"]), repo
            assert torch.equal(load_clip("cpu", repo, torch.float32)(prompts), expected["clip"]), repo
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    assert r.stdout.count("loading that text encoder from") == 2 and T5_FALLBACK in r.stdout


@pytest.mark.parametrize("loader", ["load_t5", "HFEmbedder"])
def test_no_network_fails_fast_with_advice(tmp_path, monkeypatch, loader):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        if loader == "load_t5":
            load_t5("cpu", 16, "acme/FLUX.1-none")
        else:
            HFEmbedder("acme/t5-none", 16)
    assert time.perf_counter() - t < 5
    for advice in ("cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "t5_path"):
        assert advice in str(e.value), advice


def test_a_repo_folder_as_flow_path_supplies_its_text_encoders(flux_repo, monkeypatch):
    from flux.util import weight_sources

    sources = weight_sources("flux-dev", flow_path=str(flux_repo))
    assert (sources.t5, sources.clip) == (str(flux_repo), str(flux_repo))
    assert "T5 from" in sources.describe() and "(the transformer's repo folder)" in sources.describe()
    assert sources.ae is None  # it holds no autoencoder: the model's own (HF cache or Hub)
    assert weight_sources("flux-dev", flow_path=str(flux_repo), clip_path="elsewhere").clip == "elsewhere"
    monkeypatch.setenv("FLUX_MODEL", str(flux_repo))  # the official variable naming the folder serves as well
    assert weight_sources("flux-dev").t5 == str(flux_repo)
