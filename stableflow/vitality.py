"""Vital-layer identification (Stable Flow, Sec. 3.1): per-layer similarity statistics over prompts, the vital set,
and the vital_layers.json payload that demo_4_edit.py reads.

vitality(l) = 1 - mean over prompts of similarity(reference, image with layer l bypassed). The similarity is a seam
(`Similarity`: image pairs -> one number each); demo_3 uses DINOv2's (stableflow.dino).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flux.errors import UserError
from flux.model import check_layers, layer_name
from flux.util import model_spec

from .config import output_dir_problems
from .dino import DEFAULT_DINO, Similarity
from .io import atomic_write_json
from .sweep import FALLBACK_MODEL, Sweep

DEFAULT_TAU = 0.2
FLUX1_DEPTH = model_spec(FALLBACK_MODEL).params.depth  # double blocks, when nothing names the model


# ----------------------------------------------------------------------------------------------- statistics


@dataclass
class LayerScore:
    layer: int
    name: str
    mean_similarity: float
    std: float  # sample standard deviation over prompts (ddof=1; 0 for a single prompt)
    ci_low: float  # bootstrap percentile interval of the mean similarity
    ci_high: float
    vitality: float  # 1 - mean_similarity
    num_prompts: int


def similarities(pairs: Sequence[tuple[str, int, Path, Path]], similarity: Similarity) -> dict[int, dict[str, float]]:
    """layer -> prompt -> similarity of the ablated image to its reference, for (prompt, layer, ref, ablated)
    pairs (`Sweep.pairs()`), under any metric (DINOv2: `stableflow.dino.dino_similarity`)."""
    out: dict[int, dict[str, float]] = {}
    for (pid, layer, _, _), s in zip(pairs, similarity([(ref, ablated) for _, _, ref, ablated in pairs])):
        out.setdefault(layer, {})[pid] = s
    return out


def layer_scores(
    sims: dict[int, dict[str, float]],
    num_double: int = FLUX1_DEPTH,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[LayerScore]:
    """Per-layer mean, std and bootstrap interval of similarity over prompts, sorted by layer.

    Each layer's resampling uses its own generator seeded by (seed, layer), so a layer's interval does not change
    when other layers are added to a partial sweep.
    """
    scores = []
    alpha = (1 - confidence) / 2
    for layer in sorted(sims):
        x = np.asarray([sims[layer][p] for p in sorted(sims[layer])], dtype=np.float64)
        n = len(x)
        rng = np.random.default_rng([seed, layer])
        boot = x[rng.integers(0, n, size=(n_bootstrap, n))].mean(axis=1) if n_bootstrap > 0 else x[None]
        lo, hi = np.quantile(boot, [alpha, 1 - alpha])
        mean = float(x.mean())
        scores.append(
            LayerScore(
                layer=layer,
                name=layer_name(layer, num_double),
                mean_similarity=mean,
                std=float(x.std(ddof=1)) if n > 1 else 0.0,
                ci_low=float(lo),
                ci_high=float(hi),
                vitality=1.0 - mean,
                num_prompts=n,
            )
        )
    return scores


def select_vital(scores: Sequence[LayerScore], tau: float | None = None, top_k: int | None = None) -> list[int]:
    """Vital layers, sorted: vitality >= tau (the paper's rule), or the k most vital (ties -> lower index)."""
    if (tau is None) == (top_k is None):
        raise UserError('choose exactly one vital-layer rule: "tau" (a vitality threshold) or "top_k"')
    if top_k is not None:
        if top_k > len(scores):
            raise UserError(
                f"top_k={top_k} but only {len(scores)} layer(s) were scored; lower top_k or complete the sweep"
            )
        ranked = sorted(scores, key=lambda s: (-s.vitality, s.layer))
        return sorted(s.layer for s in ranked[:top_k])
    return sorted(s.layer for s in scores if s.vitality >= tau)


def borderline_layers(scores: Sequence[LayerScore], selection: dict) -> list[int]:
    """Under the threshold rule (`selection_dict`), the layers whose vitality interval (the bootstrap interval of the
    mean, over prompts) contains tau: another sample of prompts could put them on the other side, so more prompts
    would settle them. None under top_k, which has no tau."""
    if selection["rule"] != "threshold":
        return []
    return sorted(s.layer for s in scores if 1.0 - s.ci_high <= selection["tau"] <= 1.0 - s.ci_low)


def tau_interval_for(scores: Sequence[LayerScore], k: int) -> tuple[float, float] | None:
    """(low, high]: every tau in it selects exactly the k most vital layers (None if ties make that impossible)."""
    v = sorted((s.vitality for s in scores), reverse=True)
    if not 0 < k <= len(v):
        return None
    low = v[k] if k < len(v) else -math.inf
    return (low, v[k - 1]) if low < v[k - 1] else None


# ----------------------------------------------------------------------------------------------- the record


def selection_dict(tau: float | None, top_k: int | None) -> dict:
    return {"rule": "threshold", "tau": tau} if top_k is None else {"rule": "top_k", "k": top_k}


def rule_text(selection: dict) -> str:
    return f"vitality >= tau = {selection['tau']:g}" if selection["rule"] == "threshold" else f"top {selection['k']}"


# How each `metric` of demo_3 compares an ablated image with its reference (recorded in vital_layers.json).
METRICS = {
    "dinov2": "cosine of DINOv2 CLS embeddings (pooler_output), ablated vs reference",
    "ssim": "SSIM of the 8-bit RGB images (11x11 Gaussian window, sigma 1.5), ablated vs reference",
    "mini-detector": "mini.detect.semantic_similarity: mean over matched objects of mask IoU if colour and shape "
    "agree (a missing or extra object 0), times 1 if the backgrounds agree, ablated vs reference",
}


VITAL_FILE = "vital_layers.json"  # demo_3_dino.py's result, read by demo_4_edit.py: written and read only here


def vital_layers_payload(
    scores: Sequence[LayerScore],
    vital: Sequence[int],
    selection: dict,
    *,
    model: str | None,
    dino_model: str | None,
    num_double: int,
    extra: dict | None = None,
    metric: str = "dinov2",
) -> dict:
    """The vital_layers.json object (read by demo_4_edit.py); `dino_model` is None when the metric needs none."""
    return {
        "vital_layers": sorted(vital),
        "selection": selection,
        "model": model,
        "metric": metric,
        "dino_model": dino_model,
        "num_double": num_double,
        "similarity": METRICS[metric],
        **(extra or {}),
        "layers": [asdict(s) for s in scores],
    }


def vital_layers_problems(data: Any, depth: int, depth_single: int, where: str) -> list[str]:
    """Why `data` is not a vital_layers.json for a model of `depth` double and `depth_single` single blocks (empty:
    it is one). The rules of both the writer and the reader."""
    layers = data.get("vital_layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        return [
            f'{where} is malformed: expected a JSON object with "vital_layers": [integers], as demo_3_dino.py writes it'
        ]
    num_double = data.get("num_double")
    if num_double is not None and num_double != depth:
        return [
            f"{where} was made for a model with {num_double} double blocks, but this model has {depth}: its layer "
            f"indices mean other layers here. Use the file made for this model."
        ]
    try:
        check_layers(layers, depth + depth_single, where)
    except ValueError as e:
        return [str(e)]
    return []


def write_vital_layers(out_dir: str | Path, payload: dict, num_single: int) -> Path:
    """Write `payload` as <out_dir>/vital_layers.json (atomically); it must pass the reader's rules."""
    path = Path(out_dir) / VITAL_FILE
    if problems := vital_layers_problems(payload, payload["num_double"], num_single, str(path)):
        raise ValueError(f"refusing to write a vital_layers.json demo_4 could not read: {problems}")
    atomic_write_json(path, payload)
    return path


def _load(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where} is not readable JSON ({e}): rewrite it or run demo_3_dino.py again") from None


def read_vital_layers(path: str | Path, depth: int, depth_single: int) -> list[int]:
    """The sorted "vital_layers" of a vital_layers.json (or of the demo_3_dino.py output folder holding one),
    checked against the model; anything else is a UserError naming the fix."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / VITAL_FILE).is_file():
            raise UserError(
                f"vital_layers_file {path} is a folder without {VITAL_FILE}: give demo_3_dino.py's output folder "
                "or the file itself"
            )
        p = p / VITAL_FILE
    if not p.is_file():
        raise UserError(f"vital_layers_file {path} does not exist: run demo_3_dino.py, or fix the path")
    where = f"vital_layers_file {p}"
    data = _load(p, where)
    if problems := vital_layers_problems(data, depth, depth_single, where):
        raise UserError(problems[0])
    return sorted(set(data["vital_layers"]))


def auto_vital_layers_file(output_dir: str, model: str) -> tuple[str | None, str]:
    """demo_3_dino.py's vital_layers.json beside `output_dir` (outputs/demo_3_dino/ for outputs/demo_4_edit) when it
    exists and was made for `model`, else None; the second value, for the printed line, says why none was taken
    or that the file comes from an incomplete sweep."""
    path = Path(output_dir).expanduser().parent / "demo_3_dino" / VITAL_FILE
    if not path.is_file():
        return None, f"; no {path} from demo_3_dino.py (name demo_3's output folder in vital_layers_file)"
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return str(path), ""  # read_vital_layers says what is wrong with it
    made_for = data.get("model") if isinstance(data, dict) else None
    if made_for not in (None, model):
        return None, f"; {path} was made for {made_for}, not {model}"
    if isinstance(data, dict) and data.get("complete") is False:
        lacking = len(data.get("missing") or {})
        return str(path), f"; from an incomplete sweep ({lacking} prompt(s) lack images): run demo_2 and demo_3 again"
    return str(path), ""


@dataclass
class Analysis:
    sweep: Sweep
    sims: dict[int, dict[str, float]]  # layer -> prompt -> similarity
    scores: list[LayerScore]
    vital: list[int]
    selection: dict
    bootstrap: dict
    notes: list[str]  # skipped files, size mismatches, the cache's state


# ----------------------------------------------------------------------------------------------- demo_3's config


@dataclass
class DinoConfig:
    sweep_dir: str = field(
        default="outputs/demo_2_skip",
        metadata={"help": "demo_2_skip.py output folder: <prompt_id>/ref.png, <prompt_id>/layer_XX.png, manifest.json"},
    )
    output_dir: str = field(default="outputs/demo_3_dino", metadata={"help": "folder for the outputs"})
    metric: Literal["dinov2", "ssim", "mini-detector"] = field(
        default="dinov2",
        metadata={
            "help": "how an ablated image is compared with its reference: 'dinov2' (the paper's: cosine of DINOv2 "
            "embeddings; for real models), 'ssim' (structural similarity of the pixels: needs no weights) or "
            "'mini-detector' (flux-mini only: mini.detect's semantic similarity of the objects, their colours, "
            "shapes and masks, and the background; a deleted or recoloured object counts as damage)"
        },
    )
    dino_model: str = field(
        default=DEFAULT_DINO,
        metadata={
            "help": "DINOv2 hub id (facebook/dinov2-small|base|large|giant) or local folder; "
            "'tiny-random': a seeded random tiny model for tests and CPU smoke runs (meaningless scores)"
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps",
            "pattern": r"auto|cpu|mps|cuda(:\d+)?",
        },
    )
    batch_size: int = field(default=64, metadata={"help": "images per DINOv2 forward", "min": 1})
    num_workers: int = field(
        default=8,
        metadata={
            "help": "threads decoding and resizing images (on a GPU these bound the speed, not DINOv2)",
            "min": 1,
        },
    )
    rule: Literal["threshold", "top_k"] = field(
        default="threshold",
        metadata={
            "help": "vital set: 'threshold' (vitality >= tau, the paper's rule) or 'top_k' (the k most vital layers)"
        },
    )
    tau: float = field(
        default=DEFAULT_TAU,
        metadata={
            "help": "vitality threshold (vitality = 1 - mean similarity); a default to tune with the plot",
            "min": 0.0,
            "max": 2.0,
        },
    )
    top_k: int = field(default=10, metadata={"help": "number of vital layers when rule is top_k", "min": 1})
    num_double: int | None = field(
        default=None,
        metadata={"help": "number of double-stream blocks (null: from manifest.json, else 19 as in FLUX.1)", "min": 0},
    )
    bootstrap_samples: int = field(
        default=1000, metadata={"help": "bootstrap resamples for each layer's confidence interval (0: none)", "min": 0}
    )
    confidence: float = field(
        default=0.95, metadata={"help": "confidence of the bootstrap interval", "min": 0.5, "max": 0.999}
    )
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "folder for cached DINOv2 features (null: <sweep_dir>/dino_features)"}
    )
    contact_sheet_prompts: int = field(
        default=4, metadata={"help": "prompts (rows) in contact_sheet.png; 0: no contact sheet", "min": 0}
    )
    contact_sheet_layers: int = field(
        default=8, metadata={"help": "most vital layers (columns) in contact_sheet.png", "min": 1}
    )
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
        return problems + output_dir_problems(self.output_dir)

    @property
    def scorer(self) -> str | None:
        """The DINOv2 model the metric uses (None for the others, which need no weights)."""
        return self.dino_model if self.metric == "dinov2" else None

    def vital_rule(self) -> dict:
        """`select_vital`'s keyword for the chosen rule: {"tau": ...} or {"top_k": ...}."""
        return {"tau": self.tau} if self.rule == "threshold" else {"top_k": self.top_k}
