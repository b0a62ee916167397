"""diffusers-format weights (transformer/ and vae/ folders, sharded or not), written by diffusers itself, load to
the same tensors as the official single files; broken folders fail with one clear line; no network fails fast."""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flux.convert import vae_config
from flux.errors import UserError
from flux.util import configs, load_ae, load_flow_model

from diffusers_oracle import diffusers_transformer  # the tests' independent key mapping

TINY = configs["flux-tiny"]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def write_repo(root: Path, flow: torch.nn.Module, ae: torch.nn.Module) -> Path:
    """A FLUX.1-like repo root written by diffusers' own save_pretrained: sharded transformer/, single-file vae/."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    diffusers_transformer(flow.state_dict(), TINY.params).save_pretrained(root / "transformer", max_shard_size="150KB")
    n = len(TINY.ae_params.ch_mult)
    vae = AutoencoderKL(
        **vae_config(TINY.ae_params),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        norm_num_groups=32,
    )
    vae.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), vae.config), strict=True)
    vae.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def models(tiny_models):
    """The tiny transformer (float32) and autoencoder, as load_flow_model and load_ae give them."""
    return tiny_models.model, tiny_models.ae


@pytest.fixture(scope="module")
def official(models, tmp_path_factory) -> Path:
    """The official-layout single files of the tiny model."""
    folder = tmp_path_factory.mktemp("official")
    for name, m in zip(("flow", "ae"), models):
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / f"{name}.safetensors"))
    return folder


@pytest.fixture(scope="module")
def repo(models, tmp_path_factory) -> Path:
    return write_repo(tmp_path_factory.mktemp("repo"), *models)


@pytest.fixture
def broken_repo(repo, tmp_path) -> Path:
    """A private copy of the repo, to damage."""
    import shutil

    return Path(shutil.copytree(repo, tmp_path / "repo"))


def test_diffusers_wrote_a_sharded_transformer(repo):
    shards = sorted((repo / "transformer").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 2 and (repo / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (repo / "vae" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("where", ["transformer", "root"])
def test_transformer_folder_loads_the_same_tensors(repo, official, where):
    path = repo / "transformer" if where == "transformer" else repo
    ref = load_flow_model("flux-tiny", "cpu", torch.float32, path=str(official / "flow.safetensors"))
    loaded = load_flow_model("flux-tiny", "cpu", torch.float32, path=str(path))
    assert not any(p.is_meta for p in loaded.parameters())
    assert same_weights(loaded, ref)
    bf16 = load_flow_model("flux-tiny", "cpu", torch.bfloat16, path=str(path))  # cast while reading
    assert same_weights(
        bf16, load_flow_model("flux-tiny", "cpu", torch.bfloat16, path=str(official / "flow.safetensors"))
    )


@pytest.mark.parametrize("where", ["vae", "root"])
def test_vae_folder_loads_the_same_tensors(repo, official, where):
    path = repo / "vae" if where == "vae" else repo
    ref = load_ae("flux-tiny", "cpu", path=str(official / "ae.safetensors"))
    assert same_weights(load_ae("flux-tiny", "cpu", path=str(path)), ref)


@pytest.fixture
def run_demo(run_script):
    return lambda *overrides: run_script("demo_0_test.py", "configs/tiny/demo_0_test.json", *overrides)


@pytest.mark.slow
def test_demo_gives_the_same_png_bytes(repo, official, tmp_path, run_demo):
    a = run_demo(
        "num_images=1",
        f"flow_path={official / 'flow.safetensors'}",
        f"ae_path={official / 'ae.safetensors'}",
        f"output_dir={tmp_path / 'a'}",
    )
    b = run_demo("num_images=1", f"flow_path={repo}", f"ae_path={repo / 'vae'}", f"output_dir={tmp_path / 'b'}")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    pngs = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (tmp_path / "b").glob("*.png"))
    # The same pixels, exactly; the PNGs' records differ only in naming the weight files each run was given.
    for n in pngs:
        with Image.open(tmp_path / "a" / n) as x, Image.open(tmp_path / "b" / n) as y:
            assert x.tobytes() == y.tobytes()
            assert {k: v for k, v in x.info.items() if k != "weights"} == {
                k: v for k, v in y.info.items() if k != "weights"
            }


def fake_hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>/...} (files copied in)."""
    import shutil

    rev = "b" * 40
    base = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(files, base / "snapshots" / rev)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return base / "snapshots" / rev


def test_hf_cache_serves_the_diffusers_folders(repo, official, tmp_path, monkeypatch):
    """No single file in the cache, but the repo's transformer/ and vae/ are: those are used, with no request."""
    from huggingface_hub import constants

    fake_hub_cache(tmp_path / "hub", "acme/flux-test", repo)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any request would fail
    monkeypatch.delenv("FLUX_MODEL", raising=False)
    monkeypatch.delenv("FLUX_AE", raising=False)
    monkeypatch.delenv("AE", raising=False)
    spec = dataclasses.replace(
        TINY, repo_id="acme/flux-test", repo_flow="flux1-test.safetensors", repo_ae="ae.safetensors"
    )
    monkeypatch.setitem(configs, "flux-test", spec)
    flow = load_flow_model("flux-test", "cpu", torch.float32)
    assert same_weights(
        flow, load_flow_model("flux-tiny", "cpu", torch.float32, path=str(official / "flow.safetensors"))
    )
    assert same_weights(load_ae("flux-test", "cpu"), load_ae("flux-tiny", "cpu", path=str(official / "ae.safetensors")))


def test_hf_cache_prefers_the_single_file(official, tmp_path, monkeypatch, models):
    from huggingface_hub import constants

    snap = fake_hub_cache(tmp_path / "hub", "acme/flux-test", official)
    (snap / "transformer").mkdir()
    (snap / "transformer" / "config.json").write_text("{broken")  # would fail if it were read
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("FLUX_MODEL", raising=False)
    monkeypatch.setitem(
        configs, "flux-test", dataclasses.replace(TINY, repo_id="acme/flux-test", repo_flow="flow.safetensors")
    )
    assert same_weights(load_flow_model("flux-test", "cpu", torch.float32), models[0])


def test_hf_cache_skips_a_diffusers_folder_whose_weights_are_not_cached(tmp_path, monkeypatch):
    """An interrupted diffusers download (config.json cached, weights not) is no source: the single file is fetched."""
    from huggingface_hub import constants

    from flux import util

    folder = tmp_path / "partial"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text("{}")
    fake_hub_cache(tmp_path / "hub", "acme/flux-test", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(util, "hub_file", lambda repo, name, *a, **k: f"hub:{repo}/{name}")
    got = util.resolve_checkpoint(None, (), "acme/flux-test", "flux1-test.safetensors", subfolder="transformer")
    assert got == "hub:acme/flux-test/flux1-test.safetensors"


# ---------------------------------------------------------------------------------------------- a whole repo


@pytest.fixture(scope="module")
def other_ae() -> torch.nn.Module:
    """An autoencoder unlike flux-tiny's built-in one, so a test can tell which one was loaded."""
    from flux.modules.autoencoder import AutoEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return AutoEncoder(TINY.ae_params).eval()


@pytest.mark.parametrize("layout", ["vae", "ae.safetensors"])
def test_a_repo_folder_as_flow_path_supplies_its_autoencoder(models, other_ae, official, tmp_path, capsys, layout):
    from flux.pipeline import load_models

    repo = write_repo(tmp_path / "repo", models[0], other_ae)
    if layout == "ae.safetensors":  # the official single file beside the folders wins, as in the HF cache
        save_file({k: v.contiguous() for k, v in other_ae.state_dict().items()}, str(repo / "ae.safetensors"))
        shutil.rmtree(repo / "vae")
    loaded = load_models("flux-tiny", "cpu", torch.float32, flow_path=str(repo))
    assert same_weights(loaded.model, models[0]) and same_weights(loaded.ae, other_ae)
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("weights:"))
    assert f"transformer from {repo};" in line and "(the transformer's repo folder)" in line, line
    # Its own path still wins, and the line says so.
    loaded = load_models(
        "flux-tiny", "cpu", torch.float32, flow_path=str(repo), ae_path=str(official / "ae.safetensors")
    )
    assert (
        same_weights(loaded.ae, models[1])
        and f"autoencoder from {official / 'ae.safetensors'};" in capsys.readouterr().out
    )
    # A transformer/ folder alone is no repo: the autoencoder stays the model's own.
    loaded = load_models("flux-tiny", "cpu", torch.float32, flow_path=str(repo / "transformer"))
    assert same_weights(loaded.ae, models[1])
    assert "autoencoder from random weights" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- broken folders


def delete_shard(repo: Path) -> str:
    shard = sorted((repo / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[1]
    shard.unlink()
    return shard.name


def corrupt_index(repo: Path) -> str:
    index = repo / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(index.read_text()[:-40])
    return index.name


def wrong_model_config(repo: Path) -> str:
    config = repo / "transformer" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "guidance_embeds": False}))  # a schnell-type config
    return "flux-schnell"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [delete_shard, corrupt_index, wrong_model_config])
def test_broken_folder_exits_2_with_one_clear_line(broken_repo, tmp_path, damage, run_demo):
    named = damage(broken_repo)
    r = run_demo(f"flow_path={broken_repo}", f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and named in r.stderr, r.stderr


def test_truncated_shard(broken_repo):
    shard = min((broken_repo / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"{shard.name} is not a valid safetensors file.*download it again"):
        load_flow_model("flux-tiny", "cpu", path=str(broken_repo))


def test_index_naming_a_shard_that_lacks_the_tensor(broken_repo):
    """An index edited by hand or left from another download: the shard it names exists but holds other tensors."""
    index = broken_repo / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    key = next(k for k, s in data["weight_map"].items() if s == shards[0])
    data["weight_map"][key] = shards[1]
    index.write_text(json.dumps(data))
    with pytest.raises(UserError, match=rf"says {key} is in {shards[1]}, which lacks it.*download transformer/"):
        load_flow_model("flux-tiny", "cpu", path=str(broken_repo))


def test_missing_and_unexpected_tensors_are_named(broken_repo, models):
    from diffusers import FluxTransformer2DModel

    folder = broken_repo / "transformer"
    model = FluxTransformer2DModel.from_pretrained(folder)
    sd = model.state_dict()
    sd.pop("x_embedder.bias")
    sd["extra.weight"] = torch.zeros(2)
    for f in folder.glob("diffusion_pytorch_model*"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match=r"missing tensors: x_embedder\.bias.*unexpected tensors: extra\.weight"):
        load_flow_model("flux-tiny", "cpu", path=str(broken_repo))


def test_wrong_shape_and_wrong_folder(broken_repo, monkeypatch):
    wider = dataclasses.replace(TINY, params=dataclasses.replace(TINY.params, hidden_size=128, num_heads=4))
    monkeypatch.setitem(configs, "tiny-wide", wider)
    with pytest.raises(
        UserError, match=r"config\.json does not describe tiny-wide: num_attention_heads=2 \(model tiny-wide: 4\)"
    ):
        load_flow_model("tiny-wide", "cpu", path=str(broken_repo))
    config = broken_repo / "transformer" / "config.json"
    data = json.loads(config.read_text())
    del data["num_attention_heads"], data["attention_head_dim"]  # a sparse config: the shapes still catch it
    config.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"of the wrong shape, e\.g\. "):
        load_flow_model("tiny-wide", "cpu", path=str(broken_repo))
    with pytest.raises(UserError, match=r"describes a FluxTransformer2DModel, not a AutoencoderKL: give the vae/"):
        load_ae("flux-tiny", "cpu", path=str(broken_repo / "transformer"))


def test_another_vae_is_refused(broken_repo):
    """SD3's VAE has FLUX's architecture but other latent statistics: config.json tells them apart."""
    config = broken_repo / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "scaling_factor": 1.5305, "shift_factor": 0.0609}))
    with pytest.raises(UserError, match=r"does not describe flux-tiny: scaling_factor=1\.5305"):
        load_ae("flux-tiny", "cpu", path=str(broken_repo))


def test_folder_without_weights(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"has config\.json but neither diffusion_pytorch_model\.safetensors"):
        load_flow_model("flux-tiny", "cpu", path=str(tmp_path))


# ---------------------------------------------------------------------------------------------- Krea, finetunes


def test_krea_is_a_dev_architecture_model():
    krea, dev = configs["flux-krea-dev"], configs["flux-dev"]
    assert krea.params == dev.params and krea.ae_params == dev.ae_params
    assert (krea.repo_id, krea.repo_flow, krea.repo_ae) == (
        "black-forest-labs/FLUX.1-Krea-dev",
        "flux1-krea-dev.safetensors",
        "ae.safetensors",
    )
    assert krea.t5_version == krea.clip_version == krea.repo_id


# ---------------------------------------------------------------------------------------------- no network


def test_no_network_fails_fast_with_advice(tmp_path, monkeypatch):
    """An unreachable Hub and an empty cache: the advice comes at once, not after huggingface_hub's retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("FLUX_MODEL", raising=False)
    monkeypatch.delenv("FLUX_DEV", raising=False)
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        load_flow_model("flux-dev", "cpu")
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    for advice in (
        "cannot reach the Hugging Face Hub",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "flow_path",
        "FLUX_MODEL",
    ):
        assert advice in msg, advice


@pytest.mark.slow
def test_no_network_demo_exits_2_quickly(tmp_path, run_script):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    env |= dict.fromkeys(("HF_HUB_CACHE", "HF_TOKEN", "FLUX_MODEL", "FLUX_DEV", "FLUX_AE", "AE"))  # None: unset
    t = time.perf_counter()
    r = run_script("demo_0_test.py", "configs/demo_0_test.json", f"output_dir={tmp_path / 'o'}", env=env)
    elapsed = time.perf_counter() - t
    assert r.returncode == 2 and r.stderr.startswith("error: cannot reach the Hugging Face Hub"), r.stderr
    assert "Traceback" not in r.stderr and "Retrying" not in r.stderr
    assert elapsed < 15, elapsed  # imports included; the retries used to take ~25 s on their own


def test_mmap_failure_reads_shards_as_bytes(repo, monkeypatch, models):
    """Where mmap fails (ENODEV), shards are read as bytes: same tensors."""
    import safetensors

    def no_mmap(*a, **k):
        raise OSError(19, "No such device (os error 19)")

    monkeypatch.setattr(safetensors, "safe_open", no_mmap)
    assert same_weights(load_flow_model("flux-tiny", "cpu", torch.float32, path=str(repo)), models[0])


def test_a_header_that_is_not_an_object_is_a_clear_error(tmp_path):
    from flux.util import safetensors_header

    body = b'"not an object"'
    (tmp_path / "x.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(UserError, match="is not a valid safetensors file"):
        safetensors_header(tmp_path / "x.safetensors")
