"""The edit benchmark of demo_5_bench.py: its config, the case readers, the methods by name, the metrics table
(metrics.csv), the summary (summary.md with bootstrap intervals), the trade-off figure and the contact sheet.

Cases come from one of three sources, each read and checked before anything runs; a case that cannot be measured is
reported with its id and skipped (counted in the summary line), a source that cannot be read at all is refused:

- pie: PIE-Bench's published layout (cure-lab/PnPInversion): `mapping_file.json` and `annotation_images/<image_path>`.
  Rules, as its reference evaluation applies them: prompts keep their `[ ]` markers in the records and lose them
  before the model or CLIP sees them (metrics.clean_prompt); the mask is its run-length encoding over 512x512 with the
  outer frame set to 1 (metrics.decode_mask); `editing_type_id` names the edit type (PIE_TYPES). An image that is not
  512x512 is skipped (its mask would not fit).
- list: a JSON list of {"id", "image" (a path, relative to the list's folder) or "seed", "source_prompt",
  "edit_prompt", "mask" (optional: a PNG, white = edited, or PIE-Bench's run-length list)}. An image whose sides are
  not multiples of 16 is centre-cropped to them, its mask alike. Without a mask the "unedited part" is the whole image
  and the edited-region CLIP score is NaN.
- world: flux-mini's world (mini.edits): each family's test-split edits of rendered scenes (real inputs the model
  never made), with exact masks from the scene (an edited object's grid cell; an addition's named cell, else every
  free cell; a background edit: everything but the objects) and graded by mini.detect: edit_success (NaN where the
  reference cannot show the edit, mini.edits.reference_ok), untouched_iou (NaN where no object is untouched) and
  untouched_kept.

An edit prompt that equals its source prompt (markers removed) is skipped: it measures nothing.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
from PIL import Image

from flux.errors import UserError
from flux.util import configs

from .clip_score import DEFAULT_CLIP
from .config import BaseConfig, check_rules, native_size
from .methods import DEFAULTS
from .methods.flowedit import FlowEditParams
from .methods.invert_edit import InvertEditParams
from .methods.sdedit import SDEditParams
from .methods.stable_flow import ABLATIONS, StableFlowParams, ablation
from .metrics import PIE_METRICS, PIE_SIZE, clean_prompt, decode_mask

METHOD_NAMES = (*DEFAULTS, *(f"stable-flow/{a}" for a in ABLATIONS))
PAPER_METRICS = ("clip_img", "clip_txt", "clip_dir")  # Stable Flow's own (stableflow.clip_score)
WORLD_METRICS = ("edit_success", "untouched_iou", "untouched_kept")
ALL_METRICS = (*PIE_METRICS, *PAPER_METRICS)
PIE_TYPES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change content",
    "5": "change pose",
    "6": "change color",
    "7": "change material",
    "8": "change background",
    "9": "change style",
}


@dataclass
class BenchConfig(BaseConfig):
    """demo_5_bench.py: edit cases x methods -> per-case images, metrics.csv, summary.md, trade-off figure."""

    cases: Literal["world", "list", "pie"] = field(
        default="pie",
        metadata={"help": "where the cases come from: pie (PIE-Bench folder), list (a JSON list), world (flux-mini)"},
    )
    cases_path: str | None = field(
        default=None,
        metadata={"help": "pie: the PIE-Bench folder (mapping_file.json + annotation_images/); list: the JSON file"},
    )
    max_cases: int | None = field(
        default=None, metadata={"help": "use only the first this many cases (null: all)", "min": 1}
    )
    world_families: list[str] = field(
        default_factory=lambda: ["attribute", "replacement", "addition", "background", "size"],
        metadata={"help": "world: the edit families (mini.edits.FAMILIES)"},
    )
    world_cases: int = field(default=2, metadata={"help": "world: cases per family", "min": 1, "max": 1000})
    world_seed: int = field(default=0, metadata={"help": "world: seed of the scenes and edits", "min": 0})
    methods: list[str] = field(
        default_factory=lambda: list(METHOD_NAMES),
        metadata={"help": f"methods to run, each with its published defaults: {', '.join(METHOD_NAMES)}"},
    )
    steps: int | None = field(
        default=None,
        metadata={
            "help": "every method's steps (null: each method's own: Stable Flow 50 real / 28 generated, SDEdit and "
            "FlowEdit 28, RF-Solver-Edit 15, FireFlow 8); FlowEdit's n_max keeps its share 24/28 of them",
            "min": 2,
            "max": 1000,
        },
    )
    vital_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Stable Flow's injection layers (null: the release's, scaled to the model)", "min": 0},
    )
    width: int | None = field(
        default=None,
        metadata={"help": "generated sources' width (null: native)", "min": 16, "max": 4096, "multiple_of": 16},
    )
    height: int | None = field(
        default=None,
        metadata={"help": "generated sources' height (null: native)", "min": 16, "max": 4096, "multiple_of": 16},
    )
    source_steps: int = field(
        default=28,
        metadata={
            "help": "generated sources' denoising steps (Stable Flow regenerates its reference with its own steps: "
            "keep 'steps' null or equal to this, or its reference differs from the source)",
            "min": 1,
        },
    )
    metrics: list[str] = field(
        default_factory=lambda: list(ALL_METRICS),
        metadata={"help": f"metrics of every case ({', '.join(ALL_METRICS)}); world cases add {WORLD_METRICS}"},
    )
    clip_model: str = field(
        default=DEFAULT_CLIP, metadata={"help": "CLIP of the CLIP metrics: a hub id, a folder, or tiny-random"}
    )
    tradeoff: list[str] = field(
        default_factory=lambda: ["clip_similarity_target_image", "psnr_unedit_part"],
        metadata={"help": "the trade-off figure's [edit adherence (x), preservation (y)] metrics"},
    )
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples of each mean", "min": 10})
    contact_cases: int = field(default=12, metadata={"help": "cases (rows) on the contact sheet", "min": 1})

    @property
    def image_size(self) -> tuple[int, int]:
        n = native_size(self.model)
        return self.width or n, self.height or n

    def columns(self, world: bool) -> list[str]:
        return list(self.metrics) + (list(WORLD_METRICS) if world else [])

    def check(self) -> list[str]:
        from mini.edits import FAMILIES

        bad = lambda names, known: [n for n in names if n not in known]
        unknown = lambda key, known: [
            f"'{key}' names unknown {n!r}: use {', '.join(known)}" for n in bad(getattr(self, key), known)
        ]
        columns = self.columns(self.cases == "world")
        return check_rules(
            super().check,
            lambda: unknown("methods", METHOD_NAMES) + unknown("metrics", ALL_METRICS),
            lambda: unknown("world_families", FAMILIES),
            lambda: ["'methods' is empty: name at least one"] if not self.methods else [],
            lambda: (
                [f"'tradeoff' needs two of the metrics {columns}, got {self.tradeoff}"]
                if len(self.tradeoff) != 2 or bad(self.tradeoff, columns)
                else []
            ),
        )


# ---------------------------------------------------------------------------------------------------------- cases


@dataclass
class BenchCase:
    """One edit to measure: prompts as given (PIE-Bench's markers kept), the input image (None: generated from the
    seed), the mask (H, W) with 1 = edited (None: no mask), and for world cases the edit (mini.edits.Edit)."""

    id: str
    source_prompt: str
    target_prompt: str
    image: Image.Image | None = None
    seed: int = 0
    mask: np.ndarray | None = None
    edit_type: str = ""
    source: str = ""  # where the source comes from, for the record
    world: Any = None

    def record(self) -> dict[str, Any]:
        return {"case": self.id, "source_prompt": self.source_prompt, "target_prompt": self.target_prompt} | {
            "source": self.source
        }


@dataclass
class CaseSet:
    cases: list[BenchCase]
    skipped: list[str]  # "id: why", each reported


def _crop16(image: Image.Image, mask: np.ndarray | None) -> tuple[Image.Image, np.ndarray | None]:
    """Centre-crop both down to sides that are multiples of 16 (the model's patch grid)."""
    w, h = image.width // 16 * 16, image.height // 16 * 16
    x, y = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((x, y, x + w, y + h)), None if mask is None else mask[y : y + h, x : x + w]


def _read_mask(value: Any, folder: Path, shape: tuple[int, int]) -> np.ndarray:
    """A mask as a PNG path (white = edited) or PIE-Bench's run-length list, at `shape` (H, W); ValueError if not."""
    if isinstance(value, list):
        return decode_mask(value, shape)
    with Image.open(folder / value) as im:
        m = (np.asarray(im.convert("L")) > 127).astype(np.float32)
    if m.shape != shape:
        raise ValueError(f"mask {value} is {m.shape[1]}x{m.shape[0]}, the image {shape[1]}x{shape[0]}")
    return m


def _check(case: BenchCase) -> str | None:
    """Why a case cannot be measured, or None."""
    if not case.source_prompt.strip() or not case.target_prompt.strip():
        return "an empty prompt"
    if clean_prompt(case.source_prompt).strip() == clean_prompt(case.target_prompt).strip():
        return "the edit prompt changes nothing (equal to the source prompt)"
    if case.mask is not None and case.image is not None and case.mask.shape != (case.image.height, case.image.width):
        return f"mask of size {case.mask.shape[::-1]}, image {case.image.width}x{case.image.height}"
    return None


def _keep(case: BenchCase, cases: list[BenchCase], skipped: list[str]) -> None:
    why = _check(case)
    if why is None:
        cases.append(case)
    else:
        skipped.append(f"{case.id}: {why}")


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def read_pie(root: Path) -> CaseSet:
    """PIE-Bench's cases (see the module docstring for its rules)."""
    mapping = root / "mapping_file.json"
    try:
        entries = json.loads(mapping.read_text())
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object of cases by id")
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read PIE-Bench's {mapping} ({e}): give the folder that holds mapping_file.json"
        ) from None
    cases, skipped = [], []
    for key, e in entries.items():
        try:
            path = root / "annotation_images" / e["image_path"]
            if not path.is_file():
                skipped.append(f"{key}: missing image {path}")
                continue
            image = _open(path)
            if image.size != PIE_SIZE[::-1]:
                skipped.append(f"{key}: image {image.width}x{image.height}, PIE-Bench's masks are 512x512")
                continue
            case = BenchCase(
                str(key),
                e["original_prompt"],
                e["editing_prompt"],
                image,
                mask=decode_mask(e["mask"], PIE_SIZE),
                edit_type=PIE_TYPES.get(str(e.get("editing_type_id")), str(e.get("editing_type_id"))),
                source=f"pie {e['image_path']}",
            )
        except (KeyError, TypeError, ValueError, OSError, UserError) as err:
            skipped.append(f"{key}: {type(err).__name__} {err}")
            continue
        _keep(case, cases, skipped)
    return CaseSet(cases, skipped)


def read_list(path: Path, size: tuple[int, int]) -> CaseSet:
    """Cases from a JSON list (see the module docstring); generated sources are `size` (width, height)."""
    try:
        entries = json.loads(path.read_text())
        assert isinstance(entries, list)
    except (OSError, ValueError, AssertionError) as e:
        raise UserError(
            f"cannot read the case list {path} ({e or 'not a JSON list'}): give a JSON list of cases"
        ) from None
    cases, skipped = [], []
    for i, e in enumerate(entries):
        cid = str(e.get("id", i)) if isinstance(e, dict) else str(i)
        try:
            image, mask = None, None
            if e.get("image") is not None:
                file = path.parent / e["image"]
                if not file.is_file():
                    skipped.append(f"{cid}: missing image {file}")
                    continue
                image = _open(file)
            shape = (image.height, image.width) if image is not None else (size[1], size[0])
            if e.get("mask") is not None:
                mask = _read_mask(e["mask"], path.parent, shape)
            if image is not None:
                image, mask = _crop16(image, mask)
            case = BenchCase(
                cid,
                e["source_prompt"],
                e["edit_prompt"],
                image,
                int(e.get("seed", 0)),
                mask,
                e.get("type", ""),
                f"image {e['image']}" if image is not None else f"seed {int(e.get('seed', 0))}",
            )
        except (KeyError, TypeError, ValueError, OSError, UserError, AttributeError) as err:
            skipped.append(f"{cid}: {type(err).__name__} {err}")
            continue
        _keep(case, cases, skipped)
    return CaseSet(cases, skipped)


def world_mask(scene, edit) -> np.ndarray:
    """The exact edited region of a world edit on its whole source scene (see the module docstring)."""
    from mini.world import PLACES, SIZE, SceneBatch, coverage

    def cells(places) -> np.ndarray:
        m = np.zeros((SIZE, SIZE), np.float32)
        for p in places:
            k = PLACES.index(p)
            x0, y0 = round(k % 3 * SIZE / 3), round(k // 3 * SIZE / 3)
            m[y0 : round(y0 + SIZE / 3), x0 : round(x0 + SIZE / 3)] = 1
        return m

    if edit.family == "background":
        return (coverage(SceneBatch.of([scene]))[0].sum(0) <= 0).numpy().astype(np.float32)
    if edit.family == "addition":
        taken = {o.place for o in scene.objects}
        return cells([edit.place] if edit.place else [p for p in PLACES if p not in taken])
    return cells([next(o.place for o in scene.objects if o.colour == edit.colour)])


def read_world(families: list[str], per_family: int, seed: int) -> CaseSet:
    """flux-mini world's test-split edits of rendered scenes, with exact masks."""
    from mini.edits import edit_cases, source_scenes
    from mini.world import render

    from .io import tensor_to_pil

    cases = []
    for family in families:
        scenes = source_scenes(per_family, seed, family)
        images = render(scenes)
        for k, (scene, (src, tgt, edit), pixels) in enumerate(
            zip(scenes, edit_cases(per_family, seed, family), images)
        ):
            cases.append(
                BenchCase(f"{family}-{k}", src, tgt, tensor_to_pil(pixels), seed + k, world_mask(scene, edit), family,
                          f"world seed {seed} {family} {k}", edit)
            )  # fmt: skip
    return CaseSet(cases, [])


def read_cases(cfg: BenchConfig) -> CaseSet:
    """The config's cases, checked; refuses when none is left to measure."""
    path = Path(cfg.cases_path or "").expanduser()
    if cfg.cases != "world" and (
        not cfg.cases_path or not path.exists()
    ):  # read here, not by the config check: the shipped config's
        raise UserError(  # placeholder path must load
            f"cases_path {cfg.cases_path or 'is not set'}{' does not exist' if cfg.cases_path else ''}: give "
            + ("your PIE-Bench folder (mapping_file.json + annotation_images/; cure-lab/PnPInversion distributes it "
               "by form)" if cfg.cases == "pie" else "the JSON list of cases")
        )  # fmt: skip
    if cfg.cases == "world":
        found = read_world(cfg.world_families, cfg.world_cases, cfg.world_seed)
    elif cfg.cases == "pie":
        found = read_pie(path)
    else:
        found = read_list(path, cfg.image_size)
    ids = [c.id for c in found.cases]
    if len(set(ids)) != len(ids):
        raise UserError(f"case ids repeat in {cfg.cases_path}: {sorted({i for i in ids if ids.count(i) > 1})}")
    found.cases = found.cases[: cfg.max_cases]
    if not found.cases:
        shown = "; ".join(found.skipped[:5])
        raise UserError(
            f"no case to measure in {cfg.cases_path or cfg.cases}" + (f" (skipped: {shown})" if shown else "")
        )
    return found


# -------------------------------------------------------------------------------------------------------- methods


def model_shape(model: str) -> SimpleNamespace:
    """What the methods' defaults read of a model (its block counts), from its spec: no weights loaded, so a run's
    records are known, and a changed setting refused, before anything loads."""
    p = configs[model].params
    return SimpleNamespace(model=SimpleNamespace(params=p, num_layers=p.depth + p.depth_single_blocks))


def method_params(models: Any, name: str, steps: int | None, layers: list[int] | None) -> object:
    """A method's params by name (METHOD_NAMES), its published defaults, with the bench's steps and vital layers."""
    base = StableFlowParams(layers=layers)
    if name == "stable-flow":
        params = base
    elif name.startswith("stable-flow/"):
        params = ablation(models, name.removeprefix("stable-flow/"), base)
    else:
        params = DEFAULTS[name](models)
    if steps is None:
        return params
    if isinstance(params, FlowEditParams):
        return replace(params, steps=steps, n_max=round(steps * params.n_max / params.steps))
    if isinstance(params, InvertEditParams):
        return replace(params, steps=steps, inject=min(params.inject, steps))
    if isinstance(params, (SDEditParams, StableFlowParams)):
        return replace(params, steps=steps)
    return params


def file_name(name: str) -> str:
    return name.replace("/", "--") + ".png"


# ---------------------------------------------------------------------------------------------------- the table


def metric_row(case: BenchCase, source: Image.Image, edited: Image.Image, columns: list[str], tools: dict) -> dict:
    """Every metric of one edit (NaN where it does not apply), from the 8-bit PNGs."""
    from .metrics import pie_metrics

    mask = case.mask if case.mask is not None else np.zeros((source.height, source.width), np.float32)
    pie = [m for m in columns if m in PIE_METRICS]
    row = pie_metrics(
        source, edited, mask, case.source_prompt, case.target_prompt, tools.get("clip"), tools.get("dino"),
        tools.get("lpips"), pie,
    )  # fmt: skip
    if any(m in columns for m in PAPER_METRICS):
        s = tools["clip"].scores(source, clean_prompt(case.source_prompt), [edited], [clean_prompt(case.target_prompt)])
        row |= {m: math.nan if s[0][m] is None else s[0][m] for m in PAPER_METRICS if m in columns}
    if "edit_success" in columns:
        row |= world_grades(case, source, edited)
    return row


def world_grades(case: BenchCase, source: Image.Image, edited: Image.Image) -> dict[str, float]:
    """The detector's grades of a world case (NaN for any other case)."""
    if case.world is None:
        return dict.fromkeys(WORLD_METRICS, math.nan)
    from mini.detect import detect
    from mini.edits import grade, reference_ok

    ref = detect(np.asarray(source))
    g = grade(ref, detect(np.asarray(edited)), case.world)
    return {
        "edit_success": float(g.success) if reference_ok(ref, case.world) else math.nan,
        "untouched_iou": math.nan if g.untouched_iou is None else g.untouched_iou,
        "untouched_kept": float(g.untouched_kept),
    }


TABLE_KEYS = ("case", "edit_type", "method", "nfe", "seconds")


def table_csv(rows: list[dict], columns: list[str]) -> str:
    """metrics.csv: one row per case x method, every metric; NaN written as nan, never dropped."""
    out = io.StringIO()
    w = csv.DictWriter(out, [*TABLE_KEYS, *columns], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in r.items()})
    return out.getvalue()


def read_table(text: str) -> list[dict]:
    """metrics.csv back as rows, numbers as floats (nan included)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    num = lambda k, v: v if k in ("case", "edit_type", "method") else float(v)
    return [{k: num(k, v) for k, v in r.items()} for r in rows]


def bootstrap(values: list[float], resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean of the finite-or-infinite (not NaN) values and its percentile bootstrap interval (resampling the values
    with replacement, `resamples` times, seeded); NaNs are counted, not averaged. n: values used, nan: left out."""
    a = np.asarray(values, dtype=np.float64)
    kept = a[~np.isnan(a)]
    out = {"n": float(len(kept)), "nan": float(len(a) - len(kept))}
    if not len(kept):
        return out | {"mean": math.nan, "lo": math.nan, "hi": math.nan}
    rng = np.random.default_rng(seed)
    means = kept[rng.integers(0, len(kept), (resamples, len(kept)))].mean(1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return out | {"mean": float(kept.mean()), "lo": float(lo), "hi": float(hi)}


def summary_md(rows: list[dict], methods: list[str], columns: list[str], resamples: int, title: str) -> str:
    """summary.md: methods x metrics, mean [95% bootstrap interval], NaN counts beside; NFE and seconds per edit."""
    lines = [
        title,
        "",
        f"Means over cases with 95% percentile bootstrap intervals ({resamples} resamples); `nan k` counts the cases "
        "where a metric is undefined (kept in metrics.csv, left out of the mean).",
        "",
        "| method | NFE | s/edit | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = []
        for c in columns:
            b = bootstrap([r[c] for r in mine], resamples)
            nan = f" (nan {int(b['nan'])})" if b["nan"] else ""
            cells.append(f"{b['mean']:.4g} [{b['lo']:.4g}, {b['hi']:.4g}]{nan}" if b["n"] else f"nan{nan}")
        nfe = np.mean([r["nfe"] for r in mine]) if mine else math.nan
        sec = np.mean([r["seconds"] for r in mine]) if mine else math.nan
        lines.append(f"| {m} | {nfe:.0f} | {sec:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tradeoff_figure(rows: list[dict], methods: list[str], x: str, y: str, path: Path, resamples: int) -> None:
    """Each method's mean preservation (y) against edit adherence (x) with its bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for m in methods:
        bx = bootstrap([r[x] for r in rows if r["method"] == m], resamples)
        by = bootstrap([r[y] for r in rows if r["method"] == m], resamples)
        if not (math.isfinite(bx["mean"]) and math.isfinite(by["mean"])):
            continue
        err = lambda b: [[b["mean"] - b["lo"]], [b["hi"] - b["mean"]]]
        ax.errorbar(bx["mean"], by["mean"], xerr=err(bx), yerr=err(by), fmt="o", capsize=3, label=m)
    ax.set_xlabel(f"{x} (edit adherence)")
    ax.set_ylabel(f"{y} (preservation)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def params_record(params: object) -> dict:
    return {"kind": type(params).__name__, **asdict(params)}
