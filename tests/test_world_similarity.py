"""demo_3's mini-detector metric: a hand-made flux-mini sweep of rendered world scenes, where one bypass changes
nothing, one deletes an object and one recolours two, scores as that damage through demo_3_dino.main; SSIM, for
contrast, barely sees it. Any other model's sweep is refused."""

import json
from dataclasses import replace

import pytest
from PIL import Image

import demo_3_dino
from flux.errors import UserError
from mini.world import Obj, Scene, render
from stableflow import vitality as V
from stableflow.ssim import ssim_pairs

REFERENCE = Scene(
    (
        Obj("circle", "red", "top left", "large"),
        Obj("square", "blue", "center", "small"),
        Obj("star", "orange", "bottom right", "large"),
    ),
    "white",
)
RED, BLUE, ORANGE = REFERENCE.objects
BYPASSES = {
    0: REFERENCE,  # nothing changed
    1: replace(REFERENCE, objects=(RED, BLUE)),  # the orange star deleted
    2: replace(REFERENCE, objects=(replace(RED, colour="green"), BLUE, replace(ORANGE, colour="purple"))),  # recoloured
}
# semantic_similarity: the mean over matched objects of mask IoU when colour and shape agree, else 0 (a missing
# object 0). Deleting one of three: 2/3 kept; recolouring two of three: 1/3 kept.
WANT_VITALITY = {0: 0.0, 1: 1 / 3, 2: 2 / 3}


def save(path, scene: Scene) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = ((render([scene])[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    Image.fromarray(x).save(path)


def make_sweep(root, model="flux-mini"):
    for pid in ("p0", "p1"):
        save(root / pid / "ref.png", REFERENCE)
        for layer, scene in BYPASSES.items():
            save(root / pid / f"layer_{layer:02d}.png", scene)
    manifest = {
        "model": model,
        "num_double": 4,
        "num_single": 8,
        "prompts": [{"id": p, "prompt": "a red circle", "seed": i} for i, p in enumerate(("p0", "p1"))],
        "layers": list(BYPASSES),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def config(sweep, out, **kw) -> V.DinoConfig:
    return V.DinoConfig(
        sweep_dir=str(sweep), output_dir=str(out), metric="mini-detector", device="cpu", contact_sheet_prompts=0, **kw
    )


def test_demo3_scores_deleted_and_recoloured_objects_as_damage(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sweep")
    demo_3_dino.main(config(sweep, tmp_path / "out", tau=0.3))
    assert "scored with mini-detector" in capsys.readouterr().out
    payload = json.loads((tmp_path / "out" / "vital_layers.json").read_text())
    assert payload["metric"] == "mini-detector" and payload["dino_model"] is None
    assert "semantic_similarity" in payload["similarity"]
    got = {s["layer"]: s["vitality"] for s in payload["layers"]}
    assert got == pytest.approx(WANT_VITALITY, abs=1e-9)
    assert payload["vital_layers"] == [1, 2]
    assert (tmp_path / "out" / "vitality.png").is_file()
    # The pixel metric it replaces on flux-mini calls both bypasses nearly harmless.
    ssim = ssim_pairs([(sweep / "p0" / "ref.png", sweep / "p0" / f"layer_{l:02d}.png") for l in (1, 2)])
    assert min(ssim) > 0.9


@pytest.mark.parametrize("model", ["flux-tiny", None])
def test_demo3_refuses_the_detector_for_another_model(tmp_path, model):
    sweep = make_sweep(tmp_path / "sweep", model=model)
    with pytest.raises(UserError, match=r"metric=mini-detector reads only flux-mini's world pictures.*metric=dinov2"):
        demo_3_dino.main(config(sweep, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
