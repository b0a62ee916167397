"""Text to image with FLUX: python demo_0_test.py config.json [key=value ...]  (--print-config lists every key)."""

from stableflow.config import run_demo
from stableflow.text2img import Text2ImgConfig, run

if __name__ == "__main__":
    run_demo(Text2ImgConfig, run, description=__doc__)
