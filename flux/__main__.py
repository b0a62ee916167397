"""`python -m flux`: the official CLI's main flags, text to image with this package."""

import argparse
import json
import random
import re
import sys
from pathlib import Path

from PIL import PngImagePlugin

from .errors import UserError
from .util import configs

DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_PROMPT = (
    'a photo of a forest with mist swirling around the tree trunks. The word "FLUX" is painted over it in big, red '
    "brush strokes with visible texture"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flux", description="Text to image with FLUX.")
    parser.add_argument("command", nargs="?", choices=["t2i"], help="optional, as in the official CLI")
    parser.add_argument("--name", default="flux-schnell", choices=list(configs))
    parser.add_argument("--width", type=int, default=None, help="default: 1360 (flux-mini: 128, its native size)")
    parser.add_argument("--height", type=int, default=None, help="default: 768 (flux-mini: 128)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--num_steps", type=int, default=None, help="default: the model's (schnell 4, dev 50)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's (dev 3.5)")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--output_dir", default="output")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    args = parser.parse_args(argv)
    spec = configs[args.name]
    seed = random.randrange(2**31) if args.seed is None else args.seed
    # As the official CLI, 1360x768, except for a model trained at another size (flux-mini draws texture at 1360).
    if args.width is None:
        args.width = spec.native_size or 1360
    if args.height is None:
        args.height = spec.native_size or 768
    # Recorded as the model uses it: None (null) where it has no effect.
    guidance = (spec.guidance if args.guidance is None else args.guidance) if spec.uses_guidance else None
    # As the official CLI: sizes are floored to multiples of 16 rather than rejected, but we say so.
    width, height = 16 * (args.width // 16), 16 * (args.height // 16)
    if (width, height) != (args.width, args.height):
        print(f"size {args.width}x{args.height} floored to {width}x{height}: FLUX needs multiples of 16")
    try:
        from .pipeline import load_models, resolve_device, resolve_dtype, tensor_to_pil

        if min(width, height) < 16:
            raise UserError(f"width and height must be at least 16, got {args.width}x{args.height}")
        if args.num_steps is not None and args.num_steps < 1:
            raise UserError(f"--num_steps must be at least 1, got {args.num_steps}")
        models = load_models(args.name, resolve_device(args.device), resolve_dtype(args.dtype), offload=args.offload)
        steps = models.spec.num_steps if args.num_steps is None else args.num_steps
        image = models.generate([args.prompt], [seed], width, height, steps, 0.0 if guidance is None else guidance)[0]
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # As the official CLI: the next index after the highest one there, so no earlier image is overwritten.
        taken = [int(m[1]) for p in out.glob("img_*.png") if (m := re.fullmatch(r"img_(\d+)\.png", p.name))]
        path = out / f"img_{max(taken, default=-1) + 1}.png"
        info = PngImagePlugin.PngInfo()
        for key, value in {
            "prompt": args.prompt,
            "seed": seed,
            "model": args.name,
            "steps": steps,
            "guidance": guidance,
        }.items():
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        tensor_to_pil(image).save(path, pnginfo=info)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({width}x{height}, seed {seed}, {steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
