"""DINOv2 image similarity for vitality scoring: the model, its preprocessing, CLS embeddings and their cache.

Similarity is the cosine of DINOv2 CLS embeddings (`pooler_output`, the CLS token after the final LayerNorm).
Preprocessing is the one shipped with the hub's DINOv2 repos, written out here (see HUB_PREPROCESS) rather than taken
from a default-constructed `BitImageProcessor`, whose defaults (224, CLIP mean/std) silently differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flux.errors import UserError
from flux.util import hub_pretrained

from . import TINY_RANDOM
from .io import IMAGE_SUFFIXES, atomic_write_bytes, examples
from .sweep import FEATURES_DIR
from .sweep import load_sweep_image as load_image

DEFAULT_DINO = "facebook/dinov2-base"
# What demo_3 computes per (reference, ablated) pair of image files: one similarity each (the metric's seam).
Similarity = Callable[[Sequence[tuple[Path, Path]]], list[float]]


# ----------------------------------------------------------------------------------------------- the model


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


def tiny_dino(seed: int = 0):
    """A 2-layer, width-32 random Dinov2 (same patch size and input size as the real ones). For tests only."""
    from transformers import Dinov2Config, Dinov2Model

    # initializer_range 0.2 (not 0.02): with tiny weights every CLS embedding is nearly the same vector.
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=224, initializer_range=0.2
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(config).eval()


def load_dino(name: str = DEFAULT_DINO, device: str | torch.device = "cpu"):
    """`Dinov2Model` from a hub repo id or a local folder (or TINY_RANDOM), in eval mode on `device`."""
    if name == TINY_RANDOM:
        return tiny_dino().to(device)
    from transformers import AutoConfig, Dinov2Model

    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise UserError(
            f"dino_model {name!r} is a local path without a config.json; point it at a saved DINOv2 "
            f"model folder (save_pretrained) or use a hub id such as {DEFAULT_DINO!r}"
        )

    def load(**hub) -> Dinov2Model:
        config = AutoConfig.from_pretrained(name, **hub)
        if config.model_type != "dinov2":
            raise UserError(
                f"dino_model {name!r} is a {config.model_type!r} model, not DINOv2; use one of "
                f"facebook/dinov2-small|base|large|giant or a local copy"
            )
        return Dinov2Model.from_pretrained(name, config=config, **hub)

    try:  # a hub id: the HF cache first, then one quick Hub check (no retry storm when the network is down)
        model = load() if Path(name).exists() else hub_pretrained(load, name, hint="give a local DINOv2 folder")
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load DINOv2 {name!r}: {e}\nUse a hub id such as {DEFAULT_DINO!r} "
            f"(downloaded once, needs internet) or a local folder with config.json and weights."
        ) from e
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

    def __init__(
        self,
        model,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        num_workers: int = 4,
        preprocessing: Preprocess = HUB_PREPROCESS,
    ):
        self.model, self.device = model, torch.device(device)
        self.batch_size, self.num_workers, self.preprocessing = batch_size, num_workers, preprocessing

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch -> [N, hidden] float32 CLS embeddings on the CPU."""
        return self.model(pixel_values=pixels.to(self.device)).pooler_output.float().cpu()

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLS embeddings of in-memory images, [N, hidden] float32 on the CPU."""
        feats = [
            self.forward(preprocess(images[i : i + self.batch_size], self.preprocessing))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(feats) if feats else torch.empty(0, 0)

    def _prepare(self, path: Path) -> torch.Tensor:
        return preprocess([load_image(path)], self.preprocessing)[0]

    def embed_files(
        self,
        paths: Sequence[Path],
        on_batch: Callable[[list[Path], torch.Tensor], None] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Embeddings of image files in order; `on_batch` sees each finished batch (used to fill the cache).

        Decoding and resizing (PIL releases the GIL there) run on `num_workers` threads, one batch ahead of the
        model: on a GPU they, not the model, bound the speed. Only two batches are in memory at a time.
        """
        from tqdm import tqdm

        batches = [list(paths[i : i + self.batch_size]) for i in range(0, len(paths), self.batch_size)]
        feats = []
        with (
            ThreadPoolExecutor(max(1, self.num_workers)) as pool,
            tqdm(total=len(paths), desc="DINOv2", unit="img", disable=not progress) as bar,
        ):

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
        except Exception as e:  # noqa: BLE001  (a cache is disposable: an unreadable one is recomputed, not fatal)
            self.discarded = f"unreadable ({e.__class__.__name__})"
            return
        if meta.get("preprocessing") != self.fingerprint:
            self.discarded = "computed with other preprocessing"
            return
        if meta["keys"] and meta.get("sha256") != _checksum(feats):  # damaged after it was written
            self.discarded = "damaged (its features do not match their checksum)"
            return
        for i, (key, stamp) in enumerate(zip(meta["keys"], meta["stamps"])):
            self.entries[key] = (tuple(stamp), feats[i])

    def notes(self) -> list[str]:
        """What a person should know about this cache (a file that was there but not used)."""
        return [f"feature cache {self.file} was {self.discarded}; recomputing"] if self.discarded else []

    def holds(self, paths: Sequence[Path]) -> int:
        """How many of `paths` have a valid cached embedding (work a re-run does not repeat)."""
        return sum(self.get(Path(p)) is not None for p in dict.fromkeys(paths))

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
        meta |= {"sha256": _checksum(tensors["features"])} if keys else {}
        atomic_write_bytes(self.file, save(tensors, metadata={"index": json.dumps(meta)}))
        self.dirty = False


def _checksum(features: torch.Tensor) -> str:
    return hashlib.sha256(features.float().contiguous().numpy().tobytes()).hexdigest()


def cache_path(sweep_dir: str | Path, dino_model: str, cache_dir: str | Path | None = None) -> Path:
    """Where a sweep's features for one DINOv2 model live: <sweep>/dino_features/<model-slug>.safetensors."""
    return (
        Path(cache_dir if cache_dir is not None else Path(sweep_dir) / FEATURES_DIR)
        / f"{model_slug(dino_model)}.safetensors"
    )


def embed_with_cache(
    embedder: DinoEmbedder,
    paths: Sequence[Path],
    cache: FeatureCache | None,
    save_every: int = 20,
    progress: bool = False,
) -> dict[Path, torch.Tensor]:
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


def dino_similarity(embedder: DinoEmbedder, cache: FeatureCache | None = None, progress: bool = False) -> Similarity:
    """The DINOv2 metric: cosine of the two images' CLS embeddings, each file embedded once (and cached)."""

    def similarity(pairs: Sequence[tuple[Path, Path]]) -> list[float]:
        if not pairs:
            return []
        feats = embed_with_cache(embedder, [p for ab in pairs for p in ab], cache, progress=progress)
        return cosine(
            torch.stack([feats[Path(a)] for a, _ in pairs]), torch.stack([feats[Path(b)] for _, b in pairs])
        ).tolist()

    return similarity


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
    """Similarity of each (a, b) pair of image files (no cache)."""
    return dino_similarity(embedder)(pairs)


def match_folders(folder_a: Path, folder_b: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Image files with the same name in both folders, and notes about everything left out."""
    a, a_other = list_images(folder_a)
    b, b_other = list_images(folder_b)
    names = sorted(set(a) & set(b))
    notes = []
    for folder, mine, theirs in ((folder_a, a, b), (folder_b, b, a)):
        only = sorted(set(mine) - set(theirs))
        if only:
            notes.append(f"{len(only)} image(s) only in {folder}: {examples(only)}")
    for folder, other in ((folder_a, a_other), (folder_b, b_other)):
        if other:
            notes.append(f"skipped {len(other)} non-image file(s) in {folder}: {examples(other)}")
    return [(n, a[n], b[n]) for n in names], notes
