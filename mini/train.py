"""Train flux-mini: the autoencoder, then the transformer (with its two small text encoders), then export.

    python -m mini.train ae   --out runs/mini [--steps N] [--minutes M] [--resume]
    python -m mini.train flow --out runs/mini [--steps N] [--minutes M] [--resume]
    python -m mini.train compact --out runs/mini --dest D  # the flow checkpoint, small enough to travel
    python -m mini.train grow --out runs/mini --depth 6 --depth-single 16  # more blocks, same function; then flow
    python -m mini.train export --out runs/mini          # EMA weights -> flux/assets/mini + manifest.json

The architecture is `configs["flux-mini"]` of flux/util.py (the repo's own Flux and AutoEncoder). FLUX's conventions
are kept so the toolkit's sampler, inversion and hooks apply unchanged: x_t = t*eps + (1-t)*x0, the model predicts
v = eps - x0 (MSE), t ~ logit-normal(0, 1) pushed through the sampler's own time shift for 64 image tokens.

Every stage is seeded and resumable: a checkpoint holds the model, its EMA, the optimizer, the step and both RNG
states, written atomically in byte shards of < 16 MiB (small enough for the GPU machine to return), so a stage
continues exactly where it stopped, also in a later device call (with `--pool`, in all but which scenes come next);
`compact` makes one that fits the device's upload for a later session and the repo (the EMA alone: the model and
the optimizer's moments restart from it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    T5TokenizerFast,
)

from flux.assets.make_tiny_tokenizers import write_clip_tokenizer
from flux.errors import UserError
from flux.model import Flux, FluxParams
from flux.modules.autoencoder import AutoEncoder
from flux.sampling import get_lin_function, image_ids, pack, time_shift
from flux.util import ASSETS, configs
from stableflow.io import atomic_write_bytes, atomic_write_json, temp_files

from .world import VOCABULARY, SceneBatch, caption_words, render_batch, sample_batch

SPEC = configs["flux-mini"]
PART_BYTES = 15 * 2**20  # checkpoint shard size, under the device's 16 MiB per returned file
TEXT_DIM = SPEC.params.context_in_dim
assert SPEC.params.vec_in_dim == TEXT_DIM

HPARAMS = {  # per stage; the command line can override batch, lr and warmup
    "ae": {"batch": 64, "lr": 5e-4, "warmup": 200, "wd": 0.0, "ema": 0.999, "kl": 1e-6},
    "flow": {"batch": 512, "lr": 4e-4, "warmup": 500, "wd": 0.01, "ema": 0.999},
}


# ------------------------------------------------------------------------------------------------ models


def make_tokenizers(out: Path) -> Path:
    """Word-level T5 and CLIP tokenizers of the world's vocabulary in out/{t5,clip}: every caption word is one token
    (character-level pieces left binding colour to shape to place to the small encoders). Real tokenizers of FLUX's
    kinds, so the toolkit's HFEmbedder tokenizes flux-mini's prompts exactly as training does."""
    if (out / "t5" / "tokenizer.json").is_file() and (out / "clip" / "tokenizer.json").is_file():
        return out
    (out / "t5").mkdir(parents=True, exist_ok=True)
    (out / "clip").mkdir(parents=True, exist_ok=True)
    spiece = io.BytesIO()
    spm.SentencePieceTrainer.train(  # model_type=word: one piece per whitespace-separated word
        sentence_iterator=iter([" ".join(VOCABULARY)] * 4), model_writer=spiece, model_type="word",
        vocab_size=len(VOCABULARY) + 3, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
        character_coverage=1.0,
    )  # fmt: skip
    (out / "t5" / "spiece.model").write_bytes(spiece.getvalue())
    T5Tokenizer.from_pretrained(str(out / "t5"), model_max_length=SPEC.max_length, legacy=True, extra_ids=0
                                ).save_pretrained(str(out / "t5"))  # fmt: skip
    # CLIP: byte-level BPE whose merges build every vocabulary word into one token (merge until none is left).
    write_clip_tokenizer(out / "clip", collections.Counter(VOCABULARY), 10_000, 77)
    return out


def load_tokenizers(folder: Path) -> tuple[T5TokenizerFast, CLIPTokenizer]:
    return T5TokenizerFast.from_pretrained(str(folder / "t5")), CLIPTokenizer.from_pretrained(str(folder / "clip"))


def build_text_encoders(seed: int, tokenizers: Path) -> tuple[T5EncoderModel, CLIPTextModel]:
    """Small random T5 and CLIP for the world's word-level tokenizers, trained jointly with the transformer."""
    t5_tok, clip_tok = load_tokenizers(tokenizers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=TEXT_DIM // 4, d_ff=2 * TEXT_DIM, num_layers=2,
            num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=SPEC.max_length,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
            pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id,
        ))  # fmt: skip
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, projection_dim=TEXT_DIM,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        ))  # fmt: skip
    return t5, clip


class FlowStack(nn.Module):
    """What the flow stage trains: the transformer and both text encoders (one state dict, one EMA)."""

    def __init__(self, seed: int, tokenizers: Path, params: FluxParams = SPEC.params):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.flow = Flux(params)
        # adaLN-zero (as DiT): every block starts as the identity and the output as zero; only the init changes.
        for name, m in self.flow.named_modules():
            if name.endswith(("mod.lin", "modulation.lin", "adaLN_modulation.1")) or name == "final_layer.linear":
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self.t5, self.clip = build_text_encoders(seed + 1, tokenizers)

    def encode(self, t5_ids: Tensor, clip_ids: Tensor) -> tuple[Tensor, Tensor]:
        """As HFEmbedder: no attention mask (padding attended), T5 last_hidden_state and CLIP pooler_output."""
        txt = self.t5(input_ids=t5_ids).last_hidden_state
        vec = self.clip(input_ids=clip_ids).pooler_output
        return txt, vec


class WorldTokens:
    """Token ids of a SceneBatch's captions without strings: `caption_words` mapped through each tokenizer's id of
    every vocabulary word, plus its special tokens and padding, exactly as HFEmbedder tokenizes (a test pins it)."""

    def __init__(self, tokenizers: Path, device: torch.device):
        t5_tok, clip_tok = load_tokenizers(tokenizers)
        self.device = device

        def table(tok) -> Tensor:
            ids = [tok(w, add_special_tokens=False)["input_ids"] for w in VOCABULARY]
            assert all(len(i) == 1 for i in ids), "a vocabulary word is not one token"
            return torch.tensor([i[0] for i in ids], device=device)

        self.t5 = (table(t5_tok), t5_tok.eos_token_id, t5_tok.pad_token_id, SPEC.max_length)
        self.clip = (table(clip_tok), clip_tok.eos_token_id, clip_tok.pad_token_id, 77, clip_tok.bos_token_id)

    def __call__(self, b: SceneBatch) -> tuple[Tensor, Tensor]:
        return self.from_words(caption_words(b).to(self.device))

    def empty(self, n: int) -> tuple[Tensor, Tensor]:
        """The ids of the empty caption "", n times: caption dropout's unconditional input."""
        return self.from_words(torch.full((n, 1), -1, device=self.device))

    def from_words(self, words: Tensor) -> tuple[Tensor, Tensor]:
        """(n, W) vocabulary indices, -1 after the last word -> (T5 ids, CLIP ids)."""
        n_words = (words >= 0).sum(1, keepdim=True)
        ar = torch.arange(words.shape[1], device=self.device)

        def ids(table: Tensor, eos: int, pad: int, length: int, bos: int | None = None) -> Tensor:
            body = torch.where(words >= 0, table[words.clamp(min=0)], pad)
            body = torch.where(ar == n_words, eos, body)  # eos right after the last word (words always has a slot free)
            if bos is not None:
                body = torch.cat([torch.full_like(body[:, :1], bos), body], 1)
            out = torch.full((len(words), length), pad, device=self.device, dtype=torch.long)
            out[:, : body.shape[1]] = body[:, :length]
            return out

        return ids(*self.t5), ids(*self.clip)


def load_trained_ae(out: Path, device: torch.device) -> AutoEncoder:
    """The AE stage's result: EMA weights with their measured latent scale and shift."""
    meta = json.loads((out / "ae" / "ae.json").read_text())
    ae = AutoEncoder(replace(SPEC.ae_params, scale_factor=meta["scale_factor"], shift_factor=meta["shift_factor"]))
    ae.load_state_dict(load_file(str(out / "ae" / "ae.safetensors")))
    return ae.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(folder: Path, state: dict) -> None:
    """torch.save bytes split into shards, each with its SHA-256, written to a temp file and renamed. ckpt.json
    (renamed last) names the shards of the newest complete checkpoint and ckpt.prev.json those of the one before,
    so a kill at any moment leaves a loadable checkpoint and a damaged newest one falls back to the previous."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    parts = []
    for i in range(0, max(len(data), 1), PART_BYTES):
        chunk = data[i : i + PART_BYTES]
        name = f"ckpt-{state['step']:07d}-{digest[:12]}.part{i // PART_BYTES}"  # never the name of another's shard
        atomic_write_bytes(folder / name, chunk)
        parts.append({"file": name, "sha256": hashlib.sha256(chunk).hexdigest()})
    index = {"step": state["step"], "parts": parts, "bytes": len(data), "sha256": digest}
    current, previous = folder / "ckpt.json", folder / "ckpt.prev.json"
    if current.exists() and digest not in current.read_text():  # saving the same state twice keeps the one before
        os.replace(current, previous)
    atomic_write_json(current, index, indent=1)
    keep = {
        part for f in (current, previous) if f.exists() for part in re.findall(r"ckpt-[\w-]+\.part\d+", f.read_text())
    }
    # Also the temp file of a shard whose write a kill cut short.
    for old in [*folder.glob("ckpt-*.part*"), *temp_files(folder, "ckpt-*.part*")]:
        if old.name not in keep:
            old.unlink()


def load_checkpoint(folder: Path) -> dict | None:
    """The newest checkpoint in `folder` whose every shard matches its SHA-256: ckpt.json, else (saying why)
    ckpt.prev.json. None where there is none; a UserError where every one there is damaged."""
    damaged = []
    for index_path in (folder / "ckpt.json", folder / "ckpt.prev.json"):
        if not index_path.exists():
            continue
        try:
            index = json.loads(index_path.read_text())
            data = b""
            for part in index["parts"]:
                # A checkpoint written before per-shard digests names its shards only; the whole one is checked.
                name, want = (part, None) if isinstance(part, str) else (part["file"], part["sha256"])
                chunk = (folder / name).read_bytes()
                if want is not None and hashlib.sha256(chunk).hexdigest() != want:
                    raise ValueError(f"{name} does not match its SHA-256")
                data += chunk
            if hashlib.sha256(data).hexdigest() != index["sha256"]:
                raise ValueError("the shards together do not match the checkpoint's SHA-256")
        except (OSError, ValueError, KeyError, TypeError) as e:
            damaged.append(f"{index_path.name}: {e}")
            continue
        if damaged:
            print(f"warning: {folder / damaged[0]} is damaged; using the previous checkpoint (step {index['step']})")
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if "model" not in state and "ema" in state:  # a compact checkpoint: training goes on from its EMA
            state["model"] = {k: v.float() if v.is_floating_point() else v for k, v in state["ema"].items()}
        return state
    if damaged:
        raise UserError(
            f"every checkpoint in {folder} is damaged ({'; '.join(damaged)}): restore the folder from a copy, "
            "or delete it (or leave out --resume) to train that stage afresh"
        )
    return None


def stack_params(state: dict | None) -> FluxParams:
    """The transformer's shape a flow checkpoint holds: its own where `grow` deepened it, else the spec's."""
    given = (state or {}).get("flow_params")
    return SPEC.params if given is None else FluxParams(**given)


def grow(folder: Path, depth: int, depth_single: int) -> None:
    """Deepen the flow checkpoint in `folder` to `depth` double and `depth_single` single blocks, in place. The old
    blocks keep their weights and order, spread evenly through the deeper stacks; every new block is adaLN-zero
    (its gates are zero) so the grown transformer computes exactly what the old one did, and `flow --resume` trains
    on from there (the optimizer's moments restart, as after `compact`)."""
    state = load_checkpoint(folder)
    if state is None:
        raise UserError(f"no flow checkpoint in {folder}: train the flow stage (or copy mini/checkpoint) first")
    old = stack_params(state)
    if depth < old.depth or depth_single < old.depth_single_blocks:
        raise UserError(f"grow only deepens: the checkpoint has {old.depth} double and {old.depth_single_blocks} "
                        f"single blocks, asked for {depth} and {depth_single}")  # fmt: skip
    new = replace(old, depth=depth, depth_single_blocks=depth_single)
    where = {
        "double_blocks": [i * depth // old.depth for i in range(old.depth)],
        "single_blocks": [i * depth_single // old.depth_single_blocks for i in range(old.depth_single_blocks)],
    }

    def moved(key: str) -> str:
        m = re.match(r"flow\.(double_blocks|single_blocks)\.(\d+)\.(.*)", key)
        return key if m is None else f"flow.{m[1]}.{where[m[1]][int(m[2])]}.{m[3]}"

    fresh = FlowStack(0, folder.parent / "tokenizers", new).state_dict()
    for part in ("model", "ema"):
        grown = dict(fresh)
        grown.update({moved(k): v for k, v in state[part].items()})
        state[part] = grown
    state.pop("opt", None)
    state["flow_params"] = asdict(new)
    state["history"] = [*state["history"], {"step": state["step"], "grown": where}]
    save_checkpoint(folder, state)
    print(f"grew {folder} at step {state['step']} to {depth} double + {depth_single} single blocks; old ones at "
          f"{where}", flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------ training


def lr_at(step: int, hp: dict, left: float | None = None) -> float:
    """Linear warm-up, then constant: runs end on a time budget, so there is no fixed horizon to decay to; the EMA
    does the averaging. `left`: the fraction of this run's time budget still to go."""
    lr = hp["lr"] * min(1.0, (step - hp.get("warmup_from", 0) + 1) / hp["warmup"])
    if hp.get("anneal"):  # --anneal: linear decay to 0 over this run's --steps (a final cool-down)
        start, end = hp["anneal"]
        lr *= min(1.0, max(0.0, (end - step) / (end - start)))
    if left is not None and hp.get("anneal_frac"):  # --anneal-frac: the same over the last part of --minutes
        lr *= min(1.0, max(0.0, left / hp["anneal_frac"]))
    return lr


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))  # short effective horizon early on
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1 - d)


def update(
    model: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module, loss: Tensor, step: int, decay: float
) -> Tensor:
    """One optimiser step on `loss`: backward, gradients clipped to norm 1, AdamW, then the EMA; returns the
    gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema_update(ema, model, step, decay)
    return grad_norm


def sample_t(n: int, g: torch.Generator, device: torch.device) -> Tensor:
    """Logit-normal(0, 1) times, shifted as get_schedule(..., shift=True) shifts them for 128x128 (64 tokens)."""
    mu = get_lin_function()(64)
    t = torch.sigmoid(torch.randn(n, generator=g, device=device))
    return time_shift(mu, 1.0, t)


def ae_loss(ae: AutoEncoder, x: Tensor, g: torch.Generator, kl_weight: float) -> tuple[Tensor, Tensor]:
    """L1 + MSE of the reconstruction from a posterior sample, plus a tiny KL; returns (loss, mse)."""
    mean, logvar = ae.encoder(x).float().chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g, device=x.device)
    rec = ae.decoder(z).float()
    mse = F.mse_loss(rec, x)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    return F.l1_loss(rec, x) + mse + kl_weight * kl, mse


def fresh_batch(ae: AutoEncoder, tokens: WorldTokens, g_cpu: torch.Generator, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """n new world scenes: their normalised latents (n, 16, 16, 16) and T5 / CLIP token ids."""
    scenes = sample_batch(n, g_cpu, "train")
    with torch.no_grad():
        x0 = ae.encode(render_batch(scenes, tokens.device)).float()
    return x0, *tokens(scenes)


class LatentPool:
    """Encoded scenes kept on the device, so a step costs the transformer alone: rendering and the AE encode took a
    third of an H100 step at batch 512 (benchmarks/profile_mini_train.py). Each step replaces `refresh` random
    entries with new scenes, so the pool keeps drawing from the whole world instead of cycling through epochs. A
    resumed run draws a new pool: resume is exact in weights, optimizer and step, not in which scenes come next."""

    def __init__(self, ae: AutoEncoder, tokens: WorldTokens, g_cpu: torch.Generator, size: int, refresh: int):
        self.ae, self.tokens, self.g_cpu, self.refresh = ae, tokens, g_cpu, refresh
        parts = [fresh_batch(ae, tokens, g_cpu, min(2048, size - i)) for i in range(0, size, 2048)]
        self.x0, self.t5, self.clip = (torch.cat(p) for p in zip(*parts, strict=True))
        self.x0 = self.x0.to(torch.bfloat16)  # halves the pool; bf16's rounding (0.4%) is far below the flow loss

    def draw(self, n: int, g_dev: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        dev = self.x0.device
        if self.refresh:
            slots = torch.randint(len(self.x0), (self.refresh,), generator=g_dev, device=dev)
            x0, t5, clip = fresh_batch(self.ae, self.tokens, self.g_cpu, self.refresh)
            self.x0[slots], self.t5[slots], self.clip[slots] = x0.to(self.x0.dtype), t5, clip
        i = torch.randint(len(self.x0), (n,), generator=g_dev, device=dev)
        return self.x0[i].float(), self.t5[i], self.clip[i]


def drop_captions(
    t5: Tensor, clip: Tensor, empty: tuple[Tensor, Tensor], p: float, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Caption dropout: each sample's captions become the empty one with probability p, so the model also learns
    the unconditional velocity that classifier-free guidance extrapolates from."""
    drop = _dropped(len(t5), p, g, t5.device)
    if drop is None:
        return t5, clip
    return torch.where(drop, empty[0][: len(t5)], t5), torch.where(drop, empty[1][: len(t5)], clip)


def drop_pooled(clip: Tensor, empty: Tensor, p: float, g: torch.Generator) -> Tensor:
    """Pooled-vector dropout: each sample's CLIP caption (the pooled vector that modulates every block) becomes the
    empty one with probability p while its T5 tokens stay, so the caption must also reach the image through
    attention, which injection acts on."""
    drop = _dropped(len(clip), p, g, clip.device)
    return clip if drop is None else torch.where(drop, empty[: len(clip)], clip)


def _dropped(n: int, p: float, g: torch.Generator, device: torch.device) -> Tensor | None:
    """Which of n samples a dropout of rate p takes, as an (n, 1) mask; None at p = 0, which draws no random numbers,
    so a run without dropout is the run it was before the option existed."""
    if p <= 0:
        return None
    return (torch.rand(n, generator=g, device=g.device) < p)[:, None].to(device)


def drop_layers(n: int, num_layers: int, p: float, g: torch.Generator) -> list[set[int]] | None:
    """Layer dropout (stochastic depth, per sample): each of n samples bypasses each block with probability p,
    through the transformer's own skip hook, so that no one block is indispensable (as most of FLUX.1's 57 are
    not); None at p = 0, which draws no random numbers."""
    if p <= 0:
        return None
    rows = (torch.rand(n, num_layers, generator=g, device=g.device) < p).cpu().tolist()
    return [{i for i, dropped in enumerate(row) if dropped} for row in rows]


def flow_loss(
    stack: FlowStack, x0: Tensor, t5_ids: Tensor, clip_ids: Tensor, g_dev: torch.Generator,
    skip: list[set[int]] | None = None,
):  # fmt: skip
    """FLUX's rectified-flow loss on a batch of latents and captions (`skip`: per-sample bypassed blocks, as
    `drop_layers` draws them); returns (loss, per-sample loss, t)."""
    dev, batch = x0.device, len(x0)
    eps = torch.randn(x0.shape, generator=g_dev, device=dev)
    t = sample_t(batch, g_dev, dev)
    xt = t[:, None, None, None] * eps + (1 - t[:, None, None, None]) * x0
    txt, vec = stack.encode(t5_ids, clip_ids)
    pred = stack.flow(
        img=pack(xt),
        img_ids=image_ids(batch, 8, 8, dev),
        txt=txt,
        txt_ids=torch.zeros(batch, txt.shape[1], 3, device=dev),
        timesteps=t,
        y=vec,
        skip=skip,
    )
    per = ((pred.float() - pack(eps - x0)) ** 2).mean(dim=(1, 2))
    return per.mean(), per.detach(), t


def measure_latents(ae: AutoEncoder, device: torch.device, n: int = 2048, seed: int = 123) -> tuple[float, float]:
    """(scale_factor, shift_factor) that make the posterior means zero-mean, unit-variance on world images."""
    g = torch.Generator().manual_seed(seed)
    means = []
    with torch.no_grad():
        for _ in range(max(n // 64, 1)):
            x = render_batch(sample_batch(64, g, "train"), device)
            means.append(ae.encoder(x).float().chunk(2, dim=1)[0].cpu())
    m = torch.cat(means)
    return 1.0 / float(m.std()), float(m.mean())


def train(stage: str, args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hp = {**HPARAMS[stage], **{k: v for k, v in (("batch", args.batch), ("lr", args.lr), ("warmup", args.warmup)) if v}}
    out = Path(args.out) / stage
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    state = load_checkpoint(out) if args.resume else None

    if stage == "ae":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model: nn.Module = AutoEncoder(SPEC.ae_params)
        if args.init:  # fine-tune from an earlier AE of the same architecture
            model.load_state_dict(load_file(args.init))
    else:
        tokenizers = make_tokenizers(Path(args.out) / "tokenizers")
        model = FlowStack(args.seed, tokenizers, stack_params(state))
        ae = load_trained_ae(Path(args.out), device)
        tokens = WorldTokens(tokenizers, device)
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay, no_decay = [], []
    for p in model.parameters():  # no weight decay on gains, biases and embeddings' norms
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["wd"]}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(0.9, 0.99), fused=device.type == "cuda")  # fmt: skip
    g_cpu = torch.Generator().manual_seed(args.seed)  # scenes
    g_dev = torch.Generator(device=device).manual_seed(args.seed + 1)  # noise, t
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        if "opt" in state:
            opt.load_state_dict(state["opt"])
        else:  # a compact checkpoint (see `compact`): the moments restart, so warm up again
            hp["warmup_from"] = state["step"]
        g_cpu.set_state(state["rng_cpu"])
        step, history = state["step"], state["history"]
        try:
            g_dev.set_state(state["rng_dev"])
        except RuntimeError:  # saved by another kind of device (a GPU's state, resumed on a CPU): a new noise stream
            g_dev.manual_seed(args.seed + 1 + step)
            print(f"[{stage}] the checkpoint's noise generator is another device's: {device}'s starts afresh")
        print(f"[{stage}] resumed at step {step}", flush=True)
    elif args.resume:
        print(f"[{stage}] no checkpoint in {out}: starting fresh", flush=True)
    if args.compile and stage == "flow":  # in place: the state dict's keys (and so checkpoints) stay the same
        # Layer dropout's skip sets differ every step, which a whole-model graph would recompile for: then compile
        # block by block and leave the skip hook's choice between blocks eager.
        blocks = [*model.flow.double_blocks, *model.flow.single_blocks]
        for m in blocks if args.layer_drop else [model.flow]:
            m.compile()

    def checkpoint() -> None:
        save_checkpoint(out, {
            "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "rng_cpu": g_cpu.get_state(), "rng_dev": g_dev.get_state(), "history": history, "hparams": hp,
            **({"flow_params": asdict(model.flow.params)} if stage == "flow" else {}),
        })  # fmt: skip

    hp["anneal_frac"] = args.anneal_frac
    if stage == "flow":
        hp["caption_dropout"], hp["pooled_dropout"] = args.caption_dropout, args.pooled_dropout
        hp["layer_drop"] = args.layer_drop
        empty = tokens.empty(hp["batch"])
    if args.anneal:
        if not args.steps:
            raise SystemExit("--anneal needs --steps")
        hp["anneal"] = (step, step + args.steps)
    pool = None
    if stage == "flow" and args.pool:
        with autocast:
            pool = LatentPool(ae, tokens, g_cpu, args.pool, args.refresh)
        print(f"[flow] pool of {args.pool:,} encoded scenes, {args.refresh} replaced a step", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{stage}] {n_params:,} parameters on {device}, batch {hp['batch']}, lr {hp['lr']}", flush=True)
    target = step + args.steps if args.steps else None
    t0 = last_save = time.time()
    run_steps, acc = 0, {"loss": 0.0, "mse": 0.0, "n": 0, "bucket": torch.zeros(4), "bucket_n": torch.zeros(4)}
    while (target is None or step < target) and (args.minutes is None or time.time() - t0 < 60 * args.minutes):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, hp, 1 - (time.time() - t0) / (60 * args.minutes) if args.minutes else None)
        with autocast:
            if stage == "ae":
                x = render_batch(sample_batch(hp["batch"], g_cpu, "train"), device)
                loss, mse = ae_loss(model, x, g_dev, hp["kl"])
            else:
                x0, t5, clip = pool.draw(hp["batch"], g_dev) if pool else fresh_batch(ae, tokens, g_cpu, hp["batch"])
                t5, clip = drop_captions(t5, clip, empty, hp["caption_dropout"], g_dev)
                clip = drop_pooled(clip, empty[1], hp["pooled_dropout"], g_dev)
                skip = drop_layers(len(x0), model.flow.num_layers, hp["layer_drop"], g_dev)
                loss, per, t = flow_loss(model, x0, t5, clip, g_dev, skip)
                mse = loss.detach()
                b = (t * 4).long().clamp(max=3).cpu()
                acc["bucket"].index_add_(0, b, per.float().cpu())
                acc["bucket_n"].index_add_(0, b, torch.ones_like(per.cpu()))
        grad_norm = update(model, opt, ema, loss, step, hp["ema"])
        step += 1
        run_steps += 1
        acc["loss"] += loss.item()
        acc["mse"] += mse.item()
        acc["n"] += 1
        if step % args.log_every == 0 or step == target:
            rec = {"step": step, "loss": acc["loss"] / acc["n"], "grad_norm": float(grad_norm),
                   "steps_per_s": run_steps / (time.time() - t0), "minutes": (time.time() - t0) / 60}  # fmt: skip
            if stage == "ae":
                rec["psnr"] = 10 * math.log10(4 / max(acc["mse"] / acc["n"], 1e-12))  # [-1, 1] pixels: peak 2
            else:
                rec["loss_by_t"] = (acc["bucket"] / acc["bucket_n"].clamp(min=1)).tolist()  # t in [0,.25),..,[.75,1]
            history.append(rec)
            print(json.dumps(rec), flush=True)
            acc = {"loss": 0.0, "mse": 0.0, "n": 0, "bucket": torch.zeros(4), "bucket_n": torch.zeros(4)}
        if time.time() - last_save > 60 * args.save_minutes:
            checkpoint()
            last_save = time.time()
    checkpoint()
    print(f"[{stage}] stopped at step {step} after {(time.time() - t0) / 60:.1f} min; checkpoint in {out}", flush=True)

    if stage == "ae":  # the shipped AE: EMA weights plus the latent normalisation measured with them
        scale, shift = measure_latents(ema, device, args.measure_n)
        weights = {k: v.contiguous() for k, v in ema.state_dict().items()}
        atomic_write_bytes(out / "ae.safetensors", safetensors_bytes(weights))
        meta = {
            "scale_factor": scale,
            "shift_factor": shift,
            "step": step,
            "hparams": hp,
            "parameters": n_params,
            "final_loss": history[-1]["loss"] if history else None,
            "final_train_psnr": history[-1]["psnr"] if history else None,
        }
        atomic_write_json(out / "ae.json", meta, indent=1)
        print(f"[ae] scale_factor {scale:.4f} shift_factor {shift:.4f}", flush=True)


# ------------------------------------------------------------------------------------------------ export


def compact(src: Path, dest: Path) -> None:
    """The flow checkpoint small enough to travel between device sessions and to ship (the tree that travels is
    <= 64 MiB): the EMA alone, in bf16 (the weights `export` ships), without the raw model or the optimizer's
    moments. `flow --resume` restarts both from it: the model from the EMA (`load_checkpoint`), AdamW's moments
    with a fresh warm-up."""
    state = load_checkpoint(src)
    state.pop("opt", None)  # absent where src is itself compact
    state.pop("model")
    state["ema"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state["ema"].items()}
    save_checkpoint(dest, state)
    print(f"compact checkpoint of step {state['step']} in {dest}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict:
    """An export folder's manifest.json (what `export` writes), or a UserError naming the folder."""
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable flux-mini manifest ({e}): give a folder `mini.train export` "
                        "wrote") from None  # fmt: skip


def record_evaluation(folder: Path, name: str, result: dict) -> None:
    """Adds a measurement of an export's weights to its manifest under `name`, atomically (a kill mid-write leaves
    the old manifest, never a truncated one) and under a lock on the folder, so that evaluations running side by side
    (docs/gallery.sh runs two at a time) each add their record instead of one writing over the other's."""
    with _folder_lock(Path(folder)):
        manifest = read_manifest(folder)
        manifest["evaluation"] = {**(manifest.get("evaluation") or {}), name: result}
        atomic_write_json(Path(folder) / "manifest.json", manifest, indent=1)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock between processes on `folder` itself (its inode outlives the files renamed into it); where
    the OS has no flock (Windows), none."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def classifier_free(manifest: dict) -> bool:
    """Whether the exported transformer's last flow stage trained with caption dropout, so its guidance is
    classifier-free (flux.util.ModelSpec.cfg)."""
    return manifest["training"]["flow"]["hparams"].get("caption_dropout", 0.0) > 0


@torch.no_grad()
def hold_empty_pooled(clip: CLIPTextModel, empty_ids: Tensor) -> None:
    """Make `clip` return the empty caption's pooled vector for every caption: the pooled output is the final norm's
    output at the end token, so a zero gain and that vector as the bias. For weights trained with pooled-vector
    dropout, this takes the caption out of the vector that modulates every block, leaving it only to attention."""
    empty = clip(input_ids=empty_ids).pooler_output[0]
    norm = getattr(clip, "text_model", clip).final_layer_norm  # transformers 5 flattened CLIPTextModel
    norm.weight.zero_()
    norm.bias.copy_(empty)


def export(args: argparse.Namespace) -> None:
    """EMA weights -> flux/assets/mini: flow.safetensors (bf16, Flux.state_dict() keys), ae.safetensors (fp32,
    AutoEncoder.state_dict() keys), t5/ and clip/ (transformers folders with their tokenizers), manifest.json."""
    run = Path(args.out)
    dest = Path(args.assets)
    dest.mkdir(parents=True, exist_ok=True)
    flow_state = load_checkpoint(run / "flow")
    tokenizers = run / "tokenizers"
    stack = FlowStack(0, tokenizers, stack_params(flow_state))
    stack.load_state_dict(flow_state["ema"])
    # bf16: the repository's size budget (the loader casts to the dtype the user asks for).
    flow = {k: v.to(torch.bfloat16).contiguous() for k, v in stack.flow.state_dict().items()}
    atomic_write_bytes(dest / "flow.safetensors", safetensors_bytes(flow))
    ae_file = run / "ae" / "ae.safetensors"
    atomic_write_bytes(dest / "ae.safetensors", ae_file.read_bytes())
    t5_tok, clip_tok = load_tokenizers(tokenizers)
    if args.empty_pooled:
        hold_empty_pooled(stack.clip, WorldTokens(tokenizers, torch.device("cpu")).empty(1)[1])
    for name, model, tok in (("t5", stack.t5, t5_tok), ("clip", stack.clip, clip_tok)):
        model.save_pretrained(str(dest / name))
        tok.save_pretrained(str(dest / name))
    ae_meta = json.loads((run / "ae" / "ae.json").read_text())
    manifest_path = dest / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    files = sorted(p for p in dest.rglob("*") if p.is_file() and p.name != "manifest.json")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:  # no git
        commit = None

    def last(history: list[dict], key: str) -> float | None:
        return next((h[key] for h in reversed(history) if key in h), None)

    manifest = {
        "model": "flux-mini",
        "flow_params": asdict(stack.flow.params),
        "ae_params": {
            **asdict(SPEC.ae_params),
            "scale_factor": ae_meta["scale_factor"],
            "shift_factor": ae_meta["shift_factor"],
        },
        "t5_max_length": SPEC.max_length,
        "text_encoders": "small T5 and CLIP with word-level tokenizers, trained jointly with the transformer",
        "parameters": {
            "flow": sum(v.numel() for v in stack.flow.state_dict().values()),
            "ae": ae_meta["parameters"],
            "t5": sum(p.numel() for p in stack.t5.parameters()),
            "clip": sum(p.numel() for p in stack.clip.parameters()),
        },
        "training": {
            "commands": args.commands or old.get("training", {}).get("commands", []),
            "seed": args.seed,
            "ae": {
                "steps": ae_meta["step"],
                "hparams": ae_meta["hparams"],
                "final_loss": ae_meta["final_loss"],
                "final_train_psnr": ae_meta["final_train_psnr"],
                "minutes": args.ae_minutes,
            },
            "flow": {
                "steps": flow_state["step"],
                "hparams": flow_state["hparams"],
                "final_loss": last(flow_state["history"], "loss"),
                "final_loss_by_t": last(flow_state["history"], "loss_by_t"),
                "minutes": args.flow_minutes,
            },
            "device": args.device_name,
        },  # fmt: skip
        "empty_pooled": args.empty_pooled,
        "git_commit": commit,
        "sha256": {str(p.relative_to(dest)): sha256(p) for p in files},
    }
    # An evaluation describes the weights it measured: kept only when the export wrote the very same files.
    manifest["evaluation"] = old.get("evaluation") if old.get("sha256") == manifest["sha256"] else None
    atomic_write_json(manifest_path, manifest, indent=1)
    total = sum(p.stat().st_size for p in files)
    print(
        f"exported to {dest}: {len(files)} files, {total / 2**20:.1f} MiB; update flux/util.py's flux-mini "
        f"ae_params to scale_factor={ae_meta['scale_factor']:.6g}, shift_factor={ae_meta['shift_factor']:.6g}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["ae", "flow", "compact", "grow", "export"])
    p.add_argument("--out", required=True, help="run folder: <out>/ae and <out>/flow hold checkpoints")
    p.add_argument("--steps", type=int, help="train this many more steps")
    p.add_argument("--minutes", type=float, help="stop (and save) after this many minutes")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<stage>/ckpt.json if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--anneal", action="store_true", help="decay the lr linearly to 0 over this run's --steps")
    p.add_argument("--anneal-frac", type=float, default=0.0, help="... or over this last fraction of --minutes")
    p.add_argument("--dest", help="compact: folder for the compact flow checkpoint")
    p.add_argument("--depth", type=int, help="grow: double blocks after growing")
    p.add_argument("--depth-single", type=int, help="grow: single blocks after growing")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--init", help="ae: start from these AE weights (same architecture) instead of random")
    p.add_argument("--pool", type=int, default=0, help="flow: keep this many encoded scenes on the device (0: none)")
    p.add_argument("--refresh", type=int, default=64, help="flow: new scenes into the pool each step")
    p.add_argument("--compile", action="store_true", help="flow: torch.compile the transformer (CUDA)")
    p.add_argument("--caption-dropout", type=float, default=0.0,
                   help="flow: train this fraction of samples on the empty caption (for classifier-free guidance)")  # fmt: skip
    p.add_argument("--pooled-dropout", type=float, default=0.0,
                   help="flow: train this fraction of samples on the empty caption's pooled CLIP vector, T5 kept")  # fmt: skip
    p.add_argument("--layer-drop", type=float, default=0.0,
                   help="flow: each sample bypasses each block with this probability (stochastic depth)")  # fmt: skip
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-minutes", type=float, default=3.0, help="checkpoint this often")
    p.add_argument("--measure-n", type=int, default=2048, help="ae: images to measure the latent scale/shift on")
    # export only: what the manifest records
    p.add_argument("--assets", default=str(ASSETS / "mini"))
    p.add_argument("--commands", nargs="*", help="the training commands, for the manifest")
    p.add_argument("--ae-minutes", type=float)
    p.add_argument("--flow-minutes", type=float)
    p.add_argument("--device-name", default=None)
    p.add_argument("--empty-pooled", action="store_true",
                   help="export a CLIP whose pooled vector is the empty caption's for every caption")  # fmt: skip
    args = p.parse_args(argv)
    if args.stage == "export":
        export(args)
    elif args.stage == "compact":
        compact(Path(args.out) / "flow", Path(args.dest))
    elif args.stage == "grow":
        if args.depth is None or args.depth_single is None:
            p.error("grow needs --depth and --depth-single")
        grow(Path(args.out) / "flow", args.depth, args.depth_single)
    else:
        if not args.steps and not args.minutes:
            p.error("give --steps and/or --minutes")
        for flag in ("caption_dropout", "pooled_dropout", "layer_drop"):
            if not 0 <= getattr(args, flag) < 1:
                p.error(f"--{flag.replace('_', '-')} is a probability in [0, 1), got {getattr(args, flag)}")
        print("$ python -m mini.train " + shlex.join(sys.argv[1:] if argv is None else argv), flush=True)
        train(args.stage, args)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # e.g. every checkpoint in the folder damaged: the message names the fix
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
