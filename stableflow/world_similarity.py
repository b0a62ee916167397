"""The mini-detector metric: a semantic similarity of flux-mini's world pictures for demo_3, as DINOv2 is the paper's.

SSIM sees pixels: a bypass that deletes a small object or turns orange to magenta keeps most of them and scores
near 1. `mini.detect.semantic_similarity` reads what is in the picture (the objects' colours, shapes and masks, and
the background), so a deleted, added or recoloured object counts as damage. The detector reads only pictures of
`mini.world`, so this metric refuses a sweep of any other model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flux.errors import UserError

from .sweep import load_sweep_image

METRIC = "mini-detector"
WORLD_MODEL = "flux-mini"  # the only model whose pictures are mini.world's


def require_world_model(model: str | None, where: str) -> None:
    """Refuse (UserError) a sweep the detector cannot read: one not made by flux-mini."""
    if model != WORLD_MODEL:
        made_by = f"model {model!r}" if model else "an unknown model (no manifest.json names it)"
        raise UserError(
            f"metric={METRIC} reads only {WORLD_MODEL}'s world pictures, but {where} was made by {made_by}: use "
            f"metric=dinov2 (or ssim) for this sweep, or score a {WORLD_MODEL} sweep"
        )


def detector_pairs(pairs: Sequence[tuple[Path, Path]], batch_size: int = 64) -> list[float]:
    """`mini.detect.semantic_similarity` of each (a, b) pair of image files, in [0, 1]."""
    from mini.detect import detect_batch, semantic_similarity  # lazily: stableflow does not need mini otherwise

    files = list(dict.fromkeys(Path(p) for ab in pairs for p in ab))
    found = {}
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        try:
            found |= dict(zip(chunk, detect_batch([load_sweep_image(p) for p in chunk])))
        except ValueError as e:  # a picture of another size: not the world's
            raise UserError(f"metric={METRIC} cannot read {chunk[0].parent}: {e}") from None
    return [semantic_similarity(found[Path(a)], found[Path(b)]) for a, b in pairs]
