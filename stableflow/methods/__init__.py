"""Training-free editing methods on one FLUX core, behind one interface.

    case = prepare(models, EditCase(source_prompt, target_prompt, image=pixels_or_None, seed=0))
    result = edit(models, case, "flowedit")            # or a params object: edit(models, case, FlowEditParams(...))
    result.image, result.nfe

Each method is a small module: stable_flow (stableflow.edit), sdedit, flowedit, and invert_edit for RF-Solver-Edit and
FireFlow; each module's docstring says where it deviates from its paper and why. `prepare` encodes both prompts, draws
the seed's noise and gets the source latent once, for every method.
"""

from collections.abc import Callable

from flux.errors import UserError
from flux.pipeline import FluxModels

from . import flowedit, invert_edit, sdedit, stable_flow
from .common import Case, EditCase, Edited, prepare

DEFAULTS: dict[str, Callable[[FluxModels], object]] = {
    "stable-flow": lambda models: stable_flow.StableFlowParams(),
    "sdedit": lambda models: sdedit.SDEditParams(),
    "flowedit": lambda models: flowedit.FlowEditParams(),
    "rf-solver-edit": invert_edit.rf_solver_edit_params,
    "fireflow": invert_edit.fireflow_params,
}
METHODS = tuple(DEFAULTS)
_RUN = {
    stable_flow.StableFlowParams: stable_flow.edit,
    sdedit.SDEditParams: sdedit.edit,
    flowedit.FlowEditParams: flowedit.edit,
    invert_edit.InvertEditParams: invert_edit.edit,
}


def edit(models: FluxModels, case: Case, params: "str | object") -> Edited:
    """Run one method on a prepared case: a method name (its published defaults) or a params object."""
    if isinstance(params, str):
        if params not in DEFAULTS:
            raise UserError(f"unknown method {params!r}: use one of {', '.join(METHODS)}")
        params = DEFAULTS[params](models)
    if type(params) not in _RUN:
        raise TypeError(
            f"{type(params).__name__} is no method's params: use one of {', '.join(METHODS)} or their params"
        )
    return _RUN[type(params)](models, case, params)


__all__ = ["METHODS", "Case", "EditCase", "Edited", "edit", "prepare"]
