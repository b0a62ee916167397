import errno
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from . import convert
from .errors import UserError
from .model import Flux, FluxParams
from .modules.autoencoder import AutoEncoder, AutoEncoderParams

if TYPE_CHECKING:  # transformers is imported only when a text encoder is loaded
    from .modules.conditioner import HFEmbedder

PREFIX = "model.diffusion_model."
ASSETS = Path(__file__).resolve().parent / "assets"
T = TypeVar("T")


@dataclass
class ModelSpec:
    params: FluxParams
    ae_params: AutoEncoderParams
    repo_id: str | None  # None: built locally from a seed (flux-tiny)
    repo_flow: str | None
    repo_ae: str | None
    ckpt_env: tuple[str, ...]  # env vars naming a local transformer checkpoint, newest first
    # Where T5 and CLIP come from: a FLUX repo id or local copy (its text_encoder_2/ + tokenizer_2/, text_encoder/ +
    # tokenizer/), or a transformers repo such as T5_FALLBACK / CLIP_FALLBACK to ask for those; "tiny": random.
    t5_version: str
    clip_version: str
    max_length: int  # T5 tokens
    num_steps: int
    guidance: float
    shift: bool  # schedule shift (dev yes, schnell no)
    seed: int = 0  # weights seed for the locally built tiny model
    # Weights bundled with the repo (flux-mini), relative to flux/assets; used when no explicit path is given.
    local_flow: str | None = None
    local_ae: str | None = None
    # The square size the model was trained at, where it is not FLUX.1's (flux-mini: 128); None for FLUX.1's sizes.
    native_size: int | None = None
    # `guidance` is a true classifier-free guidance scale against the empty prompt (flux.sampling.CFG), for a model
    # without a guidance embedding that was trained with caption dropout; else it goes to the guidance embedding
    # (dev) or nowhere (schnell), as in the official sampler.
    cfg: bool = False

    @property
    def uses_guidance(self) -> bool:
        """Whether samples depend on `guidance`: through a guidance embedding (dev) or classifier-free guidance."""
        return self.params.guidance_embed or self.cfg


# Text encoders outside the FLUX repos, used when a spec asks for them or a FLUX repo lacks its encoder folders.
# Downloads: FLUX.1's text_encoder_2/ holds T5-XXL's encoder in bf16 safetensors (~9.5 GB) and text_encoder/ CLIP-L's
# text model (~246 MB); google/t5-v1_1-xxl holds only a 44.5 GB fp32 pickle (encoder and decoder), loaded by
# transformers with weights_only.
T5_FALLBACK = "google/t5-v1_1-xxl"
CLIP_FALLBACK = "openai/clip-vit-large-patch14"


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
        t5_version="black-forest-labs/FLUX.1-dev",
        clip_version="black-forest-labs/FLUX.1-dev",
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
        t5_version="black-forest-labs/FLUX.1-schnell",
        clip_version="black-forest-labs/FLUX.1-schnell",
        max_length=256,
        num_steps=4,
        guidance=0.0,
        shift=False,
    ),
    # FLUX.1 Krea [dev]: a dev finetune (same architecture); repository and file names as in the official BFL
    # registry (black-forest-labs/flux, src/flux/util.py, where it is named "flux-dev-krea"). Gated like dev.
    "flux-krea-dev": ModelSpec(
        params=_full_params(guidance_embed=True),
        ae_params=_FULL_AE,
        repo_id="black-forest-labs/FLUX.1-Krea-dev",
        repo_flow="flux1-krea-dev.safetensors",
        repo_ae="ae.safetensors",
        ckpt_env=("FLUX_MODEL",),
        t5_version="black-forest-labs/FLUX.1-Krea-dev",
        clip_version="black-forest-labs/FLUX.1-Krea-dev",
        max_length=512,
        num_steps=50,
        guidance=4.5,  # the hosted endpoints' default for this model (dev: 3.5)
        shift=True,
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
    # FLUX's architecture at toy size (4 double + 8 single blocks), trained from scratch on the world of mini/
    # (`mini.train`); its weights and text encoders ship in flux/assets/mini, so generation, ablation and editing run
    # on a CPU.
    "flux-mini": ModelSpec(
        params=FluxParams(
            in_channels=64,
            out_channels=64,
            vec_in_dim=128,
            context_in_dim=128,
            hidden_size=128,
            mlp_ratio=4.0,
            num_heads=4,
            depth=6,
            depth_single_blocks=16,
            axes_dim=[4, 14, 14],
            theta=10_000,
            qkv_bias=True,
            guidance_embed=False,
        ),
        ae_params=AutoEncoderParams(
            resolution=128,
            in_channels=3,
            ch=32,
            out_ch=3,
            ch_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            z_channels=16,
            scale_factor=2.1421137629452285,  # measured on world images after training (mini.train ae writes them)
            shift_factor=-0.007739841006696224,
        ),
        repo_id=None,
        repo_flow=None,
        repo_ae=None,
        ckpt_env=(),
        t5_version=str(ASSETS / "mini" / "t5"),
        clip_version=str(ASSETS / "mini" / "clip"),
        max_length=32,
        num_steps=20,
        guidance=0.0,
        shift=True,
        local_flow="mini/flow.safetensors",
        local_ae="mini/ae.safetensors",
        native_size=128,
    ),
}


def model_spec(name: str) -> ModelSpec:
    if name not in configs:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(configs)}")
    return configs[name]


# ---------------------------------------------------------------------------------------------- checkpoints


# Where to point instead of the Hub, for the FLUX weights; other callers pass their own `hint`.
FLUX_LOCAL_HINT = "point to local files instead (flow_path/ae_path in the config, or FLUX_MODEL / FLUX_AE)"
# Seconds for the one request that asks the Hub whether a file exists (huggingface_hub's own default is 10 s, and
# after a failed first request hf_hub_download retries for ~25 s): without a network the advice comes at once.
HUB_CHECK_TIMEOUT = 4.0


def hub_cached_file(repo_id: str, filename: str) -> str | None:
    """The local path of a file of a Hub repo when the HF cache (HF_HOME / HF_HUB_CACHE) holds it; never asks the Hub."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None  # may also be a "known not to exist" marker


def hub_file_exists(repo_id: str, filename: str, hint: str = FLUX_LOCAL_HINT) -> bool:
    """Ask the Hub once, with a short timeout and no retries, whether `filename` is in `repo_id`.

    False when the repository answers that the file is absent; a UserError with the fixes (network, HF_ENDPOINT,
    HF_HUB_OFFLINE and the cache, login/HF_TOKEN, `hint`) when the Hub cannot be asked or refuses access.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
    )

    where = f"{repo_id} (looking up {filename})"
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set, so it "
            f"cannot be downloaded: unset HF_HUB_OFFLINE (with a network; check HF_ENDPOINT for mirrors), point "
            f"HF_HOME / HF_HUB_CACHE at a cache that holds it, or {hint}."
        )
    # An explicit HF_HUB_ETAG_TIMEOUT is the user's choice (slow links); otherwise fail fast.
    timeout = float(os.environ["HF_HUB_ETAG_TIMEOUT"]) if os.environ.get("HF_HUB_ETAG_TIMEOUT") else HUB_CHECK_TIMEOUT
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=timeout)  # retry_on_errors defaults to False
        return True
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while logged in, then run "
            f"`hf auth login` (or set HF_TOKEN) — or {hint}."
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{repo_id} was not found on the Hub (or needs a login: `hf auth login` / HF_TOKEN), or {hint}."
        ) from None
    except EntryNotFoundError:
        return False
    # The transport's errors (no network, DNS, timeout, proxy) and 5xx answers; their classes differ between
    # huggingface_hub versions (requests, httpx, httpx2), hence the broad catch.
    except Exception as e:  # noqa: BLE001
        first = (str(e).splitlines() or [""])[0]
        raise UserError(
            f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) for {where} ({e.__class__.__name__}: {first}), "
            f"and the cache ({constants.HF_HUB_CACHE}) does not hold it. Check the network or proxy, HF_ENDPOINT "
            f"(mirrors) and HF_TOKEN; with the files downloaded elsewhere, set HF_HOME to that cache and "
            f"HF_HUB_OFFLINE=1; or {hint}."
        ) from None


def hub_file(repo_id: str, filename: str, hint: str = FLUX_LOCAL_HINT) -> str:
    """One file of a Hub repo: from the HF cache without any request, else downloaded after one quick check.

    Access problems (no network, gated, missing) become a UserError with advice within a few seconds.
    """
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    try:
        # The cache first, without a request: a cached file needs no network, and a failed request is slow.
        return huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=True)
    except GatedRepoError:  # only from a test double, but honour it like the real answer
        raise UserError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} while logged in, then run "
            f"`hf auth login` (or set HF_TOKEN) — or {hint}."
        ) from None
    except LocalEntryNotFoundError:
        pass
    if not hub_file_exists(repo_id, filename, hint):
        raise UserError(f"{repo_id} has no file {filename} on the Hub: check the name, or {hint}.")
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename)
    except Exception as e:  # noqa: BLE001 -- a download interrupted after the check (transport errors vary)
        raise UserError(
            f"could not download {filename} from {repo_id} ({e.__class__.__name__}: {(str(e).splitlines() or [''])[0]}). "
            f"Check the network or HF_ENDPOINT (mirrors), or {hint}."
        ) from None


def hub_pretrained(load: Callable[..., T], repo_id: str, probe: str = "config.json", hint: str = "") -> T:
    """`load(local_files_only=...)` (a from_pretrained) from the HF cache first, else after one quick Hub check.

    Without this, transformers (through huggingface_hub) keeps retrying for a long while before it says the network
    is down.
    `probe` is a file the repo must hold (e.g. "text_encoder_2/config.json"); `hint` says where else to point.
    """
    try:
        return load(local_files_only=True)
    except OSError:  # not (fully) in the cache
        pass
    hint = hint or "give a local folder instead"
    if not hub_file_exists(repo_id, probe, hint):
        raise UserError(f"{repo_id} has no {probe} on the Hub: check the name, or {hint}.")
    return load(local_files_only=False)


def resolve_checkpoint(
    path: str | None,
    env_vars: tuple[str, ...],
    repo_id: str | None,
    filename: str | None,
    subfolder: str | None = None,
) -> str:
    """Where a checkpoint comes from, in order: explicit path, environment variable, the HF cache, the Hub.

    In the cache, the repo's single file comes first, then its diffusers `subfolder` ("transformer" / "vae"), so
    weights fetched for diffusers are used as they are instead of downloading a second copy.
    """
    if path:
        return path
    for var in env_vars:
        if os.environ.get(var):
            return os.environ[var]
    if repo_id is None or filename is None:
        raise UserError("no checkpoint path given and this model has no Hub repository")
    if not hub_cached_file(repo_id, filename) and subfolder:
        config = hub_cached_file(repo_id, f"{subfolder}/config.json")
        # Only a folder whose weights are cached too: an interrupted diffusers download falls through to the Hub.
        weights = (f"{subfolder}/{DIFFUSERS_WEIGHTS}", f"{subfolder}/{DIFFUSERS_WEIGHTS}.index.json")
        if config and any(hub_cached_file(repo_id, w) for w in weights):
            return str(Path(config).parent)
    return hub_file(repo_id, filename)


def read_safetensors(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
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


# ---------------------------------------------------------------------------------------------- diffusers layout

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_KIND = {Flux: ("transformer", "FluxTransformer2DModel"), AutoEncoder: ("vae", "AutoencoderKL")}


def diffusers_folder(path: str | os.PathLike, model: nn.Module) -> Path | None:
    """The diffusers folder for `model` at `path`: the folder itself (config.json inside) or its transformer/ or
    vae/ subfolder (a repo root such as a local FLUX.1-dev copy); None when `path` is not such a folder."""
    p = Path(path)
    if not p.is_dir():
        return None
    sub = p / _DIFFUSERS_KIND[type(model)][0]
    if (sub / "config.json").is_file():
        return sub
    return p if (p / "config.json").is_file() else None


def _read_json(path: Path, fix: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e.__class__.__name__}: {e}): {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object: {fix}")
    return data


def safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a .safetensors header (8-byte length, then JSON), checking the file is whole.

    Reads a few kilobytes, never the data, and needs no mmap.
    """
    bad = f"{path} is not a valid safetensors file"
    fix = "it may be truncated by an interrupted download: delete it and download it again."
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            size = os.fstat(f.fileno()).st_size
            if not 2 <= n <= min(size - 8, 100_000_000):
                raise UserError(f"{bad} ({size:,} bytes on disk): {fix}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        header.pop("__metadata__", None)
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        raise UserError(f"{bad} (its header does not parse): {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}): check the path and its permissions") from None
    if 8 + n + end > size:
        raise UserError(f"{bad} ({size:,} bytes on disk, {8 + n + end:,} expected): {fix}")
    return shapes


def _diffusers_tensors(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (file, shape) of a diffusers folder, single file or sharded, strictly checked."""
    index = folder / f"{DIFFUSERS_WEIGHTS}.index.json"
    redo = f"download {folder.name}/ again (e.g. `hf download <repo> --include '{folder.name}/*'`)"
    if index.is_file():
        weight_map = _read_json(index, f"the shard index is corrupted: {redo}.").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} has no valid weight_map: the shard index is corrupted: {redo}.")
        headers = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise UserError(f"{folder / shard} is missing (listed in {index.name}): {redo}.")
            headers[shard] = safetensors_header(folder / shard)
        out = {}
        for key, shard in weight_map.items():
            if key not in headers[shard]:
                raise UserError(
                    f"{index} says {key} is in {shard}, which lacks it: the folder is inconsistent: {redo}."
                )
            out[key] = (folder / shard, headers[shard][key])
        return out
    single = folder / DIFFUSERS_WEIGHTS
    if single.is_file():
        return {k: (single, shape) for k, shape in safetensors_header(single).items()}
    found = ", ".join(sorted(x.name for x in folder.iterdir())) or "nothing"
    raise UserError(
        f"{folder} has config.json but neither {DIFFUSERS_WEIGHTS} nor {index.name} (it holds: {found}): {redo}."
    )


def _check_config(path: Path, config: dict, class_name: str, expected: dict, name: str) -> None:
    """config.json must describe the chosen model, or the weights are another model's (a clearer error than shapes)."""
    fix = "choose the model these weights belong to, or give the folder of this model's weights"
    found = config.get("_class_name", class_name)
    if found != class_name:
        sub = {"FluxTransformer2DModel": "transformer/", "AutoencoderKL": "vae/"}.get(class_name, "")
        raise UserError(f"{path} describes a {found}, not a {class_name}: give the {sub} folder of a FLUX.1 repo.")
    if class_name == "FluxTransformer2DModel" and config.get("out_channels") is None:
        config = {k: v for k, v in config.items() if k != "out_channels"}  # diffusers: null means in_channels
        if "in_channels" in config:
            config["out_channels"] = config["in_channels"]
    wrong = []
    for key, want in expected.items():
        if key not in config:
            continue  # an older diffusers wrote fewer keys; the tensors' shapes are checked next
        have = config[key]
        same = abs(have - want) < 1e-4 if isinstance(want, float) and isinstance(have, (int, float)) else have == want
        if not same:
            wrong.append(f"{key}={json.dumps(have)} (model {name or 'chosen'}: {json.dumps(want)})")
    if wrong:
        if config.get("guidance_embeds") is False and expected.get("guidance_embeds") is True:
            fix = "these are FLUX.1-schnell weights: use model flux-schnell"
        elif config.get("guidance_embeds") is True and expected.get("guidance_embeds") is False:
            fix = "these are FLUX.1-dev weights (or a dev finetune): use model flux-dev"
        raise UserError(f"{path} does not describe {name or 'the chosen model'}: {', '.join(wrong)}; {fix}.")


class _TensorReader:
    """Reads single tensors from safetensors files, cast as read; falls back to reading bytes where mmap fails."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype | None):
        self.device, self.dtype = device, dtype
        self.handles: dict[Path, object] = {}
        self.loaded: dict[Path, dict[str, torch.Tensor]] = {}  # the no-mmap fallback: whole files, emptied as read

    def read(self, path: Path, key: str) -> torch.Tensor:
        from safetensors import safe_open
        from safetensors.torch import load as load_bytes

        if path in self.loaded:
            t = self.loaded[path].pop(key)
        else:
            if path not in self.handles:
                try:
                    self.handles[path] = safe_open(str(path), framework="pt", device="cpu")
                except OSError as e:
                    if e.errno != errno.ENODEV and "os error 19" not in str(e):
                        raise
                    self.loaded[path] = load_bytes(path.read_bytes())
                    return self.read(path, key)
            t = self.handles[path].get_tensor(key)
        floating = self.dtype is not None and t.is_floating_point()
        return t.to(device=self.device, dtype=self.dtype if floating else t.dtype)


def read_diffusers(
    folder: Path, model: nn.Module, device: torch.device | str, dtype: torch.dtype | None, name: str = ""
) -> dict[str, torch.Tensor]:
    """The official-layout state dict of `model` from a diffusers folder, converted while reading.

    Before any tensor is read, config.json must describe the model and the files must hold exactly the expected
    names and shapes; then each official tensor is assembled from its diffusers parts, one at a time.
    """
    class_name = _DIFFUSERS_KIND[type(model)][1]
    config_path = folder / "config.json"
    config = _read_json(config_path, f"download {folder.name}/config.json again.")
    if isinstance(model, Flux):
        rules, expected_config = convert.transformer_rules(model.params), convert.transformer_config(model.params)
    else:
        rules, expected_config = (
            convert.vae_rules(list(model.state_dict()), model.params),
            convert.vae_config(model.params),
        )
    _check_config(config_path, config, class_name, expected_config, name)
    tensors = _diffusers_tensors(folder)
    expected = {k: tuple(v.shape) for k, v in convert.to_diffusers(model.state_dict(), rules).items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k][1] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} ({len(missing)})")
    if unexpected:
        problems.append(
            f"unexpected tensors: {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of the wrong shape, e.g. {k}: file {tensors[k][1]}, expected {expected[k]}")
    if problems:
        raise UserError(f"{folder} does not hold the weights of {name or class_name}: {'; '.join(problems)}.")
    reader = _TensorReader(device, dtype)
    return dict(convert.to_official(lambda k: reader.read(tensors[k][0], k), rules))


def load_weights(
    model: nn.Module, path: str, device: torch.device | str, dtype: torch.dtype | None, name: str = ""
) -> nn.Module:
    """Assign a checkpoint's tensors to a model built on the meta device; strict about keys and shapes.

    `path` is a .safetensors file (official layout, keys optionally prefixed `model.diffusion_model.`) or a
    diffusers folder (see `diffusers_folder`), converted while it is read.
    """
    folder = diffusers_folder(path, model) if type(model) in _DIFFUSERS_KIND else None
    if folder is not None:
        sd = read_diffusers(folder, model, device, dtype, name)
    else:
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
    params: FluxParams | None = None,
) -> Flux:
    """The transformer of `name`, from `path`, $FLUX_MODEL, the HF cache or the Hub (flux-tiny: random from its seed).

    `path` may be a .safetensors file (official or ComfyUI-prefixed keys) or a diffusers folder (transformer/ or
    the repo root above it); in the HF cache, the repo's diffusers transformer/ serves when its single file is absent.
    `params`: the transformer's shape where it is not the spec's (a flux-mini deepened by `mini.train grow`).
    """
    spec = model_spec(name)
    spec = spec if params is None else replace(spec, params=params)
    path = path or (str(ASSETS / spec.local_flow) if spec.local_flow else None)
    if spec.repo_id is None and not path:
        return _seeded_init(lambda: Flux(spec.params), spec.seed, device, dtype).eval().requires_grad_(False)
    ckpt = resolve_checkpoint(path, spec.ckpt_env, spec.repo_id, spec.repo_flow, "transformer")
    if verbose:
        print(f"loading {name} transformer from {ckpt}")
    with torch.device("meta"):
        model = Flux(spec.params)
    return load_weights(model, ckpt, device, dtype, name).eval().requires_grad_(False)


def load_ae(
    name: str,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float32,
    path: str | None = None,
    verbose: bool = False,
) -> AutoEncoder:
    """The autoencoder of `name`, from `path` (ae.safetensors, or a diffusers vae/ folder or the repo root above it),
    $FLUX_AE (older: $AE), the HF cache (ae.safetensors, else vae/) or the Hub. fp32 by default: it is small."""
    spec = model_spec(name)
    path = path or (str(ASSETS / spec.local_ae) if spec.local_ae else None)
    if spec.repo_id is None and not path:
        return (
            _seeded_init(lambda: AutoEncoder(spec.ae_params), spec.seed + 1, device, dtype).eval().requires_grad_(False)
        )
    ckpt = resolve_checkpoint(path, ("FLUX_AE", "AE"), spec.repo_id, spec.repo_ae, "vae")
    if verbose:
        print(f"loading {name} autoencoder from {ckpt}")
    with torch.device("meta"):
        ae = AutoEncoder(spec.ae_params)
    return load_weights(ae, ckpt, device, dtype, name).eval().requires_grad_(False)


@dataclass
class WeightSources:
    """Where each of a model's four networks is read from (a path, a Hub id or None for the loaders' defaults), and
    the words for the log."""

    flow: str | None
    ae: str | None
    t5: str
    clip: str
    said: dict[str, str]

    def describe(self) -> str:
        return "weights: " + "; ".join(f"{part} from {where}" for part, where in self.said.items())


def repo_parts(folder: str | None) -> dict[str, str]:
    """The parts besides the transformer that a whole FLUX.1 repo folder holds, as paths for their loaders: the
    autoencoder (its ae.safetensors, else its vae/), T5 (text_encoder_2/) and CLIP (text_encoder/)."""
    root = Path(folder) if folder else None
    if root is None or not root.is_dir():
        return {}
    parts = {}
    if (root / "ae.safetensors").is_file():
        parts["autoencoder"] = str(root / "ae.safetensors")
    elif (root / "vae" / "config.json").is_file():
        parts["autoencoder"] = folder
    for part, sub in (("T5", "text_encoder_2"), ("CLIP", "text_encoder")):
        if (root / sub / "config.json").is_file():
            parts[part] = folder
    return parts


def weight_sources(
    name: str,
    flow_path: str | None = None,
    ae_path: str | None = None,
    t5_path: str | None = None,
    clip_path: str | None = None,
) -> WeightSources:
    """Where `load_models` reads each network from. A whole repo folder given as `flow_path` (or $FLUX_MODEL)
    supplies every other part it holds, unless that part's own path (or, for the autoencoder, $FLUX_AE / $AE) is given: a transformer
    from one folder and an autoencoder from elsewhere would silently draw other pictures."""
    spec = model_spec(name)
    flow_env = next((os.environ[v] for v in spec.ckpt_env if os.environ.get(v)), None)
    repo = repo_parts(flow_path or flow_env)  # $FLUX_MODEL naming a repo folder serves as well
    said = {}

    def pick(part: str, given: str | None, env: tuple[str, ...], bundled: str | None, default: str) -> str | None:
        var = next((v for v in env if os.environ.get(v)), None)
        if given:
            said[part] = given
            return given
        if var is None and part in repo:
            said[part] = f"{repo[part]} (the transformer's repo folder)"
            return repo[part]
        if var is not None:
            said[part] = f"${var} ({os.environ[var]})"
        elif bundled:
            said[part] = str(ASSETS / bundled)
        else:
            said[part] = default
        return None

    hub = f"{spec.repo_id} (HF cache, else the Hub)" if spec.repo_id else f"random weights ({name}'s seed)"
    flow = pick("transformer", flow_path, spec.ckpt_env, spec.local_flow, hub)
    ae = pick("autoencoder", ae_path, ("FLUX_AE", "AE"), spec.local_ae, hub)

    def text(part: str, given: str | None, version: str) -> str:
        default = "random weights (tiny)" if version == "tiny" else version
        return pick(part, given, (), None, default) or version

    t5, clip = text("T5", t5_path, spec.t5_version), text("CLIP", clip_path, spec.clip_version)
    return WeightSources(flow, ae, t5, clip, said)


TEXT_LOCAL_HINT = (
    "set t5_path / clip_path to a local folder (a transformers text encoder, or a FLUX.1 repo copy holding "
    "text_encoder_2/, tokenizer_2/, text_encoder/ and tokenizer/)"
)


def load_t5(
    device: str | torch.device = "cuda",
    max_length: int = 512,
    version: str = T5_FALLBACK,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> "HFEmbedder":
    """T5 text encoder from `version`: a FLUX.1 repo id or local copy (its text_encoder_2/ and tokenizer_2/), a
    transformers T5 repo or folder, or "tiny" (small and random, no download). A FLUX.1 repo without
    text_encoder_2/ falls back to T5_FALLBACK."""
    from .modules.conditioner import HFEmbedder

    if version == "tiny":
        return HFEmbedder.tiny("t5", max_length=max_length, seed=seed).to(device)
    source, sub = text_encoder_source(version, "text_encoder_2", T5_FALLBACK)
    return HFEmbedder(source, max_length, sub, torch_dtype=dtype, **_safetensors_only(sub)).to(device)


def load_clip(
    device: str | torch.device = "cuda",
    version: str = CLIP_FALLBACK,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> "HFEmbedder":
    """CLIP text encoder (pooled output) from `version`: a FLUX.1 repo id or local copy (its text_encoder/ and
    tokenizer/), a transformers CLIP repo or folder, or "tiny" (small and random, no download). A FLUX.1 repo
    without text_encoder/ falls back to CLIP_FALLBACK."""
    from .modules.conditioner import HFEmbedder

    if version == "tiny":
        return HFEmbedder.tiny("clip", max_length=77, seed=seed).to(device)
    source, sub = text_encoder_source(version, "text_encoder", CLIP_FALLBACK)
    return HFEmbedder(source, 77, sub, torch_dtype=dtype, **_safetensors_only(sub)).to(device)


def _safetensors_only(subfolder: str | None) -> dict:
    # The FLUX.1 repos' encoder folders hold safetensors only; never fall through to a pickle there.
    return {"use_safetensors": True} if subfolder else {}


def text_encoder_source(version: str, subfolder: str, fallback: str) -> tuple[str, str | None]:
    """(repo id or folder, subfolder or None) to load a text encoder from.

    A local folder is used as it is (with `subfolder` when it is a FLUX.1 repo copy). A Hub id is a FLUX.1 repo
    when it holds `subfolder`/config.json, else a plain transformers repo when it holds config.json; the HF cache
    answers first, then one quick request per question. A repo with neither falls back to `fallback`.
    """
    looks_local = os.path.isabs(version) or version.startswith(("~", ".")) or Path(version).expanduser().exists()
    if looks_local:
        return version, _subfolder(str(Path(version).expanduser()), subfolder)
    from huggingface_hub import try_to_load_from_cache

    probes = [(subfolder, f"{subfolder}/config.json"), (None, "config.json")]
    cached = [try_to_load_from_cache(version, probe) for _, probe in probes]
    for (sub, _), found in zip(probes, cached):
        if isinstance(found, str):
            return version, sub
    for (sub, probe), found in zip(probes, cached):
        # None: the cache knows nothing; otherwise it recorded the Hub's "no such file" (a marker object).
        if found is None and hub_file_exists(version, probe, TEXT_LOCAL_HINT):
            return version, sub
    if version == fallback:
        raise UserError(f"{version} holds no text encoder (no config.json on the Hub): {TEXT_LOCAL_HINT}.")
    print(f"{version} has no {subfolder}/ folder: loading that text encoder from {fallback}")
    return text_encoder_source(fallback, subfolder, fallback)


def _subfolder(version: str, name: str) -> str | None:
    """A local copy of a diffusers-style repo (FLUX.1-dev keeps T5 in text_encoder_2/) works as it is."""
    return name if (Path(version) / name / "config.json").is_file() else None
