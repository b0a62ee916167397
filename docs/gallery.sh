#!/usr/bin/env bash
# Writes every flux-mini picture and number of the README (docs/images/mini_*.png, outputs/mini_eval/*.json|md) on a
# CPU, from the shipped weights: the demos' mini configs, then mini.evaluate's text-to-image grading, ablations,
# layer sweep and conditioning run, and demo_5's mini table.
set -euo pipefail
cd "$(dirname "$0")/.."
python demo_2_skip.py configs/mini/demo_2_skip.json
python demo_3_dino.py configs/mini/demo_3_dino.json  # the vital layers the mini demo_4s and the ablation use
# Two lanes at once: a flux-mini run takes half the cores (flux.pipeline.cpu_threads), so two fill a 2-core CPU and
# the whole takes about half as long. The second lane's output goes to a log; a failure in either stops the script.
mkdir -p outputs
(
    python demo_3_dino.py configs/mini/demo_3_dino_ssim.json  # the same sweep by SSIM, for contrast
    python demo_4_edit.py configs/mini/demo_4_edit.json
    python demo_4_edit.py configs/mini/demo_4_edit_real.json
    python -m mini.evaluate --ablation --vital-layers 0,1 --cases 64 --out outputs/mini_eval_01  # the [0, 1] finding
    python -m mini.evaluate --conditioning --cases 16 --out outputs/mini_eval --update-manifest  # T5 vs pooled vector
    python demo_5_bench.py configs/mini/demo_5_bench.json  # the benchmark's mini table
) >outputs/gallery_second_lane.log 2>&1 &
second=$!
trap 'if kill -0 "$second" 2>/dev/null; then pkill -P "$second"; kill "$second" 2>/dev/null; fi' EXIT  # no orphaned lane
python -m mini.evaluate --n 100 --out outputs/mini_eval --update-manifest
python -m mini.evaluate --ablation --cases 64 --out outputs/mini_eval --update-manifest  # demo_3's vital layers
python -m mini.evaluate --layer-sweep --cases 16 --out outputs/mini_eval --update-manifest  # one layer at a time
wait "$second" || { tail -20 outputs/gallery_second_lane.log; exit 1; }
cp outputs/mini_eval/heldout.png docs/images/mini_text2img.png
cp outputs/mini/demo_3_dino/vitality.png docs/images/mini_vitality.png
cp outputs/mini/demo_4_edit/grid.png docs/images/mini_edit.png
cp outputs/mini/demo_4_edit_real/grid.png docs/images/mini_edit_real.png
cp outputs/mini_eval/ablation.png docs/images/mini_ablation.png
cp outputs/mini_eval/layer_sweep.png docs/images/mini_layer_sweep.png
