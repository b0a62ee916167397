import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention over B H L D tensors with rotary positions; returns B L (H D)."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "B H L D -> B L (H D)")


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices (..., n, dim/2, 2, 2) for positions `pos` (..., n) along one axis.

    Computed in fp32, like the current official release: fp64 is unavailable on some
    backends (MPS) and the angles stay small enough for fp32 (see tests).
    """
    assert dim % 2 == 0
    scale = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angle = pos.float()[..., None] * omega  # (..., n, dim/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    return out.view(*angle.shape, 2, 2)


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    # Rotate each pair (x_2k, x_2k+1) in fp32: [out0, out1] = R @ [x0, x1], R = [[cos, -sin], [sin, cos]].
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)
