"""KDA as a plain recurrence: the gold definition (NumPy float64) and its PyTorch twin.

Per value head, with state S in R^{K x V} (DESIGN.md section 4; Kimi Linear, KDA_EQ):

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

evaluated as "decay, then the delta-rule correction reads the decayed state":

    S'  = exp(g_t)[:, None] * S_{t-1}
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T

The loop over tokens is the only Python loop; batch rows, heads and the K x V state are
vectorised. A packed batch (cu_seqlens) runs each sequence from its own initial state, so
the loop still visits each of the T tokens exactly once.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .conventions import check_kda
from .packing import run_np, run_torch

KDA_EQ = "arXiv 2510.26692v2, eq. (1), section 3"  # where the recurrence stands in the paper


def to_f64(x) -> np.ndarray:
    """A float64 NumPy copy of an array or a (CPU or CUDA) tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def expand_heads(x, HV: int):
    """Repeat query/key heads [B, T, H, K] -> [B, T, HV, K]: value head j reads head j // G."""
    G = HV // x.shape[2]
    if G == 1:
        return x
    if isinstance(x, np.ndarray):
        return np.repeat(x, G, axis=2)
    return x.repeat_interleave(G, dim=2)


def _scan_np(q, k, v, g, beta, scale, S):
    """One batch of independent sequences. q, k, g: [B, T, HV, K]; v: [B, T, HV, V];
    beta: [B, T, HV]; S: [B, HV, K, V], updated in place. Returns (o [B, T, HV, V], S)."""
    B, T, HV, V = v.shape
    o = np.empty((B, T, HV, V), dtype=np.float64)
    decay = np.exp(g)
    for t in range(T):
        S *= decay[:, t, :, :, None]  # S' = Diag(exp(g_t)) S_{t-1}
        kt = k[:, t]
        err = v[:, t] - (kt[..., None, :] @ S)[..., 0, :]  # v_t - S'^T k_t
        S += (beta[:, t, :, None] * kt)[..., :, None] * err[..., None, :]
        o[:, t] = scale * (q[:, t, :, None, :] @ S)[..., 0, :]  # S_t^T (scale q_t)
    return o, S


def kda_recurrent_np(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """KDA by its recurrence in NumPy float64: the gold reference (KDA_EQ).

    Args:
        q, k: [B, T, H, K].  v: [B, T, HV, V], HV a multiple of H.
        g: [B, T, HV, K], log-space decay (<= 0 for a contraction; any real is computed).
        beta: [B, T, HV].  scale: float, default K ** -0.5.
        initial_state: [N, HV, K, V] or None (zeros).
        cu_seqlens: int [N+1] offsets of a packed batch (B must be 1), or None (N = B).
    Returns:
        (o [B, T, HV, V] float64, final_state [N, HV, K, V] float64 or None).
    Inputs of any dtype (NumPy arrays or torch tensors on the CPU) are promoted to float64.
    """
    dims, scale, spans = check_kda(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    q, k, v, g, beta = (to_f64(x) for x in (q, k, v, g, beta))
    arrays = (expand_heads(q, dims.HV), expand_heads(k, dims.HV), v, g, beta)
    h0 = None if initial_state is None else to_f64(initial_state)
    o, S = run_np(_scan_np, arrays, scale, dims, h0, spans, cu_seqlens is not None)
    return o, (S if output_final_state else None)


LOG2E = 1.4426950408889634  # log2(e)


def exp_via_exp2(x: torch.Tensor) -> torch.Tensor:
    """exp(x) as GPU kernels form it: the product x log2(e) rounded to x's dtype, then exp2
    (Triton's tl.exp and CUDA's __expf on float32 lower to a multiply and ex2.approx). The
    rounded product makes the relative error about |x| unit roundoffs where torch.exp's is
    under one: over 17 tokens of strong gates (g to -20) a float32 recurrence's final state
    under beta = 0 lands 9.0e-7 from the float64 oracle this way against 7e-8 with torch.exp
    (flash-linear-attention's fused_recurrent_kda measured 6.4e-7 on an H200)."""
    return torch.exp2(x * LOG2E)


def _scan_torch(q, k, v, g, beta, scale, S, exp=torch.exp):
    """Differentiable twin of _scan_np: no in-place update of a tensor autograd needs."""
    decay = exp(g)
    outs = []
    for t in range(v.shape[1]):
        S = S * decay[:, t, :, :, None]
        kt = k[:, t]
        err = v[:, t] - (kt[..., None, :] @ S)[..., 0, :]
        S = S + (beta[:, t, :, None] * kt)[..., :, None] * err[..., None, :]
        outs.append(scale * (q[:, t, :, None, :] @ S)[..., 0, :])
    return torch.stack(outs, dim=1), S


def kda_recurrent(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, exp=torch.exp
):
    """KDA by its recurrence in PyTorch: any dtype and device, differentiable (KDA_EQ).

    Shapes as kda_recurrent_np. Everything, the state included, is computed in the dtype of
    q (pass float64 for an oracle), and o and the final state are returned in it. exp: the
    exponential the decays exp(g_t) are formed with (torch.exp, or exp_via_exp2 as a GPU
    kernel forms them).
    """
    dims, scale, spans = check_kda(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    k, v, g, beta = (x.to(q.dtype) for x in (k, v, g, beta))
    tensors = (expand_heads(q, dims.HV), expand_heads(k, dims.HV), v, g, beta)
    scan = functools.partial(_scan_torch, exp=exp)
    o, S = run_torch(scan, tensors, scale, dims, initial_state, spans, cu_seqlens is not None)
    return o, (S if output_final_state else None)
