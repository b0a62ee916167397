"""Vital-layer identification (Stable Flow, Sec. 3.1): DINOv2 similarity between every layer-bypassed image and
its reference, per-layer statistics over prompts, the vital set, and the files demo_4_edit.py and people read.

Similarity is the cosine of DINOv2 CLS embeddings (`pooler_output`, the CLS token after the final LayerNorm).
Preprocessing is the one shipped with the hub's DINOv2 repos, written out here (see HUB_PREPROCESS) rather than taken
from a default-constructed `BitImageProcessor`, whose defaults (224, CLIP mean/std) silently differ.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from flux.pipeline import resolve_device
from stableflow.config import output_dir_problems
from flux.errors import UserError
from stableflow.io import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text, make_grid, save_png
from stableflow.io import IMAGE_SUFFIXES
from stableflow.io import load_image as read_image
from flux.model import layer_name  # noqa: F401  (re-exported: one naming of layers)

DEFAULT_DINO = "facebook/dinov2-base"
TINY_RANDOM = "tiny-random"  # a seeded random 2-layer Dinov2 for tests and CPU smoke runs; its scores mean nothing
DEFAULT_TAU = 0.2
DEFAULT_NUM_DOUBLE = 19  # FLUX.1 dev/schnell: 19 double-stream blocks, then 38 single-stream ones
FEATURES_DIR = "dino_features"
_LAYER_FILE = re.compile(r"^layer_(\d+)$")


# ----------------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """DINOv2 input preprocessing; the defaults are the hub's preprocessor_config.json for facebook/dinov2-*."""

    shortest_edge: int = 256
    resample: int = Image.Resampling.BICUBIC  # == 3 in preprocessor_config.json
    crop_size: int = 224
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


HUB_PREPROCESS = Preprocess()


def load_image(path: str | Path) -> Image.Image:
    """Fully decode a sweep image as RGB; a corrupt or vanished file is a UserError naming it."""
    return read_image(path, fix="delete or regenerate it (demo_2_skip.py regenerates missing images when "
                                   "restarted) and run again")


def preprocess(images: Sequence[Image.Image], pp: Preprocess = HUB_PREPROCESS) -> torch.Tensor:
    """RGB images of any size -> normalised float32 batch [N, 3, crop, crop]."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        # Shortest edge to `shortest_edge`, the long edge truncated like transformers' get_resize_output_image_size.
        if w <= h:
            size = (pp.shortest_edge, int(pp.shortest_edge * h / w))
        else:
            size = (int(pp.shortest_edge * w / h), pp.shortest_edge)
        im = im.resize(size, resample=pp.resample)
        left, top = (size[0] - pp.crop_size) // 2, (size[1] - pp.crop_size) // 2
        im = im.crop((left, top, left + pp.crop_size, top + pp.crop_size))
        x = np.asarray(im, dtype=np.float32) * pp.rescale_factor
        x = (x - np.asarray(pp.image_mean, np.float32)) / np.asarray(pp.image_std, np.float32)
        out.append(torch.from_numpy(x.transpose(2, 0, 1).copy()))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------- model


def tiny_dino(seed: int = 0):
    """A 2-layer, width-32 random Dinov2 (same patch size and input size as the real ones). For tests only."""
    from transformers import Dinov2Config, Dinov2Model

    # initializer_range 0.2 (not 0.02): with tiny weights every CLS embedding is nearly the same vector.
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=224,
                          initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(config).eval()


def load_dino(name: str = DEFAULT_DINO, device: str | torch.device = "cpu"):
    """`Dinov2Model` from a hub repo id or a local folder (or TINY_RANDOM), in eval mode on `device`."""
    if name == TINY_RANDOM:
        return tiny_dino().to(device)
    from transformers import AutoConfig, Dinov2Model

    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise UserError(f"dino_model {name!r} is a local path without a config.json; point it at a saved DINOv2 "
                        f"model folder (save_pretrained) or use a hub id such as {DEFAULT_DINO!r}")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the DINOv2 config of {name!r}: {e}\nUse a hub id such as {DEFAULT_DINO!r} "
                        f"(downloaded once, needs internet) or a local folder with config.json and weights.") from e
    if config.model_type != "dinov2":
        raise UserError(f"dino_model {name!r} is a {config.model_type!r} model, not DINOv2; use one of "
                        f"facebook/dinov2-small|base|large|giant or a local copy")
    try:
        model = Dinov2Model.from_pretrained(name, config=config)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the DINOv2 weights of {name!r}: {e}") from e
    return model.float().eval().to(device)  # fp32 whatever the checkpoint: similarities near 1 need the digits


def model_slug(name: str) -> str:
    """A file-name-safe key for a DINOv2 model; part of the feature cache's file name."""
    if name == TINY_RANDOM:
        return "tiny-random-seed0"
    p = Path(name)
    if p.exists():  # local folder: its resolved path, so two folders called "dinov2" don't share a cache
        name = str(p.resolve()).strip("/")
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name)


class DinoEmbedder:
    """CLS embeddings of images, in batches; images are decoded and preprocessed on a few threads."""

    def __init__(self, model, device: str | torch.device = "cpu", batch_size: int = 32, num_workers: int = 4,
                 preprocessing: Preprocess = HUB_PREPROCESS):
        self.model, self.device = model, torch.device(device)
        self.batch_size, self.num_workers, self.preprocessing = batch_size, num_workers, preprocessing

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch -> [N, hidden] float32 CLS embeddings on the CPU."""
        return self.model(pixel_values=pixels.to(self.device)).pooler_output.float().cpu()

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLS embeddings of in-memory images, [N, hidden] float32 on the CPU."""
        feats = [self.forward(preprocess(images[i:i + self.batch_size], self.preprocessing))
                 for i in range(0, len(images), self.batch_size)]
        return torch.cat(feats) if feats else torch.empty(0, 0)

    def _prepare(self, path: Path) -> torch.Tensor:
        return preprocess([load_image(path)], self.preprocessing)[0]

    def embed_files(self, paths: Sequence[Path], on_batch: Callable[[list[Path], torch.Tensor], None] | None = None,
                    progress: bool = False) -> torch.Tensor:
        """Embeddings of image files in order; `on_batch` sees each finished batch (used to fill the cache).

        Decoding and resizing (PIL releases the GIL there) run on `num_workers` threads, one batch ahead of the
        model: on a GPU they, not the model, bound the speed. Only two batches are in memory at a time.
        """
        from tqdm import tqdm

        batches = [list(paths[i:i + self.batch_size]) for i in range(0, len(paths), self.batch_size)]
        feats = []
        with ThreadPoolExecutor(max(1, self.num_workers)) as pool, \
                tqdm(total=len(paths), desc="DINOv2", unit="img", disable=not progress) as bar:
            def submit(k: int) -> list:
                return [pool.submit(self._prepare, p) for p in batches[k]] if k < len(batches) else []

            pending = submit(0)
            for k, chunk in enumerate(batches):
                ready, pending = pending, submit(k + 1)
                f = self.forward(torch.stack([r.result() for r in ready]))
                if on_batch is not None:
                    on_batch(chunk, f)
                feats.append(f)
                bar.update(len(chunk))
        return torch.cat(feats) if feats else torch.empty(0, 0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, in float64 so an image against itself gives 1 to rounding."""
    a, b = a.double(), b.double()
    return (torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------- feature cache


class FeatureCache:
    """Embeddings of files under `root`, keyed by relative path and valid while the file's size and mtime hold.

    Stored as one safetensors file (a [N, hidden] matrix; keys and stamps in its metadata), rewritten atomically,
    so a killed run loses at most what was computed since the last save.
    """

    def __init__(self, file: Path, root: Path, preprocessing: Preprocess = HUB_PREPROCESS):
        self.file, self.root = Path(file), Path(root)
        self.fingerprint = preprocessing.fingerprint()
        self.entries: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
        self.dirty = False
        self.discarded: str | None = None  # why an existing cache file was not used
        if self.file.is_file():
            self._load()

    def _load(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.file), framework="pt") as f:
                meta = json.loads(f.metadata()["index"])
                feats = f.get_tensor("features") if meta["keys"] else None
        except Exception as e:  # a cache is disposable: an unreadable one is recomputed, not fatal
            self.discarded = f"unreadable ({e.__class__.__name__})"
            return
        if meta.get("preprocessing") != self.fingerprint:
            self.discarded = "computed with other preprocessing"
            return
        for i, (key, stamp) in enumerate(zip(meta["keys"], meta["stamps"])):
            self.entries[key] = (tuple(stamp), feats[i])

    def key(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    @staticmethod
    def stamp(path: Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    def get(self, path: Path) -> torch.Tensor | None:
        hit = self.entries.get(self.key(path))
        return hit[1] if hit is not None and hit[0] == self.stamp(path) else None

    def put(self, path: Path, feature: torch.Tensor) -> None:
        self.entries[self.key(path)] = (self.stamp(path), feature.detach().float().cpu())
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        from safetensors.torch import save

        keys = sorted(self.entries)
        meta = {"keys": keys, "stamps": [list(self.entries[k][0]) for k in keys], "preprocessing": self.fingerprint}
        tensors = {"features": torch.stack([self.entries[k][1] for k in keys]).contiguous()} if keys else {}
        atomic_write_bytes(self.file, save(tensors, metadata={"index": json.dumps(meta)}))
        self.dirty = False


def cache_path(sweep_dir: str | Path, dino_model: str, cache_dir: str | Path | None = None) -> Path:
    """Where a sweep's features for one DINOv2 model live: <sweep>/dino_features/<model-slug>.safetensors."""
    return Path(cache_dir if cache_dir is not None else Path(sweep_dir) / FEATURES_DIR) / f"{model_slug(dino_model)}.safetensors"


def embed_with_cache(embedder: DinoEmbedder, paths: Sequence[Path], cache: FeatureCache | None,
                     save_every: int = 20, progress: bool = False) -> dict[Path, torch.Tensor]:
    """Embeddings of `paths`, computing only those the cache lacks or holds for an older version of the file.

    The cache is saved every `save_every` batches and when this returns or fails (e.g. on a corrupt image), so work
    done is kept.
    """
    paths = list(dict.fromkeys(Path(p) for p in paths))
    found = {p: cache.get(p) for p in paths} if cache is not None else {p: None for p in paths}
    todo = [p for p, f in found.items() if f is None]
    batches = 0

    def keep(chunk: list[Path], feats: torch.Tensor) -> None:
        nonlocal batches
        for p, f in zip(chunk, feats):
            found[p] = f
            if cache is not None:
                cache.put(p, f)
        batches += 1
        if cache is not None and batches % save_every == 0:
            cache.save()

    try:
        if todo:
            embedder.embed_files(todo, on_batch=keep, progress=progress)
    finally:
        if cache is not None:
            cache.save()
    return found


# ----------------------------------------------------------------------------------------------- sweep layout


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


def _examples(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


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
        return [(pid, layer, self.refs[pid], path) for pid in sorted(self.ablations) if pid in self.refs
                for layer, path in sorted(self.ablations[pid].items())]

    def require_pairs(self) -> None:
        if not self.pairs():
            raise UserError(f"no (ref.png, layer_XX.png) pairs in {self.root}; run demo_2_skip.py into it first or "
                            f"fix \"sweep_dir\"")

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
    path = Path(root) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or delete it (layers are then read from file names)") from e
    if not isinstance(manifest, dict):
        raise UserError(f"{path} should hold a JSON object, not {type(manifest).__name__}")
    return manifest


def scan_sweep(root: str | Path, num_double: int | None = None, exclude: Iterable[Path] = ()) -> Sweep:
    """Index a sweep folder `<root>/<prompt_id>/{ref,layer_XX}.png` (+ manifest.json), tolerating a partial sweep.

    `num_double` overrides the manifest (an error if they disagree); without either it is 19 (FLUX.1).
    Subfolders in `exclude` (e.g. the output folder) and the feature cache are not prompts.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"sweep folder {root} does not exist or is not a folder; run demo_2_skip.py first or fix "
                        f"\"sweep_dir\"")
    manifest = read_manifest(root)
    m_double = manifest.get("num_double") if manifest else None
    if num_double is not None and m_double is not None and num_double != m_double:
        raise UserError(f"num_double is {num_double} in the config but {m_double} in {root / 'manifest.json'}; "
                        f"remove num_double from the config (the manifest knows the model)")
    nd = num_double if num_double is not None else (m_double if isinstance(m_double, int) else DEFAULT_NUM_DOUBLE)
    total = nd + manifest["num_single"] if manifest and isinstance(manifest.get("num_single"), int) else None
    sweep = Sweep(root=root, manifest=manifest, num_double=nd)

    skip_dirs = {FEATURES_DIR} | {Path(p).resolve() for p in exclude}
    skipped, ignored, out_of_range = [], [], []
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            if d.name != "manifest.json" and not d.name.startswith("."):
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
            elif f.stem == "ref":
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
        sweep.notes.append(f"skipped {len(skipped)} non-image file(s): {_examples(skipped)}")
    if ignored:
        sweep.notes.append(f"ignored {len(ignored)} image(s) not named ref.* or layer_XX.*: {_examples(ignored)}")
    if out_of_range:
        sweep.notes.append(f"ignored {len(out_of_range)} image(s) with a layer index >= {total} (the model's "
                           f"layer count per manifest.json): {_examples(out_of_range)}")

    seen_prompts = sorted(set(sweep.refs) | set(sweep.ablations))
    seen_layers = sorted({l for ls in sweep.ablations.values() for l in ls})
    if manifest and isinstance(manifest.get("prompts"), list):
        sweep.expected_prompts = [str(p["id"]) for p in manifest["prompts"] if isinstance(p, dict) and "id" in p]
        extra = [p for p in seen_prompts if p not in sweep.expected_prompts]
        if extra:
            sweep.notes.append(f"{len(extra)} prompt folder(s) not in manifest.json are scored too: {_examples(extra)}")
            sweep.expected_prompts += extra
    else:
        sweep.expected_prompts = seen_prompts
    if manifest and isinstance(manifest.get("layers"), list):
        sweep.expected_layers = sorted(set(int(l) for l in manifest["layers"]) | set(seen_layers))
    else:
        sweep.expected_layers = seen_layers
    orphans = sorted(p for p in sweep.ablations if p not in sweep.refs)
    if orphans:
        sweep.notes.append(f"{len(orphans)} prompt(s) have ablated images but no ref.png and are not scored: "
                           f"{_examples(orphans)}")
    return sweep


def size_report(sweep: Sweep) -> list[str]:
    """Notes about ablated images whose size differs from their reference's (comparable after preprocessing, which
    resizes and crops every image, but a sign that the sweep mixes settings)."""
    def size(p: Path) -> tuple[int, int]:
        try:
            with Image.open(p) as im:
                return im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return load_image(p).size  # raises the UserError that names the file

    ref_sizes = {pid: size(p) for pid, p in sweep.refs.items()}
    odd = []
    for pid, _, _, path in sweep.pairs():
        if (s := size(path)) != ref_sizes[pid]:
            odd.append(f"{pid}/{path.name} {s[0]}x{s[1]} vs ref {ref_sizes[pid][0]}x{ref_sizes[pid][1]}")
    notes = []
    if len(set(ref_sizes.values())) > 1:
        notes.append(f"reference images come in {len(set(ref_sizes.values()))} sizes: "
                     f"{sorted(set(ref_sizes.values()))}")
    if odd:
        notes.append(f"{len(odd)} ablated image(s) differ in size from their reference (scored anyway: preprocessing "
                     f"resizes to 256 and crops 224, but check the sweep settings): {_examples(odd)}")
    return notes


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


def similarities(sweep: Sweep, features: dict[Path, torch.Tensor]) -> dict[int, dict[str, float]]:
    """layer -> prompt -> cosine similarity of the ablated image's and the reference's embeddings."""
    pairs = sweep.pairs()
    if not pairs:
        return {}
    sims = cosine(torch.stack([features[r] for _, _, r, _ in pairs]), torch.stack([features[a] for *_, a in pairs]))
    out: dict[int, dict[str, float]] = {}
    for (pid, layer, _, _), s in zip(pairs, sims.tolist()):
        out.setdefault(layer, {})[pid] = s
    return out


def layer_scores(sims: dict[int, dict[str, float]], num_double: int = DEFAULT_NUM_DOUBLE, n_bootstrap: int = 1000,
                 seed: int = 0, confidence: float = 0.95) -> list[LayerScore]:
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
        scores.append(LayerScore(layer=layer, name=layer_name(layer, num_double), mean_similarity=mean,
                                 std=float(x.std(ddof=1)) if n > 1 else 0.0, ci_low=float(lo), ci_high=float(hi),
                                 vitality=1.0 - mean, num_prompts=n))
    return scores


def select_vital(scores: Sequence[LayerScore], tau: float | None = None, top_k: int | None = None) -> list[int]:
    """Vital layers, sorted: vitality >= tau (the paper's rule), or the k most vital (ties -> lower index)."""
    if (tau is None) == (top_k is None):
        raise UserError("choose exactly one vital-layer rule: \"tau\" (a vitality threshold) or \"top_k\"")
    if top_k is not None:
        if top_k > len(scores):
            raise UserError(f"top_k={top_k} but only {len(scores)} layer(s) were scored; lower top_k or complete the "
                            f"sweep")
        ranked = sorted(scores, key=lambda s: (-s.vitality, s.layer))
        return sorted(s.layer for s in ranked[:top_k])
    return sorted(s.layer for s in scores if s.vitality >= tau)


def tau_interval_for(scores: Sequence[LayerScore], k: int) -> tuple[float, float] | None:
    """(low, high]: every tau in it selects exactly the k most vital layers (None if ties make that impossible)."""
    v = sorted((s.vitality for s in scores), reverse=True)
    if not 0 < k <= len(v):
        return None
    low = v[k] if k < len(v) else -math.inf
    return (low, v[k - 1]) if low < v[k - 1] else None


# ----------------------------------------------------------------------------------------------- outputs


def selection_dict(tau: float | None, top_k: int | None) -> dict:
    return {"rule": "threshold", "tau": tau} if top_k is None else {"rule": "top_k", "k": top_k}


def rule_text(selection: dict) -> str:
    return f"vitality >= tau = {selection['tau']:g}" if selection["rule"] == "threshold" else f"top {selection['k']}"


def vital_layers_payload(scores: Sequence[LayerScore], vital: Sequence[int], selection: dict, *, model: str | None,
                         dino_model: str, num_double: int, extra: dict | None = None) -> dict:
    """The vital_layers.json object (read by demo_4_edit.py)."""
    return {
        "vital_layers": sorted(vital),
        "selection": selection,
        "model": model,
        "dino_model": dino_model,
        "num_double": num_double,
        "similarity": "cosine of DINOv2 CLS embeddings (pooler_output), ablated vs reference",
        **(extra or {}),
        "layers": [asdict(s) for s in scores],
    }


CSV_FIELDS = ["layer", "name", "block", "mean_similarity", "std", "ci_low", "ci_high", "vitality", "num_prompts",
              "vital"]


def scores_csv(scores: Sequence[LayerScore], vital: Sequence[int], num_double: int) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for s in scores:
        w.writerow({**asdict(s), "block": "double" if s.layer < num_double else "single",
                    "vital": int(s.layer in vital)})
    return buf.getvalue()


DOUBLE_COLOUR, SINGLE_COLOUR = "#1f77b4", "#ff7f0e"


def vitality_figure(scores: Sequence[LayerScore], vital: Sequence[int], num_double: int, tau: float | None = None,
                    title: str = "Layer vitality"):
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
    bars = ax.bar(layers, [s.vitality for s in scores], color=colours, width=0.8,
                  yerr=[[s.vitality - (1 - s.ci_high) for s in scores], [(1 - s.ci_low) - s.vitality for s in scores]],
                  error_kw={"elinewidth": 0.7, "ecolor": "0.3", "capsize": 1.5})
    for bar, s in zip(bars, scores):
        is_vital = s.layer in vital
        bar.set_alpha(1.0 if is_vital else 0.35)
        bar.set_edgecolor("black" if is_vital else "none")
        bar.set_linewidth(1.2 if is_vital else 0)
        bar.set_gid(f"layer_{s.layer}{'_vital' if is_vital else ''}")
        if is_vital:
            ax.annotate(str(s.layer), (bar.get_x() + bar.get_width() / 2, 1 - s.ci_low), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    if any(l < num_double for l in layers) and any(l >= num_double for l in layers):
        ax.axvline(num_double - 0.5, color="0.6", linewidth=0.8)
    handles = [Patch(color=DOUBLE_COLOUR, label="double-stream block"),
               Patch(color=SINGLE_COLOUR, label="single-stream block"),
               Patch(facecolor="white", edgecolor="black", label="vital (outlined, labelled)")]
    if tau is not None:
        handles.append(ax.axhline(tau, color="crimson", linestyle="--", linewidth=1, label=f"threshold τ = {tau:g}"))
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_xlabel("layer (global index; single block j = layer j + %d)" % num_double)
    ax.set_ylabel("vitality = 1 − mean DINOv2 similarity")
    ax.set_title(title)
    ax.set_xlim(min(layers) - 1, max(layers) + 1)
    ax.set_ylim(min(0.0, *(s.vitality for s in scores)), max(1.0 if tau is None else tau, *(1 - s.ci_low for s in scores)) * 1.08)
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def contact_sheet(sweep: Sweep, scores: Sequence[LayerScore], vital: Sequence[int],
                  sims: dict[int, dict[str, float]] | None = None, prompts: int = 4, columns: int = 8,
                  thumb: int = 192) -> Image.Image:
    """Rows: the first `prompts` scored prompts. Columns: the reference, then ablations of the most vital layers
    (vital ones first, by vitality), each captioned with the layer, its block and that prompt's similarity."""
    ranked = sorted(scores, key=lambda s: (s.layer not in vital, -s.vitality, s.layer))[:columns]
    pids = [p for p in sorted(sweep.refs) if p in sweep.ablations][:prompts]

    def tile(path: Path | None) -> Image.Image:
        if path is None:  # a partial sweep: keep the grid aligned
            return Image.new("RGB", (thumb, thumb), "#d0d0d0")
        return ImageOps.contain(load_image(path), (thumb, thumb), Image.Resampling.LANCZOS)  # small images grow too

    images, labels = [], []
    for pid in pids:
        images.append(tile(sweep.refs[pid]))
        labels.append(f"{pid}\nreference")
        for s in ranked:
            path = sweep.ablations[pid].get(s.layer)
            sim = (sims or {}).get(s.layer, {}).get(pid)
            images.append(tile(path))
            block = f"double {s.layer}" if s.layer < sweep.num_double else f"single {s.layer - sweep.num_double}"
            labels.append(f"skip layer {s.layer}{' (vital)' if s.layer in vital else ''}\n{block}\n"
                          + ("missing" if path is None else f"similarity {sim:.3f}" if sim is not None else ""))
    return make_grid(images, labels, cols=len(ranked) + 1)


# ----------------------------------------------------------------------------------------------- plain mode


def list_images(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Image files in a folder by name, and the names of other files (skipped)."""
    images, other = {}, []
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            images[f.name] = f
        elif not f.name.startswith("."):
            other.append(f.name)
    return images, other


def compare_files(embedder: DinoEmbedder, pairs: Sequence[tuple[Path, Path]]) -> list[float]:
    """Similarity of each (a, b) pair of image files."""
    feats = embed_with_cache(embedder, [p for ab in pairs for p in ab], cache=None)
    if not pairs:
        return []
    return cosine(torch.stack([feats[Path(a)] for a, _ in pairs]), torch.stack([feats[Path(b)] for _, b in pairs])).tolist()


def match_folders(folder_a: Path, folder_b: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Image files with the same name in both folders, and notes about everything left out."""
    a, a_other = list_images(folder_a)
    b, b_other = list_images(folder_b)
    names = sorted(set(a) & set(b))
    notes = []
    for folder, mine, theirs in ((folder_a, a, b), (folder_b, b, a)):
        only = sorted(set(mine) - set(theirs))
        if only:
            notes.append(f"{len(only)} image(s) only in {folder}: {_examples(only)}")
    for folder, other in ((folder_a, a_other), (folder_b, b_other)):
        if other:
            notes.append(f"skipped {len(other)} non-image file(s) in {folder}: {_examples(other)}")
    return [(n, a[n], b[n]) for n in names], notes


# ----------------------------------------------------------------------------------------------- whole analysis


@dataclass
class Analysis:
    sweep: Sweep
    sims: dict[int, dict[str, float]]  # layer -> prompt -> similarity
    scores: list[LayerScore]
    vital: list[int]
    selection: dict
    bootstrap: dict
    notes: list[str]  # skipped files, size mismatches, the cache's state


def analyse_sweep(sweep: Sweep, embedder: DinoEmbedder, cache: FeatureCache | None, *, tau: float | None = DEFAULT_TAU,
                  top_k: int | None = None, n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95,
                  progress: bool = False) -> Analysis:
    """Score every (reference, ablated) pair the sweep holds so far and select the vital layers."""
    sweep.require_pairs()
    pairs = sweep.pairs()
    notes = list(sweep.notes) + size_report(sweep)
    if cache is not None and cache.discarded:
        notes.append(f"feature cache {cache.file} was {cache.discarded}; recomputing")
    paths = [p for _, _, r, a in pairs for p in (r, a)]
    features = embed_with_cache(embedder, paths, cache, progress=progress)
    sims = similarities(sweep, features)
    scores = layer_scores(sims, sweep.num_double, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    vital = select_vital(scores, tau=tau, top_k=top_k)
    return Analysis(sweep, sims, scores, vital, selection_dict(tau, top_k),
                    {"samples": n_bootstrap, "seed": seed, "confidence": confidence}, notes)


def write_sweep_outputs(a: Analysis, out_dir: str | Path, *, dino_model: str, contact_sheet_prompts: int = 4,
                        contact_sheet_columns: int = 8) -> dict[str, Path]:
    """vital_layers.json, vitality.csv, vitality.png, contact_sheet.png (each written atomically) in `out_dir`."""
    out = Path(out_dir)
    missing = a.sweep.missing()
    model = a.sweep.manifest.get("model") if a.sweep.manifest else None
    payload = vital_layers_payload(
        a.scores, a.vital, a.selection, model=model, dino_model=dino_model, num_double=a.sweep.num_double,
        extra={"vital_layer_names": [layer_name(l, a.sweep.num_double) for l in a.vital],
               "num_prompts": len({p for per in a.sims.values() for p in per}),
               "complete": not missing, "missing": missing, "bootstrap": a.bootstrap, "notes": a.notes})
    paths = {"json": out / "vital_layers.json", "csv": out / "vitality.csv", "plot": out / "vitality.png",
             "contact_sheet": out / "contact_sheet.png"}
    atomic_write_text(paths["csv"], scores_csv(a.scores, a.vital, a.sweep.num_double))
    tau = a.selection.get("tau")
    title = f"Layer vitality of {model or 'the model'} ({payload['num_prompts']} prompts, {dino_model})"
    save_figure(vitality_figure(a.scores, a.vital, a.sweep.num_double, tau=tau, title=title), paths["plot"])
    if contact_sheet_prompts > 0:
        save_png(paths["contact_sheet"], contact_sheet(a.sweep, a.scores, a.vital, a.sims, prompts=contact_sheet_prompts,
                                                       columns=contact_sheet_columns))
    else:
        del paths["contact_sheet"]
    atomic_write_json(paths["json"], payload)  # last: its presence means the other files are from the same run
    return paths


def summary_lines(a: Analysis) -> list[str]:
    """What a person reads after a run: vital set, the most vital layers, how tau relates to the paper's set size."""
    lines = [f"scored {sum(s.num_prompts for s in a.scores)} pairs over {len(a.scores)} layer(s)",
             f"vital layers ({rule_text(a.selection)}): {a.vital}"]
    for s in sorted(a.scores, key=lambda s: -s.vitality)[:12]:
        lines.append(f"  {s.name:<28} vitality {s.vitality:<10.4g} similarity {s.mean_similarity:.4f} "
                     f"[{s.ci_low:.4f}, {s.ci_high:.4f}]  n={s.num_prompts}{'  *' if s.layer in a.vital else ''}")
    if not a.vital:
        lines.append(f"WARNING: no layer is vital under {rule_text(a.selection)}; demo_4_edit.py would inject nowhere. "
                     f"Lower tau (see vitality.png) or use rule top_k")
    k = 10  # the paper's vital set for FLUX.1-dev has 10 layers
    span = tau_interval_for(a.scores, k)
    if span is not None and len(a.scores) > k:
        lines.append(f"tau in ({span[0]:.3f}, {span[1]:.3f}] would select the {k} most vital layers (the size of the "
                     f"paper's set)")
    return lines


# ---------------------------------------------------------------------------------------------- the demo


@dataclass
class DinoConfig:
    sweep_dir: str = field(default="outputs/demo_2_skip", metadata={
        "help": "demo_2_skip.py output folder: <prompt_id>/ref.png, <prompt_id>/layer_XX.png, manifest.json"})
    output_dir: str = field(default="outputs/demo_3_dino", metadata={"help": "folder for the outputs"})
    dino_model: str = field(default=DEFAULT_DINO, metadata={
        "help": "DINOv2 hub id (facebook/dinov2-small|base|large|giant) or local folder; "
                "'tiny-random': a seeded random tiny model for tests and CPU smoke runs (meaningless scores)"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", "pattern": r"auto|cpu|mps|cuda(:\d+)?"})
    batch_size: int = field(default=64, metadata={"help": "images per DINOv2 forward", "min": 1})
    num_workers: int = field(default=8, metadata={
        "help": "threads decoding and resizing images (on a GPU these bound the speed, not DINOv2)", "min": 1})
    rule: Literal["threshold", "top_k"] = field(default="threshold", metadata={
        "help": "vital set: 'threshold' (vitality >= tau, the paper's rule) or 'top_k' (the k most vital layers)"})
    tau: float = field(default=DEFAULT_TAU, metadata={
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
        return problems + output_dir_problems(self.output_dir)


def run_plain(cfg: DinoConfig, embedder: DinoEmbedder) -> None:
    """Similarity of two images, or of same-named images in two folders; printed and written as JSON/CSV."""
    if cfg.image_a is not None:
        names, pairs, notes = [Path(cfg.image_b).name], [(Path(cfg.image_a), Path(cfg.image_b))], []
    else:
        matched, notes = match_folders(Path(cfg.folder_a), Path(cfg.folder_b))
        if not matched:
            raise UserError(f"no image file name appears in both {cfg.folder_a} and {cfg.folder_b}; the plain mode "
                              f"compares same-named files")
        names, pairs = [n for n, _, _ in matched], [(a, b) for _, a, b in matched]
    sims = compare_files(embedder, pairs)
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


def run(cfg: DinoConfig) -> None:
    """demo_3_dino.py: score a sweep (vital_layers.json, CSV, plot, contact sheet), or the plain mode."""
    device = resolve_device(cfg.device)
    sweep = None
    if cfg.image_a is None and cfg.folder_a is None:
        # Scan before loading DINOv2: an empty or mistyped sweep folder should fail in a second, not after a download.
        cache_file = cache_path(cfg.sweep_dir, cfg.dino_model, cfg.cache_dir)
        sweep = scan_sweep(cfg.sweep_dir, cfg.num_double, exclude=[Path(cfg.output_dir), cache_file.parent])
        sweep.require_pairs()
    embedder = DinoEmbedder(load_dino(cfg.dino_model, device), device, cfg.batch_size, cfg.num_workers)
    if sweep is None:
        return run_plain(cfg, embedder)

    report = sweep.missing_report()
    if report:
        print(f"partial sweep: {len(report)} of {len(sweep.expected_prompts)} prompt(s) incomplete; scoring what "
              f"is there (details in vital_layers.json under \"missing\")")
        for line in report[:10]:
            print(f"  {line}")
        if len(report) > 10:
            print(f"  ... and {len(report) - 10} more")
    cache = FeatureCache(cache_file, sweep.root)
    analysis = analyse_sweep(
        sweep, embedder, cache, tau=cfg.tau if cfg.rule == "threshold" else None,
        top_k=cfg.top_k if cfg.rule == "top_k" else None, n_bootstrap=cfg.bootstrap_samples, seed=cfg.seed,
        confidence=cfg.confidence, progress=sys.stderr.isatty())
    for note in analysis.notes:
        print(f"note: {note}")
    paths = write_sweep_outputs(analysis, cfg.output_dir, dino_model=cfg.dino_model,
                                  contact_sheet_prompts=cfg.contact_sheet_prompts,
                                  contact_sheet_columns=cfg.contact_sheet_layers)
    print("\n".join(summary_lines(analysis)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
