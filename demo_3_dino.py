"""Find FLUX's vital layers: DINOv2 similarity of every layer-bypassed image (demo_2_skip.py) to its reference.

    python demo_3_dino.py configs/demo_3_dino.json            # score a sweep -> vital_layers.json, CSV, plots
    python demo_3_dino.py image_a=a.png image_b=b.png         # plain mode: similarity of two images
    python demo_3_dino.py folder_a=runA folder_b=runB         # plain mode: of same-named images in two folders

Re-running after more sweep images arrive embeds only the new ones (features are cached inside the sweep folder).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flux import vitality as V
from flux.config import resolve_device, run_demo
from flux.errors import UserError
from flux.io import atomic_write_json, atomic_write_text


@dataclass
class DinoConfig:
    sweep_dir: str = field(default="outputs/demo_2_skip", metadata={
        "help": "demo_2_skip.py output folder: <prompt_id>/ref.png, <prompt_id>/layer_XX.png, manifest.json"})
    output_dir: str = field(default="outputs/demo_3_dino", metadata={"help": "folder for the outputs"})
    dino_model: str = field(default=V.DEFAULT_DINO, metadata={
        "help": "DINOv2 hub id (facebook/dinov2-small|base|large|giant) or local folder; "
                "'tiny-random': a seeded random tiny model for tests and CPU smoke runs (meaningless scores)"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", "pattern": r"auto|cpu|mps|cuda(:\d+)?"})
    batch_size: int = field(default=64, metadata={"help": "images per DINOv2 forward", "min": 1})
    num_workers: int = field(default=8, metadata={
        "help": "threads decoding and resizing images (on a GPU these bound the speed, not DINOv2)", "min": 1})
    rule: Literal["threshold", "top_k"] = field(default="threshold", metadata={
        "help": "vital set: 'threshold' (vitality >= tau, the paper's rule) or 'top_k' (the k most vital layers)"})
    tau: float = field(default=V.DEFAULT_TAU, metadata={
        "help": "vitality threshold (vitality = 1 - mean DINOv2 similarity); a default to tune with the plot",
        "min": 0.0, "max": 2.0})
    top_k: int = field(default=10, metadata={"help": "number of vital layers when rule is top_k", "min": 1})
    num_double: int | None = field(default=None, metadata={
        "help": "number of double-stream blocks (null: from manifest.json, else 19 as in FLUX.1)", "min": 0})
    bootstrap_samples: int = field(default=1000, metadata={
        "help": "bootstrap resamples for each layer's confidence interval (0: none)", "min": 0})
    confidence: float = field(default=0.95, metadata={"help": "confidence of the bootstrap interval",
                                                      "min": 0.5, "max": 0.999})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "folder for cached DINOv2 features (null: <sweep_dir>/dino_features)"})
    contact_sheet_prompts: int = field(default=4, metadata={
        "help": "prompts (rows) in contact_sheet.png; 0: no contact sheet", "min": 0})
    contact_sheet_layers: int = field(default=8, metadata={
        "help": "most vital layers (columns) in contact_sheet.png", "min": 1})
    image_a: str | None = field(default=None, metadata={"help": "plain mode: first image file"})
    image_b: str | None = field(default=None, metadata={"help": "plain mode: second image file"})
    folder_a: str | None = field(default=None, metadata={"help": "plain mode: first folder of images"})
    folder_b: str | None = field(default=None, metadata={"help": "plain mode: second folder (same file names)"})

    def check(self) -> list[str]:
        problems = []
        images, folders = (self.image_a, self.image_b), (self.folder_a, self.folder_b)
        if any(images) and any(folders):
            problems.append("set either image_a/image_b or folder_a/folder_b, not both")
        for (a, b), kind, exists in ((images, "image", Path.is_file), (folders, "folder", Path.is_dir)):
            if (a is None) != (b is None):
                problems.append(f"plain mode needs both {kind}_a and {kind}_b (only one is set)")
            for name, value in ((f"{kind}_a", a), (f"{kind}_b", b)):
                if value is not None and not exists(Path(value)):
                    problems.append(f"'{name}' '{value}' is not an existing {'file' if kind == 'image' else 'folder'}")
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            problems.append(f"'output_dir' '{self.output_dir}' is a file, not a folder: choose another output_dir")
        return problems


def plain_mode(cfg: DinoConfig, embedder: V.DinoEmbedder) -> None:
    if cfg.image_a is not None:
        names, pairs, notes = [Path(cfg.image_b).name], [(Path(cfg.image_a), Path(cfg.image_b))], []
    else:
        matched, notes = V.match_folders(Path(cfg.folder_a), Path(cfg.folder_b))
        if not matched:
            raise UserError(f"no image file name appears in both {cfg.folder_a} and {cfg.folder_b}; the plain mode "
                              f"compares same-named files")
        names, pairs = [n for n, _, _ in matched], [(a, b) for _, a, b in matched]
    sims = V.compare_files(embedder, pairs)
    rows = [{"name": n, "a": str(a), "b": str(b), "similarity": s} for n, (a, b), s in zip(names, pairs, sims)]
    for note in notes:
        print(f"note: {note}")
    for r in rows:
        print(f"{r['similarity']:.4f}  {r['a']}  {r['b']}")
    mean = sum(sims) / len(sims)
    if len(rows) > 1:
        print(f"mean similarity over {len(rows)} pairs: {mean:.4f}")
    out = Path(cfg.output_dir)
    atomic_write_text(out / "similarity.csv", "name,a,b,similarity\n" + "".join(
        f"{r['name']},{r['a']},{r['b']},{r['similarity']!r}\n" for r in rows))
    atomic_write_json(out / "similarity.json", {"dino_model": cfg.dino_model, "mean_similarity": mean,
                                                "pairs": rows, "notes": notes})
    print(f"wrote {out / 'similarity.json'} and {out / 'similarity.csv'}")


def main(cfg: DinoConfig) -> None:
    device = resolve_device(cfg.device)
    sweep = None
    if cfg.image_a is None and cfg.folder_a is None:
        # Scan before loading DINOv2: an empty or mistyped sweep folder should fail in a second, not after a download.
        cache_file = V.cache_path(cfg.sweep_dir, cfg.dino_model, cfg.cache_dir)
        sweep = V.scan_sweep(cfg.sweep_dir, cfg.num_double, exclude=[Path(cfg.output_dir), cache_file.parent])
        sweep.require_pairs()
    embedder = V.DinoEmbedder(V.load_dino(cfg.dino_model, device), device, cfg.batch_size, cfg.num_workers)
    if sweep is None:
        return plain_mode(cfg, embedder)

    report = sweep.missing_report()
    if report:
        print(f"partial sweep: {len(report)} of {len(sweep.expected_prompts)} prompt(s) incomplete; scoring what "
              f"is there (details in vital_layers.json under \"missing\")")
        for line in report[:10]:
            print(f"  {line}")
        if len(report) > 10:
            print(f"  ... and {len(report) - 10} more")
    cache = V.FeatureCache(cache_file, sweep.root)
    analysis = V.analyse_sweep(
        sweep, embedder, cache, tau=cfg.tau if cfg.rule == "threshold" else None,
        top_k=cfg.top_k if cfg.rule == "top_k" else None, n_bootstrap=cfg.bootstrap_samples, seed=cfg.seed,
        confidence=cfg.confidence, progress=sys.stderr.isatty())
    for note in analysis.notes:
        print(f"note: {note}")
    paths = V.write_sweep_outputs(analysis, cfg.output_dir, dino_model=cfg.dino_model,
                                  contact_sheet_prompts=cfg.contact_sheet_prompts,
                                  contact_sheet_columns=cfg.contact_sheet_layers)
    print("\n".join(V.summary_lines(analysis)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    run_demo(DinoConfig, main, description=__doc__.split("\n")[0])
