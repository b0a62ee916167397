"""Inversion-based editing with attention sharing, the scheme of RF-Solver-Edit (Wang et al., arXiv 2411.04746) and
FireFlow (Deng et al., arXiv 2412.07517), on any of flux.sampling's solvers.

The source latent (times `nudge`) is inverted to noise under the source prompt with guidance 1; the batch [reference,
edit] then denoises from that noise, the reference under the source prompt and guidance 1, the edit under the target
prompt. After every step the reference's latent is overwritten with the inversion latent of the same noise level
(as Stable Flow's real-image path does), and in the first `inject` steps the edit attends with the reference's values
in the shared layers.

The official codes store each single block's V during the inversion and load it during denoising. Our mapping onto
flux.model's `inject` hook differs, and says so:
- V comes from the reference sample of the same forward pass, not from a stored inversion pass. The stored V of a
  denoising step from t_b is the one the inversion computed at the cleaner end t_a of that step (its key is the
  inversion step's target time, its input the step's start), one level off; ours is the reference's at t_b, the
  matching level. The midpoint calls match in time. The reference costs one more sample per forward pass (NFE counts
  it); the official code costs the memory of every stored V instead.
- The whole V is taken, text tokens included, as the official code replaces the whole joint sequence's V
  (Injection(keys=False, text=True)); the keys stay the edit's own.
- FireFlow reuses the previous midpoint velocity; for the reference, whose latent is overwritten after each step, that
  velocity belongs to the latent before the overwrite (the official reconstruction has no overwrite).
"""

from dataclasses import dataclass

from flux.errors import UserError
from flux.model import Injection
from flux.pipeline import FluxModels
from flux.sampling import Step, check_solver

from .common import Case, Edited, finish, single_blocks, solve


@dataclass
class InvertEditParams:
    solver: str
    steps: int
    guidance: float  # of the edit
    layers: list[int]  # global indices of the shared layers
    inject: int  # sharing in denoising steps 0..inject-1
    keys: bool = False  # share the keys too (Stable Flow)
    text: bool = True  # share the text tokens' values too (RF-Solver-Edit, FireFlow)
    source_guidance: float = 1.0  # the inversion's and the reference's
    nudge: float = 1.0  # Stable Flow's latent nudging (1: off)


def rf_solver_edit_params(models: FluxModels, steps: int = 15, inject: int = 3, guidance: float = 2.0):
    """RF-Solver-Edit's published setting: V of single blocks 20..37 shared in the first steps; guidance 2."""
    return InvertEditParams("rf-solver", steps, guidance, single_blocks(models, 20, 37), inject)


def fireflow_params(models: FluxModels, steps: int = 8, inject: int = 1, guidance: float = 2.0):
    """FireFlow's "fast editing" setting: 8 steps, V of every single block (0..37) shared in the first step."""
    return InvertEditParams("fireflow", steps, guidance, single_blocks(models, 0, 37), inject)


def edit(models: FluxModels, case: Case, params: InvertEditParams) -> Edited:
    check_solver(params.solver, UserError)
    if not 0 <= params.inject <= params.steps:
        raise UserError(f"inject {params.inject} must be in 0..steps ({params.steps}): the steps that share attention")
    timesteps = case.schedule(models, params.steps)
    levels = []  # packed inversion latents, clean first
    source = case.latent * params.nudge

    def record(step: Step) -> None:
        if not levels:
            levels.append(step.latent)
        levels.append(step.next_latent)

    noise, nfe = solve(
        models, source, case.text.select([0]), timesteps, params.source_guidance, params.solver, True, callback=record
    )

    def overwrite_reference(step: Step):
        # step i moves timesteps[i] -> timesteps[i + 1], the inversion's level steps - (i + 1)
        out = step.next_latent.clone()
        out[0] = levels[params.steps - step.index - 1][0]
        return out

    inject = Injection(frozenset(params.layers), (0, 0), params.keys, params.text) if params.layers else None
    out, n = solve(
        models,
        noise.repeat(2, 1, 1, 1),
        case.text,
        timesteps,
        [params.source_guidance, params.guidance],
        params.solver,
        inject=inject if params.inject else None,
        inject_steps=(0, params.inject) if params.inject else None,
        callback=overwrite_reference,
    )
    return finish(models, out[1], nfe + n)
