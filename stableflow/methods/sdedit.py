"""SDEdit (Meng et al., arXiv 2108.01073) on FLUX: noise the source latent to level `strength` along the flow's
straight path, x_t = (1 - t) x_0 + t n, then denoise it with the edit prompt.

As diffusers' FluxImg2ImgPipeline does it: the schedule of `steps` steps is cut to its last round(steps * strength)
steps, and t is the first kept time, so strength 0 returns the source latent and strength 1 is plain generation of
the edit prompt from the same noise. Deviation: none in the method; its noise is the case's seed, shared with the
other methods, rather than a fresh draw.
"""

from dataclasses import dataclass

from flux.errors import UserError
from flux.pipeline import FluxModels

from .common import Case, Edited, finish, solve


@dataclass
class SDEditParams:
    strength: float = 0.6  # diffusers' FluxImg2ImgPipeline default
    steps: int = 28
    guidance: float = 3.5


def edit(models: FluxModels, case: Case, params: SDEditParams) -> Edited:
    if not 0 <= params.strength <= 1:
        raise UserError(f"SDEdit strength {params.strength} must be in [0, 1] (0: the source, 1: plain generation)")
    timesteps = case.schedule(models, params.steps)
    kept = round(params.steps * params.strength)
    if kept == 0:
        return finish(models, case.latent[0], 0)
    timesteps = timesteps[params.steps - kept :]
    t = timesteps[0]
    start = (1 - t) * case.latent + t * case.noise
    out, nfe = solve(models, start, case.text.select([1]), timesteps, params.guidance)
    return finish(models, out[0], nfe)
