"""Stable Flow (stableflow.edit) behind the methods' interface, and its ablations as settings: no injection
(layers=[]), all layers, non-vital layers, no nudging (nudge=1).

It calls stableflow.edit itself: edit_generated for a generated source (Euler only), edit_real for an input image
with any of flux.sampling's solvers (a second-order one is demo_4's `solver` option, a combination not in the paper).
A generated case uses the case's own source steps and guidance, so the reference is the case's source image.
"""

from dataclasses import dataclass, replace

from flux.errors import UserError
from flux.pipeline import FluxModels
from flux.sampling import solver_nfe

from ..edit import (
    NUDGE,
    REAL_GUIDANCE,
    REAL_STEPS,
    SOURCE_GUIDANCE,
    EditRequest,
    RealImage,
    default_vital_layers,
    edit_generated,
    edit_real,
)
from .common import Case, Edited


@dataclass
class StableFlowParams:
    layers: list[int] | None = None  # None: the release's vital layers scaled to the model; []: no injection
    steps: int | None = None  # None: the case's source steps (generated), 50 (real)
    guidance: float | None = None  # None: the case's source guidance (generated), 3 (real)
    nudge: float = NUDGE
    source_guidance: float = SOURCE_GUIDANCE
    solver: str = "euler"


ABLATIONS = ("no-injection", "all-layers", "non-vital", "no-nudging")


def vital_layers(models: FluxModels, params: StableFlowParams) -> list[int]:
    p = models.model.params
    return default_vital_layers(p.depth, p.depth_single_blocks) if params.layers is None else list(params.layers)


def ablation(models: FluxModels, name: str, params: StableFlowParams | None = None) -> StableFlowParams:
    """The paper's ablations of `params` (default: the release's settings): injection in no layer, in every layer, in
    the layers that are not vital, or no latent nudging."""
    params = params or StableFlowParams()
    vital = vital_layers(models, params)
    every = list(range(models.model.num_layers))
    changes = {
        "no-injection": dict(layers=[]),
        "all-layers": dict(layers=every),
        "non-vital": dict(layers=[i for i in every if i not in vital]),
        "no-nudging": dict(nudge=1.0),
    }
    if name not in changes:
        raise UserError(f"unknown Stable Flow ablation {name!r}: use one of {', '.join(ABLATIONS)}")
    return replace(params, layers=vital, **changes[name]) if name == "no-nudging" else replace(params, **changes[name])


def edit(models: FluxModels, case: Case, params: StableFlowParams) -> Edited:
    layers = vital_layers(models, params)
    spec = case.spec
    if case.generated:
        if params.solver != "euler":
            raise UserError("Stable Flow edits a generated image with the Euler sampler only: set solver to euler")
        steps = params.steps or spec.source_steps
        guidance = spec.source_guidance if params.guidance is None else params.guidance
        request = EditRequest(spec.source_prompt, [spec.target_prompt], steps, guidance, layers)
        result = edit_generated(models, request, spec.seed, case.width, case.height)
        return Edited(result.edits[0], result.latents[1], 2 * steps)
    steps = params.steps or REAL_STEPS
    guidance = REAL_GUIDANCE if params.guidance is None else params.guidance
    request = EditRequest(spec.source_prompt, [spec.target_prompt], steps, guidance, layers)
    result = edit_real(models, request, RealImage(case.image, params.source_guidance, params.nudge, params.solver))
    return Edited(result.edits[0], result.latents[1], 3 * solver_nfe(params.solver, steps))  # inversion, 2 samples
