"""FlowEdit (Kulikov et al., arXiv 2412.08629): inversion-free editing by an ODE on the difference of velocities.

From z = x_src at t = 1 down the schedule, in the steps with T - i <= n_max: draw noise n, put the source on its
noisy path z_src = (1 - t) x_src + t n, carry the edit along the same offset, z_tar = z + z_src - x_src, and move
z <- z + (t_next - t) * mean over n_avg draws of [v(z_tar, target, target guidance) - v(z_src, source, source
guidance)]. The last n_min steps (0 by default) sample the target plainly from z + z_src - x_src. Defaults are the
official FLUX settings: 28 steps, n_max 24, n_min 0, n_avg 1, guidance 1.5 (source) and 5.5 (target).

Deviations: the noise comes from a generator seeded by the case (the official code draws from the global generator);
the source and target velocities of one draw run as one batch of two (the official code calls the model twice).
"""

from dataclasses import dataclass

import torch

from flux.errors import UserError
from flux.pipeline import FluxModels

from .common import Case, Edited, finish, solve, velocity


@dataclass
class FlowEditParams:
    steps: int = 28
    n_max: int = 24
    n_min: int = 0
    n_avg: int = 1
    source_guidance: float = 1.5
    target_guidance: float = 5.5


def edit(models: FluxModels, case: Case, params: FlowEditParams) -> Edited:
    T = params.steps
    if not 0 <= params.n_min <= params.n_max <= T or params.n_avg < 1:
        raise UserError(
            f"FlowEdit needs 0 <= n_min <= n_max <= steps and n_avg >= 1; got n_min {params.n_min}, n_max "
            f"{params.n_max}, steps {T}, n_avg {params.n_avg}"
        )
    timesteps = case.schedule(models, T)
    x_src = case.latent.float()
    z = x_src.clone()
    generator = torch.Generator().manual_seed(case.spec.seed)
    draw = lambda: torch.randn(x_src.shape, generator=generator).to(x_src.device)
    nfe = 0
    for i in range(T - params.n_max, T - params.n_min):
        t, t_next = timesteps[i], timesteps[i + 1]
        delta = torch.zeros_like(z)
        for _ in range(params.n_avg):
            z_src = (1 - t) * x_src + t * draw()
            z_tar = z + z_src - x_src
            v = velocity(
                models,
                torch.cat([z_src, z_tar]),
                case.text,
                t,
                [params.source_guidance, params.target_guidance],
            ).float()
            delta += (v[1] - v[0]) / params.n_avg
            nfe += 2
        z = z + (t_next - t) * delta
    if params.n_min:
        i = T - params.n_min
        t = timesteps[i]
        start = z + (1 - t) * x_src + t * draw() - x_src
        z, n = solve(models, start.to(models.dtype), case.text.select([1]), timesteps[i:], params.target_guidance)
        nfe += n
    return finish(models, z[0].to(models.dtype), nfe)
