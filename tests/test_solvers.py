"""The inversion/denoising solvers of flux.sampling: convergence order on an ODE with a known solution, single steps
computed by hand, the model evaluations they count, and the hooks they pass to every call."""

import math

import numpy as np
import pytest
import torch

from flux.model import Injection
from flux.sampling import SOLVERS, Step, denoise, invert, solver_nfe


class Rotation:
    """dx/dt = cos(3t) x, with the exact solution x(t) = x(s) exp((sin 3t - sin 3s) / 3), as a FLUX-shaped model
    that records its calls (for the single steps written out by hand)."""

    def __init__(self):
        self.calls = []

    def __call__(self, img, timesteps, **hooks):
        self.calls.append((timesteps[0].item(), hooks))
        return torch.cos(3 * timesteps)[:, None, None] * img


class Nonlinear:
    """dx/dt = f'(t) + sin(d) + d^2 with d = x - f(t), f(t) = sin 2t + t^2: x = f(t) solves it exactly. Nonlinear in
    x and t, so no error term cancels (on dx/dt = a(t) x the second-order solvers converge faster than their order)."""

    @staticmethod
    def f(t):
        return torch.sin(2 * t) + t * t

    def __call__(self, img, timesteps, **hooks):
        t = timesteps[:, None, None]
        d = img - self.f(t)
        return 2 * torch.cos(2 * t) + 2 * t + torch.sin(d) + d * d


def run(solver: str, steps: int, backwards: bool = False, model=None, **hooks):
    model = model or Rotation()
    x = torch.tensor([[[1.0, -0.5]]], dtype=torch.float64)
    z = torch.zeros(1, 1, 1, dtype=torch.float64)
    timesteps = np.linspace(1, 0, steps + 1).tolist()
    loop = invert if backwards else denoise
    out = loop(model, x, z, z, z, z, timesteps, guidance=1.0, solver=solver, **hooks)
    return out, model, x


def order(solver: str, backwards: bool = False) -> float:
    """The slope of log error against log step size, fitted over 32..512 steps (Euler's inversion, with its velocity
    at the noisier time, is still approaching its order at fewer steps)."""
    ns = [32, 64, 128, 256, 512]
    s, t = (0.0, 1.0) if backwards else (1.0, 0.0)
    f = lambda t: Nonlinear.f(torch.tensor(t, dtype=torch.float64))
    errors = []
    for n in ns:
        z = torch.zeros(1, 1, 1, dtype=torch.float64)
        x = f(s).reshape(1, 1, 1)
        timesteps = np.linspace(1, 0, n + 1).tolist()
        loop = invert if backwards else denoise
        out = loop(Nonlinear(), x, z, z, z, z, timesteps, guidance=1.0, solver=solver)
        errors.append((out - f(t)).abs().item())
    return np.polyfit(np.log([1 / n for n in ns]), np.log(errors), 1)[0]


@pytest.mark.parametrize("backwards", [False, True], ids=["denoise", "invert"])
@pytest.mark.parametrize("solver,expected", [("euler", 1), ("rf-solver", 2), ("fireflow", 2)])
def test_convergence_order_on_an_ode_with_a_known_solution(solver, expected, backwards):
    assert order(solver, backwards) == pytest.approx(expected, abs=0.1)


@pytest.mark.parametrize("solver", SOLVERS)
def test_the_loops_count_their_model_evaluations(solver):
    seen: list[Step] = []
    _, model, _ = run(solver, 5, callback=seen.append)
    assert (
        len(model.calls)
        == seen[-1].nfe
        == solver_nfe(solver, 5)
        == {"euler": 5, "rf-solver": 10, "fireflow": 6}[solver]
    )
    assert [s.nfe for s in seen] == {
        "euler": [1, 2, 3, 4, 5],
        "rf-solver": [2, 4, 6, 8, 10],
        "fireflow": [2, 3, 4, 5, 6],
    }[solver]


def test_one_step_of_each_solver_by_hand():
    """One step from t=1 to t=0.5 of dx/dt = cos(3t) x from x = 1, each update written out."""
    v = lambda t, x: math.cos(3 * t) * x
    h, t0, x0 = -0.5, 1.0, 1.0
    euler = x0 + h * v(t0, x0)
    mid = x0 + h / 2 * v(t0, x0)
    midpoint = x0 + h * v(t0 + h / 2, mid)
    rf = x0 + h * v(t0, x0) + h * h / 2 * (v(t0 + h / 2, mid) - v(t0, x0)) / (h / 2)
    for solver, want in (("euler", euler), ("rf-solver", rf), ("fireflow", midpoint)):
        model = Rotation()
        x = torch.ones(1, 1, 1, dtype=torch.float64)
        z = torch.zeros(1, 1, 1, dtype=torch.float64)
        assert denoise(model, x, z, z, z, z, [1.0, 0.5], solver=solver).item() == pytest.approx(want, rel=1e-12)


def test_fireflow_reuses_the_previous_midpoint_velocity():
    """Step 2 of FireFlow starts from step 1's midpoint velocity, with no call at (x_1, t_1): its only call is the
    midpoint x_1 + h/2 v_mid1, at t_1 + h/2."""
    v = lambda t, x: math.cos(3 * t) * x
    x, times = 1.0, [1.0, 0.5, 0.0]
    h = -0.5
    v_mid1 = v(1.0 + h / 2, x + h / 2 * v(1.0, x))
    x1 = x + h * v_mid1
    v_mid2 = v(0.5 + h / 2, x1 + h / 2 * v_mid1)
    want = x1 + h * v_mid2
    _, model, _ = run("fireflow", 2)
    assert [t for t, _ in model.calls] == pytest.approx([1.0, 0.75, 0.25])  # start, midpoint 1, midpoint 2
    z = torch.zeros(1, 1, 1, dtype=torch.float64)
    out = denoise(Rotation(), torch.ones(1, 1, 1, dtype=torch.float64), z, z, z, z, times, solver="fireflow")
    assert out.item() == pytest.approx(want, rel=1e-12)


def test_euler_inversion_keeps_the_velocity_at_the_noisier_time_the_others_start_at_the_current_one():
    _, euler, _ = run("euler", 2, backwards=True)
    _, rf, _ = run("rf-solver", 2, backwards=True)
    assert [t for t, _ in euler.calls] == pytest.approx([0.5, 1.0])
    assert [t for t, _ in rf.calls] == pytest.approx([0.0, 0.25, 0.5, 0.75])


@pytest.mark.parametrize("solver", SOLVERS)
def test_hooks_reach_every_call_of_a_step_and_inject_only_in_its_steps(solver):
    inject = Injection.from_reference([0], 1)
    skip = [{1}]
    _, model, _ = run(solver, 4, inject=inject, inject_steps=(1, 3), skip=skip)
    per_step = {"euler": [1] * 4, "rf-solver": [2] * 4, "fireflow": [2, 1, 1, 1]}[solver]
    step_of_call = [i for i, n in enumerate(per_step) for _ in range(n)]
    assert [hooks["inject"] is inject for _, hooks in model.calls] == [1 <= i < 3 for i in step_of_call]
    assert all(hooks["skip"] is skip for _, hooks in model.calls)


def test_the_callback_replaces_the_latent_the_next_step_starts_from():
    replaced = torch.full((1, 1, 2), 7.0, dtype=torch.float64)
    seen: list[Step] = []

    def hook(step: Step):
        seen.append(step)
        return replaced if step.index == 0 else None

    run("rf-solver", 2, callback=hook)
    assert torch.equal(seen[1].latent, replaced)
    for s in seen:
        assert torch.allclose(s.next_latent, s.latent + (s.t_prev - s.t) * s.velocity)


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="unknown solver 'heun'.*euler, rf-solver, fireflow"):
        run("heun", 2)
