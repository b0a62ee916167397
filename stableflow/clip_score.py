"""Stable Flow's edit metrics with CLIP: CLIP_txt (edit vs its prompt), CLIP_img (edit vs source image) and
CLIP_dir (image change vs prompt change), on a transformers CLIPModel + CLIPProcessor."""

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from flux.errors import UserError
from flux.util import hub_pretrained

from . import TINY_RANDOM

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ClipScorer:
    """CLIP_txt, CLIP_img and CLIP_dir (Stable Flow's evaluation) with a transformers CLIPModel + CLIPProcessor."""

    def __init__(self, model, processor, device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def load(cls, name: str = DEFAULT_CLIP, device: str | torch.device = "cpu") -> "ClipScorer":
        """A hub repo id or a local folder (CLIPModel + CLIPProcessor files); TINY_RANDOM builds a tiny random one."""
        from transformers import CLIPModel, CLIPProcessor

        if name == TINY_RANDOM:
            return cls(*tiny_clip(), device)
        path = Path(name).expanduser()
        if path.is_file():
            raise UserError(
                f"clip_model {name} is a file: give a folder with config.json and the processor files, or a hub id"
            )
        if name.startswith(("/", ".", "~")) and not path.exists():
            raise UserError(
                f"clip_model folder {name} does not exist: fix the path, or give a hub id like {DEFAULT_CLIP}"
            )

        def load(**hub) -> tuple:
            source = str(path) if path.exists() else name
            return CLIPModel.from_pretrained(source, **hub), CLIPProcessor.from_pretrained(source, **hub)

        try:  # a hub id: the HF cache first, then one quick Hub check (no retry storm when the network is down)
            model, processor = (
                load() if path.exists() else hub_pretrained(load, name, hint="set clip_model to a folder")
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load CLIP model {name} for the scores ({str(e).splitlines()[0]}): give a hub id "
                f"such as {DEFAULT_CLIP} or a local folder, or set scores=false"
            ) from None
        return cls(model, processor, device)

    @staticmethod
    def _features(out) -> Tensor:
        # transformers 5 returns an output object whose pooler_output is the projected embedding; 4 a tensor
        x = out if torch.is_tensor(out) else out.pooler_output
        return torch.nn.functional.normalize(x.double(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        self.model.to(self.device)
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self._features(self.model.get_image_features(pixel_values=pixels)).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        self.model.to(self.device)
        tokens = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        return self._features(self.model.get_text_features(input_ids=ids, attention_mask=mask)).cpu()

    def scores(
        self, source: Image.Image, source_prompt: str, edits: Sequence[Image.Image], edit_prompts: Sequence[str]
    ) -> list[dict[str, float | None]]:
        """Per edit: CLIP_txt = cos(edit image, edit prompt); CLIP_img = cos(edit image, source image);
        CLIP_dir = cos(edit image - source image, edit prompt - source prompt) on unit embeddings
        (None where a direction is zero, e.g. an edit prompt equal to the source prompt)."""
        img = self.embed_images([source, *edits])
        txt = self.embed_texts([source_prompt, *edit_prompts])
        out = []
        for k in range(1, len(img)):
            d_img, d_txt = img[k] - img[0], txt[k] - txt[0]
            norm = d_img.norm() * d_txt.norm()
            out.append(
                {
                    "clip_txt": float(img[k] @ txt[k]),
                    "clip_img": float(img[k] @ img[0]),
                    "clip_dir": float((d_img @ d_txt) / norm) if norm > 1e-12 else None,
                }
            )
        return out


def tiny_clip(seed: int = 0):
    """A seeded random CLIP (width 32, 32x32 images) with the tiny tokenizer in flux/assets; for tests only."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from flux.modules.conditioner import TINY_ASSETS

    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_ASSETS / "clip"))
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        **ids,
    }
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def mean_scores(scores: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Each metric's mean over the edits that have it (CLIP_dir is None where a direction is zero)."""
    out = {}
    for key in ("clip_txt", "clip_img", "clip_dir"):
        values = [s[key] for s in scores if s[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out
