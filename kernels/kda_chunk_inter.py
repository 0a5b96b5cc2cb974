"""The inter-chunk stage of chunk_kda (DESIGN.md section 4): one program per (sequence, value
head, block of BV value columns) walks the chunks of its sequence in order, carrying the state
S [K, BV] in registers, and writes each chunk's output as it goes. No per-chunk state is ever
stored: memory is the inputs, the outputs and the per-token operands and per-chunk matrices
of kda_chunk_intra.

Per chunk (tokens r of the chunk; from kda_chunk_intra: Aqk, M = (I + L)^{-1} Diag(beta),
QG = scale * Gam * Q, KG = Gam * K, KD = (Gam_C / Gam) * K):

    V' = M (V - KG S)                  = U - W S  (eq. (7))
    O  = QG S + Aqk V'                            (eq. (9); Aqk carries the scale)
    S  = Diag(Gam_C) S + KD^T V'                  (eq. (8))

Every exponent was formed <= 0 in kda_chunk_intra (G is an in-chunk cumulative sum of g <= 0;
Gam_C / Gam = exp(G_C - G_r) with r <= C; rows past the sequence end get exponent -inf);
here only Gam_C, from G at the chunk's last token.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kda_chunk_intra import chunk_end_decay, load_rows, mma, mma_split, one_dim_grid, round_to, sequence_span


# STORE_HT is a runtime flag: one binary with and without the final state (runtime.state_out)
@triton.jit(do_not_specialize=["STORE_HT", "T", "NT"])
def chunk_recurrence(
    QG, KG, KD, v, G, Rs, Aqk, M, o, h0, ht, h, chunk_first, cu_seqlens, T, NT, STORE_HT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, RESETS: tl.constexpr, HAS_H0: tl.constexpr, STORE_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, MATS_ROWS: tl.constexpr = False,
):  # fmt: skip
    """o [B*T, HV, V] for value columns [i_v*BV, (i_v+1)*BV) and, if STORE_HT, the final state
    ht [N, HV, K, V] fp32, from h0 [N, HV, K, V] fp32 (or zero). QG = scale * Gam * Q, KG =
    Gam * K, KD = (Gam_C / Gam) * K [B*T, HV, K] in the dot operand dtype (chunk_pairs): every
    [BT, K] tile is read only as a dot operand, so no exponent or elementwise pass over K runs
    in this sequential loop. NT: chunks per sequence without cu_seqlens (for the rows of h).
    The loop runs each sequence's own chunk count, read from cu_seqlens (runtime.py lets the
    interpreter take such a trip count). STORE_H (training only): the state entering every
    chunk is also written to h [NC, HV, K, V] fp32 (chunk c of sequence n at row
    chunk_first[n] + c, or n * NT + c without cu_seqlens), for the backward of
    kda_chunk_backward. MATS_ROWS: Aqk and M under the row mask alone, so that they are
    copied a chunk ahead like the operands (ChunkBlocks.MATS_ROWS)."""
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
        ops = (rows[:, None] * HV + i_hv) * K + cols_k[None, :]
        m_ops = m[:, None] & (cols_k[None, :] < K)
        v_c = load_rows(v, rows, m, HV, i_hv, cols_v, V)
        if MATS_ROWS:  # the row mask alone (ChunkBlocks.MATS_ROWS)
            tri = m[:, None] & (o_t[None, :] < BT)  # (always true: the mask's [BT, BT] shape)
        else:
            tri = m[:, None] & (t0 + o_t[None, :] < eos) & (o_t[None, :] <= o_t[:, None])
        mat = (rows[:, None] * HV + i_hv) * BT + o_t[None, :]
        a_qk = tl.load(Aqk + mat, mask=tri, other=0.0)
        m_c = tl.load(M + mat, mask=tri, other=0.0)
        gam_c = chunk_end_decay(G, Rs, tl.minimum(t0 + BT, eos) - 1, HV, i_hv, cols_k, K, RESETS)

        kg = tl.load(KG + ops, mask=m_ops, other=0.0)
        x = v_c - mma(kg, S, DOT_DTYPE, PRECISION)
        vp = mma_split(m_c, x, DOT_DTYPE, PRECISION)  # x not rounded to DOT_DTYPE on its own
        qg = tl.load(QG + ops, mask=m_ops, other=0.0)
        out = mma(qg, S, DOT_DTYPE, PRECISION)
        out += mma(a_qk, vp, DOT_DTYPE, PRECISION)
        o_ptr = o + (rows[:, None] * HV + i_hv) * V + cols_v[None, :]
        tl.store(o_ptr, round_to(out, o.dtype.element_ty), mask=m[:, None] & (cols_v[None, :] < V))

        S = S * gam_c[:, None]
        kd = tl.load(KD + ops, mask=m_ops, other=0.0)
        S += mma(tl.trans(kd), vp, DOT_DTYPE, PRECISION)
    if STORE_HT != 0:
        tl.store(ht + s_ptr, S, mask=m_kv)
