"""HFEmbedder: official tokenization (pad to max_length, no mask), tiny seeded encoders, loading from folders."""

import pytest
import torch
from transformers import BertConfig, BertModel, CLIPTokenizer, T5TokenizerFast

from flux.errors import UserError
from flux.modules.conditioner import TINY_ASSETS, TINY_DIM, HFEmbedder

PROMPTS = ["a cat sitting on a wooden table", "a red car in front of a small house at night"]


@pytest.fixture(scope="module")
def t5() -> HFEmbedder:
    return HFEmbedder.tiny("t5", max_length=16, seed=0)


@pytest.fixture(scope="module")
def clip() -> HFEmbedder:
    return HFEmbedder.tiny("clip", max_length=77, seed=0)


def test_tiny_output_shapes(t5: HFEmbedder, clip: HFEmbedder):
    assert t5(PROMPTS).shape == (2, 16, TINY_DIM) and t5.out_dim == TINY_DIM
    assert clip(PROMPTS).shape == (2, TINY_DIM) and clip.out_dim == TINY_DIM
    assert HFEmbedder.tiny("t5", max_length=40)(PROMPTS[:1]).shape == (1, 40, TINY_DIM)
    assert not t5.is_clip and clip.is_clip


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_tiny_weights_follow_the_seed_and_keep_global_rng(kind):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = (HFEmbedder.tiny(kind, max_length=16, seed=s) for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = (m.hf_module.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(a(PROMPTS), b(PROMPTS))
    assert not torch.allclose(a(PROMPTS), c(PROMPTS))


def test_different_text_gives_different_output(t5: HFEmbedder, clip: HFEmbedder):
    for emb in (t5, clip):
        out = emb([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
        assert torch.equal(out[0], out[2])  # batch items are independent
        assert (out[0] - out[1]).abs().max() > 1e-3


def test_t5_pads_to_max_length_without_attention_mask(t5: HFEmbedder):
    ids = t5.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 16)
    assert (ids[0] == t5.tokenizer.pad_token_id).any()  # the short prompt really is padded
    assert (ids == t5.tokenizer.eos_token_id).sum(1).tolist() == [1, 1]  # the long one is truncated, eos kept
    direct = t5.hf_module(input_ids=ids).last_hidden_state
    assert torch.equal(t5(PROMPTS), direct)
    # Padding is attended: with a mask the valid tokens would come out differently.
    masked = t5.hf_module(input_ids=ids, attention_mask=(ids != t5.tokenizer.pad_token_id).long()).last_hidden_state
    assert not torch.allclose(direct[0, :3], masked[0, :3], atol=1e-4)


def test_clip_pools_the_end_of_the_prompt(clip: HFEmbedder):
    ids = clip.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 77) and (ids[:, 0] == clip.tokenizer.bos_token_id).all()
    hidden = clip.hf_module(input_ids=ids).last_hidden_state
    first_eos = (ids == clip.tokenizer.eos_token_id).int().argmax(1)
    assert torch.allclose(clip(PROMPTS), hidden[torch.arange(2), first_eos])


def test_tiny_tokenizers_are_real_offline_files():
    t5_tok = T5TokenizerFast.from_pretrained(str(TINY_ASSETS / "t5"), local_files_only=True)
    clip_tok = CLIPTokenizer.from_pretrained(str(TINY_ASSETS / "clip"), local_files_only=True)
    assert (t5_tok.pad_token_id, t5_tok.eos_token_id, t5_tok.unk_token_id) == (0, 1, 2)  # T5's convention
    assert "<extra_id_0>" in t5_tok.get_vocab()
    words = t5_tok.convert_ids_to_tokens(t5_tok("a cat on the table").input_ids)
    assert words[:3] == ["▁a", "▁cat", "▁on"] and words[-1] == "</s>"
    ids = clip_tok("A Cat!").input_ids
    assert clip_tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "cat</w>", "!</w>", "<|endoftext|>"]
    size = sum(f.stat().st_size for f in TINY_ASSETS.rglob("*") if f.is_file())
    assert size < 1_000_000


def save(emb: HFEmbedder, model_dir, tokenizer_dir=None) -> None:
    emb.hf_module.save_pretrained(model_dir)
    emb.tokenizer.save_pretrained(tokenizer_dir or model_dir)


def test_loads_from_a_saved_local_folder(t5: HFEmbedder, clip: HFEmbedder, tmp_path):
    # Folder names say nothing: T5 vs CLIP must come from the config.
    save(t5, tmp_path / "a")
    save(clip, tmp_path / "b")
    t5_loaded = HFEmbedder(str(tmp_path / "a"), max_length=16)
    clip_loaded = HFEmbedder(str(tmp_path / "b"), max_length=77)
    assert not t5_loaded.is_clip and clip_loaded.is_clip
    assert torch.equal(t5_loaded(PROMPTS), t5(PROMPTS))
    assert torch.equal(clip_loaded(PROMPTS), clip(PROMPTS))
    bf16 = HFEmbedder(str(tmp_path / "a"), max_length=16, torch_dtype=torch.bfloat16)
    assert bf16(PROMPTS).dtype == torch.bfloat16


def test_loads_from_diffusers_style_subfolders(t5: HFEmbedder, clip: HFEmbedder, tmp_path):
    save(t5, tmp_path / "text_encoder_2", tmp_path / "tokenizer_2")
    save(clip, tmp_path / "text_encoder", tmp_path / "tokenizer")
    t5_loaded = HFEmbedder(str(tmp_path), max_length=16, subfolder="text_encoder_2")
    clip_loaded = HFEmbedder(str(tmp_path), max_length=77, subfolder="text_encoder")
    assert torch.equal(t5_loaded(PROMPTS), t5(PROMPTS))
    assert torch.equal(clip_loaded(PROMPTS), clip(PROMPTS))


def test_bad_sources_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        HFEmbedder(str(tmp_path / "missing"), max_length=16)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        HFEmbedder(str(tmp_path / "model.safetensors"), max_length=16)
    with pytest.raises(UserError, match="config.json"):
        HFEmbedder(str(tmp_path), max_length=16)  # a folder without a model
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match="'bert' model, not a T5 or CLIP"):
        HFEmbedder(str(tmp_path / "bert"), max_length=16)
    with pytest.raises(UserError, match="1..77"):
        HFEmbedder.tiny("clip", max_length=78)
    with pytest.raises(UserError, match="'t5' or 'clip'"):
        HFEmbedder.tiny("bert", max_length=16)  # type: ignore[arg-type]


def test_diffusers_flux_pipeline_accepts_and_agrees(t5: HFEmbedder, clip: HFEmbedder):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5.out_dim,
        pooled_projection_dim=clip.out_dim,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(block_out_channels=[32], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip.hf_module,
        tokenizer=clip.tokenizer,
        text_encoder_2=t5.hf_module,
        tokenizer_2=t5.tokenizer,
        transformer=transformer,
    )
    prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=16)
    assert torch.equal(prompt_embeds, t5(PROMPTS))
    assert torch.equal(pooled, clip(PROMPTS))
