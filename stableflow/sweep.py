"""The layer-ablation sweep of Stable Flow: every prompt's reference image and one image per bypassed layer.

This module owns the sweep: its plan (`SweepPlan`, batches, the split over processes) and its output folder, written
here by demo_2_skip.py and read back here (`scan_sweep`) by demo_3_dino.py:

    <out>/manifest.json                      what the sweep is: the run's settings (stableflow.runs: model, weights,
                                             dtype, size, steps, guidance), layer counts, prompts
                                             [{"id","prompt","seed"}], layers
    <out>/<prompt_id>/ref.png                the prompt's image with no layer bypassed
    <out>/<prompt_id>/layer_XX.png           the same prompt and seed with global layer XX bypassed

Three decisions make resumption and sharding safe:
- An image counts as done only if it decodes whole and records the sweep's settings (stableflow.runs): every PNG is
  written to a temp file and renamed, so a kill leaves at most an orphaned temp file, which the next run of the same
  rank deletes, and a file damaged later is made again.
- Batches are fixed by the plan alone (prompts, layers, batch_size), never by which files exist; a batch runs
  again if any of its images is missing or damaged. So a resumed sweep computes exactly what an uninterrupted one would,
  bit for bit on a deterministic device, and the world size does not change the results either.
- Rank r of W takes batches r, r+W, r+2W, ... of that fixed list: disjoint shares with no communication,
  identical in every process whatever is already on disk.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError

from flux.errors import UserError
from flux.model import check_layers, layer_name
from flux.util import model_spec

from . import runs
from .config import SamplingConfig
from .io import IMAGE_SUFFIXES, atomic_write_json, examples, temp_files
from .io import load_image as _read_image

if TYPE_CHECKING:
    from flux.pipeline import FluxModels, Text

PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MANIFEST = "manifest.json"
REF_FILE = "ref.png"
_LAYER_FILE = re.compile(r"^layer_(\d+)$")  # the stem of an ablated image; any image suffix is read back
FEATURES_DIR = "dino_features"  # the default home of demo_3's feature cache inside a sweep folder: not a prompt
# A sweep folder without manifest.json is read as FLUX.1's (dev and schnell share 19 double + 38 single blocks).
FALLBACK_MODEL = "flux-dev"


def layer_file(layer: int | None) -> str:
    """The file name of a prompt's image with `layer` bypassed (None: the reference)."""
    return REF_FILE if layer is None else f"layer_{layer:02d}.png"


# --------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of the sweep; `id` names its output folder."""

    id: str
    prompt: str
    seed: int


def load_prompts(path: str | os.PathLike) -> list[PromptSpec]:
    """Read a prompt file: a JSON list of {"id": str, "prompt": str, "seed": int}, ids unique and folder-safe.

    Every problem is reported at once as one UserError.
    """
    path = Path(path)
    fix = 'it must hold a JSON list like [{"id": "p00_fox", "prompt": "a red fox in snow", "seed": 0}, ...]'
    if path.is_dir():
        raise UserError(f"prompt file {path} is a folder: give the path of a JSON file ({fix})")
    if not path.exists():
        raise UserError(f"prompt file {path} does not exist: fix 'prompts_file' in the config ({fix})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text: {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"prompt file {path} is broken JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"prompt file {path} holds {'an empty list' if data == [] else type(data).__name__}: {fix}")
    problems, prompts, seen = [], [], set()
    for i, entry in enumerate(data):
        where, before = f"entry {i}", len(problems)
        if not isinstance(entry, dict):
            problems.append(f"{where} is a {type(entry).__name__}, not an object")
            continue
        if extra := sorted(set(entry) - {"id", "prompt", "seed"}):
            problems.append(f"{where} has unknown key(s) {extra} (allowed: id, prompt, seed)")
        pid, prompt, seed = entry.get("id"), entry.get("prompt"), entry.get("seed")
        if not isinstance(pid, str) or not PROMPT_ID.fullmatch(pid):
            problems.append(f"{where}: 'id' must be a folder-safe string (letters, digits, _ . -), got {pid!r}")
        elif pid in seen:
            problems.append(f"{where}: id {pid!r} appears twice; ids name output folders and must be unique")
        else:
            where = f"entry {i} ({pid})"
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            problems.append(f"{where}: 'seed' must be an integer >= 0, got {seed!r}")
        if isinstance(pid, str):
            seen.add(pid)
        if len(problems) == before:
            prompts.append(PromptSpec(pid, prompt, seed))
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise UserError(f"prompt file {path} has {len(problems)} problem(s) ({fix}):\n  " + "\n  ".join(shown))
    return prompts


def select_prompts(
    prompts: Sequence[PromptSpec], ids: Sequence[str] | None = None, count: int | None = None
) -> list[PromptSpec]:
    """The prompts named by `ids` (in that order; None: all, in file order), then the first `count` of them."""
    chosen = list(prompts)
    if ids is not None:
        by_id = {p.id: p for p in prompts}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            hints = [
                f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, list(by_id), 1)) else repr(u)
                for u in unknown
            ]
            raise UserError(
                f"unknown prompt id(s) {', '.join(hints)}: 'prompt_ids' must name ids of the prompt file "
                f"({', '.join(list(by_id)[:4])}, ...)"
            )
        if len(set(ids)) != len(ids):
            raise UserError(f"'prompt_ids' lists an id twice: {sorted(i for i in set(ids) if list(ids).count(i) > 1)}")
        chosen = [by_id[i] for i in ids]
    if count is not None:
        if count > len(chosen):
            raise UserError(
                f"'num_prompts' is {count} but only {len(chosen)} prompt(s) are selected: lower it or set it to null"
            )
        chosen = chosen[:count]
    if not chosen:
        raise UserError("no prompt selected: 'prompt_ids' is empty or 'num_prompts' is 0")
    return chosen


def resolve_layers(layers: Sequence[int] | None, num_double: int, num_single: int) -> list[int]:
    """The sorted, de-duplicated layers to bypass (None: every layer); out-of-range indices are a UserError."""
    n = num_double + num_single
    if layers is None:
        return list(range(n))
    try:
        check_layers(layers, n, "'layers'")
    except ValueError as e:
        raise UserError(f"{e}; fix 'layers' (or set it to null for all)") from None
    return sorted(set(layers))


# ------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Item:
    """One image of the sweep: a prompt with one layer bypassed (`layer` None: the reference)."""

    prompt: PromptSpec
    layer: int | None

    @property
    def filename(self) -> str:
        return layer_file(self.layer)

    def path(self, root: str | os.PathLike) -> Path:
        return Path(root) / self.prompt.id / self.filename

    @property
    def skip(self) -> frozenset[int]:
        return frozenset() if self.layer is None else frozenset({self.layer})


Batch = list[Item]


@dataclass(frozen=True)
class SweepPlan:
    """Everything that decides a sweep's images and where they go; validated once (`SkipConfig.plan`)."""

    model: str
    num_double: int
    num_single: int
    dtype: str  # bf16 | fp16 | fp32: part of what an image is, so a resumed sweep must keep it
    prompts: tuple[PromptSpec, ...]
    layers: tuple[int, ...]
    width: int
    height: int
    steps: int
    guidance: float
    batch_size: int
    output_dir: Path
    weights: dict[str, str] | None = None  # stableflow.runs.weights of the config (None: not recorded)

    def __post_init__(self):  # lists and str paths are welcome; stored as tuples and a Path (the plan is a value)
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "output_dir", Path(self.output_dir))

    @property
    def total(self) -> int:
        """Images in the whole sweep (all ranks): every prompt's reference and one per layer."""
        return len(self.prompts) * (len(self.layers) + 1)

    def batches(self) -> list[Batch]:
        return plan_batches(self.prompts, self.layers, self.batch_size)

    @property
    def settings(self) -> dict:
        """What decides every image of the sweep (stableflow.runs.settings)."""
        return runs.settings(self.model, self.weights, self.dtype, self.width, self.height, self.steps, self.guidance)

    def manifest(self) -> dict:
        return self.settings | {
            "num_double": self.num_double,
            "num_single": self.num_single,
            "prompts": [{"id": p.id, "prompt": p.prompt, "seed": p.seed} for p in self.prompts],
            "layers": list(self.layers),
        }

    def output(self, item: Item) -> runs.Output:
        """One image and its record: enough to regenerate it alone."""
        name = "reference (no layer bypassed)" if item.layer is None else layer_name(item.layer, self.num_double)
        own = {"prompt": item.prompt.prompt, "prompt_id": item.prompt.id, "seed": item.prompt.seed}
        own |= {"layer": "ref" if item.layer is None else item.layer, "layer_name": name}
        return runs.Output(f"{item.prompt.id}/{item.filename}", own | self.settings)


def plan_batches(prompts: Sequence[PromptSpec], layers: Sequence[int], batch_size: int) -> list[Batch]:
    """All items, cut into batches of batch_size: batch_size prompts at a time, one variant at a time (the
    reference first, then the layers in order).

    So a batch bypasses the same layer in every sample and the model skips that block outright, instead of
    computing it for the whole batch and discarding it for one sample (one block of one sample per batch), and a
    group of prompts is complete before the next starts. The last group may hold fewer prompts than batch_size;
    its batches then mix variants (samples carry their own text, noise and skip set).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    items = [Item(p, layer) for group in groups for layer in [None, *layers] for p in group]
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def shard(batches: Sequence[Batch], rank: int, world_size: int) -> list[Batch]:
    """Rank `rank`'s batches: every world_size-th one. Disjoint across ranks, and their union is all batches."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(batches[rank::world_size])


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK); a plain run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Dist:
        env = os.environ if env is None else env
        values = {}
        for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
            raw = env.get(key)
            try:
                values[key] = default if raw is None or raw == "" else int(raw)
            except ValueError:
                raise UserError(
                    f"environment variable {key}={raw!r} is not an integer (set by torchrun; unset it for a plain run)"
                ) from None
        rank, world = values["RANK"], values["WORLD_SIZE"]
        local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
        if world < 1 or not 0 <= rank < world or local < 0:
            raise UserError(
                f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} are inconsistent: need "
                "0 <= RANK < WORLD_SIZE (launch with torchrun, or unset them)"
            )
        return cls(rank, world, local)

    @property
    def tag(self) -> str:
        """A log prefix naming the rank when there are several."""
        return f"[rank {self.rank}/{self.world_size}] " if self.world_size > 1 else ""


def sweep_device(requested: str, dist: Dist) -> str:
    """Under a multi-process launch, "auto"/"cuda" mean this process's own GPU, cuda:LOCAL_RANK."""
    if dist.world_size > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
        if dist.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {dist.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                "launch at most that many processes per node (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(dist.local_rank)  # so that kernels and caches of this process stay on its own GPU
        return f"cuda:{dist.local_rank}"
    return requested


# ------------------------------------------------------------------------------------- the folder: writing


def merge_manifest(root: str | os.PathLike, manifest: dict) -> dict:
    """`manifest` merged with the one already in `root` (a sweep extended by more prompts or layers).

    Raises UserError when the folder holds a sweep made with other settings, or a prompt id whose prompt or seed
    changed: its images would silently mix with the new ones.
    """
    path = Path(root) / MANIFEST
    if not path.exists():
        return manifest
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_prompts = {p["id"]: p for p in old["prompts"]}
        old_layers = [int(x) for x in old["layers"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is unreadable or not a sweep manifest ({e.__class__.__name__}: {e}); choose another "
            "output_dir, or delete the file if that folder holds no sweep"
        ) from None
    expected = {k: v for k, v in manifest.items() if k not in ("prompts", "layers")}
    diffs = runs.changes(old, expected)
    for p in manifest["prompts"]:
        o = old_prompts.get(p["id"])
        if o is not None and (o.get("prompt"), o.get("seed")) != (p["prompt"], p["seed"]):
            diffs.append(f"prompt {p['id']!r} has another text or seed there")
    if diffs:
        raise UserError(
            f"{root} already holds a sweep made with other settings ({'; '.join(diffs[:5])}): its images "
            "would mix with this run's. Choose another output_dir, or restore the settings to resume it"
        )
    merged = dict(manifest)
    merged["prompts"] = list(old["prompts"]) + [p for p in manifest["prompts"] if p["id"] not in old_prompts]
    merged["layers"] = sorted(set(old_layers) | set(manifest["layers"]))
    return merged


def remove_stale_temp_files(batches: Sequence[Batch], root: str | os.PathLike) -> int:
    """Delete the temp files a killed run left for these items (`stableflow.io.temp_files`).

    Only this rank's own items: another rank may be writing its temp files right now.
    """
    removed = 0
    for batch in batches:
        for item in batch:
            folder = item.path(root).parent
            if folder.is_dir():
                for tmp in temp_files(folder, item.filename):
                    tmp.unlink(missing_ok=True)
                    removed += 1
    return removed


@dataclass
class Work:
    """This rank's share of a sweep as the folder stands: the batches still to run and how much is done."""

    mine: list[Batch]  # this rank's batches, done or not
    pending: list[Batch]  # those with an image to make, in plan order
    todo: set[Item]  # images this rank still has to make (missing or damaged)
    done: int  # images of this rank that are there and decode
    repaired: int = 0  # of `todo`, images that were there but damaged

    def prompts(self) -> list[PromptSpec]:
        """The prompts the pending batches need, each once, in order of first use."""
        return list(dict.fromkeys(item.prompt for batch in self.pending for item in batch))


def claim(plan: SweepPlan, dist: Dist) -> Work:
    """Make `plan.output_dir` this sweep's folder and find this rank's remaining work.

    Every rank checks the manifest, so other settings stop all of them before any work; rank 0 writes the merged
    one. Each of this rank's images counts as done only if it decodes whole and records these settings (another
    record: UserError). Temp files a killed run left for this rank's items are deleted.
    """
    root = plan.output_dir
    merged = merge_manifest(root, plan.manifest())
    mine = shard(plan.batches(), dist.rank, dist.world_size)
    items = {plan.output(item).name: item for batch in mine for item in batch}
    state = runs.Run(root, [plan.output(item) for item in items.values()], plan.settings)
    if dist.rank == 0:
        for tmp in temp_files(root, MANIFEST):
            tmp.unlink(missing_ok=True)
        atomic_write_json(root / MANIFEST, merged)
    remove_stale_temp_files(mine, root)
    todo = {items[name] for name in state.todo_names}
    pending = [b for b in mine if any(item in todo for item in b)]
    return Work(mine, pending, todo, len(state.done), state.repaired)


def encode_prompts(models: FluxModels, prompts: Sequence[PromptSpec], chunk: int = 16) -> tuple[Text, dict]:
    """Every prompt encoded once, then the text encoders leave the GPU for the whole run. Returns the encodings
    and each prompt's row in them (for `Text.select`). Chunks of `chunk` prompts bound T5's activation memory."""
    from flux.pipeline import Text

    parts = [models.encode([p.prompt for p in prompts[i : i + chunk]]) for i in range(0, len(prompts), chunk)]
    # Every chunk is padded to T5's max_length, so the rows concatenate.
    text = (
        parts[0]
        if len(parts) == 1
        else Text(*(torch.cat([getattr(t, f) for t in parts]) for f in ("txt", "txt_ids", "vec")), parts[0].negative)
    )
    models.release_text_encoders()
    return text, {p: i for i, p in enumerate(prompts)}


@dataclass
class SweepResult:
    written: list[Path]  # files this process wrote
    skipped: int  # items of this rank that already existed
    total: int  # items in the whole sweep (all ranks)
    seconds: float = 0.0  # denoising and writing, after the models were loaded
    repaired: int = 0  # of `written`, images that were there but damaged


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over `total` images with rate and ETA (smoothed: the first batch includes warm-up)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.1)


# ------------------------------------------------------------------------------------- the folder: reading


def load_sweep_image(path: str | Path) -> Image.Image:
    """Fully decode a sweep image as RGB; a corrupt or vanished file is a UserError naming it."""
    return _read_image(
        path, fix="delete or regenerate it (demo_2_skip.py regenerates missing images when restarted) and run again"
    )


def _ranges(xs: Iterable[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8' (missing-layer reports stay one line)."""
    xs, out = sorted(xs), []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


@dataclass
class Sweep:
    """What a demo_2_skip.py output folder holds, and what it should hold."""

    root: Path
    manifest: dict | None
    num_double: int
    refs: dict[str, Path] = field(default_factory=dict)  # prompt id -> ref image
    ablations: dict[str, dict[int, Path]] = field(default_factory=dict)  # prompt id -> layer -> image
    expected_prompts: list[str] = field(default_factory=list)
    expected_layers: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # skipped files and other things a person should know

    def pairs(self) -> list[tuple[str, int, Path, Path]]:
        """(prompt, layer, reference, ablated) for every ablated image whose reference exists."""
        return [
            (pid, layer, self.refs[pid], path)
            for pid in sorted(self.ablations)
            if pid in self.refs
            for layer, path in sorted(self.ablations[pid].items())
        ]

    def require_pairs(self) -> None:
        if not self.pairs():
            raise UserError(
                f'no (ref.png, layer_XX.png) pairs in {self.root}; run demo_2_skip.py into it first or fix "sweep_dir"'
            )

    def missing(self) -> dict[str, dict]:
        """prompt id -> {"ref": missing?, "layers": [missing layer indices]} for every incomplete prompt."""
        out = {}
        for pid in self.expected_prompts:
            lacking = [l for l in self.expected_layers if l not in self.ablations.get(pid, {})]
            if pid not in self.refs or lacking:
                out[pid] = {"ref": pid not in self.refs, "layers": lacking}
        return out

    def missing_report(self) -> list[str]:
        """Human-readable lines: which prompts lack their reference or which layers."""
        lines = []
        for pid, m in self.missing().items():
            what = (["ref.png"] if m["ref"] else []) + ([f"layers {_ranges(m['layers'])}"] if m["layers"] else [])
            lines.append(f"{pid}: missing {' and '.join(what)}")
        return lines


def read_manifest(root: Path) -> dict | None:
    """The manifest a sweep folder holds (None: none, e.g. a folder of images made by hand)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} is not valid JSON ({e}); fix or delete it (layers are then read from file names)"
        ) from e
    if not isinstance(manifest, dict):
        raise UserError(f"{path} should hold a JSON object, not {type(manifest).__name__}")
    return manifest


def scan_sweep(root: str | Path, num_double: int | None = None, exclude: Iterable[Path] = ()) -> Sweep:
    """Index a sweep folder `<root>/<prompt_id>/{ref,layer_XX}.png` (+ manifest.json), tolerating a partial sweep.

    `num_double` overrides the manifest (an error if they disagree); without either it is FLUX.1's.
    Subfolders in `exclude` (e.g. the output folder) and the feature cache are not prompts.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f'sweep folder {root} does not exist or is not a folder; run demo_2_skip.py first or fix "sweep_dir"'
        )
    manifest = read_manifest(root)
    m_double = manifest.get("num_double") if manifest else None
    if num_double is not None and m_double is not None and num_double != m_double:
        raise UserError(
            f"num_double is {num_double} in the config but {m_double} in {root / MANIFEST}; "
            f"remove num_double from the config (the manifest knows the model)"
        )
    nd = (
        num_double
        if num_double is not None
        else (m_double if isinstance(m_double, int) else model_spec(FALLBACK_MODEL).params.depth)
    )
    total = nd + manifest["num_single"] if manifest and isinstance(manifest.get("num_single"), int) else None
    sweep = Sweep(root=root, manifest=manifest, num_double=nd)

    skip_dirs = {FEATURES_DIR} | {Path(p).resolve() for p in exclude}
    skipped, ignored, out_of_range = [], [], []
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            if d.name != MANIFEST and not d.name.startswith("."):
                skipped.append(d.name)
            continue
        if d.name in skip_dirs or d.resolve() in skip_dirs or d.name.startswith("."):
            continue
        layers: dict[int, Path] = {}
        for f in sorted(d.iterdir()):
            rel = f"{d.name}/{f.name}"
            if f.name.startswith("."):  # temporary files of atomic writers
                continue
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(rel)
            elif f.stem == Path(REF_FILE).stem:
                sweep.refs[d.name] = f
            elif (m := _LAYER_FILE.match(f.stem)) is not None:
                layer = int(m.group(1))
                if total is not None and layer >= total:
                    out_of_range.append(rel)
                else:
                    layers[layer] = f
            else:
                ignored.append(rel)
        if layers:
            sweep.ablations[d.name] = layers

    if skipped:
        sweep.notes.append(f"skipped {len(skipped)} non-image file(s): {examples(skipped)}")
    if ignored:
        sweep.notes.append(f"ignored {len(ignored)} image(s) not named ref.* or layer_XX.*: {examples(ignored)}")
    if out_of_range:
        sweep.notes.append(
            f"ignored {len(out_of_range)} image(s) with a layer index >= {total} (the model's "
            f"layer count per manifest.json): {examples(out_of_range)}"
        )

    seen_prompts = sorted(set(sweep.refs) | set(sweep.ablations))
    seen_layers = sorted({l for ls in sweep.ablations.values() for l in ls})
    if manifest and isinstance(manifest.get("prompts"), list):
        sweep.expected_prompts = [str(p["id"]) for p in manifest["prompts"] if isinstance(p, dict) and "id" in p]
        extra = [p for p in seen_prompts if p not in sweep.expected_prompts]
        if extra:
            sweep.notes.append(f"{len(extra)} prompt folder(s) not in manifest.json are scored too: {examples(extra)}")
            sweep.expected_prompts += extra
    else:
        sweep.expected_prompts = seen_prompts
    if manifest and isinstance(manifest.get("layers"), list):
        sweep.expected_layers = sorted({int(l) for l in manifest["layers"]} | set(seen_layers))
    else:
        sweep.expected_layers = seen_layers
    orphans = sorted(p for p in sweep.ablations if p not in sweep.refs)
    if orphans:
        sweep.notes.append(
            f"{len(orphans)} prompt(s) have ablated images but no ref.png and are not scored: {examples(orphans)}"
        )
    sweep.notes += size_report(sweep)
    return sweep


def size_report(sweep: Sweep) -> list[str]:
    """Notes about ablated images whose size differs from their reference's (comparable after preprocessing, which
    resizes and crops every image, but a sign that the sweep mixes settings)."""

    def size(p: Path) -> tuple[int, int]:
        try:
            with Image.open(p) as im:
                return im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return load_sweep_image(p).size  # raises the UserError that names the file

    ref_sizes = {pid: size(p) for pid, p in sweep.refs.items()}
    odd = []
    for pid, _, _, path in sweep.pairs():
        if (s := size(path)) != ref_sizes[pid]:
            odd.append(f"{pid}/{path.name} {s[0]}x{s[1]} vs ref {ref_sizes[pid][0]}x{ref_sizes[pid][1]}")
    notes = []
    if len(set(ref_sizes.values())) > 1:
        notes.append(
            f"reference images come in {len(set(ref_sizes.values()))} sizes: {sorted(set(ref_sizes.values()))}"
        )
    if odd:
        notes.append(
            f"{len(odd)} ablated image(s) differ in size from their reference (scored anyway: preprocessing "
            f"resizes to 256 and crops 224, but check the sweep settings): {examples(odd)}"
        )
    return notes


# ---------------------------------------------------------------------------------------------- the demo's config

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SkipConfig(SamplingConfig):
    DEFAULT_STEPS = 15  # Stable Flow's

    prompts_file: str = field(
        default="prompts/prompt.json",
        metadata={
            "help": 'JSON list of {"id", "prompt", "seed"}; a relative path is looked up in the current folder, '
            "then in the repository"
        },
    )
    prompt_ids: list[str] | None = field(
        default=None, metadata={"help": "ids of the prompts to run, in this order (null: every prompt of the file)"}
    )
    num_prompts: int | None = field(
        default=None, metadata={"help": "only the first N selected prompts (null: all)", "min": 1}
    )
    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "global layer indices to bypass one at a time, double blocks first (null: every layer, "
            "0..56 for dev/schnell)",
            "min": 0,
        },
    )
    batch_size: int = field(
        default=4,
        metadata={
            "help": "images denoised together (one variant of batch_size prompts); more is faster until memory "
            "runs out. Changing it between a run and its resumption changes results only at float precision",
            "min": 1,
            "max": 256,
        },
    )
    progress: bool = field(default=True, metadata={"help": "progress bar with ETA (first process of each node)"})
    output_dir: str = field(
        default="outputs/demo_2_skip", metadata={"help": "sweep folder; a rerun resumes it (with the same settings)"}
    )
    # The plan, once `check` has built it: the prompt file is read once per run.
    _plan: SweepPlan | None = field(default=None, init=False, repr=False, compare=False)

    def prompts_path(self) -> Path:
        path = Path(self.prompts_file).expanduser()
        if not path.is_absolute() and not path.exists() and (REPO / path).exists():
            return REPO / path
        return path

    def _build_plan(self) -> tuple[SweepPlan | None, list[str]]:
        """The plan, or None and every problem of the layers and the prompt selection."""
        p = model_spec(self.model).params
        problems, layers, prompts = [], None, None
        try:
            layers = resolve_layers(self.layers, p.depth, p.depth_single_blocks)
        except UserError as e:
            problems.append(str(e))
        try:
            prompts = select_prompts(load_prompts(self.prompts_path()), self.prompt_ids, self.num_prompts)
        except UserError as e:
            problems.append(str(e))
        if problems:
            return None, problems
        return SweepPlan(
            self.model,
            p.depth,
            p.depth_single_blocks,
            self.dtype,
            tuple(prompts),
            tuple(layers),
            *self.image_size,
            self.num_steps,
            self.guidance_value,
            self.batch_size,
            Path(self.output_dir),
        ), []

    def plan(self) -> SweepPlan:
        """The validated sweep this config describes (UserError naming the fix)."""
        if self._plan is None:
            plan, problems = self._build_plan()
            if problems:
                raise UserError("\n".join(problems))
            self._plan = plan
        if self._plan.weights is None:  # read here, not in check(): a missing weights path is check()'s to report
            self._plan = replace(self._plan, weights=runs.weights(self))
        return self._plan

    def check(self) -> list[str]:
        problems = super().check()
        if self.fp8:
            problems.append(
                "'fp8' is off limits for the ablation sweep: its rounding would confound the layer "
                "measurements (use compile or stream_blocks for speed or memory)"
            )
        self._plan, more = self._build_plan()
        return problems + more
