"""flux.accel on the CPU with flux-tiny: every speed option computes what the plain model computes.

Tolerances: attention backends and compilation reorder float32 arithmetic only (≤ 1e-5 of the output's
scale); streaming copies bytes, so it must be bit-identical; FP8 is lossy by design, and is checked
against its own definition (dequantised operands, float32 product) and for a bounded error.
"""

import pytest
import torch
from torch import nn

from flux import accel
from flux.accel import kernels
from flux.errors import UserError
from flux.model import Injection
from flux.modules.layers import SingleStreamBlock
from flux.sampling import image_ids, pack
from flux.util import configs, load_flow_model

P = configs["flux-tiny"].params
# FP8 tests run on the CPU (torch 2.13's CPU build, as in CI, has the kernel); some CUDA builds of torch lack it there.
needs_cpu_fp8 = pytest.mark.skipif(
    accel.fp8_problem("cpu") is not None, reason="this torch has no FP8 matmul on the CPU"
)


def tiny(dtype: torch.dtype = torch.float32):
    model = load_flow_model("flux-tiny", "cpu", dtype)
    with torch.no_grad():  # non-trivial norm scales, so that no weight hides behind its default
        for name, t in model.named_parameters():
            if name.endswith(".scale"):
                t.uniform_(0.5, 1.5)
    return model


def inputs(batch: int = 3, h: int = 8, w: int = 6, txt_len: int = 5, seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=pack(torch.randn(batch, 16, h, w, generator=g)).to(dtype),
        img_ids=image_ids(batch, h // 2, w // 2),
        txt=torch.randn(batch, txt_len, P.context_in_dim, generator=g).to(dtype),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.rand(batch, generator=g).to(dtype),
        y=torch.randn(batch, P.vec_in_dim, generator=g).to(dtype),
        guidance=torch.full((batch,), 3.5, dtype=dtype),
    )


HOOKS = [
    {},
    {"skip": [{0, 3}, set(), {1, 5}]},  # per-sample skips: masked layers 0, 1, 3, 5
    {"skip": [{2}, {2}, {2}]},  # a layer every sample skips: never called
    {"inject": Injection(frozenset({1, 4}), (0, 0, 1))},
]


def run(model, x, **hooks):
    with torch.inference_mode():
        return model(**x, **hooks)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("backend", accel.ATTENTION_BACKENDS)
def test_attention_backends_compute_the_plain_output(backend):
    model, x = tiny(), inputs()
    for hooks in HOOKS:
        ref = run(model, x, **hooks)
        with accel.attention_backend(backend):
            out = run(model, x, **hooks)
        assert rel_err(out, ref) <= 1e-5


def test_backend_choice_sets_torch_flags_and_priority_then_restores_them():
    from torch.nn.attention import SDPBackend

    flags = torch.backends.cuda
    before = (flags.flash_sdp_enabled(), flags.math_sdp_enabled(), torch._C._get_sdp_priority_order())
    with accel.attention_backend("math"):
        assert flags.math_sdp_enabled() and not flags.flash_sdp_enabled() and not flags.cudnn_sdp_enabled()
    with accel.attention_backend("efficient"):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.EFFICIENT_ATTENTION)
        assert flags.math_sdp_enabled()  # the others stay available as fallbacks
    with accel.attention_backend("flash", strict=True):
        assert flags.flash_sdp_enabled() and not flags.math_sdp_enabled()
    assert (flags.flash_sdp_enabled(), flags.math_sdp_enabled(), torch._C._get_sdp_priority_order()) == before


def test_strict_backend_has_no_fallback():
    q = torch.randn(1, 2, 4, 8)
    with accel.attention_backend("cudnn", strict=True), pytest.raises(RuntimeError, match="No viable backend"):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # no cuDNN on a CPU, and nothing else allowed
    with accel.attention_backend("cudnn"):  # not strict: falls back
        torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_unknown_attention_backend_names_the_choices():
    with pytest.raises(UserError, match="auto, cudnn, flash, efficient, math"):
        accel.attention_backend("fast")


# ---------------------------------------------------------------------------------------------- compilation


def test_compiled_blocks_match_eager_and_skips_do_not_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, x = tiny(), inputs()
    refs = [run(model, x, **hooks) for hooks in HOOKS[:3]]
    keys = list(model.state_dict())
    counter = CompileCounter()
    accel.compile_blocks(model, backend=counter)
    assert list(model.state_dict()) == keys  # in-place compilation: the checkpoint layout is unchanged
    assert all(accel.is_compiled(b) for b in accel.blocks(model))

    out = run(model, x)
    graphs = counter.frame_count
    assert graphs == 2  # one graph per block class, shared by all 6 blocks
    assert rel_err(out, refs[0]) <= 1e-5
    for hooks, ref in zip(HOOKS[1:3], refs[1:]):
        assert rel_err(run(model, x, **hooks), ref) <= 1e-5
    assert counter.frame_count == graphs, "layer skips must not recompile"

    run(model, x, inject=HOOKS[3]["inject"])  # a kv source is another block input: one more graph per class
    assert counter.frame_count == graphs + 2
    run(model, x, inject=Injection(frozenset({0, 5}), (2, 1, 0)))  # other layers and sources: no recompile
    assert counter.frame_count == graphs + 2


def test_compiled_decoder_matches_eager_and_comes_with_the_compile_option(tiny_models):
    from flux.pipeline import load_models

    models = load_models("flux-tiny", "cpu", torch.float32, accel=accel.AccelOptions(compile=True))
    assert accel.is_compiled(models.ae.decoder) and not accel.is_compiled(models.ae.encoder)
    assert not accel.is_compiled(tiny_models.ae.decoder)
    ae = models.ae
    z = torch.randn(2, ae.params.z_channels, 8, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ae.decoder._compiled_call_impl = None  # eager first
        eager = ae.decode(z)
        accel.compile_decoder(ae, backend="aot_eager")  # traced whole (fullgraph), as inductor gets it
        assert torch.allclose(ae.decode(z), eager, atol=1e-5, rtol=1e-5)


def test_compile_blocks_asks_inductor_for_multi_kernel_reductions_without_its_graph_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append(kw))
    model = tiny()
    accel.compile_blocks(model)
    assert len(calls) == 6 and all(
        c["backend"] == "inductor" and c["options"] == {"triton.multi_kernel": 1, "fx_graph_cache": False}
        for c in calls
    )
    calls.clear()
    accel.compile_blocks(model, mode="max-autotune-no-cudagraphs")  # torch takes options or a mode, not both
    accel.compile_blocks(model, backend="aot_eager")  # inductor's options mean nothing to other backends
    assert len(calls) == 12 and all(c["options"] is None for c in calls)


def test_compiled_blocks_through_aot_autograd_match_eager():
    # aot_eager runs the decompositions inductor sees (SDPA backend choice included), without C++ codegen.
    torch._dynamo.reset()
    model, x = tiny(), inputs(batch=2)
    ref = run(model, x, skip=[{1}, {4}])
    accel.compile_blocks(model, backend="aot_eager")
    with accel.attention_backend("auto"):
        assert rel_err(run(model, x, skip=[{1}, {4}]), ref) <= 1e-5


# ---------------------------------------------------------------------------------------------- fused GELU


def test_fused_gelu_computes_the_plain_output_with_every_hook():
    model, x = tiny(), inputs()
    refs = [run(model, x, **hooks) for hooks in HOOKS]
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    accel.fuse_gelu(model)
    assert all(type(b) is accel.FusedSingleStreamBlock for b in model.single_blocks)
    assert all(
        type(b.img_mlp[0]) is accel.LinearGELU and type(b.txt_mlp[1]) is nn.Identity for b in model.double_blocks
    )
    # Same tensors under the same keys: a checkpoint loads into the fused model unchanged.
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys
    for hooks, ref in zip(HOOKS, refs):
        assert rel_err(run(model, x, **hooks), ref) <= 1e-5  # float32: only the summation order differs
    accel.compile_blocks(model, backend="eager")
    assert rel_err(run(model, x, **HOOKS[1]), refs[1]) <= 1e-5
    with pytest.raises(UserError, match="before compile_blocks"):
        accel.fuse_gelu(model)


def test_unfuse_gelu_restores_the_official_modules_and_outputs():
    model, x = tiny(), inputs()
    ref = run(model, x)
    accel.unfuse_gelu(accel.fuse_gelu(model))
    assert all(type(b) is SingleStreamBlock for b in model.single_blocks)
    assert all(type(b.img_mlp[0]) is nn.Linear and isinstance(b.img_mlp[1], nn.GELU) for b in model.double_blocks)
    assert torch.equal(run(model, x), ref)


def test_linear_gelu_is_the_tanh_gelu_of_the_linear():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 32), torch.randn(24, 32), torch.randn(24)
    expected = nn.functional.gelu(x @ w.t() + b, approximate="tanh")
    assert rel_err(accel.linear_gelu(x, w, b), expected) <= 1e-6
    assert rel_err(nn.functional.gelu(x @ w.t() + b), expected) > 1e-5  # the erf form would be caught


@needs_cpu_fp8
def test_fused_gelu_on_fp8_quantises_the_gelu_inside_the_next_linear():
    model, x = tiny(), inputs()
    ref = run(model, x)
    accel.quantize_fp8(model)
    fp8 = [run(model, x, **hooks) for hooks in HOOKS]
    accel.accelerate(model, accel.AccelOptions(fuse_gelu=True), "cpu")
    assert type(model.single_blocks[0]) is accel.FP8FusedSingleStreamBlock
    assert (
        type(model.double_blocks[0].img_mlp[2]) is accel.FP8GELULinear
        and type(model.double_blocks[0].img_mlp[1]) is nn.Identity
    )
    for hooks, out in zip(HOOKS, fp8):
        # The GELU now reaches the quantisation in float32 instead of bf16-rounded: a change far below FP8's own error.
        assert rel_err(run(model, x, **hooks), out) <= 2e-3
    assert rel_err(run(model, x), ref) <= 0.05
    accel.unfuse_gelu(model)
    assert (
        type(model.single_blocks[0]) is SingleStreamBlock and type(model.double_blocks[0].img_mlp[2]) is accel.FP8Linear
    )
    assert torch.equal(run(model, x), fp8[0])


def test_fp8_after_fuse_gelu_is_refused():
    model = accel.fuse_gelu(tiny())
    with pytest.raises(UserError, match="quantize_fp8 must come before fuse_gelu"):
        accel.quantize_fp8(model)


def test_gelu_quantize_rows_is_the_quantised_concatenation():
    torch.manual_seed(0)
    attn, mlp = torch.randn(2, 5, 16, dtype=torch.bfloat16), 3 * torch.randn(2, 5, 40, dtype=torch.bfloat16)
    q, scale = kernels.gelu_quantize_rows([attn, mlp], [False, True])
    row = torch.cat([attn.float(), nn.functional.gelu(mlp.float(), approximate="tanh")], -1).reshape(10, 56)
    assert q.shape == (10, 56) and q.dtype == torch.float8_e4m3fn and scale.shape == (10, 1)
    assert torch.allclose(scale, row.abs().amax(-1, keepdim=True) / 448)
    assert rel_err(q.float() * scale, row) <= 0.07  # e4m3: 3 mantissa bits
    assert torch.equal(q, kernels.quantize_rows(row)[0])


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None, reason="the Triton kernel needs CUDA")
def test_gelu_quantize_kernel_matches_its_reference():
    torch.manual_seed(0)
    attn = torch.randn(300, 3072, device="cuda", dtype=torch.bfloat16)
    mlp = torch.randn(300, 21504, device="cuda", dtype=torch.bfloat16)[:, 9216:]  # a split view, as in the model
    for parts, gelu in (([attn, mlp], [False, True]), ([mlp], [True])):
        q, scale = kernels.gelu_quantize_rows(parts, gelu)
        q_ref, scale_ref = kernels.gelu_quantize_rows_reference(parts, gelu)
        assert torch.allclose(scale, scale_ref, rtol=1e-5)
        assert (q.float() != q_ref.float()).float().mean() < 1e-3  # float32 rounding of the GELU at the fp8 boundaries


# ---------------------------------------------------------------------------------------------- FP8


def test_row_quantisation_scales_each_row_to_the_fp8_range():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]
    q, scale = accel.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    back = q.float() * scale
    assert torch.isfinite(back).all()
    assert (back[4] == 0).all()  # an all-zero row stays zero (no 0/0)
    peak = q[:4].float().abs().amax(dim=1)
    assert torch.equal(peak, torch.full((4,), 448.0))  # each row's largest value lands on the top of the range
    rel = (back[:4] - x[:4]).abs() / x[:4].abs().amax(dim=1, keepdim=True)
    assert rel.max() <= 2**-4 * 448 / 256  # e4m3: 3 mantissa bits; error ≤ half an ulp of the row's largest binade


@needs_cpu_fp8
def test_fp8_linear_is_the_product_of_the_dequantised_operands():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    fp8 = accel.FP8Linear.from_linear(lin)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    x_q, x_s = accel.quantize_rows(x.reshape(-1, 64))
    expected = (x_q.float() * x_s) @ (fp8.weight.float() * fp8.weight_scale.t()).t() + lin.bias.float()
    out = fp8(x)
    assert out.shape == (2, 7, 48) and out.dtype == torch.bfloat16
    assert rel_err(out, expected.reshape(2, 7, 48)) <= 1e-2  # bf16 output rounding
    assert rel_err(out, lin(x)) <= 0.1  # and near the bf16 layer it replaces


@pytest.mark.skipif(
    not accel.scaled_mm_takes_bias("cpu"), reason="this torch's FP8 matmul takes no bias with row-wise scales"
)
def test_fp8_bias_inside_the_kernel_matches_the_bias_added_apart():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    inside, apart = accel.FP8Linear.from_linear(lin, bias_in_kernel=True), accel.FP8Linear.from_linear(lin)
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    assert rel_err(inside(x), apart(x)) <= 1e-2  # apart, the product is rounded to bf16 before the bias


@needs_cpu_fp8
def test_fp8_model_stays_close_and_keeps_modulation_in_full_precision():
    model, x = tiny(), inputs()
    refs = [run(model, x, **hooks) for hooks in HOOKS]
    accel.quantize_fp8(model)
    lins = [m for m in model.modules() if isinstance(m, (nn.Linear, accel.FP8Linear))]
    assert (
        sum(isinstance(m, accel.FP8Linear) for m in lins) == 2 * 2 * 4 + 4 * 2
    )  # qkv, proj, mlp×2 per stream; linear1/2
    assert all(isinstance(b.img_mod.lin, nn.Linear) for b in model.double_blocks)
    for hooks, ref in zip(HOOKS, refs):
        err = ((run(model, x, **hooks) - ref).norm() / ref.norm()).item()
        assert 1e-4 < err <= 0.03  # lossy, but by a few percent at most


def test_fp8_errors_are_clear():
    model = tiny()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available.*turn the fp8 option off"):
            accel.quantize_fp8(model, "cuda")
    accel.compile_blocks(model, backend="eager")
    with pytest.raises(UserError, match="before compile_blocks"):
        accel.quantize_fp8(model)


# ---------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("keep_blocks", [0, 3])
def test_streamed_blocks_are_bit_identical(keep_blocks):
    model, x = tiny(), inputs()
    refs = [run(model, x, **hooks) for hooks in HOOKS]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = [sum(t.numel() * t.element_size() for t in b.parameters()) for b in accel.blocks(model)]
    streamer = accel.stream_blocks(model, "cpu", keep_bytes=sum(sorted(sizes)[:keep_blocks]))
    assert len(streamer.streamed) == 6 - keep_blocks
    for _ in range(2):  # the second pass starts from the wrap-around prefetch
        for hooks, ref in zip(HOOKS, refs):
            assert torch.equal(run(model, x, **hooks), ref)
    # Between calls every streamed block points at its host copy again, and the values never changed.
    for i in streamer.streamed:
        block = accel.blocks(model)[i]
        assert all(p.data_ptr() == streamer.host[i][n].data_ptr() for n, p in block.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    streamer.remove()
    assert torch.equal(run(model, x), refs[0])


def test_spread_keeps_resident_blocks_evenly_within_budget():
    sizes = [2] * 4 + [1] * 8
    streamed = accel.stream._spread(sizes, keep_bytes=8)
    kept = [i for i in range(12) if i not in streamed]
    assert sum(sizes[i] for i in kept) <= 8
    assert kept[0] < 4 and kept[-1] >= 8  # resident blocks at the start and the end, not bunched
    assert accel.stream._spread(sizes, 0) == set(range(12)) and accel.stream._spread(sizes, 100) == set()


def test_streaming_combinations_are_refused_clearly():
    model = tiny()
    accel.stream_blocks(model, "cpu")
    with pytest.raises(UserError, match="already streaming"):
        accel.stream_blocks(model, "cpu")
    with pytest.raises(UserError, match="do not combine"):
        accel.compile_blocks(model)
    with pytest.raises(UserError, match="before stream_blocks"):
        accel.quantize_fp8(model)


# ---------------------------------------------------------------------------------------------- options


@needs_cpu_fp8
def test_accelerate_applies_options_and_rejects_bad_ones():
    with pytest.raises(UserError, match="do not combine"):
        accel.accelerate(tiny(), accel.AccelOptions(compile=True, stream_blocks=True), "cpu")
    with pytest.raises(UserError, match="attention 'fastest'"):
        accel.accelerate(tiny(), accel.AccelOptions(attention="fastest"), "cpu")
    model, x = tiny(), inputs()
    ref = run(model, x)
    accel.accelerate(model, accel.AccelOptions(fp8=True, stream_blocks=True, resident_gb=0.0), "cpu")
    assert isinstance(model.single_blocks[0].linear1, accel.FP8Linear)
    assert len(accel.streamer_of(model).streamed) == 6
    assert rel_err(run(model, x), ref) <= 0.05


def test_flops_formula_matches_the_published_count():
    dev = configs["flux-dev"].params
    assert accel.flops_per_forward(dev, 1, 4096, 512) == pytest.approx(74.4e12, rel=2e-3)
    assert accel.flops_per_forward(dev, 1, 1024, 512) == pytest.approx(21.5e12, rel=3e-3)


def test_streaming_a_fused_model_is_bit_identical_to_the_fused_model():
    model, x = tiny(), inputs()
    fused = run(accel.fuse_gelu(model), x, **HOOKS[1])
    accel.unfuse_gelu(model)
    accel.accelerate(model, accel.AccelOptions(fuse_gelu=True, stream_blocks=True), "cpu")
    assert type(model.single_blocks[0]) is accel.FusedSingleStreamBlock
    assert torch.equal(run(model, x, **HOOKS[1]), fused)
