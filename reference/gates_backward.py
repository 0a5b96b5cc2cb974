"""Gradients of the activations KDA kernels fuse (gates.py), in NumPy float64: the chain
rule on top of kda_recurrent_backward_np's dg, dq, dk and dbeta (DESIGN.md section 3).

    L2 norm      y = x r,  r = (sum x^2 + eps)^(-1/2):   dx = r (dy - y <y, dy>)
    beta         beta = c sigmoid(b) (c = 1, or 2 with negative eigenvalues):
                 db = dbeta c s (1 - s),  s = sigmoid(b), formed as sigmoid(b) sigmoid(-b)
    gate         x = z + dt_bias[h, :],  A = exp(A_log[h])
      softplus   g = -A softplus(x):            dx = -A sigmoid(x) dg,   dA_log = sum g dg
                 (softplus(x) = x above 20, as F.softplus: there the slope is exactly 1)
      safe       g = lb sigmoid(A x), s = sigmoid(A x):
                 dx = lb s (1 - s) A dg,        dA_log = sum lb s (1 - s) A x dg
    and dz = dx, ddt_bias[h, :] = sum over B, T of dx, dA_log[h] summed over B, T and K.
"""

from __future__ import annotations

import numpy as np

from .gates import L2NORM_EPS
from .kda import to_f64

SOFTPLUS_THRESHOLD = 20.0  # F.softplus (gates.kda_gate) returns x itself above this


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    return np.exp(-np.logaddexp(0.0, -x))


def l2norm_backward_np(x, dy, eps: float = L2NORM_EPS) -> np.ndarray:
    """Gradient of y = l2norm(x) over the last dimension: x, dy [..., K] -> dx [..., K]."""
    x, dy = to_f64(x), to_f64(dy)
    if x.shape != dy.shape:
        raise ValueError(f"dy: expected the shape of x {x.shape}, got {dy.shape}")
    r = 1.0 / np.sqrt((x * x).sum(-1, keepdims=True) + eps)
    y = x * r
    return r * (dy - y * (y * dy).sum(-1, keepdims=True))


def beta_activation_backward_np(b, dbeta, allow_neg_eigval: bool = False) -> np.ndarray:
    """Gradient of beta = sigmoid(b) (or 2 sigmoid(b)): b, dbeta [B, T, HV] -> db."""
    b, dbeta = to_f64(b), to_f64(dbeta)
    if b.shape != dbeta.shape:
        raise ValueError(f"dbeta: expected the shape of b {b.shape}, got {dbeta.shape}")
    return (2.0 if allow_neg_eigval else 1.0) * _sigmoid(b) * _sigmoid(-b) * dbeta  # s (1 - s), no cancellation


def kda_gate_backward_np(z, A_log, dt_bias, lower_bound, dg):
    """Gradient of g = kda_gate(z, A_log, dt_bias, lower_bound) (both forms, see above).

    Args:
        z, dg: [B, T, HV, K].  A_log: [HV].  dt_bias: [HV * K] or None.
        lower_bound: None (softplus form) or a float in [-5, 0) (safe form).
    Returns:
        (dz [B, T, HV, K], dA_log [HV], ddt_bias [HV * K] or None when dt_bias is None).
    """
    z, dg, A_log = to_f64(z), to_f64(dg), to_f64(A_log)
    if z.ndim != 4 or dg.shape != z.shape:
        raise ValueError(f"dg: expected the shape of z [B, T, HV, K] {z.shape}, got {dg.shape}")
    HV, K = z.shape[2], z.shape[3]
    if A_log.shape != (HV,):
        raise ValueError(f"A_log: expected shape [HV] = ({HV},), got {A_log.shape}")
    x = z if dt_bias is None else z + to_f64(dt_bias).reshape(HV, K)
    A = np.exp(A_log)[:, None]  # [HV, 1]
    if lower_bound is None:
        linear = x > SOFTPLUS_THRESHOLD  # the forward's softplus is x there: slope exactly 1
        dx = -A * np.where(linear, 1.0, _sigmoid(x)) * dg
        dA = -A * np.where(linear, x, np.logaddexp(0.0, x)) * dg  # dg/dA_log = -A softplus(x) = g
    else:
        # s (1 - s) as sigmoid(y) sigmoid(-y): no cancellation in 1 - s where s saturates
        slope = float(lower_bound) * _sigmoid(A * x) * _sigmoid(-A * x) * dg
        dx, dA = slope * A, slope * A * x
    ddt_bias = None if dt_bias is None else dx.sum((0, 1)).reshape(HV * K)
    return dx, dA.sum((0, 1, 3)), ddt_bias
