"""mini.train on a CPU: a few steps of each stage, checkpoints, and an exact kill-and-resume."""

import json

import torch

from mini.train import load_checkpoint, main


def _tensors(state: dict) -> dict:
    return {f"{part}.{k}": v for part in ("model", "ema") for k, v in state[part].items()}


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
    main(["flow", "--out", str(tmp_path / "a"), "--steps", "1", "--resume", *small])
    state = load_checkpoint(tmp_path / "a" / "flow")
    assert state["step"] == 2 and [h["step"] for h in state["history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["history"])
    assert all(int(s["step"]) == 2 for s in state["opt"]["state"].values())
    assert len(list((tmp_path / "a" / "flow").glob("ckpt-*.part*"))) == len(
        json.loads((tmp_path / "a" / "flow" / "ckpt.json").read_text())["parts"]
    )
