"""Model loading and generation shared by every demo: load once, encode prompts once, sample, decode."""

import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor, nn

from .accel import (
    AUTO,
    AccelOptions,
    accelerate,
    attention_backend,
    compile_decoder,
    describe,
    keep_text_encoders,
    resolve_accel,
    transformer_bytes,
    use_expandable_segments,
)
from .errors import UserError
from .model import Flux, FluxParams, Injection, SkipSets
from .modules.autoencoder import AutoEncoder
from .sampling import (
    CFG,
    StepCallback,
    StepRange,
    denoise,
    get_noise,
    get_schedule,
    guidance_vector,
    image_ids,
    pack,
    unpack,
)
from .util import ModelSpec, load_ae, load_clip, load_flow_model, load_t5, model_spec, weight_sources

if TYPE_CHECKING:
    from .modules.conditioner import HFEmbedder


def check_size(width: int, height: int) -> None:
    """Refuse image sizes FLUX cannot make exactly: rounding them would silently give another size."""
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % 16:
            low = v // 16 * 16
            nearest = f"{low} or {low + 16}" if low > 0 else "16"
            raise UserError(
                f"{name} {v} is not a positive multiple of 16 (FLUX packs 8x-downsampled latents in 2x2 "
                f"patches): use {nearest}"
            )


def tensor_to_pil(x: Tensor) -> Image.Image:
    """An image tensor in [-1, 1], (C, H, W) or (1, C, H, W) with C = 1 or 3, as an 8-bit PIL image.

    Like the official sampler: clamp to [-1, 1], then 127.5 * (x + 1) truncated to 0..255, so our PNGs equal its
    PNGs byte for byte (computed in fp32 for any input dtype).
    """
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor (C, H, W) with 1 or 3 channels, got shape {tuple(x.shape)}")
    x = x.detach().float().clamp(-1, 1)
    pixels = (127.5 * (x + 1.0)).to("cpu").byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)


@dataclass
class Text:
    """Encoded prompts: T5 tokens, their (zero) position ids and the pooled CLIP vector; for a model whose
    guidance is classifier-free (ModelSpec.cfg), also the empty prompt's encoding (one row), the negative."""

    txt: Tensor
    txt_ids: Tensor
    vec: Tensor
    negative: "Text | None" = None

    def __len__(self) -> int:
        return self.txt.shape[0]

    def select(self, index: Sequence[int]) -> "Text":
        """Rows of a batch, e.g. one encoded prompt repeated for many ablation variants."""
        idx = torch.as_tensor(list(index), device=self.txt.device)
        return Text(self.txt[idx], self.txt_ids[idx], self.vec[idx], self.negative)

    def cfg(self, guidance: float | Sequence[float]) -> CFG | None:
        """Classifier-free guidance of these rows at `guidance` (one value, or one per row) against the negative;
        None where there is no negative or every scale is 1 (then guidance changes nothing)."""
        scale = guidance_vector(guidance, len(self), self.txt.device, torch.float32)
        if self.negative is None or bool((scale == 1).all()):
            return None
        n, b = self.negative, len(self)
        return CFG(scale, n.txt.expand(b, -1, -1), n.txt_ids.expand(b, -1, -1), n.vec.expand(b, -1))


@dataclass
class FluxModels:
    """The four networks of a FLUX model. With `offload`, each visits the GPU only while it is used; with
    `keep_text_encoders`, T5 and CLIP stay on the GPU between runs (else they leave it once prompts are encoded)."""

    name: str
    spec: ModelSpec
    model: Flux
    ae: AutoEncoder
    t5: "HFEmbedder"
    clip: "HFEmbedder"
    device: torch.device
    dtype: torch.dtype
    offload: bool = False
    attention: str = "auto"
    accel: AccelOptions = field(default_factory=AccelOptions)  # the resolved options the models were loaded with
    keep_text_encoders: bool = False
    _held: set[int] = field(default_factory=set, repr=False)
    _text_away: bool = field(default=False, repr=False)  # T5 and CLIP were moved off the GPU after encoding

    @contextmanager
    def on_device(self, *modules: nn.Module):
        """With offload, hold `modules` on the GPU inside the block. Nested uses keep them there until the
        outermost block ends, so a loop can hold the transformer across many denoise calls."""
        moved = [m for m in modules if self.offload and id(m) not in self._held]
        for m in moved:
            m.to(self.device)
            self._held.add(id(m))
        try:
            yield
        finally:
            for m in moved:
                m.cpu()
                self._held.discard(id(m))
            if moved and self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> Text:
        if self._text_away:  # back for the next prompts: T5-XXL encoding on the CPU would take far longer
            self.t5.to(self.device)
            self.clip.to(self.device)
            self._text_away = False
        prompts = list(prompts) + ([""] if self.spec.cfg else [])  # the negative rides along, encoded once
        with self.on_device(self.t5, self.clip):
            txt = self.t5(prompts).to(self.device, self.dtype)
            vec = self.clip(prompts).to(self.device, self.dtype)
        txt_ids = torch.zeros(txt.shape[0], txt.shape[1], 3, device=self.device)
        if not self.spec.cfg:
            return Text(txt, txt_ids, vec)
        return Text(txt[:-1], txt_ids[:-1], vec[:-1], Text(txt[-1:], txt_ids[-1:], vec[-1:]))

    def encode_all(self, prompts: Sequence[str]) -> tuple[Text, dict[str, int]]:
        """Every distinct prompt encoded once, then T5 and CLIP leave the GPU if sampling needs the room.
        Returns the encodings and each prompt's row in them (for `Text.select`)."""
        row = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        text = self.encode(list(row))
        self.release_text_encoders()
        return text, row

    def release_text_encoders(self) -> None:
        """Move T5 and CLIP off the GPU once every prompt is encoded (T5-XXL is most of the text encoders' memory),
        unless the card has room to keep them (`keep_text_encoders`); the next `encode` brings them back. Nothing
        moves where they already live in host memory (a CPU run, offload, stream_blocks)."""
        weight = next(self.t5.parameters(), None)
        if self.keep_text_encoders or weight is None or weight.device.type == "cpu":
            return
        self.t5.cpu()
        self.clip.cpu()
        self._text_away = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def noise(self, seeds: Sequence[int], width: int, height: int) -> Tensor:
        check_size(width, height)  # get_noise, like the official one, would round 40 px up to 48
        return torch.cat([get_noise(1, height, width, self.device, self.dtype, s) for s in seeds])

    def schedule(self, steps: int, width: int, height: int) -> list[float]:
        check_size(width, height)
        return get_schedule(steps, (height // 16) * (width // 16), shift=self.spec.shift)

    @torch.inference_mode()
    def denoise(
        self,
        text: Text,
        noise: Tensor,
        timesteps: list[float],
        guidance: float | Sequence[float] = 3.5,
        skip: SkipSets | None = None,
        inject: Injection | None = None,
        callback: StepCallback | None = None,
        inject_steps: StepRange | None = None,
        solver: str = "euler",
    ) -> Tensor:
        """Sample packed latents from (B, 16, h, w) noise with `solver` (flux.sampling.SOLVERS); returns (B, 16, h, w).
        For a model whose guidance is classifier-free (ModelSpec.cfg), `guidance` is the CFG scale against the
        text's negative."""
        b, _, h, w = noise.shape
        if len(text) != b:
            raise ValueError(f"{len(text)} prompts for {b} latents")
        with self.on_device(self.model), attention_backend(self.attention, self.device):
            x = denoise(
                self.model,
                pack(noise),
                image_ids(b, h // 2, w // 2, self.device),
                text.txt,
                text.txt_ids,
                text.vec,
                timesteps,
                guidance=guidance,
                skip=skip,
                inject=inject,
                callback=callback,
                inject_steps=inject_steps,
                solver=solver,
                cfg=self.cfg(text, guidance),
            )
        return unpack(x, h * 8, w * 8)

    def cfg(self, text: Text, guidance: float | Sequence[float]) -> CFG | None:
        """The classifier-free guidance of sampling `text` at `guidance`, where the model's guidance is that."""
        if not self.spec.cfg:
            return None
        if text.negative is None:
            raise ValueError(f"{self.name}'s guidance is classifier-free: encode prompts with its `encode`")
        return text.cfg(guidance)

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> Tensor:
        """(B, 16, h, w) latents -> images (B, 3, 8h, 8w) in [-1, 1].

        With a bf16 model the decoder runs under bf16 autocast, as the official CLI decodes; a float32
        model decodes in float32. One image at a time: at 1024² the decoder's activations for two images
        do not fit beside the transformer on a 24 GB card (docs/performance.md)."""
        ae_dtype = next(self.ae.parameters()).dtype
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)
        with self.on_device(self.ae), autocast:
            images = [self.ae.decode(z[None].to(self.device, ae_dtype)).clamp(-1, 1).float() for z in latent]
        return torch.cat(images)

    @torch.inference_mode()
    def encode_image(self, image: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latent means (B, 16, H/8, W/8) in the model dtype."""
        check_size(image.shape[-1], image.shape[-2])
        ae_dtype = next(self.ae.parameters()).dtype
        with self.on_device(self.ae):
            return self.ae.encode(image.to(self.device, ae_dtype)).to(self.dtype)

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        width: int,
        height: int,
        steps: int,
        guidance: float | Sequence[float] = 3.5,
        skip: SkipSets | None = None,
        inject: Injection | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Text to images in [-1, 1], one batch: prompts[b] with noise from seeds[b]."""
        check_size(width, height)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        text = self.encode(prompts)
        latent = self.denoise(
            text,
            self.noise(seeds, width, height),
            self.schedule(steps, width, height),
            guidance,
            skip,
            inject,
            callback,
        )
        return self.decode(latent)


def resolve_device(name: str) -> "torch.device":
    """The torch device for a config's `device` value; asking for hardware that is absent is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(
                "device=mps was asked for but this machine has no usable Apple GPU (MPS): set device=auto or device=cpu"
            )
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UserError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU or driver is visible"
        raise UserError(f"device={name} was asked for but {why}: set device=auto or device=cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(
            f"device={name} was asked for but only {torch.cuda.device_count()} CUDA GPU(s) are visible "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1}): choose one of those or device=auto"
        )
    return torch.device(name)


def resolve_dtype(name: str) -> "torch.dtype":
    """The torch dtype for a config's `dtype` value ("bf16", "fp16", "fp32")."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in dtypes:
        raise UserError(f"unknown dtype '{name}': use bf16, fp16 or fp32")
    return dtypes[name]


def text_encoder_home(accel: AccelOptions, home: torch.device) -> torch.device:
    """Where T5 and CLIP live. Streaming is for cards that cannot also hold T5-XXL beside the
    resident blocks: they encode on the CPU."""
    return torch.device("cpu") if accel.stream_blocks else home


# Below this many transformer parameters a model is small (flux-mini 2.8 M, flux-tiny): its operations are too small
# to gain from many threads, and threads that spin-wait for busy cores make it several times slower.
SMALL_MODEL_PARAMS = 100_000_000


def cpu_threads(params: int, cores: int | None = None, environ: dict[str, str] | None = None) -> int | None:
    """The torch threads for a CPU run of a model with `params` transformer parameters: half the cores, 1 to 4, for
    a small model, so that other work on the machine does not stall it; None (torch's default, all cores) for a
    large one, or where OMP_NUM_THREADS already says."""
    environ = os.environ if environ is None else environ
    if params >= SMALL_MODEL_PARAMS or environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, min(4, (cores or os.cpu_count() or 1) // 2))


# T5-XXL's encoder (4.76 B parameters) and CLIP-L's text model (123 M), as every full-size FLUX.1 model uses them.
FULL_TEXT_ENCODER_PARAMS = 4_885_000_000


def load_models(
    name: str,
    device: torch.device | str = "auto",
    dtype: torch.dtype = torch.bfloat16,
    offload: bool = False,
    flow_path: str | None = None,
    ae_path: str | None = None,
    t5_path: str | None = None,
    clip_path: str | None = None,
    accel: AccelOptions | None = None,
    params: FluxParams | None = None,
) -> FluxModels:
    """All four networks of `name`; local paths override the Hub (see README, "Getting weights"). A whole repo
    folder given as `flow_path` supplies every part it holds that has no path of its own; the printed line says
    where each part came from.

    `accel` switches on the speed/memory options of flux.accel (compile, attention, fp8, stream_blocks); its
    "auto" values are decided here for the device (printed once) and the result kept as `FluxModels.accel`.
    `params`: the transformer's shape where it is not the spec's (a flux-mini deepened by `mini.train grow`); the
    returned spec carries it.
    """
    spec = model_spec(name)
    spec = spec if params is None else replace(spec, params=params)
    device = resolve_device(device) if isinstance(device, str) else device
    sources = weight_sources(name, flow_path, ae_path, t5_path, clip_path)
    threads = cpu_threads(transformer_bytes(spec.params, torch.float32) // 4) if device.type == "cpu" else None
    if threads is not None:
        torch.set_num_threads(threads)
    print(sources.describe(), flush=True)
    accel = accel or AccelOptions()
    text_bytes = FULL_TEXT_ENCODER_PARAMS * dtype.itemsize if spec.repo_id else 0  # tiny/mini: a few MB
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None  # before anything is loaded
    if AUTO in (accel.compile, accel.fuse_gelu, accel.stream_blocks, accel.resident_gb):
        accel = resolve_accel(accel, device, dtype, spec.params, text_bytes, free, offload=offload)
        print(describe(accel), flush=True)
    weight_bytes = transformer_bytes(spec.params, dtype) + text_bytes if device.type == "cuda" else 0
    keep_text = keep_text_encoders(device, weight_bytes, free, offload, bool(accel.stream_blocks))
    if device.type == "cuda" and not offload and not accel.stream_blocks:
        where = "stay on the GPU" if keep_text else "move to host memory once prompts are encoded"
        print(f"text encoders: {where} ({free / 2**30:.1f} GiB free before loading)", flush=True)
    if accel.stream_blocks and device.type == "cuda":
        use_expandable_segments()  # before the first block lands on the GPU: less fragmentation on a tight card
    home = torch.device("cpu") if offload else device
    # FP8 and streaming start from the CPU, so the bf16 transformer never has to fit the GPU whole.
    flow_home = torch.device("cpu") if accel.fp8 or accel.stream_blocks else home
    model = load_flow_model(name, flow_home, dtype, path=sources.flow, params=spec.params)
    if accel != AccelOptions():
        model = accelerate(model, accel, home)
    ae = load_ae(name, home, path=sources.ae)
    if accel.compile:
        compile_decoder(ae)
    text_home = text_encoder_home(accel, home)
    t5 = load_t5(text_home, spec.max_length, version=sources.t5, dtype=dtype)
    clip = load_clip(text_home, version=sources.clip, dtype=dtype)
    return FluxModels(
        name, spec, model, ae, t5, clip, device, dtype, offload, accel.attention, accel, keep_text_encoders=keep_text
    )
