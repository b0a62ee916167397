"""The shipped flux-mini weights: the manifest's SHA-256 and loading through the strict loaders of real checkpoints."""

import hashlib
import json
from unittest import mock

import torch

import flux.util
from flux.sampling import image_ids, unpack
from flux.util import ASSETS, configs, load_ae, load_clip, load_flow_model, load_t5

MINI = ASSETS / "mini"


def test_manifest_hashes_match_the_files():
    manifest = json.loads((MINI / "manifest.json").read_text())
    files = {str(p.relative_to(MINI)) for p in MINI.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["sha256"]) == files
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((MINI / name).read_bytes()).hexdigest() == digest, name
    assert sum((MINI / n).stat().st_size for n in files) <= 32 * 2**20  # issue 18's budget


def test_loads_through_the_strict_loader():
    spec = configs["flux-mini"]
    with mock.patch.object(flux.util, "load_weights", wraps=flux.util.load_weights) as spy:
        model = load_flow_model("flux-mini", "cpu", torch.float32)
        ae = load_ae("flux-mini", "cpu", torch.float32)
    assert [c.args[1] for c in spy.call_args_list] == [str(MINI / "flow.safetensors"), str(MINI / "ae.safetensors")]
    assert not spec.params.guidance_embed and model.params == spec.params
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    t5 = load_t5("cpu", spec.max_length, version=spec.t5_version, dtype=torch.float32)
    clip = load_clip("cpu", version=spec.clip_version, dtype=torch.float32)
    prompt = ["a red circle at the top left and a small blue ring on a white background"]
    txt, vec = t5(prompt), clip(prompt)
    assert txt.shape == (1, spec.max_length, spec.params.context_in_dim) and vec.shape == (1, spec.params.vec_in_dim)
    # One denoising step and a decode run and stay finite.
    with torch.no_grad():
        img = torch.randn(1, 64, 64)
        ids = image_ids(1, 8, 8)
        v = model(img, ids, txt, torch.zeros(1, txt.shape[1], 3), torch.tensor([1.0]), vec)
        x = ae.decode(unpack(img - v, 128, 128))
    assert x.shape == (1, 3, 128, 128) and torch.isfinite(x).all()
