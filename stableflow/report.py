"""What demo_3_dino.py writes for people: the vitality CSV and plot, the contact sheet, the run summary, and the
plain mode's similarity table. Every file is written atomically."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from flux.model import layer_name

from .io import (
    _font,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    caption_font_size,
    make_grid,
    save_png,
)
from .sweep import Sweep, load_sweep_image
from .vitality import (
    Analysis,
    LayerScore,
    borderline_layers,
    rule_text,
    tau_interval_for,
    vital_layers_payload,
    write_vital_layers,
)

CSV_FIELDS = [
    "layer",
    "name",
    "block",
    "mean_similarity",
    "std",
    "ci_low",
    "ci_high",
    "vitality",
    "num_prompts",
    "vital",
]


def scores_csv(scores: Sequence[LayerScore], vital: Sequence[int], num_double: int) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for s in scores:
        w.writerow(
            {**asdict(s), "block": "double" if s.layer < num_double else "single", "vital": int(s.layer in vital)}
        )
    return buf.getvalue()


DOUBLE_COLOUR, SINGLE_COLOUR = "#1f77b4", "#ff7f0e"


def vitality_figure(
    scores: Sequence[LayerScore],
    vital: Sequence[int],
    num_double: int,
    tau: float | None = None,
    title: str = "Layer vitality",
    metric: str = "dinov2",
):
    """Bar per layer (double blocks blue, single orange; non-vital faded, vital outlined and labelled), bootstrap
    interval as error bars, the threshold as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layers = [s.layer for s in scores]
    fig = Figure(figsize=(max(8.0, 0.22 * len(scores) + 2), 4.2), dpi=120)
    ax = fig.add_subplot()
    colours = [DOUBLE_COLOUR if l < num_double else SINGLE_COLOUR for l in layers]
    bars = ax.bar(
        layers,
        [s.vitality for s in scores],
        color=colours,
        width=0.8,
        # Clamped: 1 - (1 - v) != v in floats, and matplotlib refuses an error bar of -1e-17.
        yerr=[
            [max(0.0, s.vitality - (1 - s.ci_high)) for s in scores],
            [max(0.0, (1 - s.ci_low) - s.vitality) for s in scores],
        ],
        error_kw={"elinewidth": 0.7, "ecolor": "0.3", "capsize": 1.5},
    )
    for bar, s in zip(bars, scores):
        is_vital = s.layer in vital
        bar.set_alpha(1.0 if is_vital else 0.35)
        bar.set_edgecolor("black" if is_vital else "none")
        bar.set_linewidth(1.2 if is_vital else 0)
        bar.set_gid(f"layer_{s.layer}{'_vital' if is_vital else ''}")
        if is_vital:
            ax.annotate(
                str(s.layer),
                (bar.get_x() + bar.get_width() / 2, 1 - s.ci_low),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    if any(l < num_double for l in layers) and any(l >= num_double for l in layers):
        ax.axvline(num_double - 0.5, color="0.6", linewidth=0.8)
    handles = [
        Patch(color=DOUBLE_COLOUR, label="double-stream block"),
        Patch(color=SINGLE_COLOUR, label="single-stream block"),
        Patch(facecolor="white", edgecolor="black", label="vital (outlined, labelled)"),
    ]
    low, high = y_range(scores)
    if tau is not None:
        where = "" if low <= tau <= high else f" ({'above' if tau > high else 'below'} every layer, off the axis)"
        handles.append(
            ax.axhline(tau, color="crimson", linestyle="--", linewidth=1, label=f"threshold τ = {tau:g}{where}")
        )
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_xlabel(f"layer (global index; single block j = layer j + {num_double})")
    label = {"dinov2": "DINOv2", "ssim": "SSIM", "mini-detector": "detector (semantic)"}.get(metric, metric)
    ax.set_ylabel(f"vitality = 1 − mean {label} similarity")
    ax.set_title(title)
    ax.set_xlim(min(layers) - 1, max(layers) + 1)
    ax.set_ylim(low, high)
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    return fig


def y_range(scores: Sequence[LayerScore]) -> tuple[float, float]:
    """The vitality axis: zero and every bar and interval end, with headroom for the labels and the legend.

    Fitted to the data, not fixed: layers of a weak metric or model differ by 1e-4 and must not look flat, and
    vitality can exceed 1 (anti-correlated embeddings) or dip below 0 by rounding."""
    values = [v for s in scores for v in (s.vitality, 1 - s.ci_low, 1 - s.ci_high)]
    low, high = min(0.0, *values), max(0.0, *values)
    span = high - low or max(abs(high), 1e-9)  # all equal (e.g. all zero): still a visible axis
    return low - 0.03 * span * (low < 0), high + 0.25 * span


def save_figure(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def contact_sheet(
    sweep: Sweep,
    scores: Sequence[LayerScore],
    vital: Sequence[int],
    sims: dict[int, dict[str, float]] | None = None,
    prompts: int = 4,
    columns: int = 8,
    thumb: int = 192,
) -> Image.Image:
    """Rows: the first `prompts` scored prompts. Columns: the reference, then ablations of the most vital layers
    (vital ones first, by vitality), each captioned with the layer, its block and that prompt's similarity."""
    ranked = sorted(scores, key=lambda s: (s.layer not in vital, -s.vitality, s.layer))[:columns]
    pids = [p for p in sorted(sweep.refs) if p in sweep.ablations][:prompts]

    def tile(path: Path | None) -> Image.Image:
        if path is None:  # a partial sweep: keep the grid aligned
            return Image.new("RGB", (thumb, thumb), "#d0d0d0")
        return ImageOps.contain(load_sweep_image(path), (thumb, thumb), Image.Resampling.LANCZOS)  # small ones grow

    images, labels = [], []
    for pid in pids:
        images.append(tile(sweep.refs[pid]))
        labels.append(["reference", pid])  # a long id is what gets cut, not the word "reference"
        for s in ranked:
            path = sweep.ablations[pid].get(s.layer)
            sim = (sims or {}).get(s.layer, {}).get(pid)
            images.append(tile(path))
            block = f"double {s.layer}" if s.layer < sweep.num_double else f"single {s.layer - sweep.num_double}"
            labels.append(
                [
                    f"skip layer {s.layer}{' (vital)' if s.layer in vital else ''}",
                    block,
                    "missing" if path is None else f"similarity {sim:.3f}" if sim is not None else "",
                ]
            )
    width = max(im.width for im in images)
    font_size = caption_font_size(width)  # make_grid's own choice for this tile width, made explicit
    captions = [caption(lines, font_size, width) for lines in labels]
    return make_grid(images, captions, cols=len(ranked) + 1, font_size=font_size)


_BREAK = re.compile(r"(?<=[ _\-./])")  # after a space, underscore, dash, dot or slash: where ids and words part


def caption(lines: Sequence[str], font_size: int, width: int) -> str:
    """`lines` broken at word boundaries (spaces, and the _ - . / inside prompt ids, which io.caption_lines does not
    break at) into lines that fit `width` pixels in make_grid's font, so a tile's caption never splits a word; a word wider than the tile stays whole
    (make_grid cuts it, the last resort)."""
    font = _font(font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out = []
    for line in lines:
        current = ""
        for piece in _BREAK.split(line):
            if current and draw.textlength((current + piece).rstrip(), font=font) > width:
                out.append(current.rstrip())
                current = ""
            current += piece
        out.append(current.rstrip())
    return "\n".join(out)


def write_sweep_outputs(
    a: Analysis,
    out_dir: str | Path,
    *,
    dino_model: str | None,
    contact_sheet_prompts: int = 4,
    contact_sheet_columns: int = 8,
    metric: str = "dinov2",
) -> dict[str, Path]:
    """vital_layers.json, vitality.csv, vitality.png, contact_sheet.png (each written atomically) in `out_dir`."""
    out = Path(out_dir)
    missing = a.sweep.missing()
    model = a.sweep.manifest.get("model") if a.sweep.manifest else None
    payload = vital_layers_payload(
        a.scores,
        a.vital,
        a.selection,
        model=model,
        dino_model=dino_model,
        num_double=a.sweep.num_double,
        metric=metric,
        extra={
            "vital_layer_names": [layer_name(l, a.sweep.num_double) for l in a.vital],
            "num_prompts": len({p for per in a.sims.values() for p in per}),
            "complete": not missing,
            "missing": missing,
            "bootstrap": a.bootstrap,
            "borderline_layers": borderline_layers(a.scores, a.selection),
            "notes": a.notes,
        },
    )
    paths = {
        "json": out / "vital_layers.json",
        "csv": out / "vitality.csv",
        "plot": out / "vitality.png",
        "contact_sheet": out / "contact_sheet.png",
    }
    atomic_write_text(paths["csv"], scores_csv(a.scores, a.vital, a.sweep.num_double))
    tau = a.selection.get("tau")
    title = f"Layer vitality of {model or 'the model'} ({payload['num_prompts']} prompts, {dino_model or metric})"
    save_figure(
        vitality_figure(a.scores, a.vital, a.sweep.num_double, tau=tau, title=title, metric=metric), paths["plot"]
    )
    if contact_sheet_prompts > 0:
        save_png(
            paths["contact_sheet"],
            contact_sheet(
                a.sweep, a.scores, a.vital, a.sims, prompts=contact_sheet_prompts, columns=contact_sheet_columns
            ),
        )
    else:
        del paths["contact_sheet"]
    # Last: its presence means the other files are from the same run.
    num_single = (a.sweep.manifest or {}).get("num_single")
    if not isinstance(num_single, int):  # a folder of images without manifest.json: the layers it holds
        num_single = max((s.layer + 1 for s in a.scores), default=a.sweep.num_double) - a.sweep.num_double
    write_vital_layers(out, payload, num_single)
    return paths


def print_missing(sweep: Sweep, limit: int = 10) -> None:
    """Say which prompts of a partial sweep lack images (scoring goes on with what is there)."""
    lines = sweep.missing_report()
    if not lines:
        return
    print(
        f"partial sweep: {len(lines)} of {len(sweep.expected_prompts)} prompt(s) incomplete; scoring what "
        f'is there (details in vital_layers.json under "missing")'
    )
    for line in lines[:limit]:
        print(f"  {line}")
    if len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more")


def summary_lines(a: Analysis) -> list[str]:
    """What a person reads after a run: vital set, the most vital layers, how tau relates to the paper's set size."""
    lines = [
        f"scored {sum(s.num_prompts for s in a.scores)} pairs over {len(a.scores)} layer(s)",
        f"vital layers ({rule_text(a.selection)}): {a.vital}",
    ]
    for s in sorted(a.scores, key=lambda s: -s.vitality)[:12]:
        lines.append(
            f"  {s.name:<28} vitality {s.vitality:<10.4g} similarity {s.mean_similarity:.4f} "
            f"[{s.ci_low:.4f}, {s.ci_high:.4f}]  n={s.num_prompts}{'  *' if s.layer in a.vital else ''}"
        )
    if unsure := borderline_layers(a.scores, a.selection):
        lines.append(
            f"borderline: layer(s) {unsure}, whose {a.bootstrap['confidence']:.0%} interval of vitality contains "
            f"tau = {a.selection['tau']:g}: another sample of prompts could move them across it; more prompts "
            f"(num_prompts in demo_2) would settle them"
        )
    if not a.vital:
        lines.append(
            f"WARNING: no layer is vital under {rule_text(a.selection)}; demo_4_edit.py would inject nowhere. "
            f"Lower tau (see vitality.png) or use rule top_k"
        )
    k = 10  # the paper's vital set for FLUX.1-dev has 10 layers
    span = tau_interval_for(a.scores, k)
    if span is not None and len(a.scores) > k:
        lines.append(
            f"tau in ({span[0]:.3f}, {span[1]:.3f}] would select the {k} most vital layers (the size of the "
            f"paper's set)"
        )
    return lines


def write_similarity(
    rows: Sequence[dict], out_dir: str | Path, *, dino_model: str | None, notes: Sequence[str], metric: str = "dinov2"
) -> list[Path]:
    """The plain mode's similarity.csv and similarity.json: one row per compared pair ({name, a, b, similarity})."""
    out = Path(out_dir)
    paths = [out / "similarity.json", out / "similarity.csv"]
    atomic_write_text(
        paths[1],
        "name,a,b,similarity\n" + "".join(f"{r['name']},{r['a']},{r['b']},{r['similarity']!r}\n" for r in rows),
    )
    mean = sum(r["similarity"] for r in rows) / len(rows)
    atomic_write_json(
        paths[0],
        {
            "metric": metric,
            "dino_model": dino_model,
            "mean_similarity": mean,
            "pairs": list(rows),
            "notes": list(notes),
        },
    )
    return paths
