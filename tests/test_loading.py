"""Loading real checkpoints, proven on small ones that the tests write in the official layout."""

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import flux.util as util
from flux.errors import UserError
from flux.util import configs, load_ae, load_flow_model

TINY = configs["flux-tiny"]


@pytest.fixture
def test_spec(monkeypatch):
    """A Hub-hosted model of tiny size: exercises the same code paths as flux-dev."""
    spec = dataclasses.replace(
        TINY, repo_id="acme/flux-test", repo_flow="flow.safetensors", repo_ae="ae.safetensors", ckpt_env=("FLUX_MODEL",)
    )
    monkeypatch.setitem(configs, "flux-test", spec)
    monkeypatch.delenv("FLUX_MODEL", raising=False)
    return spec


def reference_model():
    return load_flow_model("flux-tiny", "cpu", torch.float32)


def forward(model, seed=0):
    p = model.params
    g = torch.Generator().manual_seed(seed)
    from flux.sampling import image_ids

    return model(
        img=torch.randn(1, 12, 64, generator=g),
        img_ids=image_ids(1, 3, 4),
        txt=torch.randn(1, 5, p.context_in_dim, generator=g),
        txt_ids=torch.zeros(1, 5, 3),
        timesteps=torch.tensor([0.3]),
        y=torch.randn(1, p.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5]),
    )


def assert_same_model(loaded, ref):
    """Identical weights, hence outputs (up to the kernel's memory-alignment-dependent summation order)."""
    a, b = loaded.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        torch.testing.assert_close(forward(loaded), forward(ref), rtol=1e-5, atol=1e-6)


def write_checkpoint(path: Path, model: torch.nn.Module, prefix: str = "", dtype=None) -> Path:
    sd = {prefix + k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_local_checkpoint_round_trip(tmp_path, prefix):
    ref = reference_model()
    ckpt = write_checkpoint(tmp_path / "flux.safetensors", ref, prefix)
    loaded = load_flow_model("flux-tiny", "cpu", torch.float32, path=str(ckpt))
    assert not any(p.is_meta for p in loaded.parameters())
    assert_same_model(loaded, ref)


def test_dtype_is_applied_while_reading(tmp_path):
    ckpt = write_checkpoint(tmp_path / "flux.safetensors", reference_model())
    for dtype in (torch.bfloat16, torch.float16):
        loaded = load_flow_model("flux-tiny", "cpu", dtype, path=str(ckpt))
        assert {p.dtype for p in loaded.parameters()} == {dtype}


def test_weights_are_assigned_not_copied(tmp_path, monkeypatch):
    """The file's tensors become the parameters: no random init, no second copy."""
    ckpt = write_checkpoint(tmp_path / "flux.safetensors", reference_model())
    read = {}
    real = util.read_safetensors

    def spy(*a, **k):
        read.update(real(*a, **k))
        return read

    monkeypatch.setattr(util, "read_safetensors", spy)
    loaded = load_flow_model("flux-tiny", "cpu", torch.float32, path=str(ckpt))
    assert loaded.img_in.weight.data_ptr() == read["img_in.weight"].data_ptr()


def test_env_var_names_the_checkpoint(tmp_path, monkeypatch, test_spec):
    ref = reference_model()
    monkeypatch.setenv("FLUX_MODEL", str(write_checkpoint(tmp_path / "x.safetensors", ref)))
    assert_same_model(load_flow_model("flux-test", "cpu", torch.float32), ref)


def test_autoencoder_round_trip(tmp_path, monkeypatch):
    ae = load_ae("flux-tiny", "cpu")
    ckpt = write_checkpoint(tmp_path / "ae.safetensors", ae)
    keys = set(ae.state_dict())
    assert "encoder.conv_in.weight" in keys and "decoder.up.0.block.0.conv1.weight" in keys
    loaded = load_ae("flux-tiny", "cpu", path=str(ckpt))
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), ae.encode(x))
    monkeypatch.setenv("FLUX_AE", str(ckpt))
    spec = dataclasses.replace(TINY, repo_id="acme/x", repo_flow="f", repo_ae="ae.safetensors")
    monkeypatch.setitem(configs, "flux-test-ae", spec)
    with torch.no_grad():
        assert torch.equal(load_ae("flux-test-ae", "cpu").encode(x), ae.encode(x))


def test_hub_download_through_the_cache(tmp_path, run_script):
    """A model name resolves through huggingface_hub, honouring HF_HOME (offline here: a pre-filled cache)."""
    ref = reference_model()
    snap = tmp_path / "hf" / "hub" / "models--acme--flux-test" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    write_checkpoint(snap / "flow.safetensors", ref)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    torch.save(forward(ref).detach(), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import dataclasses, torch, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from flux.util import configs, load_flow_model
        from test_loading import forward
        configs["flux-test"] = dataclasses.replace(configs["flux-tiny"], repo_id="acme/flux-test", repo_flow="flow.safetensors")
        m = load_flow_model("flux-test", "cpu", torch.float32)
        torch.testing.assert_close(forward(m), torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-5, atol=1e-6)
        print("ok")
        """
    )
    r = run_script("-c", script, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "FLUX_MODEL": None})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_gated_repo_says_how_to_log_in(monkeypatch, test_spec):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **k):
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, "401 Client Error: access to this repo is restricted")
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(UserError) as e:
        load_flow_model("flux-test", "cpu")
    msg = str(e.value)
    assert "gated" in msg and "hf auth login" in msg and "HF_TOKEN" in msg and "FLUX_MODEL" in msg


def test_offline_without_cache_names_the_fixes(tmp_path, test_spec, run_script):
    script = (
        "import dataclasses; from flux.util import configs, load_flow_model;"
        "configs['x'] = dataclasses.replace(configs['flux-tiny'], repo_id='acme/none', repo_flow='f.safetensors');"
        "load_flow_model('x', 'cpu')"
    )
    r = run_script("-c", script, env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "UserError" in r.stderr and "HF_ENDPOINT" in r.stderr and "FLUX_MODEL" in r.stderr


def test_mmap_failure_falls_back_to_reading_bytes(tmp_path, monkeypatch):
    import safetensors

    ref = reference_model()
    ckpt = write_checkpoint(tmp_path / "flux.safetensors", ref)

    def no_mmap(*a, **k):
        raise OSError(19, "No such device (os error 19)")

    monkeypatch.setattr(safetensors, "safe_open", no_mmap)
    loaded = load_flow_model("flux-tiny", "cpu", torch.float32, path=str(ckpt))
    assert_same_model(loaded, ref)


def test_folder_instead_of_file(tmp_path):
    write_checkpoint(tmp_path / "flux1-dev.safetensors", reference_model())
    with pytest.raises(UserError, match=r"is a folder.*flux1-dev\.safetensors"):
        load_flow_model("flux-tiny", "cpu", path=str(tmp_path))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_flow_model("flux-tiny", "cpu", path=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_broken_file(tmp_path, damage):
    ckpt = write_checkpoint(tmp_path / "flux.safetensors", reference_model())
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"this is not a checkpoint" * 10)
    with pytest.raises(UserError, match="not a valid safetensors file.*truncated.*download it again"):
        load_flow_model("flux-tiny", "cpu", path=str(ckpt))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = reference_model().state_dict()
    sd.pop("img_in.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "f.safetensors"))
    with pytest.raises(UserError) as e:
        load_flow_model("flux-tiny", "cpu", path=str(tmp_path / "f.safetensors"))
    assert "missing keys: img_in.weight" in str(e.value) and "unexpected keys: extra.weight" in str(e.value)


def test_dev_and_schnell_mixed_up(tmp_path, monkeypatch):
    no_guidance = dataclasses.replace(TINY, params=dataclasses.replace(TINY.params, guidance_embed=False))
    monkeypatch.setitem(configs, "tiny-schnell", no_guidance)
    dev_file = write_checkpoint(tmp_path / "dev.safetensors", reference_model())
    with pytest.raises(UserError, match="look like FLUX.1-dev weights: use model flux-dev"):
        load_flow_model("tiny-schnell", "cpu", path=str(dev_file))
    schnell_file = write_checkpoint(tmp_path / "schnell.safetensors", load_flow_model("tiny-schnell", "cpu"))
    with pytest.raises(UserError, match="look like FLUX.1-schnell weights: use model flux-schnell"):
        load_flow_model("flux-tiny", "cpu", path=str(schnell_file))


def test_weights_of_another_size(tmp_path, monkeypatch):
    wider = dataclasses.replace(TINY, params=dataclasses.replace(TINY.params, hidden_size=128, num_heads=4))
    monkeypatch.setitem(configs, "tiny-wide", wider)
    ckpt = write_checkpoint(tmp_path / "f.safetensors", reference_model())
    with pytest.raises(UserError, match="wrong shape.*different model size"):
        load_flow_model("tiny-wide", "cpu", path=str(ckpt))


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'flux-devv'.*flux-dev"):
        load_flow_model("flux-devv", "cpu")


def test_text_encoders_from_a_diffusers_style_folder(tmp_path):
    """t5_path/clip_path may point at a local FLUX.1-dev repo copy (text_encoder/, text_encoder_2/ inside)."""
    from flux.modules.conditioner import HFEmbedder
    from flux.util import load_clip, load_t5

    t5, clip = HFEmbedder.tiny("t5", 16), HFEmbedder.tiny("clip", 77)
    for enc, sub in ((t5, "2"), (clip, "")):
        enc.hf_module.save_pretrained(tmp_path / f"text_encoder{'_' + sub if sub else ''}")
        enc.tokenizer.save_pretrained(tmp_path / f"tokenizer{'_' + sub if sub else ''}")
    prompts = ["a fox", "a lighthouse at dusk"]
    assert torch.equal(load_t5("cpu", 16, str(tmp_path), torch.float32)(prompts), t5(prompts))
    assert torch.equal(load_clip("cpu", str(tmp_path), torch.float32)(prompts), clip(prompts))
