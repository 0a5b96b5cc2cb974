"""The inter-chunk stage of chunk_kda (DESIGN.md section 4): one program per (sequence, value
head, block of BV value columns) walks the chunks of its sequence in order, carrying the state
S [K, BV] in registers, and writes each chunk's output as it goes. No per-chunk state is ever
stored: memory is the inputs, the outputs and the per-chunk matrices of kda_chunk_intra.

Per chunk (tokens r of the chunk; G, Aqk, M = (I + L)^{-1} Diag(beta) from kda_chunk_intra):

    V' = M (V - (Gam * K) S)                             = U - W S  (eq. (7))
    O  = ((scale * Gam * Q) S + Aqk V')                  (eq. (9); Aqk carries the scale)
    S  = Diag(Gam_C) S + ((Gam_C / Gam) * K)^T V'        (eq. (8))

Every exponent is <= 0 (G is an in-chunk cumulative sum of g <= 0; Gam_C / Gam =
exp(G_C - G_r) with r <= C), and rows past the sequence end get exponent -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kda_chunk_intra import (
    chunk_decays,
    load_qk,
    load_rows,
    mma,
    mma_split,
    one_dim_grid,
    round_to,
    sequence_span,
)


# STORE_HT is a runtime flag (one binary with and without the final state, so o cannot
# depend on it): as a constexpr it changed fused_recurrent_kda's o in the last bit on the
# H100 (kda_fused_recurrent.py).
@triton.jit(do_not_specialize=["STORE_HT"])
def chunk_recurrence(
    q, k, v, G, Rs, Aqk, M, o, h0, ht, h, chunk_first, cu_seqlens, scale, T, NT, STORE_HT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, RESETS: tl.constexpr, HAS_H0: tl.constexpr, STORE_H: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,  # beta is in M already
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """o [B*T, HV, V] for value columns [i_v*BV, (i_v+1)*BV) and, if STORE_HT, the final state
    ht [N, HV, K, V] fp32, from h0 [N, HV, K, V] fp32 (or zero). NT: chunks per sequence without
    cu_seqlens (for the rows of h). The loop runs each sequence's own chunk count, read from
    cu_seqlens (runtime.py lets the interpreter take such a trip count). STORE_H (training
    only): the state entering every chunk is also written to h [NC, HV, K, V] fp32 (chunk c
    of sequence n at row chunk_first[n] + c, or n * NT + c without cu_seqlens), for the
    backward of kda_chunk_backward."""
    i_nh, i_v = one_dim_grid((V + BV - 1) // BV)
    i_n, i_hv, i_h, bos, eos, c0 = sequence_span(i_nh, chunk_first, cu_seqlens, T, NT, HV, H, IS_VARLEN)
    o_t = tl.arange(0, BT)
    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    m_kv = (cols_k[:, None] < K) & (cols_v[None, :] < V)
    s_ptr = ((i_n * HV + i_hv) * K + cols_k[:, None]) * V + cols_v[None, :]
    if HAS_H0:
        S = tl.load(h0 + s_ptr, mask=m_kv, other=0.0)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    # the sequence's own chunk count as the trip count, and no branch in the body, so that
    # Triton can software-pipeline the loads of chunk i_t + 1 under the dots of chunk i_t
    for i_t in range(0, (eos - bos + BT - 1) // BT):
        t0 = bos + i_t * BT
        rows = t0 + o_t
        m = rows < eos
        if STORE_H:
            tl.store(h + ((c0 + i_t) * HV + i_hv) * K * V + cols_k[:, None] * V + cols_v[None, :], S, mask=m_kv)
        q_c, k_c = load_qk(q, k, rows, m, H, i_h, cols_k, K, L2NORM)
        v_c = load_rows(v, rows, m, HV, i_hv, cols_v, V)
        tri = m[:, None] & (t0 + o_t[None, :] < eos) & (o_t[None, :] <= o_t[:, None])
        mat = (rows[:, None] * HV + i_hv) * BT + o_t[None, :]
        a_qk = tl.load(Aqk + mat, mask=tri, other=0.0).to(tl.float32)
        m_c = tl.load(M + mat, mask=tri, other=0.0).to(tl.float32)

        last = tl.minimum(t0 + BT, eos) - 1
        _, _, e_g, e_d, gam_c = chunk_decays(G, Rs, rows, m, last, HV, i_hv, cols_k, K, RESETS)
        x = v_c - mma(k_c * e_g, S, DOT_DTYPE, PRECISION)
        vp = mma_split(m_c, x, DOT_DTYPE, PRECISION)  # x not rounded to DOT_DTYPE on its own
        out = mma(q_c * (scale * e_g), S, DOT_DTYPE, PRECISION)
        out += mma(a_qk, vp, DOT_DTYPE, PRECISION)
        o_ptr = o + (rows[:, None] * HV + i_hv) * V + cols_v[None, :]
        tl.store(o_ptr, round_to(out, o.dtype.element_ty), mask=m[:, None] & (cols_v[None, :] < V))

        S = S * gam_c[:, None]
        S += mma(tl.trans(k_c * e_d), vp, DOT_DTYPE, PRECISION)
    if STORE_HT != 0:
        tl.store(ht + s_ptr, S, mask=m_kv)
