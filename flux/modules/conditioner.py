"""Text encoders of FLUX through transformers: T5 (per-token context) and CLIP (pooled vector)."""

import os
from pathlib import Path
from typing import Literal

import torch
import transformers
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..errors import UserError

TINY_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny"
TINY_DIM = 32  # hidden size of both tiny encoders: context_in_dim = vec_in_dim = 32
CLIP_MAX_LENGTH = 77  # CLIP's learned position table has 77 entries

_T5_TYPES = {"t5"}
_CLIP_TYPES = {"clip", "clip_text_model"}
# Hub options that the config, the tokenizer and the weights all need; the other kwargs go to the model only.
_HUB_KWARGS = {"token", "revision", "cache_dir", "local_files_only", "force_download", "proxies"}


class HFEmbedder(nn.Module):
    """Tokenize a batch of prompts and encode it, as the official FLUX code does.

    Pads every prompt to `max_length` and passes no attention mask, so padding tokens are attended: FLUX was trained
    that way. Returns T5's last_hidden_state (B, max_length, d_model) or CLIP's pooler_output (B, hidden).

    `version` is a Hugging Face repo id or a local folder. In a diffusers-style repo (FLUX.1-dev) pass the model's
    `subfolder` ("text_encoder_2" for T5, "text_encoder" for CLIP); the tokenizer is then read from the matching
    "tokenizer_2" / "tokenizer" unless `tokenizer_subfolder` says otherwise. T5 or CLIP is decided by the config's
    model_type, never by the name. Other keyword arguments (e.g. torch_dtype) go to the model's from_pretrained.
    """

    def __init__(
        self,
        version: str,
        max_length: int,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        **hf_kwargs,
    ):
        super().__init__()
        version = _check_source(version)
        if not isinstance(max_length, int) or max_length < 1:  # before a possibly long download
            raise UserError(f"text max_length {max_length!r} is invalid: use a positive integer")
        hub = {k: hf_kwargs[k] for k in _HUB_KWARGS if k in hf_kwargs}
        if "torch_dtype" in hf_kwargs and int(transformers.__version__.split(".")[0]) >= 5:
            hf_kwargs["dtype"] = hf_kwargs.pop("torch_dtype")  # renamed in transformers 5
        if tokenizer_subfolder is None and subfolder:
            tokenizer_subfolder = subfolder.replace("text_encoder", "tokenizer")
        where = version + (f" (subfolder {subfolder!r})" if subfolder else "")
        model_dir = Path(version, subfolder or "")
        if Path(version).is_dir() and not (model_dir / "config.json").is_file():
            raise UserError(
                f"{model_dir} has no config.json: give the folder of a transformers text encoder (for a "
                "diffusers-style FLUX folder, the folder above text_encoder/ with subfolder='text_encoder' or "
                "'text_encoder_2')"
            )

        def load(**offline) -> tuple[PreTrainedTokenizerBase, nn.Module]:
            config = AutoConfig.from_pretrained(version, subfolder=subfolder or "", **hub, **offline)
            kind = _kind(config.model_type, where)
            tok_cls, model_cls = (CLIPTokenizer, CLIPTextModel) if kind == "clip" else (T5TokenizerFast, T5EncoderModel)
            tokenizer = tok_cls.from_pretrained(version, subfolder=tokenizer_subfolder or "", **hub, **offline)
            return tokenizer, model_cls.from_pretrained(version, subfolder=subfolder or "", **hf_kwargs, **offline)

        try:
            if Path(version).is_dir() or "local_files_only" in hub:
                tokenizer, model = load()
            else:
                # A Hub id: the HF cache first, then one quick request, so no network means an error at once
                # instead of transformers' retries.
                from ..util import TEXT_LOCAL_HINT, hub_pretrained

                probe = f"{subfolder}/config.json" if subfolder else "config.json"
                tokenizer, model = hub_pretrained(load, version, probe, TEXT_LOCAL_HINT)
        except OSError as e:
            raise UserError(
                f"cannot load the text encoder {where}: {e}\n"
                "Give a Hugging Face repo id or a local folder that holds config.json, the weights and the tokenizer "
                "files; inside a diffusers-style repo, pass subfolder='text_encoder' or 'text_encoder_2'."
            ) from e
        self._attach(tokenizer, model, max_length)

    @classmethod
    def tiny(cls, kind: Literal["t5", "clip"], max_length: int, seed: int = 0) -> "HFEmbedder":
        """A small random T5 or CLIP encoder (hidden size 32) with the tokenizers in flux/assets/tiny; no download.

        The weights depend only on `seed` (and the transformers version); the global RNG state is left unchanged.
        """
        if kind not in ("t5", "clip"):
            raise UserError(f"unknown tiny text encoder {kind!r}: choose 't5' or 'clip'")
        folder = str(TINY_ASSETS / kind)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if kind == "t5":
                tokenizer = T5TokenizerFast.from_pretrained(folder)
                config = T5Config(
                    vocab_size=len(tokenizer),
                    d_model=TINY_DIM,
                    d_kv=8,
                    d_ff=64,
                    num_layers=2,
                    num_heads=4,
                    relative_attention_num_buckets=8,
                    relative_attention_max_distance=32,
                    feed_forward_proj="gated-gelu",  # T5 v1.1, as google/t5-v1_1-xxl
                    tie_word_embeddings=False,
                    dropout_rate=0.0,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id,
                )
                model = T5EncoderModel(config)
            else:
                tokenizer = CLIPTokenizer.from_pretrained(folder)
                config = CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=TINY_DIM,
                    intermediate_size=64,
                    projection_dim=TINY_DIM,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=CLIP_MAX_LENGTH,
                    hidden_act="quick_gelu",
                    # The pooled token is the first eos; CLIP pads with eos, so this is the end of the prompt.
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
                model = CLIPTextModel(config)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach(tokenizer, model, max_length)
        return self

    def _attach(self, tokenizer: PreTrainedTokenizerBase, model: nn.Module, max_length: int) -> None:
        self.is_clip = isinstance(model, CLIPTextModel)
        limit = model.config.max_position_embeddings if self.is_clip else None
        if not isinstance(max_length, int) or max_length < 1 or (limit is not None and max_length > limit):
            bound = f"1..{limit}" if limit is not None else "a positive integer"
            raise UserError(f"text max_length {max_length!r} is out of range for this encoder: use {bound}")
        self.max_length = max_length
        self.output_key = "pooler_output" if self.is_clip else "last_hidden_state"
        self.tokenizer = tokenizer
        self.hf_module = model.eval().requires_grad_(False)

    @property
    def out_dim(self) -> int:
        """Width of the output: FluxParams.vec_in_dim for CLIP, context_in_dim for T5."""
        config = self.hf_module.config
        return config.hidden_size if self.is_clip else config.d_model

    def forward(self, text: list[str]) -> Tensor:
        tokens = self.tokenizer(
            text,
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_attention_mask=False,
            return_tensors="pt",
        )
        outputs = self.hf_module(
            input_ids=tokens["input_ids"].to(self.hf_module.device),
            attention_mask=None,
            output_hidden_states=False,
        )
        return outputs[self.output_key]


def _kind(model_type: str, where: str) -> Literal["t5", "clip"]:
    if model_type in _T5_TYPES:
        return "t5"
    if model_type in _CLIP_TYPES:
        return "clip"
    raise UserError(
        f"{where} holds a {model_type!r} model, not a T5 or CLIP text encoder: FLUX needs google/t5-v1_1-xxl "
        "(or text_encoder_2 of a FLUX repo) and openai/clip-vit-large-patch14 (or text_encoder)"
    )


def _check_source(version: str) -> str:
    """`version` with ~ expanded; a clear error for a missing folder or a file where a folder belongs."""
    # A path that cannot be a repo id (absolute, ~ or ./) must exist; say so instead of a Hub lookup error.
    looks_like_path = os.path.isabs(version) or version.startswith(("~", "."))
    path = Path(version).expanduser()
    if looks_like_path and not path.exists():
        raise UserError(
            f"text encoder folder {version} does not exist: give an existing folder or a Hugging Face repo id"
        )
    if path.is_file():
        raise UserError(
            f"text encoder {version} is a file: give the folder that holds config.json and the tokenizer files"
        )
    return str(path) if looks_like_path else version
