"""The layer-ablation sweep of Stable Flow (demo_2_skip.py): every prompt's reference image and one image per
bypassed layer, batched, resumable after a kill, and split over any number of processes.

Output layout (demo_3_dino.py / stableflow.vitality read exactly this):

    <out>/manifest.json                      what the sweep is: model, layer counts, size, steps, guidance,
                                             prompts [{"id","prompt","seed"}], layers
    <out>/<prompt_id>/ref.png                the prompt's image with no layer bypassed
    <out>/<prompt_id>/layer_XX.png           the same prompt and seed with global layer XX bypassed

Three decisions make resumption and sharding safe:
- A file that exists is complete: every PNG is written to a temp file and renamed (stableflow.io), so a kill leaves at
  most an orphaned temp file, which the next run of the same rank deletes.
- Batches are fixed by the plan alone (prompts, layers, batch_size), never by which files exist; a batch runs
  again if any of its images is missing. So a resumed sweep computes exactly what an uninterrupted one would,
  bit for bit on a deterministic device, and the world size does not change the results either.
- Rank r of W takes batches r, r+W, r+2W, ... of that fixed list: disjoint shares with no communication,
  identical in every process whatever is already on disk.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import BaseConfig
from flux.errors import UserError
from .io import atomic_write_json, save_png
from flux.model import layer_name
from flux.util import model_spec

if TYPE_CHECKING:
    from flux.pipeline import FluxModels, Text

PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MANIFEST = "manifest.json"
# Settings that must match for a folder's images to belong to one sweep (resuming with other settings would mix them).
_SETTINGS = ("model", "num_double", "num_single", "width", "height", "steps", "guidance")


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
            hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, list(by_id), 1)) else
                     repr(u) for u in unknown]
            raise UserError(f"unknown prompt id(s) {', '.join(hints)}: 'prompt_ids' must name ids of the prompt file "
                            f"({', '.join(list(by_id)[:4])}, ...)")
        if len(set(ids)) != len(ids):
            raise UserError(f"'prompt_ids' lists an id twice: {sorted(i for i in set(ids) if list(ids).count(i) > 1)}")
        chosen = [by_id[i] for i in ids]
    if count is not None:
        if count > len(chosen):
            raise UserError(f"'num_prompts' is {count} but only {len(chosen)} prompt(s) are selected: lower it "
                            "or set it to null")
        chosen = chosen[:count]
    if not chosen:
        raise UserError("no prompt selected: 'prompt_ids' is empty or 'num_prompts' is 0")
    return chosen


def resolve_layers(layers: Sequence[int] | None, num_double: int, num_single: int) -> list[int]:
    """The sorted, de-duplicated layers to bypass (None: every layer); out-of-range indices are a UserError."""
    n = num_double + num_single
    if layers is None:
        return list(range(n))
    bad = sorted({layer for layer in layers if not 0 <= layer < n})
    if bad:
        raise UserError(f"layer(s) {bad} out of range: this model has {n} layers, 0..{num_double - 1} double-stream "
                        f"and {num_double}..{n - 1} single-stream; fix 'layers' (or set it to null for all)")
    return sorted(set(layers))


# ------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Item:
    """One image of the sweep: a prompt with one layer bypassed (`layer` None: the reference)."""

    prompt: PromptSpec
    layer: int | None

    @property
    def filename(self) -> str:
        return "ref.png" if self.layer is None else f"layer_{self.layer:02d}.png"

    def path(self, root: str | os.PathLike) -> Path:
        return Path(root) / self.prompt.id / self.filename

    @property
    def skip(self) -> frozenset[int]:
        return frozenset() if self.layer is None else frozenset({self.layer})


Batch = list[Item]


def plan_batches(prompts: Sequence[PromptSpec], layers: Sequence[int], batch_size: int) -> list[Batch]:
    """All items, cut into batches of batch_size: batch_size prompts at a time, one variant at a time (the
    reference first, then the layers in order).

    So a batch bypasses the same layer in every sample and the model skips that block outright, instead of
    computing it for the whole batch and discarding it for one sample (1/57 of the work at batch_size 4), and a
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


def is_pending(batch: Batch, root: str | os.PathLike) -> bool:
    return any(not item.path(root).exists() for item in batch)


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
                raise UserError(f"environment variable {key}={raw!r} is not an integer (set by torchrun; unset it "
                                "for a plain run)") from None
        rank, world = values["RANK"], values["WORLD_SIZE"]
        local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
        if world < 1 or not 0 <= rank < world or local < 0:
            raise UserError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} are inconsistent: need "
                            "0 <= RANK < WORLD_SIZE (launch with torchrun, or unset them)")
        return cls(rank, world, local)


def sweep_device(requested: str, dist: Dist) -> str:
    """Under a multi-process launch, "auto"/"cuda" mean this process's own GPU, cuda:LOCAL_RANK."""
    if dist.world_size > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
        if dist.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {dist.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                            "launch at most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(dist.local_rank)  # so that kernels and caches of this process stay on its own GPU
        return f"cuda:{dist.local_rank}"
    return requested


# ------------------------------------------------------------------------------------------------ manifest


def sweep_manifest(
    model: str, num_double: int, num_single: int, width: int, height: int, steps: int, guidance: float,
    prompts: Sequence[PromptSpec], layers: Sequence[int],
) -> dict:
    return {
        "model": model, "num_double": num_double, "num_single": num_single, "width": width, "height": height,
        "steps": steps, "guidance": guidance,
        "prompts": [{"id": p.id, "prompt": p.prompt, "seed": p.seed} for p in prompts],
        "layers": list(layers),
    }


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
        raise UserError(f"{path} is unreadable or not a sweep manifest ({e.__class__.__name__}: {e}); choose another "
                        "output_dir, or delete the file if that folder holds no sweep") from None
    diffs = [f"{k} {old.get(k)!r} there, {manifest[k]!r} now" for k in _SETTINGS if old.get(k) != manifest[k]]
    for p in manifest["prompts"]:
        o = old_prompts.get(p["id"])
        if o is not None and (o.get("prompt"), o.get("seed")) != (p["prompt"], p["seed"]):
            diffs.append(f"prompt {p['id']!r} has another text or seed there")
    if diffs:
        raise UserError(f"{root} already holds a sweep made with other settings ({'; '.join(diffs[:5])}): its images "
                        "would mix with this run's. Use another output_dir, or restore the settings to resume it")
    merged = dict(manifest)
    merged["prompts"] = list(old["prompts"]) + [p for p in manifest["prompts"] if p["id"] not in old_prompts]
    merged["layers"] = sorted(set(old_layers) | set(manifest["layers"]))
    return merged


def remove_stale_temp_files(batches: Sequence[Batch], root: str | os.PathLike) -> int:
    """Delete the temp files a killed run left for these items (stableflow.io names them `.<name>.<random>.tmp`).

    Only this rank's own items: another rank may be writing its temp files right now.
    """
    removed = 0
    for batch in batches:
        for item in batch:
            folder = item.path(root).parent
            if folder.is_dir():
                for tmp in folder.glob(f".{item.filename}.*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
    return removed


# ------------------------------------------------------------------------------------------------- running


@dataclass
class SweepResult:
    written: list[Path]  # files this process wrote
    skipped: int  # items of this rank that already existed
    total: int  # items in the whole sweep (all ranks)


def run_sweep(
    load: Callable[[str], "FluxModels"],
    model_name: str,
    num_double: int,
    num_single: int,
    prompts: Sequence[PromptSpec],
    layers: Sequence[int],
    width: int,
    height: int,
    steps: int,
    guidance: float,
    batch_size: int,
    output_dir: str | os.PathLike,
    device: str = "auto",
    dist: Dist | None = None,
    progress: bool = True,
) -> SweepResult:
    """Generate this rank's missing images of the sweep. `load(device)` loads the models, only if work remains.

    Inputs must be validated already (load_prompts/select_prompts/resolve_layers); nothing is written before
    the manifest check passes.
    """
    dist = dist or Dist()
    root = Path(output_dir)
    manifest = sweep_manifest(model_name, num_double, num_single, width, height, steps, guidance, prompts, layers)
    merged = merge_manifest(root, manifest)  # every rank checks, so a mismatch stops all of them before any work
    batches = plan_batches(prompts, layers, batch_size)
    mine = shard(batches, dist.rank, dist.world_size)
    total = sum(len(b) for b in batches)
    if dist.rank == 0:
        for tmp in root.glob(f".{MANIFEST}.*.tmp"):
            tmp.unlink(missing_ok=True)
        atomic_write_json(root / MANIFEST, merged)
    remove_stale_temp_files(mine, root)
    pending = [b for b in mine if is_pending(b, root)]
    todo = sum(not item.path(root).exists() for b in pending for item in b)
    skipped = sum(len(b) for b in mine) - todo
    tag = f"[rank {dist.rank}/{dist.world_size}] " if dist.world_size > 1 else ""
    _log(f"{tag}sweep of {total} images ({len(prompts)} prompts x {len(layers) + 1} variants) in {root}: "
         f"{sum(len(b) for b in mine)} are this process's, {skipped} already done, {todo} to make")
    if not pending:
        return SweepResult([], skipped, total)

    models = load(sweep_device(device, dist))
    # Encode every prompt of this rank once, then free the GPU of the text encoders for the whole run.
    needed = list(dict.fromkeys(item.prompt for b in pending for item in b))
    row = {p: i for i, p in enumerate(needed)}
    chunks = [models.encode([p.prompt for p in needed[i : i + 16]]) for i in range(0, len(needed), 16)]
    text = chunks[0] if len(chunks) == 1 else _cat_text(chunks)
    models.release_text_encoders()
    timesteps = models.schedule(steps, width, height)
    noise_cache: dict[int, torch.Tensor] = {}

    def noise_of(p: PromptSpec) -> torch.Tensor:
        if p.seed not in noise_cache:
            noise_cache[p.seed] = models.noise([p.seed], width, height)
        return noise_cache[p.seed]

    written: list[Path] = []
    start = time.perf_counter()
    bar = _progress(todo, f"{tag}sweep", enabled=progress and dist.local_rank == 0)
    # PNG encoding (~0.2 s per 1024^2 image) runs in threads while the GPU denoises the next batch; waiting for
    # the previous batch's files before decoding the next keeps a kill's loss to the batches in flight.
    try:
        with models.on_device(models.model, models.ae), ThreadPoolExecutor(4, thread_name_prefix="png") as pool:
            writing: list[Future] = []
            for batch in pending:
                latent = models.denoise(
                    text.select([row[item.prompt] for item in batch]),
                    torch.cat([noise_of(item.prompt) for item in batch]),
                    timesteps,
                    guidance,
                    skip=[item.skip for item in batch],
                )
                written += [f.result() for f in writing]
                writing = []
                for i, item in enumerate(batch):
                    path = item.path(root)
                    if path.exists():  # made by the killed run before it died mid-batch: identical by construction
                        continue
                    # Decoded one at a time: the AE at 1024^2 needs several GB per image.
                    image = models.decode(latent[i : i + 1])[0].cpu()
                    meta = _metadata(item, model_name, num_double, width, height, steps, guidance)
                    writing.append(pool.submit(_write, path, image, meta, bar))
            written += [f.result() for f in writing]
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    _log(f"{tag}done: wrote {len(written)} images on {models.device} in {seconds:.1f} s "
         f"({seconds / max(1, len(written)):.2f} s/image)")
    return SweepResult(written, skipped, total)


# ---------------------------------------------------------------------------------------------- the demo

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SkipConfig(BaseConfig):
    prompts_file: str = field(default="prompts/prompt.json", metadata={
        "help": 'JSON list of {"id", "prompt", "seed"}; a relative path is looked up in the current folder, '
                "then in the repository"})
    prompt_ids: list[str] | None = field(default=None, metadata={
        "help": "ids of the prompts to run, in this order (null: every prompt of the file)"})
    num_prompts: int | None = field(default=None, metadata={
        "help": "only the first N selected prompts (null: all)", "min": 1})
    layers: list[int] | None = field(default=None, metadata={
        "help": "global layer indices to bypass one at a time, double blocks first (null: every layer, "
                "0..56 for dev/schnell)", "min": 0})
    width: int = field(default=1024, metadata={"help": "image width", "min": 16, "max": 4096, "multiple_of": 16})
    height: int = field(default=1024, metadata={"help": "image height", "min": 16, "max": 4096, "multiple_of": 16})
    steps: int = field(default=15, metadata={"help": "denoising steps (Stable Flow: 15)", "min": 1, "max": 1000})
    guidance: float = field(default=3.5, metadata={"help": "distilled guidance (ignored by schnell)", "min": 0,
                                                   "max": 100})
    batch_size: int = field(default=4, metadata={
        "help": "images denoised together (one variant of batch_size prompts); more is faster until memory "
                "runs out. Changing it between a run and its resumption changes results only at float precision",
        "min": 1, "max": 256})
    progress: bool = field(default=True, metadata={"help": "progress bar with ETA (first process of each node)"})
    output_dir: str = field(default="outputs/demo_2_skip", metadata={
        "help": "sweep folder; a rerun resumes it (with the same settings)"})

    def prompts_path(self) -> Path:
        path = Path(self.prompts_file).expanduser()
        if not path.is_absolute() and not path.exists() and (REPO / path).exists():
            return REPO / path
        return path

    def selection(self) -> tuple[list[PromptSpec], list[int]]:
        """The validated prompts and layers of the sweep (UserError naming the fix)."""
        p = model_spec(self.model).params
        layers = resolve_layers(self.layers, p.depth, p.depth_single_blocks)
        return select_prompts(load_prompts(self.prompts_path()), self.prompt_ids, self.num_prompts), layers

    def check(self) -> list[str]:
        problems = super().check()
        if self.fp8:
            problems.append("'fp8' is off limits for the ablation sweep: its rounding would confound the layer "
                            "measurements (use compile or stream_blocks for speed or memory)")
        p = model_spec(self.model).params
        for rule in (lambda: resolve_layers(self.layers, p.depth, p.depth_single_blocks),
                     lambda: select_prompts(load_prompts(self.prompts_path()), self.prompt_ids, self.num_prompts)):
            try:
                rule()
            except UserError as e:
                problems.append(str(e))
        return problems


def run(cfg: SkipConfig) -> SweepResult:
    """demo_2_skip.py: this process's share of the sweep that `cfg` describes."""
    from .config import load_models_for

    p = model_spec(cfg.model).params
    prompts, layers = cfg.selection()
    return run_sweep(
        lambda device: load_models_for(replace(cfg, device=device)), cfg.model, p.depth, p.depth_single_blocks,
        prompts, layers, cfg.width, cfg.height, cfg.steps, cfg.guidance, cfg.batch_size, cfg.output_dir,
        device=cfg.device, dist=Dist.from_env(), progress=cfg.progress,
    )


def _write(path: Path, image: torch.Tensor, meta: dict, bar) -> Path:
    save_png(path, image, meta)
    bar.update(1)
    return path


def _metadata(item: Item, model: str, num_double: int, width: int, height: int, steps: int, guidance: float) -> dict:
    return {
        "prompt": item.prompt.prompt, "prompt_id": item.prompt.id, "seed": item.prompt.seed,
        "layer": "ref" if item.layer is None else item.layer,
        "layer_name": "reference (no layer bypassed)" if item.layer is None else layer_name(item.layer, num_double),
        "model": model, "width": width, "height": height, "steps": steps, "guidance": guidance,
    }


def _cat_text(chunks: Sequence[Text]) -> Text:
    from flux.pipeline import Text

    # Different chunks may be padded to the same T5 length (max_length padding), so rows concatenate.
    return Text(*(torch.cat([getattr(c, f) for c in chunks]) for f in ("txt", "txt_ids", "vec")))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.1)

