"""Edit benchmark: python demo_5_bench.py config.json [key=value ...]  (--print-config lists every key).

    python demo_5_bench.py configs/mini/demo_5_bench.json   # flux-mini's world: every method, detector-graded, CPU
    python demo_5_bench.py configs/demo_5_bench.json cases_path=/data/PIE-Bench   # FLUX.1 on your PIE-Bench copy
    torchrun --nproc_per_node 8 demo_5_bench.py configs/demo_5_bench.json cases_path=...  # cases shared among GPUs

Runs every case through every method (stableflow.methods, their published defaults) and writes
<output_dir>/cases/<case>/source.png and <method>.png, metrics.csv (one row per case x method, NaNs kept),
summary.md (means with bootstrap intervals, NFE and seconds per edit), tradeoff.png, contact_sheet.png and run.json.
A re-run makes only the missing or damaged edits and refuses a folder made with other settings; the metrics are
computed again from the PNGs, so they are the same in the run that made an edit and in any re-run.
"""

import math
import time
from dataclasses import replace

from flux.pipeline import FluxModels
from stableflow.bench import (
    BenchConfig,
    file_name,
    method_params,
    metric_row,
    model_shape,
    params_record,
    read_cases,
    summary_md,
    table_csv,
    tradeoff_figure,
)
from stableflow.config import config_to_dict, load_models_for, run_demo
from stableflow.edit import pil_to_tensor
from stableflow.io import atomic_write_text, load_image, make_grid
from stableflow.methods import EditCase, edit, prepare
from stableflow.metrics import clean_prompt
from stableflow.runs import Output, Run, png_record, settings, weights
from stableflow.sweep import Dist, sweep_device


def main(cfg: BenchConfig, models: FluxModels | None = None) -> dict:
    """Everything the demo does; returns run.json's object. Bad cases are reported and skipped, a bad source or a
    folder made with other settings is refused, before any model loads."""
    found = read_cases(cfg)
    for why in found.skipped:
        print(f"skipped case {why}", flush=True)
    cases, names = found.cases, list(cfg.methods)
    width, height = cfg.image_size

    # What decides every picture: the run's settings, each case's source, each method's params.
    run_settings = settings(cfg.model, weights(cfg), cfg.dtype, width, height, cfg.steps or 0, 0.0, cfg.fp8)
    run_settings.pop("guidance")  # each method has its own, recorded in its params
    params = {m: method_params(model_shape(cfg.model), m, cfg.steps, cfg.vital_layers) for m in names}
    source_of = lambda c: f"cases/{c.id}/source.png"
    edit_of = lambda c, m: f"cases/{c.id}/{file_name(m)}"
    outputs = [Output(source_of(c), run_settings | c.record()) for c in cases]
    outputs += [
        Output(edit_of(c, m), run_settings | c.record() | {"method": m, "params": params_record(params[m])})
        for c in cases
        for m in names
    ]
    run = Run(cfg.output_dir, outputs, run_settings)  # refuses a folder made with other settings
    todo = set(run.todo_names)

    columns = cfg.columns(any(c.world is not None for c in cases))
    tools = metric_tools(cfg, columns)  # a metric's network that cannot load fails before the work

    # The edits still missing, case by case: each case prepared once (prompts encoded, source latent) for all methods.
    # Under torchrun each process takes every WORLD_SIZE-th case (as demo_2 does) and makes what is missing of them.
    dist = Dist.from_env()
    work = [c for c in cases[dist.rank :: dist.world_size] if {source_of(c), *(edit_of(c, m) for m in names)} & todo]
    made = sum(edit_of(c, m) in todo for c in work for m in names)
    if work:
        models = models or load_models_for(replace(cfg, device=sweep_device(cfg.device, dist)))
        with run.working(made, f"{dist.tag}editing", "edit") as bar:
            for c in work:
                spec = EditCase(
                    clean_prompt(c.source_prompt), clean_prompt(c.target_prompt),
                    None if c.image is None else pil_to_tensor(c.image), c.seed, width, height, cfg.source_steps,
                )  # fmt: skip
                case = prepare(models, spec)
                if source_of(c) in todo:
                    run.save(source_of(c), case.image)
                for m in names:
                    if edit_of(c, m) in todo:
                        start = time.perf_counter()
                        result = edit(models, case, params[m])
                        seconds = time.perf_counter() - start
                        run.save(edit_of(c, m), result.image, {"nfe": result.nfe, "seconds": round(seconds, 4)})
                        bar.update(1)

    if dist.world_size > 1 and (left := len(Run(cfg.output_dir, outputs, run_settings).todo)):
        print(f"{dist.tag}wrote {made} edit(s); {left} output(s) of other processes still missing: the last to finish "
              "writes metrics.csv and summary.md (or re-run the same command)")  # fmt: skip
        return {}

    # Every metric of every edit, from the PNGs (8-bit, as any re-run reads them).
    rows, sheet, labels = [], [], []
    for c in cases:
        source = load_image(run.folder / source_of(c))
        sheet.append(source)
        labels.append(f"{c.id}: {clean_prompt(c.target_prompt)}")
        for m in names:
            path = run.folder / edit_of(c, m)
            edited, info = load_image(path), png_record(path)
            row = {"case": c.id, "edit_type": c.edit_type, "method": m}
            row |= {"nfe": float(info["nfe"]), "seconds": float(info["seconds"])}
            rows.append(row | metric_row(c, source, edited, columns, tools))
            sheet.append(edited)
            labels.append(m)
    atomic_write_text(run.folder / "metrics.csv", table_csv(rows, columns))
    title = f"# {len(cases)} cases x {len(names)} methods on {cfg.model} ({cfg.cases})"
    atomic_write_text(run.folder / "summary.md", summary_md(rows, names, columns, cfg.bootstrap, title))
    tradeoff_figure(rows, names, *cfg.tradeoff, run.folder / "tradeoff.png", cfg.bootstrap)
    shown = cfg.contact_cases * (len(names) + 1)
    grid = make_grid(sheet[:shown], labels[:shown], cols=len(names) + 1)
    grid.save(run.folder / "contact_sheet.png")

    nan = sum(math.isnan(v) for r in rows for v in r.values() if isinstance(v, float))
    body = {
        "cases": len(cases),
        "skipped": found.skipped,
        "methods": {m: params_record(params[m]) for m in names},
        "edits_made": made,
        "nan_metrics": nan,
        "seconds": round(run.seconds, 2),
        "config": config_to_dict(cfg),
    }
    run.write_json("run.json", body)
    skipped = f", {len(found.skipped)} bad case(s) skipped" if found.skipped else ""
    print(
        f"{dist.tag}wrote {made} edit(s) of {len(cases)} cases x {len(names)} methods, metrics.csv ({len(rows)} rows, "
        f"{nan} NaN metric(s) kept), summary.md, tradeoff.png and contact_sheet.png to {run.folder}{skipped}{run.repairs()}"
    )
    return body


def metric_tools(cfg: BenchConfig, columns: list[str]) -> dict:
    """The networks the chosen metrics need, loaded once (each with one clear error when it cannot be)."""
    from stableflow.clip_score import ClipScorer
    from stableflow.metrics import load_dino, load_lpips

    clip = {"clip_similarity_source_image", "clip_similarity_target_image", "clip_similarity_target_image_edit_part"}
    tools = {}
    if set(columns) & (clip | {"clip_img", "clip_txt", "clip_dir"}):
        tools["clip"] = ClipScorer.load(cfg.clip_model)
    if "structure_distance" in columns:
        tools["dino"] = load_dino()
    if "lpips_unedit_part" in columns:
        tools["lpips"] = load_lpips()
    return tools


if __name__ == "__main__":
    run_demo(BenchConfig, main, description=__doc__)
