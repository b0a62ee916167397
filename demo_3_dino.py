"""Find FLUX's vital layers: DINOv2 similarity of every layer-bypassed image (demo_2_skip.py) to its reference.

    python demo_3_dino.py configs/demo_3_dino.json            # score a sweep -> vital_layers.json, CSV, plots
    python demo_3_dino.py image_a=a.png image_b=b.png         # plain mode: similarity of two images
    python demo_3_dino.py folder_a=runA folder_b=runB         # plain mode: of same-named images in two folders

Re-running after more sweep images arrive embeds only the new ones (features are cached inside the sweep folder).
"""

from stableflow.config import run_demo
from stableflow.vitality import DinoConfig, run

if __name__ == "__main__":
    run_demo(DinoConfig, run, description=__doc__.split("\n\n")[0])
