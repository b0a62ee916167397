"""The editing methods of stableflow.methods on flux-tiny: their limits, single steps written out by hand, the NFE
they report, and the inversion core against Stable Flow's own real-image code."""

import pytest
import torch

from flux.errors import UserError
from flux.modules.layers import KVSource, take_image_kv
from flux.sampling import image_ids, pack, unpack
from stableflow.methods import EditCase, edit, flowedit, invert_edit, prepare, sdedit, stable_flow
from stableflow.methods.common import single_blocks

SIZE = 32


@pytest.fixture(scope="module")
def case(tiny_models):
    """A generated source (the case's seed, 4 steps) and a real-image case of the same pixels."""
    spec = EditCase("a red house", "a blue house", seed=3, width=SIZE, height=SIZE, source_steps=4)
    return prepare(tiny_models, spec)


@pytest.fixture(scope="module")
def real(tiny_models, case):
    spec = EditCase("a red house", "a blue house", image=case.image, seed=3)
    return prepare(tiny_models, spec)


def test_sdedit_at_strength_0_returns_the_source_and_at_1_is_plain_generation(tiny_models, real):
    zero = edit(tiny_models, real, sdedit.SDEditParams(strength=0, steps=4))
    assert torch.equal(zero.latent, real.latent[0]) and zero.nfe == 0
    one = edit(tiny_models, real, sdedit.SDEditParams(strength=1, steps=4, guidance=3.5))
    plain = tiny_models.denoise(real.text.select([1]), real.noise, real.schedule(tiny_models, 4), 3.5)
    assert torch.allclose(one.latent, plain[0], atol=1e-6) and one.nfe == 4


def test_sdedit_starts_on_the_straight_path_at_the_first_kept_time(tiny_models, real):
    """strength 0.5 of 4 steps keeps the last 2: x_t = (1 - t) x0 + t n at t = timesteps[2], then 2 Euler steps."""
    ts = real.schedule(tiny_models, 4)
    t = ts[2]
    start = (1 - t) * real.latent + t * real.noise
    want = tiny_models.denoise(real.text.select([1]), start, ts[2:], 3.5)
    got = edit(tiny_models, real, sdedit.SDEditParams(strength=0.5, steps=4, guidance=3.5))
    assert torch.allclose(got.latent, want[0], atol=1e-6) and got.nfe == 2


def test_flowedit_with_the_source_as_target_returns_the_source(tiny_models, real):
    same = prepare(tiny_models, EditCase("a red house", "a red house", image=real.image, seed=3))
    out = edit(tiny_models, same, flowedit.FlowEditParams(steps=6, n_max=5, source_guidance=2, target_guidance=2))
    assert torch.allclose(out.latent.float(), same.latent[0].float(), atol=1e-5)
    assert out.nfe == 10


def test_flowedit_one_step_by_hand(tiny_models, real):
    """n_max = 1: only the last step, t -> 0, from z = x_src: z_src = (1 - t) x + t n, z_tar = z_src, and
    z = x - t (v(z_src, target, g_tar) - v(z_src, source, g_src)), n the seed's first draw."""
    params = flowedit.FlowEditParams(steps=4, n_max=1, source_guidance=1.5, target_guidance=5.5)
    t = real.schedule(tiny_models, 4)[3]
    x = real.latent.float()
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    z_src = (1 - t) * x + t * n
    model = tiny_models.model

    def v(row: int, g: float):
        ids = image_ids(1, SIZE // 16, SIZE // 16)
        text = real.text.select([row])
        with torch.inference_mode():
            out = model(pack(z_src), ids, text.txt, text.txt_ids, torch.tensor([t]), text.vec, torch.tensor([g]))
        return unpack(out, SIZE, SIZE)

    want = x - t * (v(1, 5.5) - v(0, 1.5))
    got = edit(tiny_models, real, params)
    assert torch.allclose(got.latent.float(), want[0], atol=1e-5) and got.nfe == 2


@pytest.mark.parametrize("solver", ["euler", "rf-solver", "fireflow"])
def test_the_inversion_core_with_stable_flows_settings_is_stable_flows_real_image_edit(tiny_models, real, solver):
    """invert_edit with the vital layers' image K/V at every step and nudging reproduces stableflow.edit's edit_real
    (reached through the stable_flow wrapper) with each solver: two implementations of the same path agree."""
    p = tiny_models.model.params
    layers = stable_flow.default_vital_layers(p.depth, p.depth_single_blocks)
    reference = edit(tiny_models, real, stable_flow.StableFlowParams(steps=4, guidance=3.0, solver=solver))
    core = invert_edit.InvertEditParams(solver, 4, 3.0, layers, 4, keys=True, text=False, nudge=1.15)
    ours = edit(tiny_models, real, core)
    assert torch.allclose(ours.latent, reference.latent, atol=1e-5)
    assert ours.nfe == reference.nfe == {"euler": 4 + 2 * 4, "rf-solver": 8 + 2 * 8, "fireflow": 5 + 2 * 5}[solver]


def test_stable_flow_on_a_generated_case_has_the_case_source_as_its_reference(tiny_models, case):
    """Without injection the edit is plain generation of the target from the case's noise, with its steps."""
    out = edit(tiny_models, case, stable_flow.StableFlowParams(layers=[]))
    plain = tiny_models.denoise(case.text.select([1]), case.noise, case.schedule(tiny_models, 4), 3.5)
    assert torch.allclose(out.latent, plain[0], atol=1e-6) and out.nfe == 8


def test_stable_flow_ablations(tiny_models):
    vital = stable_flow.default_vital_layers(2, 4)
    a = lambda name: stable_flow.ablation(tiny_models, name)
    assert a("no-injection").layers == [] and a("all-layers").layers == list(range(6))
    assert sorted(a("non-vital").layers + vital) == list(range(6)) and not set(a("non-vital").layers) & set(vital)
    assert a("no-nudging").nudge == 1 and a("no-nudging").layers == vital
    with pytest.raises(UserError, match="unknown Stable Flow ablation"):
        a("attention-extension")


@pytest.mark.parametrize(
    "method,nfe",
    [
        (lambda m: invert_edit.rf_solver_edit_params(m, steps=3), 2 * 3 + 2 * 2 * 3),  # inversion, then 2 samples
        (lambda m: invert_edit.fireflow_params(m, steps=3), 4 + 2 * 4),
        (lambda m: "flowedit", 2 * 24),  # published defaults: source and target velocity in 24 of 28 steps
        (lambda m: "sdedit", 17),  # round(28 * 0.6)
    ],
    ids=["rf-solver-edit", "fireflow", "flowedit", "sdedit"],
)
def test_reported_nfe(tiny_models, real, method, nfe):
    assert edit(tiny_models, real, method(tiny_models)).nfe == nfe


def test_rf_solver_edit_shares_the_values_of_the_late_single_blocks(tiny_models):
    p = tiny_models.model.params  # flux-tiny: 2 double + 4 single blocks
    params = invert_edit.rf_solver_edit_params(tiny_models)
    assert params.layers == single_blocks(tiny_models, 20, 37) == [p.depth + 2, p.depth + 3]
    assert (params.keys, params.text, params.inject, params.steps) == (False, True, 3, 15)
    assert invert_edit.fireflow_params(tiny_models).layers == list(range(p.depth, p.depth + 4))


def test_without_sharing_the_edit_is_the_target_denoised_from_the_inversion(tiny_models, real):
    """inject = 0: the edit sample is the plain rf-solver denoising of the inverted noise under the target prompt."""
    params = invert_edit.InvertEditParams("rf-solver", 3, 2.0, [3], inject=0)
    out = edit(tiny_models, real, params)
    from stableflow.methods.common import solve

    ts = real.schedule(tiny_models, 3)
    noise, _ = solve(tiny_models, real.latent, real.text.select([0]), ts, 1.0, "rf-solver", backwards=True)
    plain, _ = solve(tiny_models, noise, real.text.select([1]), ts, 2.0, "rf-solver")
    assert torch.allclose(out.latent, plain[0], atol=1e-5)


def test_sharing_changes_the_edit(tiny_models, real):
    base = invert_edit.InvertEditParams("fireflow", 3, 2.0, [3, 4, 5], inject=3)
    shared = edit(tiny_models, real, base)
    unshared = edit(tiny_models, real, invert_edit.InvertEditParams("fireflow", 3, 2.0, [3, 4, 5], inject=0))
    assert not torch.allclose(shared.latent, unshared.latent, atol=1e-4)


def test_kv_source_values_only_with_text():
    """Sample 1 takes sample 0's values over the whole sequence and keeps its own keys; the default keeps Stable
    Flow's rule (image tokens' K and V, the text's own)."""
    k = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).view(2, 1, 5, 2)
    v = -k
    index = torch.tensor([0, 0])
    k2, v2 = take_image_kv(k, v, 2, KVSource(index, keys=False, text=True))
    assert torch.equal(k2, k) and torch.equal(v2[1], v[0]) and torch.equal(v2[0], v[0])
    k3, v3 = take_image_kv(k, v, 2, KVSource(index))
    assert torch.equal(k3[1, :, :2], k[1, :, :2]) and torch.equal(k3[1, :, 2:], k[0, :, 2:])
    assert torch.equal(v3[1, :, :2], v[1, :, :2]) and torch.equal(v3[1, :, 2:], v[0, :, 2:])


def test_bad_settings_are_refused(tiny_models, real):
    with pytest.raises(UserError, match="unknown method 'p2p'"):
        edit(tiny_models, real, "p2p")
    with pytest.raises(UserError, match="strength 1.5 must be in"):
        edit(tiny_models, real, sdedit.SDEditParams(strength=1.5))
    with pytest.raises(UserError, match="n_min <= n_max <= steps"):
        edit(tiny_models, real, flowedit.FlowEditParams(steps=4, n_max=5))


@pytest.mark.slow
@pytest.mark.parametrize("nudge", [
    pytest.param(1.0, marks=pytest.mark.xfail(strict=True, reason="the shipped weights, not nudged: mean latent error "
                                              "0.30 against Euler's 0.046, 45.0 against 53.7 dB: RF-Solver diverges "
                                              "on two of the 8 scenes (latent error 0.9 and 1.2)")),
    pytest.param(1.15, marks=pytest.mark.xfail(strict=True, reason="the shipped weights, nudged: mean latent error "
                                               "0.082 against Euler's 0.034, 59.9 against 57.9 dB: RF-Solver is "
                                               "ahead on 7 of the 8 scenes and diverges on one (0.52)")),
])  # fmt: skip
def test_rf_solver_inversion_reconstructs_better_than_euler_at_equal_nfe_on_flux_mini(mini, nudge):
    """invert_table's 8 rendered world scenes (not the model's own output), their latents scaled by `nudge` (Stable
    Flow's latent nudging), inverted and reconstructed under their captions: RF-Solver with 10 steps and Euler with 20
    both take 20 evaluations each way; RF-Solver's reconstructions are closer to the VAE's decoding of the (nudged)
    input latents, on average, in 8-bit PSNR and in the latent. On the shipped weights RF-Solver is far ahead on most
    scenes and diverges on a few, more often without nudging; why is not measured (a guess: started at the clean
    latent itself, the second-order term, a difference of two velocities half a step apart, is taken where the
    velocity is least trained, t near 0). The 4 + 8 weights passed both on 3 scenes."""
    from mini.world import caption, render, sample_scenes
    from stableflow.methods.common import solve
    from stableflow.methods.invert_table import psnr

    n = 8
    scenes = sample_scenes(n, 0)
    pixels = render(scenes)
    latents = nudge * mini.encode_image(pixels)
    targets = mini.decode(latents)
    text = mini.encode([caption(s) for s in scenes])
    error, quality = {}, {}
    for solver, steps in (("euler", 20), ("rf-solver", 10)):
        ts = mini.schedule(steps, pixels.shape[-1], pixels.shape[-2])
        error[solver] = quality[solver] = 0
        for i in range(n):
            noise, n_in = solve(mini, latents[i : i + 1], text.select([i]), ts, 1.0, solver, backwards=True)
            back, n_out = solve(mini, noise, text.select([i]), ts, 1.0, solver)
            assert n_in == n_out == 20
            error[solver] += ((back[0] - latents[i]).norm() / latents[i].norm()).item() / n
            quality[solver] += psnr(mini.decode(back)[0], targets[i]) / n
    assert error["rf-solver"] < error["euler"]
    assert quality["rf-solver"] > quality["euler"] + 3


@pytest.mark.slow
def test_invert_table_writes_one_row_per_solver_nudge_and_steps(run_script, tmp_path):
    out = tmp_path / "table.md"
    args = ["--model", "flux-tiny", "--images", "1", "--steps", "1", "2", "--nudges", "1", "1.15", "--out", out]
    proc = run_script("-m", "stableflow.methods.invert_table", *args)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 3 * 2 * 2 + 1  # solvers x nudges x steps, and the VAE's own line
    nfe = {(r.split(" | ")[0][2:], r.split(" | ")[2]): int(r.split(" | ")[3]) for r in rows[:-1]}
    assert nfe[("euler", "2")] == 4 and nfe[("rf-solver", "2")] == 8 and nfe[("fireflow", "2")] == 6
