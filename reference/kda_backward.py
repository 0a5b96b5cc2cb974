"""The exact gradient of KDA: the reverse-time recurrence of the adjoint state, in NumPy
float64 (the gold of the backward; DESIGN.md sections 4-5).

Forward, per value head and token t (KDA_EQ; S_t in R^{K x V}, D_t = Diag(exp(g_t))):

    S'_t = D_t S_{t-1}                      (decay first)
    e_t  = v_t - S'_t^T k_t                 (the delta rule's prediction error, in R^V)
    S_t  = S'_t + beta_t k_t e_t^T
    o_t  = S_t^T (scale q_t)

For a loss L with cotangents do_t = dL/do_t and dht = dL/dS_T, write dS_t for the total
derivative dL/dS_t (through o_t and every later token). It runs backwards from dS_T = dht
(zero without a loss on the final state), and at each token t = T, ..., 1:

    dS_t  += scale q_t do_t^T                         o_t reads S_t
    dq_t   = scale S_t do_t
    de_t   = beta_t dS_t^T k_t                         S_t = S'_t + beta_t k_t e_t^T
    dv_t   = de_t
    dbeta_t = k_t^T dS_t e_t
    dk_t   = beta_t dS_t e_t - S'_t de_t               k_t enters the write and e_t
    dS'_t  = dS_t - k_t de_t^T                         e_t = v_t - S'_t^T k_t
    dg_t   = rowsum(dS'_t o S'_t)                      (o: elementwise; dS'/dg = S' per row)
    dS_{t-1} = D_t dS'_t

and dh0 = dS_0. The forward states are recomputed, not stored: the forward pass keeps the
state every CHECKPOINT tokens and the backward pass recomputes each block's states from its
checkpoint (keeping S'_t, e_t and S_t of that block), so memory stays
O(T / CHECKPOINT + 3 CHECKPOINT) states.

Grouped value heads (HV = G * H): q and k of head h are read by the G value heads
h * G, ..., h * G + G - 1, so dq and dk of head h are the sums of the per-value-head dq_t,
dk_t over that group. A packed batch (cu_seqlens) runs the adjoint of each sequence alone,
seeded by its own slice dht[n], and its dS_0 is dh0[n].
"""

from __future__ import annotations

import numpy as np

from .conventions import check_cotangents, check_kda
from .kda import expand_heads, to_f64
from .packing import same_length, stack_spans

CHECKPOINT = 64  # tokens between stored forward states


def _step(S, decay_t, k_t, v_t, beta_t):
    """One forward token for a batch [B, HV]: returns (S'_t, e_t, S_t); S is not modified."""
    Sp = decay_t[..., None] * S  # S'_t = D_t S_{t-1}
    e = v_t - (k_t[..., None, :] @ Sp)[..., 0, :]  # e_t = v_t - S'_t^T k_t
    return Sp, e, Sp + (beta_t[..., None] * k_t)[..., :, None] * e[..., None, :]


def _adjoint_scan(q, k, v, g, beta, do, scale, S0, dS):
    """The backward of one batch of independent sequences.

    q, k, g: [B, T, HV, K] (q, k already expanded to the value heads); v, do: [B, T, HV, V];
    beta: [B, T, HV]; S0: the initial state [B, HV, K, V]; dS: the seed dL/dS_T [B, HV, K, V].
    Returns (dq, dk, dv, dg, dbeta, dS0), per value head (dq, dk [B, T, HV, K]).
    """
    T = v.shape[1]
    decay = np.exp(g)
    checkpoints, S = [], S0
    for t in range(T):
        if t % CHECKPOINT == 0:
            checkpoints.append(S)
        S = _step(S, decay[:, t], k[:, t], v[:, t], beta[:, t])[2]
    dq, dk, dg = (np.zeros_like(q) for _ in range(3))
    dv, dbeta = np.zeros_like(v), np.zeros_like(beta)
    dS = dS.copy()
    for block in reversed(range(len(checkpoints))):
        start, stop = block * CHECKPOINT, min(T, (block + 1) * CHECKPOINT)
        steps, S = [], checkpoints[block]  # steps[i] = (S'_t, e_t, S_t) at t = start + i
        for t in range(start, stop):
            steps.append(_step(S, decay[:, t], k[:, t], v[:, t], beta[:, t]))
            S = steps[-1][2]
        for t in reversed(range(start, stop)):
            kt, bt = k[:, t], beta[:, t]
            Sp, e, St = steps[t - start]
            dS += scale * q[:, t, :, :, None] * do[:, t, :, None, :]  # o_t = S_t^T (scale q_t)
            dq[:, t] = scale * (St @ do[:, t, :, :, None])[..., 0]
            dSk = (kt[..., None, :] @ dS)[..., 0, :]  # dS_t^T k_t, in R^V
            de = bt[..., None] * dSk
            dv[:, t] = de
            dbeta[:, t] = (dSk * e).sum(-1)
            dk[:, t] = bt[..., None] * (dS @ e[..., None])[..., 0] - (Sp @ de[..., None])[..., 0]
            dSp = dS - kt[..., :, None] * de[..., None, :]  # dS'_t
            dg[:, t] = (dSp * Sp).sum(-1)
            dS = decay[:, t, :, :, None] * dSp  # dS_{t-1} = D_t dS'_t
    return dq, dk, dv, dg, dbeta, dS


def sum_groups(x, H: int):
    """Per-value-head gradients [B, T, HV, K] -> per query/key head [B, T, H, K]: value heads
    j = h * G, ..., h * G + G - 1 all read head h, so their gradients add up. Takes a NumPy
    array or a torch tensor."""
    B, T, HV, K = x.shape
    return x.reshape(B, T, H, HV // H, K).sum(3)


def kda_recurrent_backward_np(
    q, k, v, g, beta, do, dht=None, scale=None, initial_state=None, cu_seqlens=None
) -> tuple[np.ndarray, ...]:
    """Gradients of L = <o, do> + <final_state, dht> through KDA (KDA_EQ), in NumPy float64.

    Args:
        q, k: [B, T, H, K].  v: [B, T, HV, V].  g: [B, T, HV, K].  beta: [B, T, HV].
        do: [B, T, HV, V], the cotangent of o (None: zero, a loss on the final state only).
        dht: [N, HV, K, V], the cotangent of the final state (None: zero).
        scale: float, default K ** -0.5.  initial_state: [N, HV, K, V] or None (zeros).
        cu_seqlens: int [N+1] offsets of a packed batch (B == 1), or None (N = B).
    Returns:
        (dq [B, T, H, K], dk [B, T, H, K], dv [B, T, HV, V], dg [B, T, HV, K],
         dbeta [B, T, HV], dh0 [N, HV, K, V]), all float64; dh0 is the gradient with respect
        to the initial state, the zero state when none is given.
    Inputs of any dtype (NumPy arrays or CPU torch tensors) are promoted to float64.
    """
    dims, scale, spans = check_kda(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    check_cotangents(dims, do, dht)
    q, k, v, g, beta = (to_f64(x) for x in (q, k, v, g, beta))
    q, k = expand_heads(q, dims.HV), expand_heads(k, dims.HV)
    do = np.zeros_like(v) if do is None else to_f64(do)
    state_shape = (dims.N, dims.HV, dims.K, dims.V)
    S0 = np.zeros(state_shape) if initial_state is None else to_f64(initial_state)
    seed = np.zeros(state_shape) if dht is None else to_f64(dht)
    if cu_seqlens is None:
        dq, dk, dv, dg, dbeta, dh0 = _adjoint_scan(q, k, v, g, beta, do, scale, S0, seed)
    else:
        dq, dk, dg = (np.zeros_like(q) for _ in range(3))
        dv, dbeta = np.zeros_like(v), np.zeros_like(beta)
        dh0 = seed.copy()  # an empty sequence's final state is its initial state
        for ns in same_length(spans).values():  # the sequences of one length as rows of one scan
            grads = _adjoint_scan(*stack_spans((q, k, v, g, beta, do), spans, ns), scale, S0[ns], seed[ns])
            for i, n in enumerate(ns):
                a, b = spans[n]
                for out, grad in zip((dq, dk, dv, dg, dbeta), grads[:5], strict=True):
                    out[0, a:b] = grad[i]
            dh0[ns] = grads[5]
    return sum_groups(dq, dims.H), sum_groups(dk, dims.H), dv, dg, dbeta, dh0
