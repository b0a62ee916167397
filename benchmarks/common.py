"""Shared pieces of the GPU benchmarks: random full-size models, inputs, timing, JSON results.

Weights are random (no checkpoint is needed to measure speed), drawn per tensor from a generator on
the target device seeded by the tensor's position, so every run and every process builds the same
model without ever materialising 12B parameters on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flux.model import Flux, FluxParams
from flux.sampling import image_ids
from flux.util import configs

if TYPE_CHECKING:
    from flux.modules.conditioner import HFEmbedder


def add_common_args(parser) -> None:
    parser.add_argument(
        "--tiny", action="store_true", help="flux-tiny on the CPU at toy sizes: checks the script, not speed"
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    parser.add_argument(
        "--reps", type=int, default=None, help="timed repetitions per measurement, median reported (default 10; tiny 1)"
    )


def parse_args(parser: argparse.ArgumentParser, reps: int = 10) -> argparse.Namespace:
    """The arguments, with --reps defaulting to `reps`, and to one for --tiny (it checks the script, not speed)."""
    args = parser.parse_args()
    if args.reps is None:
        args.reps = 1 if args.tiny else reps
    return args


def env_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(
            gpu=prop.name, gpu_memory_gib=round(prop.total_memory / 2**30, 1), capability=f"{prop.major}.{prop.minor}"
        )
        try:
            import subprocess

            info["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                .stdout.split("\n")[0]
                .strip()
            )
        except OSError:
            pass
    return info


def model_params(tiny: bool) -> FluxParams:
    return configs["flux-tiny" if tiny else "flux-dev"].params


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter in place: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02²), norm scales ~ U(0.5, 1.5).

    The 1/fan_in variance keeps activations O(1) through 57 residual blocks, so that differences
    between implementations are measured on outputs of a realistic scale.
    """
    for i, (name, p) in enumerate(sorted(module.named_parameters())):
        g = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        if name.endswith(".scale"):
            p.uniform_(0.5, 1.5, generator=g)
        elif p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            p.normal_(0.0, fan_in**-0.5, generator=g)
        else:
            p.normal_(0.0, 0.02, generator=g)
    return module


def random_flux(params: FluxParams, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Flux:
    """Flux built on the meta device and materialised directly on `device` with random weights."""
    with torch.device("meta"):
        model = Flux(params)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: the fp32 model never exists on the device
    return randomize_(model, seed).eval()


def random_module(build, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    with torch.device("meta"):
        module = build()
    return randomize_(module.to(dtype).to_empty(device=device), seed).eval().requires_grad_(False)


def full_size_text_encoders(device: torch.device, dtype: torch.dtype) -> tuple[HFEmbedder, HFEmbedder]:
    """T5-XXL and CLIP-L shapes with random weights; the tiny tokenizers (their ids fit any vocabulary)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux.modules.conditioner import HFEmbedder

    t5_cfg = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    clip_cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
    )
    t5 = HFEmbedder.tiny("t5", max_length=512)
    t5.hf_module = random_module(lambda: T5EncoderModel(t5_cfg), device, dtype, seed=7)
    # CLIP is built for real, not on meta: its position_ids buffer must hold 0..76 (to_empty leaves garbage there).
    clip = HFEmbedder.tiny("clip", max_length=77)
    clip.hf_module = CLIPTextModel(clip_cfg).to(device, dtype).eval().requires_grad_(False)
    return t5, clip


def random_inputs(
    params: FluxParams, batch: int, size: int, txt_len: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, Tensor]:
    """Transformer inputs for `batch` images of size² pixels (size/16 latent patches a side)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = w = size // 16
    return {
        "img": torch.randn(batch, h * w, params.in_channels, generator=g).to(device, dtype),
        "img_ids": image_ids(batch, h, w, device),
        "txt": torch.randn(batch, txt_len, params.context_in_dim, generator=g).to(device, dtype),
        "txt_ids": torch.zeros(batch, txt_len, 3, device=device),
        "timesteps": torch.full((batch,), 0.7, device=device, dtype=dtype),
        "y": torch.randn(batch, params.vec_in_dim, generator=g).to(device, dtype),
        "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype),
    }


def diffusers_twin(model: Flux):
    """diffusers' FluxTransformer2DModel holding the same weights (views of ours: no second copy).

    The key mapping is flux.convert's, the one the loaders use; the tests check our forward against their own,
    independent mapping (tests/diffusers_oracle.py), so the benchmarks measure a twin the tests vouch for.
    """
    from diffusers import FluxTransformer2DModel

    from flux.convert import to_diffusers, transformer_config, transformer_rules

    with torch.device("meta"):
        twin = FluxTransformer2DModel(**transformer_config(model.params))
    twin.load_state_dict(to_diffusers(model.state_dict(), transformer_rules(model.params)), strict=True, assign=True)
    return twin.eval()


def diffusers_forward(twin, x: dict[str, Tensor]) -> Tensor:
    """diffusers' forward on the inputs of our Flux.forward (keyword names as ours).

    A deliberate copy of tests/diffusers_oracle.py's: benchmarks do not import the tests (flux/UPSTREAM.md)."""
    return twin(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"] if twin.config.guidance_embeds else None,
        return_dict=False,
    )[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 10, warmup: int = 2) -> dict:
    """Median and spread of `reps` timed calls after `warmup` untimed ones (CUDA events on a GPU); one warm-up call
    for a single repetition (tiny runs)."""
    warmup = min(warmup, reps)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "max_ms": round(max(times), 3),
        "reps": reps,
    }


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call including everything it triggers (compilation)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return round(time.perf_counter() - t0, 2)


def uncompile(model: Flux) -> None:
    """Back to eager blocks (to re-compile under other settings); the compile caches are dropped."""
    from flux import accel

    for block in accel.blocks(model):
        block._compiled_call_impl = None
    torch._dynamo.reset()


def compare(out: Tensor, ref: Tensor) -> dict:
    """max |out - ref|, that over max |ref|, and the relative L2 error ‖out - ref‖ / ‖ref‖ (in fp32)."""
    out, ref = out.float(), ref.float()
    d = out - ref
    return {
        "max_abs": float(d.abs().max()),
        "max_rel": float(d.abs().max() / ref.abs().max()),
        "rel_l2": float(d.norm() / ref.norm()),
        "ref_max_abs": float(ref.abs().max()),
        "finite": bool(torch.isfinite(out).all()),
    }


def gib(n: float) -> float:
    return round(n / 2**30, 3)


class Results:
    """A JSON file rewritten after every update, so a run cut short still leaves what it measured."""

    def __init__(self, path: str | os.PathLike, **header):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict = dict(header)

    def set(self, *keys: str, value) -> None:
        node = self.data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)
        print(f"[{time.strftime('%H:%M:%S')}] {' / '.join(keys)}: {json.dumps(value, default=str)}", flush=True)


def attention_context(spec: str, device: torch.device):
    """ "cudnn" prefers cuDNN (falls back); "cudnn!" uses cuDNN alone; "default" leaves torch's own order."""
    import contextlib

    from flux import accel

    if spec == "default":
        return contextlib.nullcontext()
    return accel.attention_backend(spec.rstrip("!"), device, strict=spec.endswith("!"))


def sdpa_timings(
    device: torch.device,
    batch: int,
    seq: int,
    heads: int = 24,
    head_dim: int = 128,
    specs: tuple[str, ...] = ("default", "auto", "cudnn!", "flash!", "efficient!"),
    reps: int = 20,
) -> dict:
    """ms of one joint-attention call (FLUX layout, bf16) under each attention spec; an error message where
    the spec cannot run these inputs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=g).to(device, torch.bfloat16) for _ in range(3))
    out = {}
    for spec in specs:
        try:
            with attention_context(spec, device):
                t = time_ms(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, reps=reps, warmup=3
                )
            out[spec] = t["median_ms"]
        except RuntimeError as e:
            out[spec] = f"error: {str(e).splitlines()[0][:200]}"
    return out


def fastest_attention(
    device: torch.device, batch: int, seq: int, specs: tuple[str, ...] = ("auto", "cudnn!", "flash!")
) -> tuple[str, dict]:
    """The attention spec with the fastest SDPA call at this shape (auto on a CPU)."""
    if device.type != "cuda":
        return "auto", {}
    times = sdpa_timings(device, batch, seq, specs=specs)
    ok = {s: t for s, t in times.items() if isinstance(t, float)}
    return min(ok, key=ok.get), times
