"""Exact semantics of the transformer hooks: per-sample layer skip, image K/V injection, the step callback."""

import copy

import pytest
import torch

import flux.modules.layers as layers
from flux.model import Flux, Injection, layer_name
from flux.modules.layers import timestep_embedding
from flux.sampling import denoise, get_schedule, image_ids, invert, pack
from flux.util import configs

P = configs["flux-tiny"].params
N_LAYERS = P.depth + P.depth_single_blocks
TXT_LEN = 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls gain nothing from threads, and a busy 2-core CI makes OpenMP threads wait on each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> Flux:
    torch.manual_seed(0)
    m = Flux(P).eval()
    with torch.no_grad():  # gates well away from zero, so a skipped block is visibly different
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def inputs(batch: int, seed: int = 0, same: bool = False, h: int = 6, w: int = 4) -> dict:
    """Random model inputs; `same` repeats one sample `batch` times."""
    g = torch.Generator().manual_seed(seed)
    n = 1 if same else batch

    def rep(x):
        return x.expand(batch, *x.shape[1:]).clone() if same else x

    return dict(
        img=rep(pack(torch.randn(n, 16, h, w, generator=g))),
        img_ids=image_ids(batch, h // 2, w // 2),
        txt=rep(torch.randn(n, TXT_LEN, P.context_in_dim, generator=g)),
        txt_ids=torch.zeros(batch, TXT_LEN, 3),
        timesteps=rep(torch.rand(n, generator=g)),
        y=rep(torch.randn(n, P.vec_in_dim, generator=g)),
        guidance=torch.full((batch,), 3.5),
    )


def row(x: dict, b: int) -> dict:
    return {k: v[b : b + 1] for k, v in x.items()}


def plain_forward(m: Flux, img, img_ids, txt, txt_ids, timesteps, y, guidance):
    """The official forward, written from the blocks with no hook argument at all."""
    img = m.img_in(img)
    vec = m.time_in(timestep_embedding(timesteps, 256))
    vec = vec + m.guidance_in(timestep_embedding(guidance, 256))
    vec = vec + m.vector_in(y)
    txt = m.txt_in(txt)
    pe = m.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
    for block in m.double_blocks:
        img, txt = block(img, txt, vec, pe)
    x = torch.cat((txt, img), dim=1)
    for block in m.single_blocks:
        x = block(x, vec, pe)
    return m.final_layer(x[:, txt.shape[1] :], vec)


def zero_gates(m: Flux, layer: int) -> Flux:
    """A copy of `m` whose block `layer` has its residual gates forced to zero (gate rows of the modulation)."""
    m = copy.deepcopy(m)
    H = P.hidden_size
    with torch.no_grad():
        if layer < P.depth:
            block = m.double_blocks[layer]
            # chunks (shift1, scale1, gate1, shift2, scale2, gate2), for both streams
            lins = [block.img_mod.lin, block.txt_mod.lin]
            rows = [slice(2 * H, 3 * H), slice(5 * H, 6 * H)]
        else:
            lins = [m.single_blocks[layer - P.depth].modulation.lin]  # chunks (shift, scale, gate)
            rows = [slice(2 * H, 3 * H)]
        for lin in lins:
            for r in rows:
                lin.weight[r] = 0
                lin.bias[r] = 0
    return m


@torch.no_grad()
def test_no_hooks_is_the_plain_forward_bit_for_bit(model):
    x = inputs(3)
    plain = plain_forward(model, **x)
    assert torch.equal(model(**x), plain)
    assert torch.equal(model(**x, skip=[set()] * 3), plain)
    assert torch.equal(model(**x, inject=Injection(frozenset(), (0, 0, 0))), plain)
    # Every sample its own source, in every layer: the gather copies each sample's own K/V.
    assert torch.equal(model(**x, inject=Injection(frozenset(range(N_LAYERS)), (0, 1, 2))), plain)


@torch.no_grad()
@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_skip_equals_zeroed_residual_gates(model, layer):
    x = inputs(2, seed=layer)
    skipped = model(**x, skip=[{layer}] * 2)
    zeroed = zero_gates(model, layer)(**x)
    assert (skipped - zeroed).abs().max() <= 1e-6
    assert (skipped - model(**x)).abs().max() > 1e-3  # the layer matters, so the comparison means something
    # mixed batch (the torch.where path): only sample 1 skips
    mixed = model(**x, skip=[set(), {layer}])
    assert torch.equal(mixed[0], model(**x)[0])
    assert (mixed[1] - zeroed[1]).abs().max() <= 1e-6


@torch.no_grad()
def test_per_sample_skips_equal_separate_runs(model):
    skips = [set(), {0}, {2, 5}, {1, 3, 4}]
    x = inputs(len(skips), seed=7)
    batched = model(**x, skip=skips)
    for b, s in enumerate(skips):
        alone = model(**row(x, b), skip=[s])
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(batched[0], model(**row(x, 0), skip=[{0}])[0], atol=1e-3)


@torch.no_grad()
def test_injection_between_identical_samples_changes_nothing(model):
    x = inputs(3, seed=3, same=True)
    plain = model(**x)
    injected = model(**x, inject=Injection.from_reference(range(N_LAYERS), 3))
    assert torch.equal(injected, plain)
    assert torch.equal(injected[1], injected[0]) and torch.equal(injected[2], injected[0])


@torch.no_grad()
@pytest.mark.parametrize("source", [0, 2])
def test_injection_never_alters_the_source(model, source):
    x = inputs(3, seed=4)
    inject = Injection.from_reference(range(N_LAYERS), 3, reference=source)
    injected, plain = model(**x, inject=inject), model(**x)
    assert torch.equal(injected[source], plain[source])
    torch.testing.assert_close(injected[source : source + 1], model(**row(x, source)), rtol=0, atol=1e-6)
    for b in set(range(3)) - {source}:  # the targets did change
        assert (injected[b] - plain[b]).abs().max() > 1e-3


def record_attention(monkeypatch) -> list:
    """Capture the (q, k, v) of every attention call (a test-only patch; the library itself is never patched)."""
    calls = []
    real = layers.attention

    def spy(q, k, v, pe):
        calls.append((q.clone(), k.clone(), v.clone()))
        return real(q, k, v, pe=pe)

    monkeypatch.setattr(layers, "attention", spy)
    return calls


@torch.no_grad()
@pytest.mark.parametrize("inject_layers", [range(N_LAYERS), {1, 3}])
def test_injected_layers_attend_with_the_source_image_kv(model, monkeypatch, inject_layers):
    calls = record_attention(monkeypatch)
    x = inputs(3, seed=5)
    model(**x, inject=Injection.from_reference(inject_layers, 3))
    assert len(calls) == N_LAYERS
    for layer, (q, k, v) in enumerate(calls):
        img_k, img_v = k[:, :, TXT_LEN:], v[:, :, TXT_LEN:]
        for b in (1, 2):
            # Text K/V and all queries stay each sample's own.
            assert not torch.allclose(k[b, :, :TXT_LEN], k[0, :, :TXT_LEN])
            assert not torch.allclose(q[b, :, TXT_LEN:], q[0, :, TXT_LEN:])
            if layer in inject_layers:
                assert torch.equal(img_k[b], img_k[0]) and torch.equal(img_v[b], img_v[0]), layer_name(layer, P.depth)
            else:
                assert not torch.allclose(img_k[b], img_k[0]) and not torch.allclose(img_v[b], img_v[0])


@torch.no_grad()
def test_out_of_range_layers_raise(model):
    x = inputs(2)
    for bad in (N_LAYERS, -1):
        with pytest.raises(ValueError, match="out of range"):
            model(**x, skip=[set(), {bad}])
        with pytest.raises(ValueError, match="out of range"):
            model(**x, inject=Injection.from_reference([0, bad], 2))
    with pytest.raises(ValueError, match="entries"):
        model(**x, skip=[set()])


def test_layer_names():
    assert layer_name(3, 19) == "double_blocks.3"
    assert layer_name(25, 19) == "single_blocks.6 (layer 25)"


@torch.no_grad()
def test_callback_steps_and_final_prediction(model):
    x = inputs(2, seed=6)
    timesteps = get_schedule(3, x["img"].shape[1])
    seen = []
    final = denoise(
        model, x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["y"], timesteps, guidance=3.5, callback=seen.append
    )
    assert [s.index for s in seen] == [0, 1, 2]
    assert [(s.t, s.t_prev) for s in seen] == list(zip(timesteps[:-1], timesteps[1:]))
    assert torch.equal(seen[0].latent, x["img"])
    for s, nxt in zip(seen, seen[1:]):
        assert torch.equal(nxt.latent, s.next_latent)
    for s in seen:
        assert torch.equal(s.x0, s.latent - s.t * s.velocity)
    # The last step lands on t = 0, where the prediction is the result itself.
    assert timesteps[-1] == 0
    assert torch.equal(seen[-1].x0, final)
    assert torch.equal(seen[-1].next_latent, final)


@torch.no_grad()
def test_invert_is_the_euler_loop_backwards_with_the_velocity_at_the_noisier_time(model):
    x = inputs(2, seed=7)
    timesteps = get_schedule(3, x["img"].shape[1])
    seen = []
    noise = invert(
        model, x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["y"], timesteps, guidance=1.0, callback=seen.append
    )
    rev = timesteps[::-1]  # 0 -> 1
    img = x["img"]
    for t, t_next in zip(rev[:-1], rev[1:]):
        v = plain_forward(
            model, img, x["img_ids"], x["txt"], x["txt_ids"], torch.full((2,), t_next), x["y"], torch.full((2,), 1.0)
        )
        img = img + (t_next - t) * v
    assert torch.equal(noise, img)
    assert [(s.index, s.t, s.t_prev) for s in seen] == [(i, a, b) for i, (a, b) in enumerate(zip(rev[:-1], rev[1:]))]
    assert torch.equal(seen[0].latent, x["img"]) and torch.equal(seen[-1].next_latent, noise)
    # The hooks reach the model as in denoise: a callback may replace the next latent, skip/inject are passed on.
    zeroed = invert(
        model,
        x["img"],
        x["img_ids"],
        x["txt"],
        x["txt_ids"],
        x["y"],
        timesteps,
        guidance=1.0,
        callback=lambda s: torch.zeros_like(s.next_latent) if s.index == 1 else None,
    )
    v = plain_forward(
        model,
        torch.zeros_like(img),
        x["img_ids"],
        x["txt"],
        x["txt_ids"],
        torch.full((2,), rev[3]),
        x["y"],
        torch.full((2,), 1.0),
    )
    assert torch.equal(zeroed, (rev[3] - rev[2]) * v)
    skipped = invert(
        model, x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["y"], timesteps, guidance=1.0, skip=[{0}, set()]
    )
    assert torch.equal(skipped[1], noise[1]) and not torch.allclose(skipped[0], noise[0])


@torch.no_grad()
@pytest.mark.parametrize("start,end", [(0, 1), (0, 3), (1, 3), (0, 4)])
def test_inject_steps_equal_injection_in_those_steps_and_plain_denoising_in_the_others(model, start, end):
    x = inputs(3, seed=8)
    timesteps = get_schedule(4, x["img"].shape[1])
    inject = Injection.from_reference([0, 3, 5], 3)

    def run(img, ts, **hooks):
        return denoise(model, img, x["img_ids"], x["txt"], x["txt_ids"], x["y"], ts, guidance=3.5, **hooks)

    window = run(x["img"], timesteps, inject=inject, inject_steps=(start, end))
    img = run(x["img"], timesteps[: start + 1])  # no step at all when start == 0: the input itself
    img = run(img, timesteps[start : end + 1], inject=inject)
    img = run(img, timesteps[end:])
    assert torch.equal(window, img)
    full, plain = run(x["img"], timesteps, inject=inject), run(x["img"], timesteps)
    assert torch.equal(window, full) == ((start, end) == (0, 4))
    assert not torch.allclose(window[1:], plain[1:]) and torch.equal(window[0], plain[0])
