import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import UserError
from .model import Flux, FluxParams
from .modules.autoencoder import AutoEncoder, AutoEncoderParams

if TYPE_CHECKING:  # transformers is imported only when a text encoder is loaded
    from .modules.conditioner import HFEmbedder

PREFIX = "model.diffusion_model."


@dataclass
class ModelSpec:
    params: FluxParams
    ae_params: AutoEncoderParams
    repo_id: str | None  # None: built locally from a seed (flux-tiny)
    repo_flow: str | None
    repo_ae: str | None
    ckpt_env: tuple[str, ...]  # env vars naming a local transformer checkpoint, newest first
    t5_version: str
    clip_version: str
    max_length: int  # T5 tokens
    num_steps: int
    guidance: float
    shift: bool  # schedule shift (dev yes, schnell no)
    seed: int = 0  # weights seed for the locally built tiny model


_FULL_AE = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)


def _full_params(guidance_embed: bool) -> FluxParams:
    return FluxParams(
        in_channels=64,
        out_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_heads=24,
        depth=19,
        depth_single_blocks=38,
        axes_dim=[16, 56, 56],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=guidance_embed,
    )


configs: dict[str, ModelSpec] = {
    "flux-dev": ModelSpec(
        params=_full_params(guidance_embed=True),
        ae_params=_FULL_AE,
        repo_id="black-forest-labs/FLUX.1-dev",
        repo_flow="flux1-dev.safetensors",
        repo_ae="ae.safetensors",
        ckpt_env=("FLUX_MODEL", "FLUX_DEV"),
        t5_version="google/t5-v1_1-xxl",
        clip_version="openai/clip-vit-large-patch14",
        max_length=512,
        num_steps=50,
        guidance=3.5,
        shift=True,
    ),
    "flux-schnell": ModelSpec(
        params=_full_params(guidance_embed=False),
        ae_params=_FULL_AE,
        repo_id="black-forest-labs/FLUX.1-schnell",
        repo_flow="flux1-schnell.safetensors",
        repo_ae="ae.safetensors",
        ckpt_env=("FLUX_MODEL", "FLUX_SCHNELL"),
        t5_version="google/t5-v1_1-xxl",
        clip_version="openai/clip-vit-large-patch14",
        max_length=256,
        num_steps=4,
        guidance=0.0,
        shift=False,
    ),
    # The same architecture at toy size with random weights: runs every demo and test on a CPU in seconds.
    "flux-tiny": ModelSpec(
        params=FluxParams(
            in_channels=64,
            out_channels=64,
            vec_in_dim=32,
            context_in_dim=32,
            hidden_size=64,
            mlp_ratio=4.0,
            num_heads=2,
            depth=2,
            depth_single_blocks=4,
            axes_dim=[4, 14, 14],
            theta=10_000,
            qkv_bias=True,
            guidance_embed=True,
        ),
        ae_params=AutoEncoderParams(
            resolution=256,
            in_channels=3,
            ch=32,
            out_ch=3,
            ch_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            z_channels=16,
            scale_factor=0.3611,
            shift_factor=0.1159,
        ),
        repo_id=None,
        repo_flow=None,
        repo_ae=None,
        ckpt_env=(),
        t5_version="tiny",
        clip_version="tiny",
        max_length=32,
        num_steps=4,
        guidance=3.5,
        shift=True,
    ),
}


def model_spec(name: str) -> ModelSpec:
    if name not in configs:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(configs)}")
    return configs[name]


# ---------------------------------------------------------------------------------------------- checkpoints


def hub_file(repo_id: str, filename: str) -> str:
    """Download (or find in the HF cache) one file of a Hub repo, turning access problems into advice."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo_id, filename)
    except GatedRepoError as e:
        raise UserError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while logged in, then run "
            f"`hf auth login` (or set HF_TOKEN) — or download {filename} yourself and point to the local file "
            f"(config key flow_path/ae_path, or the FLUX_MODEL / FLUX_AE environment variables). ({e.__class__.__name__})"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} was not found on the Hub (or needs a login: `hf auth login` / HF_TOKEN).") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise UserError(
            f"could not download {filename} from {repo_id} ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
            "Check the network or HF_ENDPOINT (mirrors), or point to a local copy of the file "
            "(flow_path/ae_path in the config, or FLUX_MODEL / FLUX_AE)."
        ) from None


def resolve_checkpoint(path: str | None, env_vars: tuple[str, ...], repo_id: str | None, filename: str | None) -> str:
    """Where a checkpoint comes from, in order: explicit path, environment variable, the Hub."""
    if path:
        return path
    for var in env_vars:
        if os.environ.get(var):
            return os.environ[var]
    if repo_id is None or filename is None:
        raise UserError("no checkpoint path given and this model has no Hub repository")
    return hub_file(repo_id, filename)


def read_safetensors(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, casting each tensor as it is read (one tensor in flight, never two copies).

    Falls back to reading the bytes when the filesystem refuses mmap (OSError errno 19, ENODEV:
    network filesystems, some FUSE/WSL mounts).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load as load_bytes

    p = Path(path)
    if p.is_dir():
        found = sorted(x.name for x in p.glob("*.safetensors"))
        hint = f" It holds: {', '.join(found)}." if found else ""
        raise UserError(f"{p} is a folder, but a .safetensors file is expected: give the file's path.{hint}")
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist: check the path (config key or environment variable).")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    try:
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return {k: cast(f.get_tensor(k)) for k in f.keys()}
        except OSError as e:
            if e.errno != errno.ENODEV and "os error 19" not in str(e):
                raise
            return {k: cast(t) for k, t in load_bytes(p.read_bytes()).items()}
    except SafetensorError as e:
        raise UserError(
            f"{p} is not a valid safetensors file ({e}); it may be truncated by an interrupted download "
            f"({p.stat().st_size:,} bytes on disk): delete it and download it again."
        ) from None


def _key_problems(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> list[str]:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong_shape = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    problems = []

    def listing(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")

    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if wrong_shape:
        k = wrong_shape[0]
        problems.append(
            f"{len(wrong_shape)} tensors have the wrong shape, e.g. {k}: file {tuple(sd[k].shape)}, "
            f"model {tuple(expected[k])} (weights of a different model size?)"
        )
    if missing and all(k.startswith("guidance_in.") for k in missing):
        problems.append("these look like FLUX.1-schnell weights: use model flux-schnell, or give flux1-dev.safetensors")
    if unexpected and all(k.startswith("guidance_in.") for k in unexpected):
        problems.append("these look like FLUX.1-dev weights: use model flux-dev, or give flux1-schnell.safetensors")
    return problems


def load_weights(model: nn.Module, path: str, device: torch.device | str, dtype: torch.dtype | None) -> nn.Module:
    """Assign a checkpoint's tensors to a model built on the meta device; strict about keys and shapes."""
    sd = read_safetensors(path, device=device, dtype=dtype)
    if sd and all(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX) :]: v for k, v in sd.items()}
    problems = _key_problems(model, sd)
    if problems:
        raise UserError(f"{path} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def _seeded_init(build, seed: int, device, dtype) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(device=device, dtype=dtype)


def load_flow_model(
    name: str,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    path: str | None = None,
    verbose: bool = False,
) -> Flux:
    """The transformer of `name`, from `path`, $FLUX_MODEL, or the Hub (flux-tiny: random from its seed)."""
    spec = model_spec(name)
    if spec.repo_id is None and not path:
        return _seeded_init(lambda: Flux(spec.params), spec.seed, device, dtype).eval().requires_grad_(False)
    ckpt = resolve_checkpoint(path, spec.ckpt_env, spec.repo_id, spec.repo_flow)
    if verbose:
        print(f"loading {name} transformer from {ckpt}")
    with torch.device("meta"):
        model = Flux(spec.params)
    return load_weights(model, ckpt, device, dtype).eval().requires_grad_(False)


def load_ae(
    name: str,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float32,
    path: str | None = None,
    verbose: bool = False,
) -> AutoEncoder:
    """The autoencoder of `name`, from `path`, $FLUX_AE (older: $AE), or the Hub. fp32 by default: it is small."""
    spec = model_spec(name)
    if spec.repo_id is None and not path:
        return _seeded_init(lambda: AutoEncoder(spec.ae_params), spec.seed + 1, device, dtype).eval().requires_grad_(False)
    ckpt = resolve_checkpoint(path, ("FLUX_AE", "AE"), spec.repo_id, spec.repo_ae)
    if verbose:
        print(f"loading {name} autoencoder from {ckpt}")
    with torch.device("meta"):
        ae = AutoEncoder(spec.ae_params)
    return load_weights(ae, ckpt, device, dtype).eval().requires_grad_(False)


def load_t5(
    device: str | torch.device = "cuda",
    max_length: int = 512,
    version: str = "google/t5-v1_1-xxl",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> "HFEmbedder":
    """T5 text encoder; version "tiny" builds a small random one (no download)."""
    from .modules.conditioner import HFEmbedder

    if version == "tiny":
        return HFEmbedder.tiny("t5", max_length=max_length, seed=seed).to(device)
    return HFEmbedder(version, max_length, _subfolder(version, "text_encoder_2"), torch_dtype=dtype).to(device)


def load_clip(
    device: str | torch.device = "cuda",
    version: str = "openai/clip-vit-large-patch14",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> "HFEmbedder":
    """CLIP text encoder (pooled output); version "tiny" builds a small random one (no download)."""
    from .modules.conditioner import HFEmbedder

    if version == "tiny":
        return HFEmbedder.tiny("clip", max_length=77, seed=seed).to(device)
    return HFEmbedder(version, 77, _subfolder(version, "text_encoder"), torch_dtype=dtype).to(device)


def _subfolder(version: str, name: str) -> str | None:
    """A local copy of a diffusers-style repo (FLUX.1-dev keeps T5 in text_encoder_2/) works as it is."""
    return name if (Path(version) / name / "config.json").is_file() else None
