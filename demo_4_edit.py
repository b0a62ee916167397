"""Stable Flow editing: python demo_4_edit.py config.json [key=value ...]  (--print-config lists every key).

    python demo_4_edit.py configs/demo_4_edit.json        # generated image: reference + edits from one seed
    python demo_4_edit.py configs/demo_4_edit_real.json   # real image: invert, reconstruct, edit

Edits attend with the reference's image keys/values in the vital layers (a list, demo_3_dino.py's
vital_layers.json -- by default the one beside output_dir when it exists -- or the release's default), in every
denoising step or those of `inject_steps`. Outputs: PNGs, a captioned grid.png, results.json. A re-run skips the
edits already made with the same settings and refuses a folder made with other settings.
"""

from dataclasses import replace

from flux.pipeline import FluxModels
from stableflow.clip_score import ClipScorer, mean_scores
from stableflow.config import config_to_dict, load_models_for, run_demo
from stableflow.edit import (
    EditConfig,
    RealImage,
    batching,
    edit_chunks,
    edit_file,
    edit_generated,
    edit_real,
    edit_settings,
    pil_to_tensor,
    reference_files,
)
from stableflow.io import load_image, make_grid, save_png, tensor_to_pil
from stableflow.runs import Output, Run


def main(cfg: EditConfig, models: FluxModels | None = None) -> dict:
    """Everything the demo does; returns the results.json object. Every check comes before the first file is
    written, so bad input, a folder made with other settings or a failed model load leave output_dir untouched."""
    real = cfg.real
    layers, layers_from = cfg.injection_layers  # the vital layers: a list, demo_3's file or the release's default
    print(f"vital layers {layers} ({layers_from})", flush=True)
    if real:
        print(f"real image: inverted and edited with solver {cfg.solver}, latent nudged x{cfg.nudge:g}", flush=True)
    settings = edit_settings(cfg)  # what decides the pictures; every PNG records it with its own prompt
    names, refs = [edit_file(i, p) for i, p in enumerate(cfg.edits)], reference_files(cfg)
    prompts = {n: cfg.source_prompt for n in refs} | dict(zip(names, cfg.edits))
    run = Run(cfg.output_dir, [Output(n, settings | {"prompt": p}) for n, p in prompts.items()], settings)
    out, done = run.folder, {o.name for o in run.done}
    if not set(refs) <= done:
        done = set()  # edits are kept only beside the reference they were made with
    todo = [i for i, n in enumerate(names) if n not in done]

    scorer = ClipScorer.load(cfg.clip_model) if cfg.scores else None  # a bad clip_model fails before the work
    request, result, chunks, images, written = cfg.request(), None, [], {}, []
    if todo:
        models = models or load_models_for(cfg)
        request = replace(request, edits=[cfg.edits[i] for i in todo])
        chunks = edit_chunks(len(todo), cfg.batch_size)
        with run.working(request.steps * (len(chunks) + real), "editing") as bar:
            steps = {"callback": lambda step: bar.update(1), "free_text_encoders": True}
            if real:
                image = RealImage(pil_to_tensor(cfg.input_image), cfg.source_guidance, cfg.nudge, cfg.solver)
                result = edit_real(models, request, image, **steps)
            else:
                result = edit_generated(models, request, cfg.seed, *cfg.image_size, **steps)
            reference = (
                [cfg.input_image, tensor_to_pil(result.reference)] if real else [tensor_to_pil(result.reference)]
            )
            images = dict(zip(refs, reference)) | {names[i]: tensor_to_pil(e) for i, e in zip(todo, result.edits)}
            # The new PNGs, each recording its settings; a reference already there stays: the edits were made beside it.
            written = [n for n in images if n not in done]
            for n in written:
                run.save(n, images[n], {"image": cfg.image, "size": cfg.size or 0} if n == "input.png" else None)

    # The grid and results.json cover every edit.
    images |= {n: load_image(out / n) for n in done}  # what an earlier run made
    source = images[refs[0]]  # the generated reference, or the real input
    edit_pngs = [images[n] for n in names]
    tiles = [images[n] for n in refs] + edit_pngs
    labels = ["input", f"reconstruction: {cfg.source_prompt}"] if real else [f"reference: {cfg.source_prompt}"]
    save_png(
        out / "grid.png",
        make_grid(tiles, labels + [f"edit {i}: {e}" for i, e in enumerate(cfg.edits)], cols=min(len(tiles), 5)),
    )

    summary = settings | batching(cfg, len(chunks), result.reference_drift if result else 0.0)
    files = dict(zip(["input", "reconstruction"] if real else ["reference"], refs)) | {"grid": "grid.png"}
    edits = [{"index": i, "prompt": p, "file": n} for i, (p, n) in enumerate(zip(cfg.edits, names))]
    results = {
        "settings": summary,
        "source_prompt": cfg.source_prompt,
        "files": files,
        "edits": edits,
        "already_done": len(cfg.edits) - len(todo),
        "seconds": round(run.seconds, 2),
        "config": config_to_dict(cfg),
    }
    if scorer is not None:  # from the 8-bit PNGs: an edit scores the same in the run that made it and in any re-run
        scorer.device = models.device if models is not None else scorer.device
        for e, s in zip(edits, scorer.scores(source, cfg.source_prompt, edit_pngs, cfg.edits)):
            e["scores"] = s
        results |= {"scores_model": cfg.clip_model, "mean_scores": mean_scores([e["scores"] for e in edits])}
    run.write_json("results.json", results)
    there = f"{results['already_done']} edit(s) already there" if results["already_done"] else ""
    repaired = f"{run.repaired} damaged file(s) remade" if run.repaired else ""
    skipped = f" ({'; '.join(filter(None, [there, repaired]))})" if there or repaired else ""
    print(
        f"wrote {len(todo)} edit(s), {', '.join(n for n in written if n in refs) or 'no reference'}, grid.png and "
        f"results.json to {out}{skipped}"
    )
    return results


if __name__ == "__main__":
    run_demo(EditConfig, main, description=__doc__)
