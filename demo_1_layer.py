"""Watch FLUX denoise: every step's noisy latent x_t and predicted clean image x0, as PNGs, a grid and a GIF.

    python demo_1_layer.py configs/demo_1_layer.json [key=value ...]   (--print-config lists every key)
    python demo_1_layer.py configs/demo_1_layer.json 'skip_layers=[18]'  # the same, with layer 18 bypassed
"""

from stableflow.config import run_demo
from stableflow.trajectory import TrajectoryConfig, run

if __name__ == "__main__":
    run_demo(TrajectoryConfig, run, description=__doc__.split("\n\n")[0])
