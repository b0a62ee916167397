#!/usr/bin/env bash
# Every GPU benchmark in one go on a 2-GPU machine, results and logs into $1 (default benchmarks/results).
#   GPU 0: profile_transformer.py, bench_transformer.py      GPU 1: bench_memory.py, then bench_sweep.py (1 GPU)
#   then both GPUs: bench_sweep.py under torchrun (2 processes)
# Each step has its own time limit, so one that hangs cannot take the others with it.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; } > "$out/sweep.log" 2>&1

(
    CUDA_VISIBLE_DEVICES=0 timeout "${T_PROFILE:-100}" python3 benchmarks/profile_transformer.py --out "$out" > "$out/profile.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout "${T_TRANSFORMER:-300}" python3 benchmarks/bench_transformer.py --out "$out" --reps 8 \
        >> "$out/profile.log" 2>&1
) &
(
    CUDA_VISIBLE_DEVICES=1 timeout "${T_MEMORY:-200}" python3 benchmarks/bench_memory.py --out "$out" > "$out/memory.log" 2>&1
    CUDA_VISIBLE_DEVICES=1 timeout "${T_SWEEP1:-170}" python3 benchmarks/bench_sweep.py --out "$out" --tag 1gpu --fuse-gelu >> "$out/sweep.log" 2>&1
) &
wait
timeout "${T_SWEEP2:-140}" python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_sweep.py --out "$out" --tag 2gpu --fuse-gelu \
    >> "$out/sweep.log" 2>&1
for f in "$out"/*.log; do echo "== $f"; grep -E "Error|Traceback" -A2 "$f" | tail -8; tail -n 4 "$f" | cut -c1-400; done
