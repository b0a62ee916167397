"""The two guarantees behind "a seed names an image": the seed -> initial-noise mapping is the official recipe
(pinned against values and a re-implementation, not against our own code), and an image size FLUX cannot make
exactly is refused with the nearest valid sizes instead of being rounded to another size."""

import math

import pytest
import torch

from flux.errors import UserError
from flux.pipeline import FluxModels, check_size
from flux.sampling import get_noise
from flux.util import model_spec
from stableflow.config import ConfigError, load_config
from stableflow.text2img import Text2ImgConfig
from stableflow.trajectory import TrajectoryConfig


def official_noise(num_samples: int, height: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The recipe of the current official flux package (see the reference notes): a CPU generator seeded with
    `seed`, normal samples drawn directly in the target dtype, latent side 2 * ceil(pixels / 16)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (num_samples, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    return torch.randn(*shape, dtype=dtype, generator=generator)


def bare_models(dtype: torch.dtype) -> FluxModels:
    """FluxModels without networks: noise and schedule need only the device, dtype and spec."""
    return FluxModels("flux-tiny", model_spec("flux-tiny"), None, None, None, None, torch.device("cpu"), dtype)


def test_seed_0_at_16px_gives_the_known_values():
    # torch.randn(1, 16, 2, 2) from a CPU generator seeded with 0 starts -1.1258, -1.1524, -0.2506, -0.4339, 0.8487,
    # 0.6920, -0.3160, -2.1152 in float32; these are those values rounded to bfloat16.
    noise = get_noise(1, 16, 16, "cpu", torch.bfloat16, seed=0)
    assert noise.shape == (1, 16, 2, 2) and noise.dtype == torch.bfloat16
    assert noise.flatten()[:8].tolist() == [
        -1.125,
        -1.15625,
        -0.25,
        -0.43359375,
        0.84765625,
        0.69140625,
        -0.31640625,
        -2.109375,
    ]
    fp32 = get_noise(1, 16, 16, "cpu", torch.float32, seed=0).flatten()[:4]
    assert torch.allclose(fp32, torch.tensor([-1.1258398, -1.1523602, -0.2505786, -0.4338788]))


@pytest.mark.parametrize(
    "num_samples,height,width,dtype,seed",
    [
        (1, 1024, 1024, torch.bfloat16, 0),
        (2, 48, 80, torch.bfloat16, 3),
        (1, 768, 1360, torch.float32, 11),
        (3, 32, 32, torch.float16, 2**31 - 1),
    ],
)
def test_get_noise_is_the_official_recipe(num_samples, height, width, dtype, seed):
    assert torch.equal(
        get_noise(num_samples, height, width, "cpu", dtype, seed),
        official_noise(num_samples, height, width, dtype, seed),
    )


def test_noise_is_drawn_on_the_cpu_whatever_the_device():
    # A generator on the target device (the pre-2025 official code) would fail on "meta"; a CPU one cannot.
    assert get_noise(1, 32, 32, "meta", torch.bfloat16, seed=0).device.type == "meta"


def test_models_noise_draws_each_seed_alone_in_the_model_dtype():
    """Image b of a batch gets the noise of its own seed as if generated alone (so batching never changes a seed's
    image) in the models' dtype: bf16 noise for a bf16 model, as the official CLI."""
    for dtype in (torch.bfloat16, torch.float32):
        noise = bare_models(dtype).noise([7, 0, 7], 64, 48)
        assert noise.dtype == dtype and noise.shape == (3, 16, 6, 8)
        for b, seed in enumerate([7, 0, 7]):
            assert torch.equal(noise[b], official_noise(1, 48, 64, dtype, seed)[0])


@pytest.mark.parametrize(
    "width,height,message",
    [
        (40, 32, "width 40 is not a positive multiple of 16 .*: use 32 or 48"),
        (64, 50, "height 50 is not a positive multiple of 16 .*: use 48 or 64"),
        (8, 32, "width 8 .*: use 16$"),
        (32, 0, "height 0 .*: use 16$"),
        (-16, 32, "width -16 .*: use 16$"),
    ],
)
def test_sizes_that_are_not_multiples_of_16_are_refused_with_the_nearest_valid_ones(width, height, message):
    models = bare_models(torch.bfloat16)
    for ask in (
        lambda: check_size(width, height),
        lambda: models.noise([0], width, height),
        lambda: models.schedule(4, width, height),
    ):
        with pytest.raises(UserError, match=message):
            ask()


@pytest.mark.parametrize("w,h", [(60, 64), (64, 0), (-16, 32)])
def test_sizes_must_be_multiples_of_16(w, h):
    with pytest.raises(UserError, match="multiple of 16"):
        check_size(w, h)


def test_no_size_is_silently_rounded(tiny_models):
    """Asking for 40 px used to give 48: get_noise rounds the latent up (as the official one does), and
    FluxModels.noise passed any size through."""
    with pytest.raises(UserError, match="use 32 or 48"):
        tiny_models.generate(["a fox"], [0], 40, 32, 1, 3.5)
    with pytest.raises(UserError, match="width 40 .*: use 32 or 48"):
        tiny_models.encode_image(torch.zeros(1, 3, 32, 40))
    image = tiny_models.generate(["a fox"], [0], 48, 32, 1, 3.5)
    assert image.shape == (1, 3, 32, 48)  # a valid size is made exactly


@pytest.mark.parametrize("config", [Text2ImgConfig, TrajectoryConfig])
def test_demo_configs_refuse_such_sizes_before_anything_runs(config):
    with pytest.raises(ConfigError) as e:
        load_config(config, None, ["width=40", "height=1000"])
    assert "'width' must be a multiple of 16, got 40 (nearest: 32 or 48)" in str(e.value)
    assert "'height' must be a multiple of 16, got 1000 (nearest: 992 or 1008)" in str(e.value)
