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


def test_spec_guidance_is_classifier_free_exactly_when_the_shipped_weights_learned_it():
    """flux-mini's spec says guidance is classifier-free (ModelSpec.cfg) iff the manifest's last flow stage trained
    with caption dropout: weights that never saw the empty prompt must not be guided against it, and weights that
    learned it must not ignore guidance."""
    from mini.train import classifier_free

    assert configs["flux-mini"].cfg == classifier_free(json.loads((MINI / "manifest.json").read_text()))


def test_evaluate_measures_an_export_folder_with_its_own_guidance(tmp_path, run_script):
    """`mini.evaluate --weights DIR` loads an export folder's four parts, its guidance classifier-free as its manifest
    says; a folder without a readable manifest is one clear error before any model loads."""
    import shutil

    from mini.evaluate import load_mini

    shutil.copytree(MINI, tmp_path / "export")
    manifest = json.loads((MINI / "manifest.json").read_text())
    manifest["training"]["flow"]["hparams"]["caption_dropout"] = 0.1
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(manifest))
    models = load_mini(str(tmp_path / "export"), "cpu")
    shipped = load_mini(None, "cpu")
    assert models.spec.cfg and not shipped.spec.cfg
    assert all(
        torch.equal(a, b) for a, b in zip(models.model.state_dict().values(), shipped.model.state_dict().values())
    )
    assert models.encode(["a red circle on a white background"]).negative is not None
    r = run_script("-m", "mini.evaluate", "--weights", str(tmp_path / "nothing"), "--n", "1")
    assert r.returncode == 2 and "manifest.json is not a readable flux-mini manifest" in r.stderr
    assert "Traceback" not in r.stderr
