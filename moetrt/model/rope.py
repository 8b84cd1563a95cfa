"""RoPE inverse frequencies for every variant `MixtralConfig` accepts, as transformers computes them.

Each function mirrors the rope init function of its type in transformers/modeling_rope_utils.py
(`ROPE_INIT_FUNCTIONS`; `MixtralRotaryEmbedding.compute_default_rope_parameters` for "default") and returns
`(inv_freq [head_dim // 2] float32, attention_scaling)`: cos and sin are multiplied by attention_scaling
(YaRN's mscale; 1.0 otherwise). Tensors are made on `device` so the exporter traces them on the meta device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moetrt.model.config import RopeScaling


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None, device: torch.device | str = "cpu"
) -> tuple[Tensor, float]:
    """(inv_freq, attention_scaling) of the half-split RoPE over a whole head of `head_dim`."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None or scaling.rope_type == "dynamic":
        # dynamic NTK rescales only once a sequence outgrows max_position_embeddings; moetrt's sequences never do
        return inv_freq, 1.0
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return _yarn(head_dim, theta, scaling, device)


def _llama3(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    old_context = s.original_max_position_embeddings
    low_freq_wavelen = old_context / s.low_freq_factor
    high_freq_wavelen = old_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(head_dim: int, theta: float, s: RopeScaling, device: torch.device | str) -> tuple[Tensor, float]:
    """YaRN (arXiv:2309.00071): interpolate low frequencies, extrapolate high ones, scale attention."""

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = float(mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim))
    else:
        attention_factor = mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).to(torch.float32) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor
