"""Find FLUX's vital layers: similarity of every layer-bypassed image (demo_2_skip.py) to its reference.

    python demo_3_dino.py configs/demo_3_dino.json            # score a sweep -> vital_layers.json, CSV, plots
    python demo_3_dino.py configs/mini/demo_3_dino.json       # flux-mini's sweep, scored by its world's detector
    python demo_3_dino.py image_a=a.png image_b=b.png         # plain mode: similarity of two images
    python demo_3_dino.py folder_a=runA folder_b=runB         # plain mode: of same-named images in two folders

The metric is DINOv2's (the paper's), SSIM, or on flux-mini its world's detector (mini-detector, semantic as DINOv2). Re-running after more sweep images arrive embeds only the new ones
(DINOv2 features are cached inside the sweep folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

from flux.errors import UserError
from flux.pipeline import resolve_device
from stableflow import dino, report
from stableflow.config import run_demo
from stableflow.ssim import ssim_pairs
from stableflow.sweep import scan_sweep
from stableflow.vitality import (
    Analysis,
    DinoConfig,
    layer_scores,
    select_vital,
    selection_dict,
    similarities,
)
from stableflow.world_similarity import detector_pairs, require_world_model


def main(cfg: DinoConfig) -> None:
    device = resolve_device(cfg.device)
    if cfg.image_a is not None or cfg.folder_a is not None:
        return compare(cfg, similarity_of(cfg, device))

    # Scan before loading DINOv2: an empty or mistyped sweep folder should fail in a second, not after a download.
    cache_file = dino.cache_path(cfg.sweep_dir, cfg.dino_model, cfg.cache_dir)
    sweep = scan_sweep(cfg.sweep_dir, cfg.num_double, exclude=[Path(cfg.output_dir), cache_file.parent])
    sweep.require_pairs()
    if cfg.metric == "mini-detector":
        require_world_model((sweep.manifest or {}).get("model"), f"sweep {sweep.root}")
    report.print_missing(sweep)

    # Compare each ablated image with its reference; DINOv2 embeds every image once (cached across runs).
    pairs = sweep.pairs()
    cache = dino.FeatureCache(cache_file, sweep.root) if cfg.metric == "dinov2" else None
    cached = cache.holds([p for *_, ref, ablated in pairs for p in (ref, ablated)]) if cache else 0
    sims = similarities(pairs, similarity_of(cfg, device, cache))  # layer -> prompt -> similarity

    # Vitality = 1 - mean similarity per layer (bootstrap interval over prompts); the vital set by the chosen rule.
    scores = layer_scores(sims, sweep.num_double, cfg.bootstrap_samples, cfg.seed, cfg.confidence)
    rule = cfg.vital_rule()
    vital = select_vital(scores, **rule)
    analysis = Analysis(
        sweep,
        sims,
        scores,
        vital,
        selection_dict(rule.get("tau"), rule.get("top_k")),
        {"samples": cfg.bootstrap_samples, "seed": cfg.seed, "confidence": cfg.confidence},
        sweep.notes + (cache.notes() if cache else []),
    )
    for note in analysis.notes:
        print(f"note: {note}")

    paths = report.write_sweep_outputs(
        analysis,
        cfg.output_dir,
        dino_model=cfg.scorer,
        metric=cfg.metric,
        contact_sheet_prompts=cfg.contact_sheet_prompts,
        contact_sheet_columns=cfg.contact_sheet_layers,
    )
    print("\n".join(report.summary_lines(analysis)))
    images = len({p for *_, ref, ablated in pairs for p in (ref, ablated)})
    reuse = f"; {cached} of {images} images' features already cached" if cache else ""
    print(
        f"wrote {', '.join(p.name for p in paths.values())} to {cfg.output_dir} ({len(pairs)} pairs scored with "
        f"{cfg.metric}{reuse})"
    )


def similarity_of(cfg: DinoConfig, device, cache: dino.FeatureCache | None = None) -> dino.Similarity:
    """The chosen metric as a function of image pairs: DINOv2 (loaded here), SSIM or the world's detector."""
    if cfg.metric == "ssim":
        return ssim_pairs
    if cfg.metric == "mini-detector":
        return detector_pairs
    embedder = dino.DinoEmbedder(dino.load_dino(cfg.dino_model, device), device, cfg.batch_size, cfg.num_workers)
    return dino.dino_similarity(embedder, cache, progress=sys.stderr.isatty())


def compare(cfg: DinoConfig, similarity: dino.Similarity) -> None:
    """Plain mode: similarity of two images, or of same-named images in two folders."""
    if cfg.image_a is not None:
        names, pairs, notes = [Path(cfg.image_b).name], [(Path(cfg.image_a), Path(cfg.image_b))], []
    else:
        matched, notes = dino.match_folders(Path(cfg.folder_a), Path(cfg.folder_b))
        if not matched:
            raise UserError(
                f"no image file name appears in both {cfg.folder_a} and {cfg.folder_b}; the plain mode "
                f"compares same-named files"
            )
        names, pairs = [n for n, _, _ in matched], [(a, b) for _, a, b in matched]
    sims = similarity(pairs)
    rows = [{"name": n, "a": str(a), "b": str(b), "similarity": s} for n, (a, b), s in zip(names, pairs, sims)]
    for note in notes:
        print(f"note: {note}")
    for r in rows:
        print(f"{r['similarity']:.4f}  {r['a']}  {r['b']}")
    if len(rows) > 1:
        print(f"mean similarity over {len(rows)} pairs: {sum(sims) / len(sims):.4f}")
    paths = report.write_similarity(rows, cfg.output_dir, dino_model=cfg.scorer, notes=notes, metric=cfg.metric)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_demo(DinoConfig, main, description=__doc__.split("\n\n")[0])
