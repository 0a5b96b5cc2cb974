"""Fused recurrent DPLR delta rule in Triton: the general diagonal-plus-low-rank transition
token by token, a drop-in for flash-linear-attention's fused_recurrent_dplr_delta_rule
(forward only).

Per value head, state S in R^{K x V} (reference/dplr.py; arXiv 2510.26692v2, section 6.2):

    S_t = (Diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,      o_t = S_t^T (scale q_t)

q, k [B, T, H, K] are shared by the HV / H value heads of a group (GVA); a, b, gk
[B, T, HV, K] and v [B, T, HV, V] belong to the value head. KDA is the case gk = g,
a = k * exp(g), b = -beta k with beta folded into v (reference.kda_as_dplr).

One program owns a [BK, BV] tile of one sequence's state for one value head (BK =
next_power_of_2(K) covers all of K, so the sum a_t^T S over K stays in the program; BV is a
block of V) and walks that sequence's tokens. Per token it loads q, k, a, b, gk (K lanes),
v (BV lanes), and with fp32 FMAs (no tl.dot: full fp32 products):

    w = a_t^T S_{t-1}                           [1, BV], read before the update
    S = exp(gk_t) * S + b_t w + k_t v_t^T       two rank-1 updates of the tile
    o_t = scale q_t^T S                         [1, BV]

Memory: each token's q, k, a, b, gk rows are read by the cdiv(V, BV) programs of its head
(L2 hits after the first), v and o once; the state once in, once out. Lanes past K or V are
masked on every load and store, and all offsets are int64. Each token's rows are loaded one
step ahead, and the launch configuration is token_loop_config's: narrow tiles on one warp,
because a long walk is bound by the latency of a step, not by bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kdaverify.reference.conventions import check_scale

from .kda_fused_recurrent import col_sum, load_f32, recurrent_program, token_loop_config
from .runtime import cdiv, check_inputs, check_offsets, check_state, next_power_of_2, scratch, state_out


@triton.jit
def _dplr_token(p_q, p_k, p_a, p_b, p_gk, p_v, m_k, m_v):
    """One token's q, k, a, b, gk columns [BK, 1] and v row [1, BV], in fp32."""
    return (load_f32(p_q, m_k), load_f32(p_k, m_k), load_f32(p_a, m_k), load_f32(p_b, m_k), load_f32(p_gk, m_k),
            load_f32(p_v, m_v))  # fmt: skip


@triton.jit(do_not_specialize=["T", "STORE_HT"])
def _fused_recurrent_dplr_kernel(
    q, k, v, a, b, gk, o, h0, ht, cu_seqlens, scale, T, H, HV, STORE_HT,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Grid (N * HV * cdiv(V, BV),) (recurrent_program). q, k [B*T, H, K]; a, b, gk
    [B*T, HV, K]; v, o [B*T, HV, V]; h0, ht [N, HV, K, V] fp32."""
    i_v, i_n, i_hv, i_h, bos, eos = recurrent_program(cu_seqlens, T, H, HV, V, BV, IS_VARLEN)

    # [BK, 1] columns and [1, BV] rows, shaped once to broadcast against the [BK, BV] tile
    o_k = tl.arange(0, BK)[:, None]
    o_v = i_v * BV + tl.arange(0, BV)[None, :]
    m_k = o_k < K
    m_v = o_v < V
    o_h = o_k.to(tl.int64) * V + o_v
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + (i_n * HV + i_hv) * K * V + o_h, mask=m_k & m_v, other=0.0)

    s_qk, s_k, s_v = H * K, HV * K, HV * V  # token strides
    p_q = q + (bos * H + i_h) * K + o_k
    p_k = k + (bos * H + i_h) * K + o_k
    p_a = a + (bos * HV + i_hv) * K + o_k
    p_b = b + (bos * HV + i_hv) * K + o_k
    p_gk = gk + (bos * HV + i_hv) * K + o_k
    p_v = v + (bos * HV + i_hv) * V + o_v
    p_o = o + (bos * HV + i_hv) * V + o_v
    # The next token's rows are loaded one iteration ahead, before this token's two reductions,
    # so their latency (global or L2) overlaps the arithmetic instead of adding to every step
    # of a loop that waits on its loads. Measured (seventeenth session, H200, B1 T4096 H32
    # K = V = 128 bf16, BV 32 on 8 warps): 12.95 -> 6.20 ms; at BV 8 on one warp 5.12 -> 3.02.
    t = bos
    live = t < eos
    n_q, n_k, n_a, n_b, n_gk, n_v = _dplr_token(p_q, p_k, p_a, p_b, p_gk, p_v, m_k & live, m_v & live)
    while t < eos:  # a while loop: the interpreter cannot take tensor bounds in range()
        b_q, b_k, b_a, b_b, b_gk, b_v = n_q, n_k, n_a, n_b, n_gk, n_v
        live = t + 1 < eos
        n_q, n_k, n_a, n_b, n_gk, n_v = _dplr_token(
            p_q + s_qk, p_k + s_qk, p_a + s_k, p_b + s_k, p_gk + s_k, p_v + s_v, m_k & live, m_v & live
        )  # fmt: skip
        b_w = col_sum(b_h, b_a)  # a_t^T S_{t-1}, [1, BV]
        # the decay in fp64, rounded once to fp32, as the KDA kernel takes it (its error
        # compounds over the sequence: kda_fused_recurrent)
        b_h = b_h * tl.exp(b_gk.to(tl.float64)).to(tl.float32) + b_b * b_w + b_k * b_v
        b_o = col_sum(b_h, b_q * scale)  # S_t^T (scale q_t)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)
        p_q += s_qk
        p_k += s_qk
        p_a += s_k
        p_b += s_k
        p_gk += s_k
        p_v += s_v
        p_o += s_v
        t += 1
    if STORE_HT != 0:
        tl.store(ht + (i_n * HV + i_hv) * K * V + o_h, b_h, mask=m_k & m_v)


def fused_recurrent_dplr_delta_rule(
    q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):  # fmt: skip
    """The DPLR delta rule (module docstring), forward only; flash-linear-attention's
    fused_recurrent_dplr_delta_rule arguments, without `reverse`.

    q, k [B, T, H, K]; v [B, T, HV, V] of one dtype (float32, bfloat16 or float16); a, b, gk
    [B, T, HV, K] in that dtype or float32 (HV a multiple of H: GVA); scale defaults to
    K ** -0.5; initial_state [N, HV, K, V] float32; cu_seqlens int32/int64 [N + 1] for a
    packed batch (B == 1). K, V <= 256. Returns (o [B, T, HV, V] in q's dtype, final state
    [N, HV, K, V] float32 or None). Bad input raises ValueError naming the argument."""
    B, T, H, HV, K, V = check_inputs(q, k, v, {"a": (a, "K"), "b": (b, "K"), "gk": (gk, "K")})
    device = q.device
    N, cu, _ = check_offsets(cu_seqlens, B, T, device)
    h0 = None if initial_state is None else check_state(initial_state, (N, HV, K, V), "[N, HV, K, V]", device)
    scale = check_scale(scale, K)
    q, k, v, a, b, gk = (x.contiguous() for x in (q, k, v, a, b, gk))
    o = scratch(B, T, HV, V, dtype=q.dtype, device=device)
    ht = scratch(N, HV, K, V, dtype=torch.float32, device=device) if output_final_state else None
    ht_arg, store_ht = state_out(ht, device)
    cfg = token_loop_config(K, V, N * HV)
    BK = next_power_of_2(K)
    _fused_recurrent_dplr_kernel[(N * HV * cdiv(V, cfg.BV),)](
        q, k, v, a, b, gk, o, h0 if h0 is not None else ht_arg, ht_arg, cu if cu is not None else o,
        scale, T, H, HV, store_ht,
        K=K, V=V, BK=BK, BV=cfg.BV, USE_H0=h0 is not None, IS_VARLEN=cu is not None,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return o, ht
