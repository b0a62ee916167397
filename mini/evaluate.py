"""Measure the shipped flux-mini through the toolkit's own loading and sampling path.

    python -m mini.evaluate [--n 100] [--device cpu|cuda] [--json outputs/mini_eval.json] [--update-manifest]

(a) autoencoder reconstruction PSNR on held-out world images (unseen seeds, held-out pairs);
(b) text to image with `flux.pipeline.load_models("flux-mini")` + `.generate(...)` (20 steps, guidance 0) for n heldout
    prompts (each holds a colour x shape or shape x place pair never trained on) and n train-split prompts of unseen
    seeds, graded by the analytic detector of mini.detect: shape, colour, place, background and (where the caption
    names it) size accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flux.pipeline import load_models
from flux.util import ASSETS

from .detect import detect
from .world import HELDOUT_COLOUR_SHAPE, HELDOUT_SHAPE_PLACE, caption, render, sample_scenes

ATTRS = ("shape", "colour", "place", "background", "size")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-12))


@torch.no_grad()
def ae_psnr(models, n: int, seed: int, batch: int) -> dict:
    scenes = sample_scenes(n, seed, "heldout")
    vals = []
    for i in range(0, n, batch):
        x = render(scenes[i : i + batch], models.device)
        rec = models.decode(models.encode_image(x))
        vals.append(psnr(rec.float().cpu(), x.float().cpu()))
    v = torch.cat(vals)
    return {"n": n, "mean_db": float(v.mean()), "min_db": float(v.min())}


def grade(models, split: str, n: int, seed: int, batch: int, steps: int) -> tuple[dict, torch.Tensor]:
    """Generate one image per prompt (noise seed = prompt index + 10000 * seed) and grade it with the detector."""
    scenes = sample_scenes(n, seed, split)
    right = {a: 0 for a in ATTRS}
    sized = 0
    by_pair = {"colour_shape": [0, 0], "shape_place": [0, 0]}  # [all three attributes right, count]
    images = []
    for i in range(0, n, batch):
        chunk = scenes[i : i + batch]
        imgs = models.generate([caption(s) for s in chunk], [10000 * seed + i + j for j in range(len(chunk))], 128, 128,
                               steps=steps, guidance=0.0).cpu()  # fmt: skip
        images.append(imgs)
        for s, img in zip(chunk, imgs):
            d = detect(img)
            ok = {a: getattr(d, a) == getattr(s, a) for a in ATTRS}
            for a in ATTRS[:4]:
                right[a] += ok[a]
            if s.say_size:
                sized += 1
                right["size"] += ok["size"]
            all3 = ok["shape"] and ok["colour"] and ok["place"]
            if (s.colour, s.shape) in HELDOUT_COLOUR_SHAPE:
                by_pair["colour_shape"][0] += all3
                by_pair["colour_shape"][1] += 1
            if (s.shape, s.place) in HELDOUT_SHAPE_PLACE:
                by_pair["shape_place"][0] += all3
                by_pair["shape_place"][1] += 1
    acc = {a: right[a] / n for a in ATTRS[:4]}
    acc["size"] = right["size"] / max(sized, 1)
    out = {"n": n, "accuracy": acc}
    if split == "heldout":
        out["all_three_right_on_heldout_pair"] = {k: v[0] / max(v[1], 1) for k, v in by_pair.items()}
        out["pair_counts"] = {k: v[1] for k, v in by_pair.items()}
    return out, torch.cat(images)


def save_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    from PIL import Image

    images = images[: (len(images) // cols) * cols or len(images)]
    rows = max(len(images) // cols, 1)
    g = images[: rows * cols].reshape(rows, -1, 3, 128, 128).permute(0, 3, 1, 4, 2).reshape(rows * 128, -1, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((g + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="prompts per split (heldout and train)")
    p.add_argument("--ae-n", type=int, default=200, help="images for the AE's PSNR")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1, help="prompt/noise seed (training never used seed 1's streams)")
    p.add_argument("--json", default="outputs/mini_eval.json")
    p.add_argument("--grid", default="outputs/mini_eval_heldout.png", help="the first heldout samples, for a look")
    p.add_argument("--update-manifest", action="store_true", help="store the result in flux/assets/mini/manifest.json")
    args = p.parse_args(argv)

    t0 = time.time()
    models = load_models("flux-mini", device=args.device, dtype=torch.float32)
    result = {
        "device": args.device,
        "steps": args.steps,
        "ae_psnr_heldout": ae_psnr(models, args.ae_n, args.seed, args.batch),
    }
    result["heldout"], images = grade(models, "heldout", args.n, args.seed, args.batch, args.steps)
    result["train"], _ = grade(models, "train", args.n, args.seed, args.batch, args.steps)
    result["seconds"] = time.time() - t0
    if args.grid:
        save_grid(images[:32], Path(args.grid))

    print(f"AE PSNR on {args.ae_n} held-out images: {result['ae_psnr_heldout']['mean_db']:.2f} dB "
          f"(min {result['ae_psnr_heldout']['min_db']:.2f})")  # fmt: skip
    print(f"{'prompts':<10}" + "".join(f"{a:>12}" for a in ATTRS))
    for split in ("heldout", "train"):
        print(f"{split:<10}" + "".join(f"{result[split]['accuracy'][a]:>12.1%}" for a in ATTRS))
    print("heldout, all of shape+colour+place right:", json.dumps(result["heldout"]["all_three_right_on_heldout_pair"]))
    print(f"{result['seconds']:.0f} s on {args.device}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.update_manifest:
        path = ASSETS / "mini" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest.setdefault("evaluation", {})
        manifest["evaluation"] = {**(manifest["evaluation"] or {}), args.device.split(":")[0]: result}
        path.write_text(json.dumps(manifest, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
