import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from einops import rearrange, repeat
from torch import Tensor

from .model import Flux, Injection, SkipSets


def get_noise(
    num_samples: int, height: int, width: int, device: torch.device | str, dtype: torch.dtype, seed: int
) -> Tensor:
    """Initial latent noise. Drawn on a CPU generator in the target dtype, so a seed gives the
    same noise on every device (the official behaviour since mid-2025).

    As in the official code, a size that is not a multiple of 16 is rounded up (40 px gives a 48-px latent);
    FluxModels.noise refuses such sizes instead."""
    return torch.randn(
        num_samples,
        16,
        2 * math.ceil(height / 16),
        2 * math.ceil(width / 16),
        dtype=dtype,
        generator=torch.Generator(device="cpu").manual_seed(seed),
    ).to(device)


def pack(img: Tensor) -> Tensor:
    """(B, 16, h, w) latent -> (B, h/2 * w/2, 64) tokens of 2x2 patches."""
    return rearrange(img, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    return rearrange(
        x.float(),
        "b (h w) (c ph pw) -> b c (h ph) (w pw)",
        h=math.ceil(height / 16),
        w=math.ceil(width / 16),
        ph=2,
        pw=2,
    )


def image_ids(batch: int, h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids (B, h*w, 3) of the packed latent tokens: [0, row, column]."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch).to(device)


def prepare(t5: Callable, clip: Callable, img: Tensor, prompt: str | list[str]) -> dict[str, Tensor]:
    """Pack the latent, build position ids and encode the prompt(s) for `denoise`."""
    bs, _, h, w = img.shape
    if bs == 1 and not isinstance(prompt, str):
        bs = len(prompt)
    img = pack(img)
    if img.shape[0] == 1 and bs > 1:
        img = repeat(img, "1 ... -> bs ...", bs=bs)
    img_ids = image_ids(bs, h // 2, w // 2, img.device)

    if isinstance(prompt, str):
        prompt = [prompt]
    txt = t5(prompt)
    if txt.shape[0] == 1 and bs > 1:
        txt = repeat(txt, "1 ... -> bs ...", bs=bs)
    txt_ids = torch.zeros(bs, txt.shape[1], 3)
    vec = clip(prompt)
    if vec.shape[0] == 1 and bs > 1:
        vec = repeat(vec, "1 ... -> bs ...", bs=bs)
    return {
        "img": img,
        "img_ids": img_ids,
        "txt": txt.to(img.device),
        "txt_ids": txt_ids.to(img.device),
        "vec": vec.to(img.device),
    }


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable[[float], float]:
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    """num_steps + 1 times from 1 to 0; shifted towards high noise for long sequences (dev)."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


@dataclass
class Step:
    """What a denoise callback sees after step `index` (0-based) moved the latent from t to t_prev."""

    index: int
    t: float
    t_prev: float
    latent: Tensor  # x_t, the packed latent the model saw
    velocity: Tensor  # the velocity the step moved with: model(x_t, t) for Euler, the midpoint's for the others
    x0: Tensor  # predicted clean latent x_t - t * velocity
    next_latent: Tensor  # x_{t_prev} = x_t + (t_prev - t) * velocity
    nfe: int = 0  # model evaluations of this loop so far, this step's included


StepCallback = Callable[[Step], Tensor | None]
"""Called after every step; may return a tensor that replaces next_latent (used by real-image editing)."""


def guidance_vector(guidance: float | Sequence[float] | Tensor, batch: int, device, dtype) -> Tensor:
    """One guidance value per sample (Stable Flow's real-image edit uses 1 for the reference, 3 for edits)."""
    if isinstance(guidance, (int, float)):
        return torch.full((batch,), float(guidance), device=device, dtype=dtype)
    g = torch.as_tensor(guidance, dtype=dtype).to(device)
    if g.shape != (batch,):
        raise ValueError(f"guidance needs one value per sample ({batch}), got shape {tuple(g.shape)}")
    return g


@dataclass(frozen=True)
class CFG:
    """True classifier-free guidance, which the official samplers do not have (FLUX.1-dev distils its guidance
    into the model): v = v_neg + scale * (v - v_neg), with v_neg the velocity of the same latents under the negative
    conditioning (the empty prompt's, for a model trained with caption dropout). One scale per sample; a sample of
    scale 1 moves with its own velocity, exactly. Both halves run as one batch and every hook applies to both: an
    injected sample takes its source's K/V from the same half."""

    scale: Tensor  # (B,)
    txt: Tensor  # (B, L, D), the negative prompt's T5 tokens per sample
    txt_ids: Tensor
    vec: Tensor


StepRange = tuple[int, int]
"""Steps start <= i < end of a loop (0-based), e.g. the steps in which `inject` is active."""

SOLVERS = ("euler", "rf-solver", "fireflow")
"""ODE solvers of denoise and invert. euler: one model call a step, first order. rf-solver (Wang et al., arXiv
2411.04746): a second-order Taylor step whose velocity derivative is a finite difference against a midpoint
evaluation, two calls a step. fireflow (Deng et al., arXiv 2412.07517): the midpoint step, reusing the previous step's
midpoint velocity as this step's start velocity, so one call a step (plus one for the first step)."""


def solver_nfe(solver: str, steps: int) -> int:
    """Model evaluations of `steps` steps of `solver` (the loops count them too: Step.nfe)."""
    return {"euler": steps, "rf-solver": 2 * steps, "fireflow": steps + 1}[check_solver(solver)] if steps else 0


def check_solver(solver: str, error: type[Exception] = ValueError) -> str:
    """`solver` if it is one of SOLVERS; else `error` (UserError where the name came from the user) naming them."""
    if solver not in SOLVERS:
        raise error(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
    return solver


def denoise(
    model: Flux,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    timesteps: list[float],
    guidance: float | Sequence[float] | Tensor = 4.0,
    # hooks (None: the official sampler)
    skip: SkipSets | None = None,
    inject: Injection | None = None,
    callback: StepCallback | None = None,
    inject_steps: StepRange | None = None,
    solver: str = "euler",
    cfg: CFG | None = None,
) -> Tensor:
    """Integration of the flow from timesteps[0] to timesteps[-1] with `solver` (SOLVERS; Euler: the official
    sampler).

    `skip` and `inject` apply to every model call, `inject` only in the steps of `inject_steps` if given (both calls
    of a second-order step); `callback` sees every step and may replace the next latent; `cfg` guides every velocity.
    """
    steps = list(itertools.pairwise(timesteps))
    hooks = {"skip": skip, "inject": inject, "callback": callback, "inject_steps": inject_steps, "cfg": cfg}
    return _solve(model, img, img_ids, txt, txt_ids, vec, steps, guidance, solver, **hooks)


def invert(
    model: Flux,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    timesteps: list[float],
    guidance: float | Sequence[float] | Tensor = 1.0,
    skip: SkipSets | None = None,
    inject: Injection | None = None,
    callback: StepCallback | None = None,
    inject_steps: StepRange | None = None,
    solver: str = "euler",
    cfg: CFG | None = None,
) -> Tensor:
    """The solver's loop run backwards, image -> noise: from timesteps[-1] (clean) to timesteps[0] (noise).

    Euler takes the velocity at the next, noisier time, x <- x + (t_next - t) * v(x, t_next) (Stable Flow's inverse
    Euler; the velocity at t itself would leave the error of one step behind at every level). The second-order
    solvers start at the velocity at t, as their official inversions do. Hooks as in `denoise`; the callback's Step
    runs from t to t_prev = t_next, upwards.
    """
    steps = list(itertools.pairwise(timesteps[::-1]))
    hooks = {"skip": skip, "inject": inject, "callback": callback, "inject_steps": inject_steps, "cfg": cfg}
    return _solve(model, img, img_ids, txt, txt_ids, vec, steps, guidance, solver, velocity_at_target=True, **hooks)


def _solve(
    model: Flux,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    steps: list[tuple[float, float]],
    guidance: float | Sequence[float] | Tensor,
    solver: str = "euler",
    *,
    skip: SkipSets | None,
    inject: Injection | None,
    callback: StepCallback | None,
    inject_steps: StepRange | None,
    cfg: CFG | None,
    velocity_at_target: bool = False,
) -> Tensor:
    """x <- x + (t_to - t_from) * v over `steps` (t_from, t_to), v as `solver` makes it. Euler's v is taken at t_from
    (sampling) or, with velocity_at_target (Stable Flow's inversion), at t_to."""
    check_solver(solver)
    guidance_vec = guidance_vector(guidance, img.shape[0], img.device, img.dtype)
    b = img.shape[0]
    if cfg is not None:  # one batch of both halves: [conditional; negative]
        img_ids, guidance_vec = torch.cat([img_ids, img_ids]), torch.cat([guidance_vec, guidance_vec])
        txt, txt_ids, vec = torch.cat([txt, cfg.txt]), torch.cat([txt_ids, cfg.txt_ids]), torch.cat([vec, cfg.vec])
        skip = None if skip is None else [*skip, *skip]
        inject = None if inject is None else replace(inject, source=(*inject.source, *(s + b for s in inject.source)))
        scale = cfg.scale.to(img.device, img.dtype)[:, None, None]
    nfe = 0

    def velocity(x: Tensor, t: float, i: int) -> Tensor:
        nonlocal nfe
        nfe += 1
        x_in = x if cfg is None else torch.cat([x, x])
        v = model(
            img=x_in,
            img_ids=img_ids,
            txt=txt,
            txt_ids=txt_ids,
            y=vec,
            timesteps=torch.full((x_in.shape[0],), t, dtype=x.dtype, device=x.device),
            guidance=guidance_vec,
            skip=skip,
            inject=inject if inject_steps is None or inject_steps[0] <= i < inject_steps[1] else None,
        )
        if cfg is None:
            return v
        v_pos, v_neg = v[:b], v[b:]
        return torch.where(scale == 1, v_pos, v_neg + scale * (v_pos - v_neg))

    reused = None  # FireFlow: the previous step's midpoint velocity, this step's start velocity
    for i, (t_from, t_to) in enumerate(steps):
        h = t_to - t_from
        if solver == "euler":
            v = velocity(img, t_to if velocity_at_target else t_from, i)
        else:
            v0 = reused if reused is not None else velocity(img, t_from, i)
            v_mid = velocity(img + h / 2 * v0, t_from + h / 2, i)
            if solver == "rf-solver":
                # The paper's step x + h v + h^2/2 v', with v' = (v_mid - v0) / (h/2): algebraically the midpoint step.
                v = v0 + h / 2 * ((v_mid - v0) / (h / 2))
            else:
                v = reused = v_mid
        img = _after_step(callback, Step(i, t_from, t_to, img, v, img - t_from * v, img + h * v, nfe))
    return img


def _after_step(callback: StepCallback | None, step: Step) -> Tensor:
    """The latent the loop goes on with: the step's, unless the callback replaces it."""
    replaced = callback(step) if callback is not None else None
    return step.next_latent if replaced is None else replaced
