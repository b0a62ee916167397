"""stableflow.metrics, each metric pinned against a computation of its own: values by hand on small images, the
masked region's exact pixels, and the DINO self-similarity taken from the hidden states instead of a hook."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flux.errors import UserError
from stableflow import metrics
from stableflow.clip_score import ClipScorer

pytest.importorskip("torchmetrics")


def image(values) -> np.ndarray:
    return np.asarray(values, dtype=np.uint8)


def test_prompt_markers_are_removed():
    assert metrics.clean_prompt("a [red] cat on a [wooden] table") == "a red cat on a wooden table"


def test_rle_mask_runs_are_clipped_and_the_frame_is_edited():
    # 4 x 5 image: runs [6, 7] and [13 .. 19] (100 long, clipped at the image's end), then the outer frame
    got = metrics.decode_mask([6, 2, 13, 100], (4, 5))
    want = np.array(
        [
            [1, 1, 1, 1, 1],
            [1, 1, 1, 0, 1],
            [1, 0, 0, 1, 1],
            [1, 1, 1, 1, 1],
        ]
    )
    assert np.array_equal(got, want)
    inner = metrics.decode_mask([], (4, 5))
    assert inner.sum() == 20 - 6  # the frame alone: 6 interior pixels stay 0
    with pytest.raises(UserError, match="pairs"):
        metrics.decode_mask([1, 2, 3])


def test_mse_and_psnr_by_hand_over_the_whole_frame():
    a = image(np.zeros((2, 2, 3)))
    b = a.copy()
    b[0, 0, 0] = 51  # 0.2 after / 255
    assert metrics.mse(a, b) == pytest.approx(0.04 / 12)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(12 / 0.04))
    keep_other = np.array([[0, 1], [1, 1]])
    assert metrics.mse(a, b, keep_other) == 0 and metrics.psnr(a, b, keep_other) == math.inf
    keep_it = np.array([[1, 0], [0, 0]])  # the reference still divides by the whole frame: 12 values
    assert metrics.mse(a, b, keep_it) == pytest.approx(0.04 / 12)
    assert math.isnan(metrics.psnr(a, b, np.zeros((2, 2))))


def test_psnr_and_mse_agree_with_torchmetrics():
    from torchmetrics.functional import mean_squared_error
    from torchmetrics.functional.image import peak_signal_noise_ratio

    rng = np.random.default_rng(5)
    a, b = image(rng.integers(0, 256, (9, 7, 3))), image(rng.integers(0, 256, (9, 7, 3)))
    t = lambda x: torch.from_numpy(x.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(t(a), t(b), data_range=1.0).item(), rel=1e-5)
    assert metrics.mse(a, b) == pytest.approx(mean_squared_error(t(a), t(b)).item(), rel=1e-5)


def test_ssim_of_two_flat_images_is_the_luminance_term():
    """Flat images x = 0.2, y = 0.6: no variance, so SSIM = (2xy + C1) / (x^2 + y^2 + C1), C1 = 0.01^2. (In float32,
    as the reference computes, E[x^2] - E[x]^2 leaves ~1e-8 of variance against C2 = 9e-4: 1e-4 of slack.)"""
    a, b = image(np.full((16, 16, 3), 51)), image(np.full((16, 16, 3), 153))
    c1 = 0.01**2
    assert metrics.ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), abs=1e-4)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-6)


def test_masked_metrics_see_exactly_the_kept_pixels_zeroed_elsewhere():
    """A difference inside the edit mask changes no unedited-part metric; the zeroed pixels equal zero images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    rng = np.random.default_rng(0)
    a = image(rng.integers(0, 256, (24, 24, 3)))
    b = a.copy()
    b[8:16, 8:16] = 255 - b[8:16, 8:16]
    mask = np.zeros((24, 24))
    mask[8:16, 8:16] = 1
    keep = 1 - mask
    assert metrics.mse(a, b, keep) == 0 and metrics.ssim(a, b, keep) == pytest.approx(1.0, abs=1e-6)
    c = b.copy()
    c[0, 0] = 0
    by_hand = lambda x: torch.from_numpy(x.astype(np.float32) / 255 * keep[..., None]).permute(2, 0, 1)[None]
    assert metrics.mse(a, c, keep) == pytest.approx(F.mse_loss(by_hand(a), by_hand(c)).item())
    want = structural_similarity_index_measure(by_hand(a), by_hand(c), data_range=1.0).item()
    assert metrics.ssim(a, c, keep) == pytest.approx(want)


class TinyPerceptual(torch.nn.Module):
    """A random stand-in for LPIPS' network, with its call: net(x, y) -> distance, inputs in [-1, 1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.seen = []

    def forward(self, x, y):
        self.seen.append((x, y))
        return (self.conv(x) - self.conv(y)).pow(2).mean()


def test_lpips_feeds_the_masked_pixels_scaled_to_minus_one_one():
    rng = np.random.default_rng(1)
    a, b = image(rng.integers(0, 256, (8, 8, 3))), image(rng.integers(0, 256, (8, 8, 3)))
    keep = np.ones((8, 8))
    keep[:4] = 0
    net = TinyPerceptual()
    got = metrics.lpips(a, b, keep, net)
    scaled = lambda x: torch.from_numpy(x / 255.0 * keep[..., None]).permute(2, 0, 1)[None].float() * 2 - 1
    assert got == pytest.approx(net(scaled(a), scaled(b)).item())
    x, _ = net.seen[0]
    assert torch.all(x[..., :4, :] == -1) and x.min() >= -1 and x.max() <= 1


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    return ViTModel(config, add_pooling_layer=False).eval()


def test_resize_follows_torchvision_rules():
    assert metrics.resize_size(512, 512) == (224, 224)
    assert metrics.resize_size(512, 768) == (224, 336)
    assert metrics.resize_size(1000, 100) == (480, 48)


def test_key_self_similarity_equals_the_one_from_the_hidden_states():
    """Keys rebuilt from the last layer's input (hidden_states[-2], its layernorm and key projection); cosine of
    every pair by F.cosine_similarity; preprocessing written out: 0..255 pixels, bilinear to 224, ImageNet norm."""
    vit = tiny_vit()
    rng = np.random.default_rng(2)
    a = image(rng.integers(0, 256, (40, 40, 3)))
    got = metrics.key_self_similarity(vit, a)
    x = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        hidden = vit(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
        last = vit.layers[-1] if hasattr(vit, "layers") else vit.encoder.layer[-1]
        proj = last.attention.k_proj if hasattr(last.attention, "k_proj") else last.attention.attention.key
        keys = proj(last.layernorm_before(hidden[-2]))[0]
    want = F.cosine_similarity(keys[:, None, :], keys[None, :, :], dim=-1)
    assert got.shape == (1 + 28 * 28, 1 + 28 * 28)
    assert torch.allclose(got, want, atol=1e-5)
    b = image(rng.integers(0, 256, (40, 40, 3)))
    d = metrics.structure_distance(a, b, vit=vit)
    assert d == pytest.approx(F.mse_loss(metrics.key_self_similarity(vit, b), got).item())
    assert d > 0 and metrics.structure_distance(a, a, vit=vit) == 0


@pytest.fixture(scope="module")
def clip():
    return ClipScorer.load("tiny-random")


def test_clip_score_of_the_image_and_of_the_edited_region(clip):
    rng = np.random.default_rng(3)
    a = image(rng.integers(0, 256, (32, 32, 3)))
    mask = np.zeros((32, 32))
    mask[:, 16:] = 1

    def by_hand(pixels, text):
        inputs = clip.processor(images=[Image.fromarray(pixels)], text=[text], return_tensors="pt", padding=True)
        with torch.no_grad():
            i = clip.model.get_image_features(pixel_values=inputs["pixel_values"])
            t = clip.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        i = i if torch.is_tensor(i) else i.pooler_output
        t = t if torch.is_tensor(t) else t.pooler_output
        return 100 * max(F.cosine_similarity(i.double(), t.double()).item(), 0)

    assert metrics.clip_score(clip, a, "a [red] house") == pytest.approx(by_hand(a, "a red house"), abs=1e-6)
    region = (a * mask[..., None]).astype(np.uint8)
    assert region[:, :16].max() == 0
    assert metrics.clip_score(clip, a, "a house", mask) == pytest.approx(by_hand(region, "a house"), abs=1e-6)
    assert math.isnan(metrics.clip_score(clip, a, "a house", np.zeros((32, 32))))


def test_pie_metrics_names_and_nans(clip):
    rng = np.random.default_rng(4)
    a, b = image(rng.integers(0, 256, (32, 32, 3))), image(rng.integers(0, 256, (32, 32, 3)))
    everything = np.ones((32, 32))
    out = metrics.pie_metrics(a, b, everything, "a cat", "a [dog]", clip, tiny_vit(), TinyPerceptual())
    assert list(out) == list(metrics.PIE_METRICS)
    assert all(math.isnan(out[k]) for k in ("psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part"))
    assert not math.isnan(out["structure_distance"]) and not math.isnan(out["clip_similarity_target_image_edit_part"])
    with pytest.raises(UserError, match="unknown metric"):
        metrics.pie_metrics(a, b, everything, "a", "b", clip, metrics=["fid"])
