"""Stable Flow editing: python demo_4_edit.py config.json [key=value ...]  (--print-config lists every key).

    python demo_4_edit.py configs/demo_4_edit.json        # generated image: reference + edits from one seed
    python demo_4_edit.py configs/demo_4_edit_real.json   # real image: invert, reconstruct, edit

Edits attend with the reference's image keys/values in the vital layers (a list, demo_3_dino.py's
vital_layers.json, or the release's default). Outputs: PNGs, a captioned grid.png, results.json.
"""

from stableflow.config import run_demo
from stableflow.edit import EditConfig, run

if __name__ == "__main__":
    run_demo(EditConfig, run, description=__doc__)
