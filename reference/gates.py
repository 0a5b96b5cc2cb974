"""The activations real KDA layers fuse into their kernels (DESIGN.md section 3).

The paper (arXiv 2510.26692v2, section 4, "Neural Parameterization") gives q, k = L2Norm(...),
beta = Sigmoid(W_beta x) and a channel-wise decay "similar to GDN and Mamba" without writing
it out; the forms here are the ones the kernels people use implement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension, computed in float32 or wider."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def beta_activation(b: torch.Tensor, allow_neg_eigval: bool = False) -> torch.Tensor:
    """beta = sigmoid(b) in (0, 1), or 2 * sigmoid(b) in (0, 2) when negative eigenvalues of
    the transition (I - beta k k^T) are allowed."""
    return 2 * torch.sigmoid(b) if allow_neg_eigval else torch.sigmoid(b)


def check_lower_bound(lower_bound) -> float | None:
    """None, or the safe gate's lower bound as a float in [-5, 0); anything else is a ValueError."""
    if lower_bound is None:
        return None
    try:
        ok = -5.0 <= float(lower_bound) < 0.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"lower_bound: expected a float in [-5, 0), got {lower_bound!r}")
    return float(lower_bound)


def kda_gate(z, A_log, dt_bias=None, lower_bound=None):
    """Per-channel log-space decay g [B, T, HV, K] from the raw gate projection z.

        g = -exp(A_log[h]) * softplus(z + dt_bias[h, :])                 (lower_bound None)
        g = lower_bound * sigmoid(exp(A_log[h]) * (z + dt_bias[h, :]))     ("safe" gate)

    In floating point the sigmoid saturates, so the safe gate reaches its ends: g lies in
    [lower_bound, 0].

    Args:
        z: [B, T, HV, K].  A_log: [HV].  dt_bias: [HV * K] or None (zero).
        lower_bound: None, or a float in [-5, 0) for the safe gate.
    Computed in float32 (or float64 if z is float64); returned in that dtype.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise ValueError(f"z: expected a tensor [B, T, HV, K], got {getattr(z, 'shape', type(z))}")
    HV, K = z.shape[2], z.shape[3]
    if tuple(A_log.shape) != (HV,):
        raise ValueError(f"A_log: expected shape [HV] = ({HV},), got {tuple(A_log.shape)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (HV * K,):
        raise ValueError(f"dt_bias: expected shape [HV * K] = ({HV * K},), got {tuple(dt_bias.shape)}")
    check_lower_bound(lower_bound)
    dt = torch.float64 if z.dtype == torch.float64 else torch.float32
    x = z.to(dt)
    if dt_bias is not None:
        x = x + dt_bias.to(dt).view(HV, K)
    A = A_log.to(dt).exp()[:, None]  # [HV, 1], broadcast over the K channels
    if lower_bound is None:
        return -A * F.softplus(x)
    return float(lower_bound) * torch.sigmoid(A * x)
