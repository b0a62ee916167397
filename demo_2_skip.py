"""Layer-ablation sweep (Stable Flow, Sec. 3.1): each prompt's reference image and one image per bypassed layer.

    python demo_2_skip.py configs/demo_2_skip.json                       # one process
    torchrun --nproc_per_node 8 demo_2_skip.py configs/demo_2_skip.json  # one process per GPU (multi-node too)
    python demo_2_skip.py configs/demo_2_skip.json num_prompts=4 'layers=[0,1,2]'

Writes <output_dir>/<prompt_id>/ref.png and layer_XX.png plus <output_dir>/manifest.json; rerun with the same
settings to resume: only missing images are made.  --print-config lists every key.
"""

from stableflow.config import run_demo
from stableflow.sweep import SkipConfig, run

if __name__ == "__main__":
    run_demo(SkipConfig, run, description=__doc__.split("\n\n")[0])
