"""The whole text-to-image path (T5 + CLIP + transformer + sampler + AE) against diffusers.FluxPipeline."""

import pytest
import torch

from flux.sampling import pack

from diffusers_oracle import diffusers_transformer
from test_autoencoder import diffusers_vae, to_diffusers


def diffusers_pipeline(models):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    vae = diffusers_vae(models.ae.params)
    vae.load_state_dict(to_diffusers(models.ae), strict=True)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=models.clip.hf_module,
        tokenizer=models.clip.tokenizer,
        text_encoder_2=models.t5.hf_module,
        tokenizer_2=models.t5.tokenizer,
        transformer=diffusers_transformer(models.model.state_dict(), models.model.params),
    )


@pytest.mark.parametrize("width,height,steps,guidance", [(64, 48, 4, 3.5), (32, 80, 6, 2.0)])
def test_text_to_image_matches_diffusers_pipeline(tiny_models, width, height, steps, guidance):
    prompts = ["a red fox jumping over a frozen creek at dawn", "a teapot"]
    seeds = [5, 9]
    ours = tiny_models.generate(prompts, seeds, width, height, steps, guidance) * 0.5 + 0.5  # [-1,1] -> [0,1]

    pipe = diffusers_pipeline(tiny_models)
    noise = tiny_models.noise(seeds, width, height)
    with torch.no_grad():
        theirs = pipe(
            prompt=prompts,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=pack(noise),
            max_sequence_length=tiny_models.spec.max_length,
            output_type="pt",
        ).images
    assert ours.shape == theirs.shape == (2, 3, height, width)
    # Same image up to fp32 rounding: the max pixel difference stays far below one 8-bit level (1/255).
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, diff


def test_prompts_change_the_image(tiny_models):
    a = tiny_models.generate(["a red fox"], [0], 32, 32, 2, 3.5)
    b = tiny_models.generate(["a blue whale"], [0], 32, 32, 2, 3.5)
    c = tiny_models.generate(["a red fox"], [1], 32, 32, 2, 3.5)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_offload_holds_a_module_across_nested_uses():
    """With offload, a loop can keep the transformer on the device across denoise calls (the sweep does)."""
    from flux.pipeline import FluxModels

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moves = []

        def to(self, *a, **k):
            self.moves.append("to")
            return self

        def cpu(self):
            self.moves.append("cpu")
            return self

    spy = Spy()
    m = FluxModels("flux-tiny", None, spy, None, None, None, torch.device("cpu"), torch.float32, offload=True)
    with m.on_device(spy):
        for _ in range(3):
            with m.on_device(spy):
                pass
    assert spy.moves == ["to", "cpu"]
    with m.on_device(spy):
        pass
    assert spy.moves == ["to", "cpu", "to", "cpu"]


def test_bf16_models_decode_under_bf16_autocast_like_the_official_cli(tiny_models):
    """The official CLI decodes a bf16 model's latents with the float32 AE under bf16 autocast; a float32
    model decodes in float32."""
    from dataclasses import replace

    latent = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fp32 = tiny_models.decode(latent)
        assert torch.equal(fp32, tiny_models.ae.decode(latent).clamp(-1, 1))
        bf16 = replace(tiny_models, dtype=torch.bfloat16).decode(latent)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            official = tiny_models.ae.decode(latent).clamp(-1, 1).float()
    assert torch.equal(bf16, official)
    assert 0 < (bf16 - fp32).abs().max() < 0.05


def test_text_encoders_stay_on_the_gpu_only_where_the_card_has_room():
    """The decision on fake free-memory numbers: FLUX.1-dev's weights (transformer + T5 + CLIP in bf16, 31.2 GiB)
    leave room for sampling beside them on an 80 GB or a 48 GB card, not on a 40 GB or 24 GB one; offload,
    stream_blocks and a CPU keep the encoders in host memory."""
    from flux.accel import keep_text_encoders, transformer_bytes
    from flux.pipeline import FULL_TEXT_ENCODER_PARAMS
    from flux.util import configs

    gib, cuda = 2**30, torch.device("cuda")
    weights = transformer_bytes(configs["flux-dev"].params, torch.bfloat16) + FULL_TEXT_ENCODER_PARAMS * 2
    assert 31 * gib < weights < 31.5 * gib
    for free_gib, keep in [(79.1, True), (47.3, True), (43.0, False), (39.4, False), (23.5, False)]:
        assert keep_text_encoders(cuda, weights, int(free_gib * gib)) is keep, free_gib
    assert not keep_text_encoders(cuda, weights, 79 * gib, offload=True)
    assert not keep_text_encoders(cuda, weights, 79 * gib, stream=True)
    assert not keep_text_encoders(torch.device("cpu"), weights, 79 * gib)
    assert keep_text_encoders(cuda, 20 * 2**20, 15 * gib)  # flux-mini's few MB on a 16 GB card


def test_small_models_take_few_cpu_threads_unless_omp_num_threads_says():
    """flux-mini and flux-tiny use half the cores (1 to 4): with every core busy elsewhere, torch's default of all
    cores made the quick start several times slower. FLUX.1 and an explicit OMP_NUM_THREADS keep torch's choice."""
    from flux.accel import transformer_bytes
    from flux.pipeline import cpu_threads
    from flux.util import configs

    params = {name: transformer_bytes(configs[name].params, torch.float32) // 4 for name in configs}
    assert [cpu_threads(params["flux-mini"], cores, {}) for cores in (1, 2, 4, 8, 64)] == [1, 1, 2, 4, 4]
    assert cpu_threads(params["flux-tiny"], 2, {}) == 1
    assert cpu_threads(params["flux-dev"], 2, {}) is None
    assert cpu_threads(params["flux-mini"], 2, {"OMP_NUM_THREADS": "2"}) is None


def test_loading_a_small_model_on_the_cpu_sets_its_threads(monkeypatch):
    from flux import pipeline

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 6)
    before = torch.get_num_threads()
    try:
        pipeline.load_models("flux-tiny", "cpu", torch.float32)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def _cfg_models(models):
    """The same networks under a spec whose guidance is classifier-free (ModelSpec.cfg): a view, weights shared."""
    from dataclasses import replace

    return replace(models, spec=replace(models.spec, cfg=True))


def test_classifier_free_guidance_matches_diffusers_true_cfg(tiny_models):
    """ModelSpec.cfg: `guidance` is a true CFG scale against the empty prompt. diffusers' FluxPipeline does the same
    with true_cfg_scale and negative_prompt="" (its guidance_scale feeds flux-tiny's guidance embedding, as ours does)."""
    models = _cfg_models(tiny_models)
    prompts, seeds, (width, height, steps, guidance) = ["a red fox", "a teapot"], [5, 9], (48, 32, 4, 2.5)
    ours = models.generate(prompts, seeds, width, height, steps, guidance) * 0.5 + 0.5
    plain = tiny_models.generate(prompts, seeds, width, height, steps, guidance) * 0.5 + 0.5
    with torch.no_grad():
        theirs = diffusers_pipeline(tiny_models)(
            prompt=prompts,
            negative_prompt=["", ""],
            true_cfg_scale=guidance,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=pack(tiny_models.noise(seeds, width, height)),
            max_sequence_length=tiny_models.spec.max_length,
            output_type="pt",
        ).images
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - plain).abs().max().item() > 1e-2  # guidance moved the images: the test can tell


def test_classifier_free_guidance_of_one_is_the_plain_sampler_and_hooks_act_in_both_halves(tiny_models):
    """Scales of 1 are the plain sampler exactly (no negative pass is run); with injection, each half's
    edit sample takes the K/V of the same half's reference: the batch [ref, edit | ref-, edit-] with sources
    (0, 0, 2, 2), combined by hand, is what the sampler computes."""
    from flux.model import Injection
    from flux.sampling import image_ids, unpack

    models = _cfg_models(tiny_models)
    text = models.encode(["a red fox", "a blue fox"])
    assert text.negative is not None and len(text) == 2 and len(text.negative) == 1
    noise = models.noise([3], 32, 32).repeat(2, 1, 1, 1)
    timesteps = models.schedule(3, 32, 32)
    one = models.denoise(text, noise, timesteps, guidance=1.0)
    assert torch.equal(one, tiny_models.denoise(text, noise, timesteps, guidance=1.0))
    mixed = models.denoise(text, noise, timesteps, guidance=[1.0, 3.0])
    inject = Injection.from_reference([0, 3], 2)
    got = models.denoise(text, noise, timesteps, guidance=[3.0, 3.0], inject=inject)

    x = pack(noise)
    both = text.select([0, 1])
    neg = text.negative.select([0, 0])
    txt, vec = torch.cat([both.txt, neg.txt]), torch.cat([both.vec, neg.vec])
    with torch.no_grad():
        for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
            v = models.model(img=torch.cat([x, x]), img_ids=image_ids(4, 2, 2), txt=txt, txt_ids=torch.zeros(4, txt.shape[1], 3),
                             y=vec, timesteps=torch.full((4,), t), guidance=torch.full((4,), 3.0),
                             inject=Injection(frozenset([0, 3]), (0, 0, 2, 2)))  # fmt: skip
            x = x + (t_prev - t) * (v[2:] + 3.0 * (v[:2] - v[2:]))
    assert (got - unpack(x, 32, 32)).abs().max().item() < 1e-5
    # In a batch with guided samples, a scale-1 sample still moves with its own velocity (batch-size rounding aside).
    assert (mixed[0] - one[0]).abs().max().item() < 1e-6 and (mixed[1] - one[1]).abs().max().item() > 1e-2


def test_classifier_free_guidance_needs_the_negative(tiny_models):
    from flux.pipeline import Text

    models = _cfg_models(tiny_models)
    text = tiny_models.encode(["a red fox"])  # encoded without a negative
    with pytest.raises(ValueError, match="classifier-free: encode prompts with its `encode`"):
        models.denoise(Text(text.txt, text.txt_ids, text.vec), models.noise([0], 32, 32), [1.0, 0.0], 2.0)
