"""Train flux-mini: the autoencoder, then the transformer (with its two small text encoders), then export.

    python -m mini.train ae   --out runs/mini [--steps N] [--minutes M] [--resume]
    python -m mini.train flow --out runs/mini [--steps N] [--minutes M] [--resume]
    python -m mini.train export --out runs/mini          # EMA weights -> flux/assets/mini + manifest.json

The architecture is `configs["flux-mini"]` of flux/util.py (the repo's own Flux and AutoEncoder). FLUX's conventions
are kept so the toolkit's sampler, inversion and hooks apply unchanged: x_t = t*eps + (1-t)*x0, the model predicts
v = eps - x0 (MSE), t ~ logit-normal(0, 1) pushed through the sampler's own time shift for 64 image tokens.

Every stage is seeded and resumable: a checkpoint holds the model, its EMA, the optimizer, the step and both RNG
states, written atomically in byte shards of < 16 MiB (small enough for the GPU machine to return), so a stage
continues exactly where it stopped, also in a later device call.
"""

from __future__ import annotations

import argparse
import copy
import functools
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
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from flux.errors import UserError
from flux.model import Flux
from flux.modules.autoencoder import AutoEncoder
from flux.sampling import get_lin_function, image_ids, pack, time_shift
from flux.util import ASSETS, configs

from .world import all_captions, render_batch, sample_batch

SPEC = configs["flux-mini"]
TINY_TOKENIZERS = ASSETS / "tiny"
PART_BYTES = 15 * 2**20  # checkpoint shard size, under the device's 16 MiB per returned file
TEXT_DIM = SPEC.params.context_in_dim
assert SPEC.params.vec_in_dim == TEXT_DIM

HPARAMS = {  # per stage; the command line can override batch, lr and warmup
    "ae": {"batch": 64, "lr": 5e-4, "warmup": 200, "wd": 0.0, "ema": 0.999, "kl": 1e-6},
    "flow": {"batch": 512, "lr": 4e-4, "warmup": 500, "wd": 0.01, "ema": 0.999},
}


# ------------------------------------------------------------------------------------------------ models


def build_text_encoders(seed: int) -> tuple[T5EncoderModel, CLIPTextModel, T5TokenizerFast, CLIPTokenizer]:
    """Small random T5 and CLIP with the repo's tiny tokenizers. They are trained jointly with the transformer:
    the tiny tokenizers split most world words into characters, which frozen random encoders mix too weakly."""
    t5_tok = T5TokenizerFast.from_pretrained(str(TINY_TOKENIZERS / "t5"))
    clip_tok = CLIPTokenizer.from_pretrained(str(TINY_TOKENIZERS / "clip"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=16, d_ff=2 * TEXT_DIM, num_layers=2, num_heads=4,
            relative_attention_num_buckets=16, relative_attention_max_distance=SPEC.max_length,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
            pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id,
        ))  # fmt: skip
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, projection_dim=TEXT_DIM,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        ))  # fmt: skip
    return t5, clip, t5_tok, clip_tok


class FlowStack(nn.Module):
    """What the flow stage trains: the transformer and both text encoders (one state dict, one EMA)."""

    def __init__(self, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.flow = Flux(SPEC.params)
        # adaLN-zero (as DiT): every block starts as the identity and the output as zero; only the init changes.
        for name, m in self.flow.named_modules():
            if name.endswith(("mod.lin", "modulation.lin", "adaLN_modulation.1")) or name == "final_layer.linear":
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self.t5, self.clip, _, _ = build_text_encoders(seed + 1)

    def encode(self, t5_ids: Tensor, clip_ids: Tensor) -> tuple[Tensor, Tensor]:
        """As HFEmbedder: no attention mask (padding attended), T5 last_hidden_state and CLIP pooler_output."""
        txt = self.t5(input_ids=t5_ids).last_hidden_state
        vec = self.clip(input_ids=clip_ids).pooler_output
        return txt, vec


def tokenize_world(device: torch.device) -> tuple[Tensor, Tensor]:
    """Token ids of every caption of the world (2430), tokenized exactly as HFEmbedder does."""
    t5_ids, clip_ids = _tokenize_world()
    return t5_ids.to(device), clip_ids.to(device)


@functools.cache
def _tokenize_world() -> tuple[Tensor, Tensor]:
    _, _, t5_tok, clip_tok = build_text_encoders(0)
    caps = all_captions()
    kw = dict(truncation=True, padding="max_length", return_attention_mask=False, return_tensors="pt")
    t5_ids = t5_tok(caps, max_length=SPEC.max_length, **kw)["input_ids"]
    clip_ids = clip_tok(caps, max_length=77, **kw)["input_ids"]
    longest = max(len(x) for x in t5_tok(caps)["input_ids"])
    assert longest <= SPEC.max_length, f"captions need {longest} T5 tokens, max_length is {SPEC.max_length}"
    return t5_ids, clip_ids


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
        atomic(folder / name, lambda tmp, chunk=chunk: Path(tmp).write_bytes(chunk))
        parts.append({"file": name, "sha256": hashlib.sha256(chunk).hexdigest()})
    index = {"step": state["step"], "parts": parts, "bytes": len(data), "sha256": digest}
    current, previous = folder / "ckpt.json", folder / "ckpt.prev.json"
    if current.exists() and digest not in current.read_text():  # saving the same state twice keeps the one before
        os.replace(current, previous)
    atomic(current, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
    keep = {
        part for f in (current, previous) if f.exists() for part in re.findall(r"ckpt-[\w-]+\.part\d+", f.read_text())
    }
    for old in folder.glob("ckpt-*.part*"):
        if old.name not in keep:
            old.unlink()


def atomic(path: Path, write: Callable[[str], object]) -> None:
    """`write(temp_path)`, then rename onto `path`: a kill never leaves a truncated file under the final name."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


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
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if damaged:
        raise UserError(
            f"every checkpoint in {folder} is damaged ({'; '.join(damaged)}): restore the folder from a copy, "
            "or delete it (or leave out --resume) to train that stage afresh"
        )
    return None


# ------------------------------------------------------------------------------------------------ training


def lr_at(step: int, hp: dict) -> float:
    """Linear warm-up, then constant: runs end on a time budget, so there is no fixed horizon to decay to; the EMA
    does the averaging."""
    lr = hp["lr"] * min(1.0, (step + 1) / hp["warmup"])
    if hp.get("anneal"):  # --anneal: linear decay to 0 over this run's --steps (a final cool-down)
        start, end = hp["anneal"]
        lr *= min(1.0, max(0.0, (end - step) / (end - start)))
    return lr


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))  # short effective horizon early on
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1 - d)


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


def flow_loss(stack: FlowStack, ae: AutoEncoder, ids: tuple[Tensor, Tensor], g_cpu, g_dev, batch: int):
    """FLUX's rectified-flow loss on a fresh batch of world images; returns (loss, per-sample loss, t)."""
    dev = ids[0].device
    scenes = sample_batch(batch, g_cpu, "train")
    cap = scenes.caption_index().to(dev)
    with torch.no_grad():
        x0 = ae.encode(render_batch(scenes, dev)).float()  # normalised latents (B, 16, 16, 16)
    eps = torch.randn(x0.shape, generator=g_dev, device=dev)
    t = sample_t(batch, g_dev, dev)
    xt = t[:, None, None, None] * eps + (1 - t[:, None, None, None]) * x0
    txt, vec = stack.encode(ids[0][cap], ids[1][cap])
    pred = stack.flow(
        img=pack(xt),
        img_ids=image_ids(batch, 8, 8, dev),
        txt=txt,
        txt_ids=torch.zeros(batch, txt.shape[1], 3, device=dev),
        timesteps=t,
        y=vec,
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

    if stage == "ae":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model: nn.Module = AutoEncoder(SPEC.ae_params)
    else:
        model = FlowStack(args.seed)
        ae = load_trained_ae(Path(args.out), device)
        ids = tokenize_world(device)
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
    state = load_checkpoint(out) if args.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g_cpu.set_state(state["rng_cpu"])
        g_dev.set_state(state["rng_dev"])
        step, history = state["step"], state["history"]
        print(f"[{stage}] resumed at step {step}", flush=True)
    elif args.resume:
        print(f"[{stage}] no checkpoint in {out}: starting fresh", flush=True)

    def checkpoint() -> None:
        save_checkpoint(out, {
            "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "rng_cpu": g_cpu.get_state(), "rng_dev": g_dev.get_state(), "history": history, "hparams": hp,
        })  # fmt: skip

    if args.anneal:
        if not args.steps:
            raise SystemExit("--anneal needs --steps")
        hp["anneal"] = (step, step + args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{stage}] {n_params:,} parameters on {device}, batch {hp['batch']}, lr {hp['lr']}", flush=True)
    target = step + args.steps if args.steps else None
    t0 = last_save = time.time()
    run_steps, acc = 0, {"loss": 0.0, "mse": 0.0, "n": 0, "bucket": torch.zeros(4), "bucket_n": torch.zeros(4)}
    while (target is None or step < target) and (args.minutes is None or time.time() - t0 < 60 * args.minutes):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, hp)
        with autocast:
            if stage == "ae":
                x = render_batch(sample_batch(hp["batch"], g_cpu, "train"), device)
                loss, mse = ae_loss(model, x, g_dev, hp["kl"])
            else:
                loss, per, t = flow_loss(model, ae, ids, g_cpu, g_dev, hp["batch"])
                mse = loss.detach()
                b = (t * 4).long().clamp(max=3).cpu()
                acc["bucket"].index_add_(0, b, per.float().cpu())
                acc["bucket_n"].index_add_(0, b, torch.ones_like(per.cpu()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, step, hp["ema"])
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
        atomic(out / "ae.safetensors", lambda tmp: save_file(weights, tmp))
        meta = {
            "scale_factor": scale,
            "shift_factor": shift,
            "step": step,
            "hparams": hp,
            "parameters": n_params,
            "final_loss": history[-1]["loss"] if history else None,
            "final_train_psnr": history[-1]["psnr"] if history else None,
        }
        atomic(out / "ae.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
        print(f"[ae] scale_factor {scale:.4f} shift_factor {shift:.4f}", flush=True)
    elif args.sample_eval:
        print(json.dumps(quick_eval(ema.flow, ema, ae, device, args.sample_eval)), flush=True)


@torch.no_grad()
def quick_eval(flow: Flux, stack: FlowStack, ae: AutoEncoder, device: torch.device, n: int) -> dict:
    """Detector accuracy of EMA samples for n heldout prompts (20 Euler steps), a progress signal while training;
    mini.evaluate measures the exported model through the toolkit's own pipeline."""
    from flux.sampling import denoise, get_noise, get_schedule, unpack

    from .detect import detect

    scenes = sample_batch(n, torch.Generator().manual_seed(0), "heldout")
    t5_ids, clip_ids = tokenize_world(device)
    cap = scenes.caption_index().to(device)
    txt, vec = stack.encode(t5_ids[cap], clip_ids[cap])
    noise = torch.cat([get_noise(1, 128, 128, device, torch.float32, s) for s in range(n)])
    x = denoise(flow, pack(noise), image_ids(n, 8, 8, device), txt, torch.zeros(n, txt.shape[1], 3, device=device), vec,
                get_schedule(20, 64, shift=SPEC.shift), guidance=0.0)  # fmt: skip
    imgs = ae.decode(unpack(x, 128, 128)).clamp(-1, 1).cpu()
    right = {"shape": 0, "colour": 0, "place": 0, "background": 0}
    for s, img in zip(scenes.scenes(), imgs):
        d = detect(img)
        for k in right:
            right[k] += getattr(d, k) == getattr(s, k)
    return {"quick_eval_heldout": {k: v / n for k, v in right.items()}}


# ------------------------------------------------------------------------------------------------ export


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(args: argparse.Namespace) -> None:
    """EMA weights -> flux/assets/mini: flow.safetensors (fp32, Flux.state_dict() keys), ae.safetensors (fp32,
    AutoEncoder.state_dict() keys), t5/ and clip/ (transformers folders with their tokenizers), manifest.json."""
    run = Path(args.out)
    dest = Path(args.assets)
    dest.mkdir(parents=True, exist_ok=True)
    flow_state = load_checkpoint(run / "flow")
    stack = FlowStack(0)
    stack.load_state_dict(flow_state["ema"])
    # fp32: the exact EMA weights (they fit the repository's size budget as they are).
    flow = {k: v.contiguous() for k, v in stack.flow.state_dict().items()}
    atomic(dest / "flow.safetensors", lambda tmp: save_file(flow, tmp))
    ae_file = run / "ae" / "ae.safetensors"
    atomic(dest / "ae.safetensors", lambda tmp: Path(tmp).write_bytes(ae_file.read_bytes()))
    _, _, t5_tok, clip_tok = build_text_encoders(0)
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
        "flow_params": asdict(SPEC.params),
        "ae_params": {
            **asdict(SPEC.ae_params),
            "scale_factor": ae_meta["scale_factor"],
            "shift_factor": ae_meta["shift_factor"],
        },
        "t5_max_length": SPEC.max_length,
        "text_encoders": "small T5 and CLIP trained jointly with the transformer (random init, seed+1)",
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
        "git_commit": commit,
        "sha256": {str(p.relative_to(dest)): sha256(p) for p in files},
        "evaluation": old.get("evaluation"),
    }
    atomic(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    total = sum(p.stat().st_size for p in files)
    print(
        f"exported to {dest}: {len(files)} files, {total / 2**20:.1f} MiB; update flux/util.py's flux-mini "
        f"ae_params to scale_factor={ae_meta['scale_factor']:.6g}, shift_factor={ae_meta['shift_factor']:.6g}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["ae", "flow", "export"])
    p.add_argument("--out", required=True, help="run folder: <out>/ae and <out>/flow hold checkpoints")
    p.add_argument("--steps", type=int, help="train this many more steps")
    p.add_argument("--minutes", type=float, help="stop (and save) after this many minutes")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<stage>/ckpt.json if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--anneal", action="store_true", help="decay the lr linearly to 0 over this run's --steps")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-minutes", type=float, default=3.0, help="checkpoint this often")
    p.add_argument("--measure-n", type=int, default=2048, help="ae: images to measure the latent scale/shift on")
    p.add_argument("--sample-eval", type=int, default=0, help="flow: detector accuracy of n heldout samples at the end")
    # export only: what the manifest records
    p.add_argument("--assets", default=str(ASSETS / "mini"))
    p.add_argument("--commands", nargs="*", help="the training commands, for the manifest")
    p.add_argument("--ae-minutes", type=float)
    p.add_argument("--flow-minutes", type=float)
    p.add_argument("--device-name", default=None)
    args = p.parse_args(argv)
    if args.stage == "export":
        export(args)
    else:
        if not args.steps and not args.minutes:
            p.error("give --steps and/or --minutes")
        print("$ python -m mini.train " + shlex.join(sys.argv[1:] if argv is None else argv), flush=True)
        train(args.stage, args)


if __name__ == "__main__":
    main()
