"""Measure the shipped flux-mini through the toolkit's own loading, sampling and editing path, graded by mini.detect.

    python -m mini.evaluate [--n 100] [--device cpu]                 # AE and text to image
    python -m mini.evaluate --ablation [--cases 32] [--vital-layers outputs/mini/demo_3_dino/vital_layers.json]
    python -m mini.evaluate --layer-sweep [--cases 32]                # injection in each layer alone
    python -m mini.evaluate --conditioning [--cases 32]               # which conditioning moves the layout
    ... [--weights DIR] [--guidance G]                                # an exported candidate; its CFG scale

Text to image: `load_models("flux-mini").generate` (20 steps) for n heldout prompts (each holds a colour x shape or
shape x place pair never trained on) and n train-split prompts of unseen seeds; per object (matched by colour):
colour present, shape right, named place right, named size right; per image: object count and background.

The ablation (Stable Flow, Sec. 5): for each edit family of mini.edits, the same cases and seeds edited with
injection in (a) the vital layers (demo_3's vital_layers.json, or a list), (b) none, (c) all layers, (d) the layers
that are not vital; each graded for edit success and untouched-object mask IoU (over all of them, and over those
whose place the source caption leaves open) on the references that are right.
Real images (rendered world pictures): inverted and edited with the vital layers, with and without latent nudging.
The layer sweep edits the same cases with injection in no layer and in each layer alone: which layers hold what.
It and the conditioning run below grade their edits as the ablation does (success, both IoUs).
The conditioning run edits them with injection in no, the vital or all layers, the edit sample conditioned on the
edit caption, or on its T5 tokens with the source's pooled CLIP vector, or the reverse (`MIXES`): whether what moves
a layout reaches the blocks through attention, which injection replaces, or through the pooled vector's modulation.
Each writes a JSON record, a markdown table (the README's) and, but for the conditioning run, a figure. Every run
samples at `--guidance` (1: none, as flux-mini 2 was trained without caption dropout; for a model whose guidance is
classifier-free, ModelSpec.cfg, the CFG scale of references and edits, inversions staying at 1).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from flux.errors import UserError
from flux.model import FluxParams, Injection, check_layers
from flux.pipeline import FluxModels, Text, load_models
from flux.util import ASSETS, model_spec
from stableflow.edit import NUDGE, EditRequest, RealImage, edit_generated, edit_real, read_vital_layers
from stableflow.io import atomic_write_json

from .detect import detect_batch
from .edits import FAMILIES, edit_cases, grade, make_edit, mean, reference_ok, shows
from .train import classifier_free, read_manifest, record_evaluation
from .world import MAX_OBJECTS, caption, parse_caption, render, sample_scenes

STEPS = 20
CONFIGS = ("vital", "none", "all", "non-vital")
# A `_summary`'s IoUs, in the order its table cells (`_fmt`) give them, and their figures' labels.
IOUS = {"untouched_iou": "untouched-object IoU", "open_iou": "IoU of untouched objects left unplaced"}
CELL = "success / IoU / open IoU"  # what a table cell (`_fmt`) holds


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-12))


@torch.no_grad()
def ae_psnr(models: FluxModels, n: int, seed: int, batch: int) -> dict:
    scenes = sample_scenes(n, seed, "heldout")
    vals = []
    for i in range(0, n, batch):
        x = render(scenes[i : i + batch], models.device)
        rec = models.decode(models.encode_image(x))
        vals.append(psnr(rec.float().cpu(), x.float().cpu()))
    v = torch.cat(vals)
    return {"n": n, "mean_db": float(v.mean()), "min_db": float(v.min())}


def text2img(
    models: FluxModels, split: str, n: int, seed: int, batch: int, guidance: float = 1.0
) -> tuple[dict, torch.Tensor]:
    """One image per prompt (noise seed = 10000 * seed + prompt index), graded per object and per image."""
    scenes = sample_scenes(n, seed, split)
    hits = {"colour": [0, 0], "shape": [0, 0], "place": [0, 0], "size": [0, 0], "count": [0, 0],
            "background": [0, 0], "whole caption": [0, 0]}  # fmt: skip
    images = []
    for i in range(0, n, batch):
        chunk = scenes[i : i + batch]
        prompts = [caption(s) for s in chunk]
        seeds = [10000 * seed + i + j for j in range(len(chunk))]
        imgs = models.generate(prompts, seeds, 128, 128, STEPS, guidance).cpu()
        images.append(imgs)
        for prompt, d in zip(prompts, detect_batch(imgs)):
            want = parse_caption(prompt)
            _hit(hits, "count", len(d.objects) == len(want.objects))
            _hit(hits, "background", d.background == want.background)
            _hit(hits, "whole caption", shows(d, want))
            for o in want.objects:
                got = d.find(o.colour)
                _hit(hits, "colour", got is not None)
                _hit(hits, "shape", got is not None and got.shape == o.shape)
                if o.place is not None:
                    _hit(hits, "place", got is not None and got.place == o.place)
                if o.size is not None:
                    _hit(hits, "size", got is not None and got.size == o.size)
    return {"n": n, "accuracy": {k: v[0] / max(v[1], 1) for k, v in hits.items()},
            "counted": {k: v[1] for k, v in hits.items()}}, torch.cat(images)  # fmt: skip


def _hit(hits: dict, key: str, ok: bool) -> None:
    hits[key][0] += bool(ok)
    hits[key][1] += 1


def _summary(grades: list, refs_ok: int, cases: int) -> dict:
    """Every editing run's summary of its grades (mini.edits.EditGrade): the IoUs are means over the grades that
    measured one (None where none did)."""
    return {
        "cases": cases,
        "references_right": refs_ok,
        "success": sum(g.success for g in grades) / max(len(grades), 1),
        "untouched_iou": mean(g.untouched_iou for g in grades),
        "open_iou": mean(g.open_iou for g in grades),
        "untouched_kept": sum(g.untouched_kept for g in grades) / max(len(grades), 1),
    }


def layer_sets(models: FluxModels, vital: list[int]) -> dict[str, list[int]]:
    every = list(range(models.model.num_layers))
    return {"vital": vital, "none": [], "all": every, "non-vital": [i for i in every if i not in vital]}


def single_layers(models: FluxModels) -> dict[str, list[int]]:
    """No injection, then injection in each layer alone: where in the network injection holds a layout."""
    return {"none": [], **{f"layer {i}": [i] for i in range(models.model.num_layers)}}


def ablation_generated(
    models: FluxModels, sets: dict[str, list[int]], cases: int, seed: int, guidance: float = 1.0
) -> dict:
    """Per family and injection layer set (`layer_sets`, `single_layers`): a `_summary` (success, untouched and
    open-place IoU) of same-seed edits of generated references. References are drawn first (alone, batched) and only
    the right ones are edited: the others cannot measure an edit."""
    out = {}
    for family in FAMILIES:
        grades = {c: [] for c in sets}
        todo, seeds, right = _cases(models, family, cases, seed, guidance)
        for k in right:
            source, target, edit = todo[k]
            for c, layers in sets.items():
                request = EditRequest(source, [target], STEPS, guidance, layers)
                r = edit_generated(models, request, seeds[k], 128, 128)
                grades[c].append(grade(r.reference.float().cpu(), r.edits[0].float().cpu(), edit))
        out[family] = {c: _summary(grades[c], len(right), cases) for c in sets}
        print(f"{family:<12}" + "".join(f"  {c}: {_fmt(out[family][c])}" for c in sets), flush=True)
    return out


def _cases(
    models: FluxModels, family: str, cases: int, seed: int, guidance: float
) -> tuple[list, list[int], list[int]]:
    """A family's edit cases, their noise seeds, and the indices of those whose reference is right (alone, batched):
    the others cannot measure an edit."""
    todo = edit_cases(cases, seed, family)
    seeds = [1000 * seed + k for k in range(len(todo))]
    sources = [s for s, _, _ in todo]
    refs = torch.cat([models.generate(sources[i : i + 32], seeds[i : i + 32], 128, 128, STEPS, guidance).cpu()
                      for i in range(0, len(todo), 32)])  # fmt: skip
    return todo, seeds, [k for k, (d, (_, _, e)) in enumerate(zip(detect_batch(refs), todo)) if reference_ok(d, e)]


# Where the edit sample's conditioning comes from, (T5 tokens, pooled CLIP vector): 0 the source caption, 1 the edit's.
MIXES = {"edit caption": (1, 1), "source's pooled vector": (1, 0), "source's T5 tokens": (0, 1)}


@torch.no_grad()
def mixed_edits(
    models: FluxModels, source: str, target: str, seed: int, layers: list[int], guidance: float = 1.0
) -> torch.Tensor:
    """[reference, one edit per MIXES entry] from one noise, the edits taking the reference's image K/V in `layers`:
    Stable Flow's batch (`edit_generated`), but the edit's T5 tokens and pooled vector can each come from either
    caption. The pooled vector modulates every block, where image K/V injection does not reach."""
    text = models.encode([source, target])
    t5, vec = [0, *(a for a, _ in MIXES.values())], [0, *(b for _, b in MIXES.values())]
    mixed = Text(text.txt[t5], text.txt_ids[t5], text.vec[vec], text.negative)
    inject = Injection.from_reference(layers, len(t5)) if layers else None
    noise = models.noise([seed], 128, 128).repeat(len(t5), 1, 1, 1)
    return models.decode(models.denoise(mixed, noise, models.schedule(STEPS, 128, 128), guidance, inject=inject)).cpu()


def conditioning(models: FluxModels, sets: dict[str, list[int]], cases: int, seed: int, guidance: float = 1.0) -> dict:
    """Per family, layer set and MIXES entry: a `_summary` (success, untouched and open-place IoU) of the
    ablation's cases and seeds."""
    out = {}
    for family in FAMILIES:
        grades = {(c, m): [] for c in sets for m in MIXES}
        todo, seeds, right = _cases(models, family, cases, seed, guidance)
        for k in right:
            source, target, edit = todo[k]
            for c, layers in sets.items():
                images = mixed_edits(models, source, target, seeds[k], layers, guidance).float()
                for m, image in zip(MIXES, images[1:]):
                    grades[(c, m)].append(grade(images[0], image, edit))
        out[family] = {f"{c}, {m}": _summary(g, len(right), cases) for (c, m), g in grades.items()}
        print(f"{family:<12}" + "".join(f"  {c}: {_fmt(s)}" for c, s in out[family].items()), flush=True)
    return out


def _real_family(k: int, scene) -> str:
    """The families in turn; a full scene has no room for an addition, so it is recoloured instead."""
    family = FAMILIES[k % len(FAMILIES)]
    return "attribute" if family == "addition" and len(scene.objects) >= MAX_OBJECTS else family


def ablation_real(
    models: FluxModels, vital: list[int], cases: int, seed: int, steps: int, guidance: float = 1.0
) -> dict:
    """Rendered world pictures, inverted and edited with the vital layers, with and without latent nudging; graded
    against the input picture (an exact rendering of the source caption), plus the reconstruction's PSNR."""
    rng = random.Random(f"real-{seed}")
    scenes = sample_scenes(cases, seed + 7, "test")
    edits = [make_edit(s, _real_family(k, s), rng) for k, s in enumerate(scenes)]
    pictures = render(scenes)
    out = {}
    for key, nudge in (("nudge", NUDGE), ("no nudge", 1.0)):
        grades, recon = [], []
        for edit, picture in zip(edits, pictures):
            request = EditRequest(edit.source_caption, [edit.edit_caption], steps, guidance, vital)
            r = edit_real(models, request, RealImage(picture, nudge=nudge))
            recon.append(float(psnr(r.reference.float().cpu()[None], picture[None])))
            grades.append(grade(picture, r.edits[0].float().cpu(), edit))
        out[key] = {**_summary(grades, len(edits), len(edits)), "reconstruction_db": sum(recon) / len(recon)}
        line = f"real, {key:<9} {_fmt(out[key])}  reconstruction {out[key]['reconstruction_db']:.1f} dB"
        print(line, flush=True)
    return out


def _fmt(s: dict) -> str:
    """A `_summary` in a cell (`CELL`): success/untouched IoU/the same over the objects whose place the source caption
    leaves open, a dash for an IoU no object measured."""
    return f"{s['success']:.0%}" + "".join("/-" if s.get(k) is None else f"/{s[k]:.2f}" for k in IOUS)


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = result["ablation"]["generated"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.6))
    width = 0.8 / len(CONFIGS)
    for ax, (key, label) in zip(axes, {"success": "edit success", **IOUS}.items()):
        for j, c in enumerate(CONFIGS):
            vals = [gen[f][c].get(key) or 0.0 for f in FAMILIES]
            ax.bar([i + (j - 1.5) * width for i in range(len(FAMILIES))], vals, width, label=f"injection: {c}")
        ax.set_xticks(range(len(FAMILIES)), FAMILIES)
        ax.set_ylim(0, 1)
        ax.set_title(label, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(CONFIGS))  # below: bars reach every height
    fig.suptitle(f"flux-mini: Stable Flow's ablation (vital layers {result['ablation']['vital_layers']})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_figure(sweep: dict, path: Path) -> None:
    """Each family's edit success against each IoU (a row per `IOUS` entry), one point per injected layer (and none);
    a layer set whose edits measured no such IoU has no point there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(IOUS), len(FAMILIES), figsize=(3.2 * len(FAMILIES), 3.2 * len(IOUS)), sharey=True,
                             squeeze=False)  # fmt: skip
    for row, (key, label) in zip(axes, IOUS.items()):
        for ax, f in zip(row, FAMILIES):
            for c, s in sweep["generated"][f].items():
                if s.get(key) is None:
                    continue
                x, y, none = s[key], s["success"], c == "none"
                ax.scatter(x, y, c="k" if none else "C0", s=40 if none else 14, marker="x" if none else "o", zorder=3)
                ax.annotate(c.removeprefix("layer "), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
            ax.set_title(f, fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.set_xlim(0, 1.05)
            ax.set_ylim(-0.05, 1.05)
        row[0].set_ylabel("edit success")
    fig.suptitle("flux-mini: injection in one layer at a time (x: none)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_table(sweep: dict) -> str:
    gen = sweep["generated"]
    refs = {f: next(iter(gen[f].values()))["references_right"] for f in FAMILIES}
    rows = [f"| injection: {CELL} | " + " | ".join(f"{f} ({refs[f]} refs)" for f in FAMILIES) + " |",
            "|---|" + "---|" * len(FAMILIES)]  # fmt: skip
    for c in gen[FAMILIES[0]]:
        rows.append(f"| {c} | " + " | ".join(_fmt(gen[f][c]) for f in FAMILIES) + " |")
    return "\n".join(rows)


def table(result: dict) -> str:
    gen = result["ablation"]["generated"]
    rows = ["| edit family | " + " | ".join(f"{c}: {CELL}" for c in CONFIGS) + " |",
            "|---|" + "---|" * len(CONFIGS)]  # fmt: skip
    for f in FAMILIES:
        rows.append(f"| {f} ({gen[f]['vital']['references_right']} refs) | "
                    + " | ".join(_fmt(gen[f][c]) for c in CONFIGS) + " |")  # fmt: skip
    for key, s in result["ablation"]["real"].items():
        rows.append(f"| real images, {key} | {_fmt(s)} (reconstruction {s['reconstruction_db']:.1f} dB) |||")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="prompts per split (heldout and train)")
    p.add_argument("--ae-n", type=int, default=200, help="images for the AE's PSNR")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ablation", action="store_true", help="run the editing ablation instead")
    mode.add_argument("--layer-sweep", action="store_true", help="edit with injection in each layer alone instead")
    mode.add_argument("--conditioning", action="store_true",
                      help="edit with the edit's T5 tokens or pooled vector swapped for the source's instead")  # fmt: skip
    p.add_argument("--cases", type=int, default=32, help="ablation: cases per edit family")
    p.add_argument("--real-cases", type=int, default=20, help="ablation: real-image cases")
    p.add_argument("--real-steps", type=int, default=30)
    p.add_argument("--vital-layers", default="outputs/mini/demo_3_dino/vital_layers.json",
                   help="demo_3's result (default: configs/mini/demo_3_dino.json's, the detector's semantic metric, "
                   "as the mini demo_4 configs use), or a comma-separated list of layers")  # fmt: skip
    p.add_argument("--guidance", type=float, default=1.0,
                   help="sampling and edit guidance: 1 is none; for a flux-mini trained with caption dropout "
                   "(ModelSpec.cfg) the classifier-free scale, the inversion and reconstruction staying at 1")  # fmt: skip
    p.add_argument("--weights", help="an export folder (mini.train export --assets DIR) to measure instead of the "
                   "shipped weights")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=1, help="prompt/noise seed (training never used seed 1's streams)")
    p.add_argument("--out", default="outputs/mini_eval", help="folder for the JSON, figure and table")
    p.add_argument("--update-manifest", action="store_true",
                   help="store the result in the measured weights' manifest.json (flux/assets/mini's by default)")  # fmt: skip
    args = p.parse_args(argv)
    if args.ablation or args.conditioning:  # read before the models load, so a missing or wrong file fails at once
        params = mini_params(args.weights)
        if all(c.isdigit() or c == "," for c in args.vital_layers):
            vital = [int(x) for x in args.vital_layers.split(",") if x]
            try:  # the one range rule; a file is checked by read_vital_layers
                check_layers(vital, params.depth + params.depth_single_blocks, "--vital-layers")
            except ValueError as e:
                raise UserError(str(e)) from None
        else:
            vital = read_vital_layers(args.vital_layers, params.depth, params.depth_single_blocks)

    t0 = time.time()
    models = load_mini(args.weights, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ablation:
        g = args.guidance
        result = {"ablation": {"vital_layers": vital, "steps": STEPS, "guidance": g, "cases_per_family": args.cases}}
        result["ablation"]["generated"] = ablation_generated(
            models, layer_sets(models, vital), args.cases, args.seed, g
        )
        result["ablation"]["real"] = ablation_real(models, vital, args.real_cases, args.seed, args.real_steps, g)
        figure(result, out / "ablation.png")
        (out / "ablation.md").write_text(table(result) + "\n")
        name = "ablation.json"
    elif args.conditioning:
        sets = {c: v for c, v in layer_sets(models, vital).items() if c != "non-vital"}
        result = {"conditioning": {"vital_layers": vital, "steps": STEPS, "guidance": args.guidance,
                                   "cases_per_family": args.cases}}  # fmt: skip
        result["conditioning"]["generated"] = conditioning(models, sets, args.cases, args.seed, args.guidance)
        (out / "conditioning.md").write_text(sweep_table(result["conditioning"]) + "\n")
        name = "conditioning.json"
    elif args.layer_sweep:
        result = {"layer_sweep": {"steps": STEPS, "guidance": args.guidance, "cases_per_family": args.cases}}
        sets = single_layers(models)
        result["layer_sweep"]["generated"] = ablation_generated(models, sets, args.cases, args.seed, args.guidance)
        sweep_figure(result["layer_sweep"], out / "layer_sweep.png")
        (out / "layer_sweep.md").write_text(sweep_table(result["layer_sweep"]) + "\n")
        name = "layer_sweep.json"
    else:
        result = {"ae_psnr_heldout": ae_psnr(models, args.ae_n, args.seed, args.batch)}
        result["guidance"] = args.guidance
        result["heldout"], images = text2img(models, "heldout", args.n, args.seed, args.batch, args.guidance)
        result["train"], _ = text2img(models, "train", args.n, args.seed, args.batch, args.guidance)
        save_grid(images[:32], out / "heldout.png")
        ae = result["ae_psnr_heldout"]
        print(f"AE PSNR on {args.ae_n} held-out images: {ae['mean_db']:.2f} dB (min {ae['min_db']:.2f})")
        keys = list(result["heldout"]["accuracy"])
        print(f"{'prompts':<10}" + "".join(f"{k:>15}" for k in keys))
        for split in ("heldout", "train"):
            print(f"{split:<10}" + "".join(f"{result[split]['accuracy'][k]:>15.1%}" for k in keys))
        name = "text2img.json"
    result["device"], result["seconds"] = args.device, time.time() - t0
    print(f"{result['seconds']:.0f} s on {args.device}; wrote {out / name}")
    atomic_write_json(out / name, result, indent=1)
    if args.update_manifest:
        record_evaluation(Path(args.weights or ASSETS / "mini"), name.removesuffix(".json"), result)
    return result


def mini_params(weights: str | None) -> FluxParams:
    """The transformer's shape: the spec's, or that of an export folder's manifest (`mini.train grow` deepens it)."""
    return FluxParams(**read_manifest(Path(weights))["flow_params"]) if weights else model_spec("flux-mini").params


def load_mini(weights: str | None, device: str) -> FluxModels:
    """flux-mini in fp32: the shipped weights, or those of an export folder, whose guidance is classifier-free where
    its manifest says caption dropout trained it (the shipped spec says so for the shipped weights)."""
    if weights is None:
        return load_models("flux-mini", device=device, dtype=torch.float32)
    folder = Path(weights)
    manifest = read_manifest(folder)
    models = load_models("flux-mini", device, torch.float32, flow_path=str(folder / "flow.safetensors"),
                         ae_path=str(folder / "ae.safetensors"), t5_path=str(folder / "t5"),
                         clip_path=str(folder / "clip"), params=FluxParams(**manifest["flow_params"]))  # fmt: skip
    return replace(models, spec=replace(models.spec, cfg=classifier_free(manifest)))


def save_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    from PIL import Image

    images = images[: (len(images) // cols) * cols or len(images)]
    rows = max(len(images) // cols, 1)
    g = images[: rows * cols].reshape(rows, -1, 3, 128, 128).permute(0, 3, 1, 4, 2).reshape(rows * 128, -1, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((g + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(path)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # e.g. no vital_layers.json yet: the message names the fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
