"""Where a flux-mini flow training step spends its time, phase by phase, and what a larger batch or compilation buys.

    python benchmarks/profile_mini_train.py --out DIR [--ckpt mini/checkpoint]   # GPU
    python benchmarks/profile_mini_train.py --tiny --out DIR                     # CPU: checks the script

Builds the flow stage exactly as `mini.train flow` does (FlowStack, the trained AE from --ckpt, WorldTokens) and
times, cuda-synchronised, each phase of one step: drawing scenes (CPU), rendering, the AE encode, token ids, the
text encoders, the transformer forward, backward, clip + AdamW, EMA. Then the whole step at each --batches, with and
without torch.compile of the transformer, and the top CUDA kernels of one step. Writes DIR/profile_mini_train.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from common import sync

# `common` puts the repository on sys.path, so the project's imports stay below it.
# isort: split
from flux.sampling import image_ids, pack
from mini.train import (
    FlowStack,
    WorldTokens,
    ema_update,
    flow_loss,
    fresh_batch,
    load_trained_ae,
    make_tokenizers,
    sample_t,
    update,
)
from mini.world import render_batch, sample_batch


def phases(stack, ae, tokens, opt, ema, batch: int, dev: torch.device, reps: int) -> dict[str, float]:
    g_cpu, g_dev = torch.Generator().manual_seed(0), torch.Generator(device=dev).manual_seed(1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    times: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        sync(dev)
        t = time.perf_counter()
        times.setdefault(name, []).append(t - t0)
        return t

    for _ in range(reps + 1):
        sync(dev)
        t = time.perf_counter()
        scenes = sample_batch(batch, g_cpu, "train")
        t = tick("sample_batch (cpu)", t)
        img = render_batch(scenes, dev)
        t = tick("render_batch", t)
        with autocast:
            with torch.no_grad():
                x0 = ae.encode(img).float()
            t = tick("ae.encode", t)
            ids = tokens(scenes)
            t = tick("token ids", t)
            txt, vec = stack.encode(*ids)
            t = tick("text encoders fwd", t)
            eps = torch.randn(x0.shape, generator=g_dev, device=dev)
            tt = sample_t(batch, g_dev, dev)
            xt = tt[:, None, None, None] * eps + (1 - tt[:, None, None, None]) * x0
            pred = stack.flow(img=pack(xt), img_ids=image_ids(batch, 8, 8, dev), txt=txt,
                              txt_ids=torch.zeros(batch, txt.shape[1], 3, device=dev), timesteps=tt, y=vec)  # fmt: skip
            loss = ((pred.float() - pack(eps - x0)) ** 2).mean()
            t = tick("flow fwd", t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t = tick("backward", t)
        torch.nn.utils.clip_grad_norm_(stack.parameters(), 1.0)
        opt.step()
        t = tick("clip + adamw", t)
        ema_update(ema, stack, 0, 0.999)
        t = tick("ema", t)
        loss.item()
    return {k: 1000 * sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}  # median ms, first rep warms up


def whole_step(stack, ae, tokens, opt, ema, batch: int, dev: torch.device, reps: int) -> float:
    g_cpu, g_dev = torch.Generator().manual_seed(0), torch.Generator(device=dev).manual_seed(1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    for i in range(reps + 3):
        if i == 3:
            sync(dev)
            t0 = time.perf_counter()
        with autocast:
            loss, _, _ = flow_loss(stack, *fresh_batch(ae, tokens, g_cpu, batch), g_dev)
        update(stack, opt, ema, loss, i, 0.999)
        loss.item()
    sync(dev)
    return 1000 * (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default="mini/checkpoint", help="a run folder with ae/ (and tokenizers/)")
    p.add_argument("--tiny", action="store_true", help="CPU, small batches, two reps: checks the script")
    p.add_argument("--batches", default="512,1024,2048")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    batches = [8, 16] if args.tiny else [int(b) for b in args.batches.split(",")]
    reps = 2 if args.tiny else args.reps
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizers(out / "tokenizers")
    stack = FlowStack(0, tok).to(dev).train()
    ae = load_trained_ae(Path(args.ckpt), dev)
    tokens = WorldTokens(tok, dev)
    ema = copy.deepcopy(stack).eval().requires_grad_(False)
    opt = torch.optim.AdamW(stack.parameters(), lr=1e-4, fused=dev.type == "cuda")
    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    res["phases_ms"] = phases(stack, ae, tokens, opt, ema, batches[0], dev, reps)
    print(json.dumps(res), flush=True)
    res["step_ms"] = {f"eager b{b}": whole_step(stack, ae, tokens, opt, ema, b, dev, reps) for b in batches}
    print(json.dumps(res["step_ms"]), flush=True)
    if dev.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            whole_step(stack, ae, tokens, opt, ema, batches[0], dev, 1)
        res["top_kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        print(res["top_kernels"], flush=True)
        stack.flow = torch.compile(stack.flow)
        ae.encoder = torch.compile(ae.encoder)
        for b in batches:
            res["step_ms"][f"compiled b{b}"] = whole_step(stack, ae, tokens, opt, ema, b, dev, reps)
            print(json.dumps(res["step_ms"]), flush=True)
    (out / "profile_mini_train.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
