"""The AE reproduces the official key layout and equals diffusers' AutoencoderKL on the same weights."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from flux.modules.autoencoder import AutoEncoder, AutoEncoderParams

FULL = AutoEncoderParams(256, 3, 128, 3, [1, 2, 4, 4], 2, 16, 0.3611, 0.1159)
TINY = AutoEncoderParams(256, 3, 32, 3, [1, 1, 1, 1], 1, 16, 0.3611, 0.1159)
# Widths change between levels here, so nin_shortcut layers are exercised too.
SMALL_WIDENING = AutoEncoderParams(64, 3, 32, 3, [1, 2, 2], 2, 16, 0.3611, 0.1159)


def official_keys(p: AutoEncoderParams) -> dict[str, tuple[int, ...]]:
    """The latent-diffusion layout, written out from its description rather than from our module."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        keys[f"{name}.weight"] = (cout, cin, k, k)
        keys[f"{name}.bias"] = (cout,)

    def norm(name: str, c: int) -> None:
        keys[f"{name}.weight"] = keys[f"{name}.bias"] = (c,)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(name: str, c: int) -> None:
        resnet(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{proj}", c, c, 1)
        resnet(f"{name}.block_2", c, c)

    widths = [p.ch * m for m in p.ch_mult]
    levels = len(widths)
    conv("encoder.conv_in", p.in_channels, p.ch, 3)
    cin = p.ch
    for i, w in enumerate(widths):
        for j in range(p.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, w)
            cin = w
        if i < levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", w, w, 3)
    mid("encoder.mid", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, 2 * p.z_channels, 3)

    cin = widths[-1]
    conv("decoder.conv_in", p.z_channels, cin, 3)
    mid("decoder.mid", cin)
    for i in reversed(range(levels)):
        for j in range(p.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, widths[i])
            cin = widths[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, p.out_ch, 3)
    return keys


def diffusers_vae(p: AutoEncoderParams) -> AutoencoderKL:
    levels = len(p.ch_mult)
    return AutoencoderKL(
        in_channels=p.in_channels,
        out_channels=p.out_ch,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[p.ch * m for m in p.ch_mult],
        layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels,
        norm_num_groups=32,
        sample_size=p.resolution,
        scaling_factor=p.scale_factor,
        shift_factor=p.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def to_diffusers(ae: AutoEncoder) -> dict[str, torch.Tensor]:
    config = {"down_block_types": [None] * len(ae.params.ch_mult), "up_block_types": [None] * len(ae.params.ch_mult)}
    return convert_ldm_vae_checkpoint(ae.state_dict(), config)


def test_full_size_layout_on_meta_device():
    with torch.device("meta"):
        ae = AutoEncoder(FULL)
    sd = ae.state_dict()
    assert all(t.is_meta for t in sd.values())
    assert {k: tuple(t.shape) for k, t in sd.items()} == official_keys(FULL)
    assert len(sd) == 244
    assert sum(t.numel() for t in sd.values()) == 83_819_683  # ae.safetensors holds 83.8M parameters
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert "encoder.down.3.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert not any("quant_conv" in k for k in sd)


def test_full_size_converts_onto_every_diffusers_key():
    with torch.device("meta"):
        ae = AutoEncoder(FULL)
        ref = diffusers_vae(FULL)
    converted = to_diffusers(ae)
    expected = ref.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)


def test_meta_then_assign_loads_real_tensors():
    sd = AutoEncoder(TINY).state_dict()
    with torch.device("meta"):
        ae = AutoEncoder(TINY)
    ae.load_state_dict(sd, assign=True)
    assert all(not t.is_meta for t in ae.state_dict().values())
    assert ae.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 16, 2, 2)


def randomized(p: AutoEncoderParams, seed: int = 0) -> AutoEncoder:
    ae = AutoEncoder(p)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in ae.named_parameters():
            # Norm affines away from (1, 0) so a swapped or skipped norm shows up.
            t.copy_(0.2 * torch.randn(t.shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0))
    return ae.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("params", [TINY, SMALL_WIDENING], ids=["tiny", "widening"])
def test_encode_decode_match_diffusers(params: AutoEncoderParams):
    ae = randomized(params)
    ref = diffusers_vae(params).eval()
    ref.load_state_dict(to_diffusers(ae), strict=True)

    down = 2 ** (len(params.ch_mult) - 1)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 4 * down, 6 * down, generator=g) * 2 - 1  # non-square, batch 2
    with torch.no_grad():
        z = ae.encode(x)
        mean = ref.encode(x).latent_dist.mean
        assert z.shape == (2, 16, 4, 6)
        assert rel_err(z, params.scale_factor * (mean - params.shift_factor)) < 1e-5

        latent = torch.randn(2, 16, 3, 5, generator=g)
        img = ae.decode(latent)
        expected = ref.decode(latent / params.scale_factor + params.shift_factor).sample
        assert img.shape == (2, 3, 3 * down, 5 * down)
        assert rel_err(img, expected) < 1e-5


def test_encode_is_deterministic_mean():
    ae = randomized(TINY)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ae.encode(x), ae.encode(x))
