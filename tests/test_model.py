"""The transformer and the sampler against diffusers (the peer implementation) and the closed forms."""

import math

import pytest
import torch

from flux.model import Flux, FluxParams
from flux.sampling import get_noise, get_schedule, image_ids, pack, time_shift, unpack
from flux.util import configs

from diffusers_oracle import diffusers_forward, diffusers_transformer


def tiny_params(guidance_embed: bool = True) -> FluxParams:
    p = configs["flux-tiny"].params
    return FluxParams(**{**p.__dict__, "guidance_embed": guidance_embed})


def random_inputs(batch: int, h: int, w: int, txt_len: int, p: FluxParams, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = pack(torch.randn(batch, 16, h, w, generator=g))
    return dict(
        img=img,
        img_ids=image_ids(batch, h // 2, w // 2),
        txt=torch.randn(batch, txt_len, p.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, p.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5, 1.0, 5.0][:batch]),
    )


@pytest.mark.parametrize("guidance_embed", [True, False])
@pytest.mark.parametrize("batch,h,w,txt_len", [(2, 8, 12, 7), (1, 10, 6, 13)])
def test_transformer_matches_diffusers(guidance_embed, batch, h, w, txt_len):
    p = tiny_params(guidance_embed)
    torch.manual_seed(1)
    ours = Flux(p).eval()
    # Random gates and norm scales, so that no branch of either model hides behind a default init.
    with torch.no_grad():
        for name, t in ours.named_parameters():
            if name.endswith(".scale"):
                t.uniform_(0.5, 1.5)
    theirs = diffusers_transformer(ours.state_dict(), p)
    x = random_inputs(batch, h, w, txt_len, p)
    with torch.no_grad():
        out = ours(**x)
        ref = diffusers_forward(theirs, x)
    assert out.shape == (batch, (h // 2) * (w // 2), 64)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-5, rel


def test_dev_without_guidance_is_an_error():
    p = tiny_params(True)
    x = random_inputs(1, 4, 4, 3, p)
    x["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        Flux(p)(**x)


EXPECTED_DEV_KEYS = 780
EXPECTED_SCHNELL_KEYS = 776


@pytest.mark.parametrize("name,count", [("flux-dev", EXPECTED_DEV_KEYS), ("flux-schnell", EXPECTED_SCHNELL_KEYS)])
def test_full_size_state_dict_matches_official_checkpoint(name, count):
    with torch.device("meta"):
        model = Flux(configs[name].params)
    sd = model.state_dict()
    assert len(sd) == count
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # Every key and shape of the official layout (shared/reference/flux.md).
    expected = {
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "time_in.in_layer.weight": (3072, 256),
        "time_in.out_layer.weight": (3072, 3072),
        "vector_in.in_layer.weight": (3072, 768),
        "final_layer.linear.weight": (64, 3072),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    }
    if name == "flux-dev":
        expected["guidance_in.in_layer.weight"] = (3072, 256)
    for i in range(19):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            expected |= {
                f"{b}_mod.lin.weight": (18432, 3072),
                f"{b}_mod.lin.bias": (18432,),
                f"{b}_attn.qkv.weight": (9216, 3072),
                f"{b}_attn.qkv.bias": (9216,),
                f"{b}_attn.norm.query_norm.scale": (128,),
                f"{b}_attn.norm.key_norm.scale": (128,),
                f"{b}_attn.proj.weight": (3072, 3072),
                f"{b}_mlp.0.weight": (12288, 3072),
                f"{b}_mlp.2.weight": (3072, 12288),
            }
    for j in range(38):
        b = f"single_blocks.{j}"
        expected |= {
            f"{b}.linear1.weight": (21504, 3072),
            f"{b}.linear1.bias": (21504,),
            f"{b}.linear2.weight": (3072, 15360),
            f"{b}.norm.query_norm.scale": (128,),
            f"{b}.norm.key_norm.scale": (128,),
            f"{b}.modulation.lin.weight": (9216, 3072),
        }
    for k, shape in expected.items():
        assert shapes[k] == shape, k
    # Every Linear has weight and bias; LayerNorms carry none.
    weights = [k for k in sd if k.endswith(".weight")]
    assert all(k[: -len("weight")] + "bias" in sd for k in weights)
    n_params = sum(v.numel() for v in sd.values())
    assert n_params == {"flux-dev": 11_901_408_320, "flux-schnell": 11_891_178_560}[name]


def test_schedule_closed_form():
    steps, seq = 15, 4096
    ts = get_schedule(steps, seq)
    mu = 0.5 + (seq - 256) * (1.15 - 0.5) / (4096 - 256)
    assert len(ts) == steps + 1 and ts[0] == 1.0 and ts[-1] == 0.0
    for i, t in enumerate(ts[:-1]):
        lin = 1 - i / steps
        assert t == pytest.approx(math.exp(mu) / (math.exp(mu) + (1 / lin - 1)), rel=1e-6)
    assert get_schedule(4, 1024, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert float(time_shift(1.15, 1.0, torch.tensor(0.5))) == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))


@pytest.mark.parametrize("steps,seq", [(15, 4096), (50, 4096), (28, 1024), (4, 256)])
def test_schedule_matches_diffusers_dynamic_shift(steps, seq):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    mu = 0.5 + (seq - 256) * (1.15 - 0.5) / (4096 - 256)
    sigmas = torch.linspace(1.0, 1 / steps, steps).numpy()
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    ours = torch.tensor(get_schedule(steps, seq))
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6)


def test_schedule_schnell_matches_diffusers_without_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / 4, 4).numpy())
    assert torch.allclose(torch.tensor(get_schedule(4, 4096, shift=False)), sched.sigmas.float(), atol=1e-6)


def test_noise_and_packing():
    n = get_noise(2, 48, 80, "cpu", torch.bfloat16, seed=3)
    assert n.shape == (2, 16, 6, 10) and n.dtype == torch.bfloat16
    assert torch.equal(n, get_noise(2, 48, 80, "cpu", torch.bfloat16, seed=3))
    assert not torch.equal(n, get_noise(2, 48, 80, "cpu", torch.bfloat16, seed=4))
    x = pack(n.float())
    assert x.shape == (2, 3 * 5, 64)
    assert torch.equal(unpack(x, 48, 80), n.float())
    ids = image_ids(1, 3, 5)
    assert ids[0, 7].tolist() == [0.0, 1.0, 2.0]  # token 7 = row 1, column 2
