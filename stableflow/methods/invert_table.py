"""Inversion then reconstruction on flux-mini's world: solver x nudging x steps -> PSNR and NFE.

    python -m stableflow.methods.invert_table [--images 8] [--steps 4 8 16 32] [--out outputs/invert_table.md]

Each image is a rendered scene of mini.world (a real input: ground truth the model never produced), captioned by the
world. Its VAE latent (times the nudge) is inverted under its caption and denoised back with the same solver, guidance
1 both ways. PSNR (8-bit, over the whole image) is taken against the VAE's own reconstruction of the same latent,
decode(nudge * z) -- so the table measures the solver, not the autoencoder (that ceiling is in the last line) -- and
against the input itself. NFE is per image, inversion plus reconstruction.
"""

import argparse
import math
from pathlib import Path

import torch

from flux.pipeline import load_models
from flux.sampling import SOLVERS, solver_nfe
from stableflow.io import atomic_write_text

from .common import solve


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] as 8-bit pictures (peak 255)."""
    q = lambda x: (127.5 * (x.float().clamp(-1, 1) + 1)).round()
    mse = (q(a) - q(b)).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@torch.inference_mode()
def table(model: str, images: int, steps: list[int], nudges: list[float], seed: int = 0) -> list[dict]:
    from mini.world import caption, render, sample_scenes

    models = load_models(model, "cpu", torch.float32)
    scenes = sample_scenes(images, seed)
    pixels = render(scenes)
    prompts = [caption(s) for s in scenes]
    text = models.encode(prompts)
    latents = models.encode_image(pixels)
    size = pixels.shape[-1]
    rows = []
    for nudge in nudges:
        ceiling = models.decode(latents * nudge)
        for solver in SOLVERS:
            for n in steps:
                ts = models.schedule(n, size, size)
                out = []
                for i in range(images):
                    noise, _ = solve(models, latents[i : i + 1] * nudge, text.select([i]), ts, 1.0, solver, True)
                    back, _ = solve(models, noise, text.select([i]), ts, 1.0, solver)
                    out.append(models.decode(back)[0])
                vae = sum(psnr(o, c) for o, c in zip(out, ceiling)) / images
                real = sum(psnr(o, p) for o, p in zip(out, pixels)) / images
                rows.append(
                    dict(solver=solver, nudge=nudge, steps=n, nfe=2 * solver_nfe(solver, n), psnr=vae, input=real)
                )
                print(
                    f"{solver:9s} nudge {nudge:4.2f} steps {n:3d}: PSNR {vae:6.2f} dB (vs input {real:6.2f})",
                    flush=True,
                )
    ceiling = sum(psnr(models.decode(latents[i : i + 1])[0], pixels[i]) for i in range(images)) / images
    rows.append(dict(solver="VAE alone", nudge=1.0, steps=0, nfe=0, psnr=math.inf, input=ceiling))
    return rows


def markdown(rows: list[dict], model: str, images: int) -> str:
    lines = [
        f"Inversion -> reconstruction on {model}, {images} rendered world scenes, guidance 1 both ways.",
        "PSNR (dB) against decode(nudge * z) (the solver's error) and against the input (with the VAE's).",
        "",
        "| solver | nudge | steps | NFE | PSNR vs VAE latent | PSNR vs input |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['solver']} | {r['nudge']:.2f} | {r['steps']} | {r['nfe']} | {r['psnr']:.2f} | {r['input']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux-mini")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--nudges", type=float, nargs="+", default=[1.0, 1.15])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/invert_table.md")
    args = ap.parse_args(argv)
    rows = table(args.model, args.images, args.steps, args.nudges, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, markdown(rows, args.model, args.images))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
