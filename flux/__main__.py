"""`python -m flux`: the official CLI's main flags, running our text-to-image path."""

import argparse
import json
import random
import sys

from .config import run_demo
from .text2img import Text2ImgConfig, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flux", description="Text to image with FLUX.")
    parser.add_argument("command", nargs="?", choices=["t2i"], help="optional, as in the official CLI")
    parser.add_argument("--name", default="flux-schnell", help="flux-dev, flux-schnell or flux-tiny")
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--prompt", default=Text2ImgConfig.prompt)
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--num_steps", type=int, default=None, help="default: 4 for schnell, 50 for dev")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--output_dir", default="output")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args(argv)
    seed = random.randrange(2**31) if args.seed is None else args.seed
    # As the official CLI: sizes are floored to multiples of 16 rather than rejected.
    width, height = 16 * (args.width // 16), 16 * (args.height // 16)
    overrides = {
        "model": args.name, "width": width, "height": height, "prompt": args.prompt, "seed": seed,
        "steps": args.num_steps, "guidance": args.guidance, "offload": args.offload, "output_dir": args.output_dir,
        "device": args.device, "dtype": args.dtype,
    }
    # The same validation and error handling as the demos (exit status 2 with one clear message).
    pairs = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    run_demo(Text2ImgConfig, lambda cfg: print("\n".join(str(p) for p in run(cfg))), argv=pairs)


if __name__ == "__main__":
    main(sys.argv[1:])
