"""The general diagonal-plus-low-rank (DPLR) delta rule, and KDA written as one.

Per value head, state S in R^{K x V} (DESIGN.md section 4; Kimi Linear, DPLR_EQ):

    S_t = (Diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = S_t^T (scale * q_t)

Shapes: q, k [B, T, H, K]; a, b, gk [B, T, HV, K]; v [B, T, HV, V]. The transition (a, b,
gk) belongs to the value head; the write key k and the query q are shared by the G = HV / H
value heads of a group, exactly as in KDA.
"""

from __future__ import annotations

import numpy as np
import torch

from .conventions import check_dplr
from .kda import expand_heads, to_f64
from .packing import run_np, run_torch

DPLR_EQ = "arXiv 2510.26692v2, section 6.2 (unnumbered; also section 3.2)"


def _scan_np(q, k, v, a, b, gk, scale, S):
    B, T, HV, V = v.shape
    o = np.empty((B, T, HV, V), dtype=np.float64)
    decay = np.exp(gk)
    for t in range(T):
        aS = (a[:, t, :, None, :] @ S)[..., 0, :]  # a_t^T S_{t-1}, read before the update
        S *= decay[:, t, :, :, None]
        S += b[:, t, :, :, None] * aS[..., None, :] + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * (q[:, t, :, None, :] @ S)[..., 0, :]
    return o, S


def dplr_recurrent_np(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """DPLR delta rule by its recurrence in NumPy float64 (DPLR_EQ).

    Args as kda_recurrent_np, with the transition given by a, b, gk [B, T, HV, K] instead
    of g and beta. Returns (o [B, T, HV, V] float64, final_state [N, HV, K, V] or None).
    """
    dims, scale, spans = check_dplr(q, k, v, a, b, gk, scale, initial_state, cu_seqlens)
    q, k, v, a, b, gk = (to_f64(x) for x in (q, k, v, a, b, gk))
    arrays = (expand_heads(q, dims.HV), expand_heads(k, dims.HV), v, a, b, gk)
    h0 = None if initial_state is None else to_f64(initial_state)
    o, S = run_np(_scan_np, arrays, scale, dims, h0, spans, cu_seqlens is not None)
    return o, (S if output_final_state else None)


def _scan_torch(q, k, v, a, b, gk, scale, S):
    decay = gk.exp()
    outs = []
    for t in range(v.shape[1]):
        aS = (a[:, t, :, None, :] @ S)[..., 0, :]
        S = S * decay[:, t, :, :, None] + b[:, t, :, :, None] * aS[..., None, :]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ S)[..., 0, :])
    return torch.stack(outs, dim=1), S


def dplr_recurrent(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """DPLR delta rule in PyTorch: any dtype and device, differentiable (DPLR_EQ).

    Computed in the dtype of q; shapes as dplr_recurrent_np.
    """
    dims, scale, spans = check_dplr(q, k, v, a, b, gk, scale, initial_state, cu_seqlens)
    k, v, a, b, gk = (x.to(q.dtype) for x in (k, v, a, b, gk))
    tensors = (expand_heads(q, dims.HV), expand_heads(k, dims.HV), v, a, b, gk)
    o, S = run_torch(_scan_torch, tensors, scale, dims, initial_state, spans, cu_seqlens is not None)
    return o, (S if output_final_state else None)


def kda_as_dplr(q, k, v, g, beta):
    """The DPLR arguments that compute the same KDA (NumPy arrays or torch tensors).

    (I - beta k k^T) Diag(exp(g)) S + beta k v^T
        = (Diag(exp(g)) + (-beta k)(k * exp(g))^T) S + k (beta v)^T,
    so gk = g, a = k * exp(g), b = -beta * k and the write is k (beta v)^T. Folding beta
    into the value (rather than the key) keeps q and k per query/key head under GVA.
    Returns a dict with keys q, k, v, a, b, gk for dplr_recurrent(_np)(**dict, ...).
    """
    HV = v.shape[2]
    kv = expand_heads(k, HV)
    exp = np.exp if isinstance(g, np.ndarray) else torch.exp
    return dict(q=q, k=k, v=beta[..., None] * v, a=kv * exp(g), b=-beta[..., None] * kv, gk=g)
