"""The backward of chunk_kda (DESIGN.md section 4 read in reverse): four launches after a
forward that kept the state entering every chunk (kda_chunk_inter, STORE_H).

    chunk_dh_recurrence  (NV * N*HV)   dh [NC, HV, K, V]: the adjoint of each chunk's end state,
                                       walking the chunks of a sequence backwards; dh0
    chunk_grads          (NC * B*HV)   dv, and the terms of dq, dk, dG, dbeta that sum over V;
                                       the pair weights P, dL [B*T, HV, BT]
    chunk_pair_grads     (NC * B*HV * NB)  the pair terms (below) of one 16-token sub-chunk's
                                       rows added to dq, dk (per value head), dG and dbeta
    chunk_pair_grads_diag (NC * B*HV/BH * BT)  with GRADS_DIAG_COLS = 0 (the GPU default): the pairs inside
                                       each sub-chunk, one program per token (chunk_diag's way)
    chunk_dg_cumsum      (NC * B*HV)   dg = dG's reverse cumulative sum inside each chunk

Per chunk, with the forward's quantities (tokens r of the chunk, G the in-chunk cumulative
sum of g, S0 the state entering it, SC the one leaving it, Minv = (I + L)^{-1} and
M = Minv Diag(beta), both from kda_chunk_intra):

    X  = V - (Gam K) S0            V' = M X = Minv (beta X)     O = scale (Gam Q) S0 + Aqk V'
    SC = Gam_C S0 + Kd^T V',       Kd = (Gam_C / Gam) K

Given dO and dSC (the adjoint of SC), reverse mode gives

    dV' = Aqk^T dO + Kd dSC        dY = Minv^T dV'    dX = beta dY = M^T dV' = dv
    dS0 = Gam_C dSC + scale (Gam Q)^T dO - (Gam K)^T dX                    (the dh recurrence)
    dAqk = Tril(dO V'^T)           dL = -StrictTril(dY V'^T)    (dMinv = -Minv^T . Minv^T)
    dbeta = rowsum(dY X) + rowsum(K (dL-weighted pairs))

and the pair terms: Aqk[r, i] = scale sum_d Q_rd K_id exp(G_rd - G_id) and
L[r, i] = beta_r sum_d K_rd K_id exp(G_rd - G_id) feed dQ, dK and dG through
rowpair(P, Y)[r, d] = sum_{i <= r} P_ri Y_id exp(G_rd - G_id) and
colpair(P, Y)[i, d] = sum_{r >= i} P_ri Y_rd exp(G_rd - G_id). Both are split as the forward
splits Aqk and L (kda_chunk_intra): on BC = 16-token sub-chunks, the pairs of one sub-chunk
(the diagonal blocks) are formed elementwise in fp32, BC steps that each take one token of
the sub-chunk and serve both sums; the blocks off the diagonal are tensor-core dots around
an anchor a, exp(G_r - G_a) exp(G_a - G_i) with i < a <= r: the rows' sub-chunk's first
token for their earlier columns, the next sub-chunk's first token for the columns' later
rows. Every exponent is a later token's G minus an earlier one's: never positive, whatever
the gates (no exp(G) * exp(-G) factorisation). With 16-bit dots each product is three dots
(mma_hilo): the pair terms' dG contributions cancel in dg, and one bf16 dot each was too
coarse for dg. Finally dg = the in-chunk reverse cumulative sum of dG.

Everything is fp32 except the dot operands, rounded as in the forward (DOT_DTYPE,
PRECISION). Memory: the forward keeps G, Aqk, M, Minv and h (4 NC HV K V bytes); the backward
adds dh (the same size), fp32 dq, dk, dg per value head, and P and dL (2 x 4 B T HV BT bytes).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kda_chunk_intra import (
    chunk_decays,
    chunk_end_decay,
    chunk_selected,
    chunk_span,
    load_counts,
    load_counts_row,
    load_rows,
    load_rows_stored,
    mma,
    mma_hilo,
    mma_split,
    one_dim_grid,
    round_to,
    sequence_span,
    span_has,
    token_program,
)


@triton.jit
def _load_tril(
    x, rows, m, HV: tl.constexpr, i_hv, o_t, eos, t0, BT: tl.constexpr, ROWS: tl.constexpr, F32: tl.constexpr = True
):
    """The chunk's [BT, BT] matrix (Aqk, M or Minv rows, see kda_chunk_intra) in fp32 (or,
    F32 False, as stored: kda_chunk_intra.load_rows_stored says when): the lower triangle,
    diagonal included, of the rows and columns inside the sequence. ROWS (ChunkBlocks.
    MATS_ROWS): under the row mask alone, the same values (the forward wrote every row inside
    the sequence in full, zeros above the diagonal) in 16-byte loads instead of one load an
    element."""
    if ROWS:
        keep = m[:, None] & (o_t[None, :] < BT)  # (always true: the mask's [BT, BT] shape)
    else:
        keep = m[:, None] & (t0 + o_t[None, :] < eos) & (o_t[None, :] <= o_t[:, None])
    tile = tl.load(x + (rows[:, None] * HV + i_hv) * BT + o_t[None, :], mask=keep, other=0.0)
    return tile.to(tl.float32) if F32 else tile


@triton.jit
def _dot_rows(x, rows, m, heads, head, cols, D: tl.constexpr, STORED: tl.constexpr):
    """A [rows, cols] tile that only feeds mma: as stored with STORED (load_rows_stored), else
    in fp32 (load_rows); the dot's operand is the same bit for bit either way."""
    if STORED:
        return load_rows_stored(x, rows, m, heads, head, cols, D)
    else:
        return load_rows(x, rows, m, heads, head, cols, D)


@triton.jit(do_not_specialize=["T", "NBH"])
def chunk_dh_operands(
    k, G, Rs, KD, Aqk, M, do, W2, DVL, cu_seqlens, chunks, T, NBH,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, IS_VARLEN: tl.constexpr, RESETS: tl.constexpr, OPS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, MATS_ROWS: tl.constexpr = False,
):  # fmt: skip
    """The parts of chunk_dh_recurrence's dX = M^T (Aqk^T dO + Kd dS) that do not depend on
    the state gradient dS (ChunkBlocks.DH_SPLIT), one program per (chunk, value head), all
    chunks at once: W2 = M^T Kd [B*T, HV, K] in the dot dtype, and DVL = M^T (Aqk^T dO)
    [B*T, HV, V] fp32. The sequential recurrence is then dX = DVL + W2 dS: one dot from dS
    to dX instead of two, and three dots a chunk instead of five, as flash-linear-attention's
    dhu does with the forward's w and its dAv kernel. Kd is the forward's KD (OPS; W2 may
    then be KD itself: each program reads its rows whole before it writes them) or formed
    here from k, G and the reset counts as chunk_dh_recurrence forms it without OPS (the
    same values bit for bit), so a second backward through the graph, which finds the
    forward's operands freed, gives the first one's gradients. Traffic per program: Kd's
    tile in (or k's and G's) and W2's out, Aqk and M [BT, BT] in, dO in and DVL out [BT, V]."""
    i_c, i_bh = one_dim_grid(NBH)
    i_b, i_hv = i_bh // HV, i_bh % HV
    _, _, eos, t0 = chunk_span(i_c, i_b, cu_seqlens, chunks, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    rows = t0 + o_t
    m = rows < eos
    m_t = tl.trans(_load_tril(M, rows, m, HV, i_hv, o_t, eos, t0, BT, MATS_ROWS, False))
    a_t = tl.trans(_load_tril(Aqk, rows, m, HV, i_hv, o_t, eos, t0, BT, MATS_ROWS, False))
    cols_k = tl.arange(0, BK)
    if OPS:
        kd = load_rows_stored(KD, rows, m, HV, i_hv, cols_k, K)
    else:
        last = tl.minimum(t0 + BT, eos) - 1
        _, _, _, e_d, _ = chunk_decays(G, Rs, rows, m, last, HV, i_hv, cols_k, K, RESETS)
        kd = load_rows(k, rows, m, H, i_hv // (HV // H), cols_k, K) * e_d
    w2 = mma(m_t, kd, DOT_DTYPE, PRECISION)
    out_k = W2 + (rows[:, None] * HV + i_hv) * K + cols_k[None, :]
    tl.store(out_k, round_to(w2, W2.dtype.element_ty), mask=m[:, None] & (cols_k[None, :] < K))
    for i_v in range(0, (V + BV - 1) // BV):
        cols_v = i_v * BV + tl.arange(0, BV)
        do_c = load_rows_stored(do, rows, m, HV, i_hv, cols_v, V)
        dvl = mma(m_t, mma(a_t, do_c, DOT_DTYPE, PRECISION), DOT_DTYPE, PRECISION)
        out_v = DVL + (rows[:, None] * HV + i_hv) * V + cols_v[None, :]
        tl.store(out_v, dvl, mask=m[:, None] & (cols_v[None, :] < V))


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_dh_recurrence(
    q, k, G, Rs, QG, KG, W2, Aqk, M, do, DVL, dht, dh, dh0, cu_seqlens, chunk_first, scale, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, RESETS: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, OPS: tl.constexpr = False, SPLIT: tl.constexpr = False,
    MATS_ROWS: tl.constexpr = False,
):  # fmt: skip
    """dh [NC, HV, K, V] fp32 for value columns [i_v*BV, (i_v+1)*BV): row c holds dSC of chunk
    c (the loss's gradient with respect to the state leaving it), from dht [N, HV, K, V] (or
    zero) backwards over the chunks; dh0 [N, HV, K, V] = the gradient of the initial state.
    Traffic per chunk: q, k, G, dO tiles and two [BT, BT] matrices in, one [K, BV] tile out.

    OPS (ChunkBlocks.DH_OPS): the operands Gam Q (scaled) and Gam K are read from the
    forward's QG, KG [B*T, HV, K] (chunk_pairs forms them with the same products, rounded to
    the dot dtype as mma rounds them here: the same values bit for bit) instead of being
    formed from q, k, G and the reset counts with 2 BT * BK exps per chunk; G and Rs then give
    only the chunk's end decay. Without SPLIT, Kd likewise from the forward's KD (passed as W2).

    SPLIT (ChunkBlocks.DH_SPLIT, 16-bit dot operands): W2 = M^T Kd and DVL = M^T Aqk^T dO fp32
    come from chunk_dh_operands, so dX = DVL + W2 dS and Aqk, M are not read here; and every
    tile that only feeds a dot (W2, dO, and OPS's Gam Q, Gam K) is loaded as stored, not
    widened to fp32 for mma to narrow again (_dot_rows: the same operands bit for bit), so
    Triton's pipeliner issues it a chunk ahead as an async copy. Those stored loads without
    SPLIT (the removed DH_STORED) faulted on an H200: compute-sanitizer reported shared
    addresses out of range at a dot of this loop (Triton 3.6, sm_90, 3 stages; the
    transposed Aqk and M tiles are what only that variant had). kernels/NOTES.md."""
    i_nh, i_v = one_dim_grid((V + BV - 1) // BV)
    i_n, i_hv, i_h, bos, eos, c0 = sequence_span(i_nh, chunk_first, cu_seqlens, T, NT, HV, H, IS_VARLEN)
    o_t = tl.arange(0, BT)
    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    m_kv = (cols_k[:, None] < K) & (cols_v[None, :] < V)
    s_off = cols_k[:, None] * V + cols_v[None, :]
    if HAS_DHT:
        dS = tl.load(dht + (i_n * HV + i_hv) * K * V + s_off, mask=m_kv, other=0.0)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    nt = (eos - bos + BT - 1) // BT  # this sequence's chunks: no branch in the loop body (see chunk_recurrence)
    for j in range(0, nt):
        i_t = nt - 1 - j
        t0 = bos + i_t * BT
        tl.store(dh + ((c0 + i_t) * HV + i_hv) * K * V + s_off, dS, mask=m_kv)
        rows = t0 + o_t
        m = rows < eos
        if OPS:
            qg = _dot_rows(QG, rows, m, HV, i_hv, cols_k, K, SPLIT)
            kg = _dot_rows(KG, rows, m, HV, i_hv, cols_k, K, SPLIT)
        else:
            q_c = load_rows(q, rows, m, H, i_h, cols_k, K)
            k_c = load_rows(k, rows, m, H, i_h, cols_k, K)
        do_c = _dot_rows(do, rows, m, HV, i_hv, cols_v, V, SPLIT)
        last = tl.minimum(t0 + BT, eos) - 1
        if OPS:
            gam_c = chunk_end_decay(G, Rs, last, HV, i_hv, cols_k, K, RESETS)
        else:
            _, _, e_g, e_d, gam_c = chunk_decays(G, Rs, rows, m, last, HV, i_hv, cols_k, K, RESETS)
        if SPLIT:
            w2 = _dot_rows(W2, rows, m, HV, i_hv, cols_k, K, True)
            dx = load_rows(DVL, rows, m, HV, i_hv, cols_v, V) + mma(w2, dS, DOT_DTYPE, PRECISION)
        else:
            if OPS:
                kd = load_rows(W2, rows, m, HV, i_hv, cols_k, K)  # the forward's KD
            else:
                kd = k_c * e_d
            a_qk = _load_tril(Aqk, rows, m, HV, i_hv, o_t, eos, t0, BT, MATS_ROWS)
            m_c = _load_tril(M, rows, m, HV, i_hv, o_t, eos, t0, BT, MATS_ROWS)
            dvp = mma(tl.trans(a_qk), do_c, DOT_DTYPE, PRECISION) + mma(kd, dS, DOT_DTYPE, PRECISION)
            dx = mma(tl.trans(m_c), dvp, DOT_DTYPE, PRECISION)
        dS = dS * gam_c[:, None]
        if not OPS:
            qg = q_c * (scale * e_g)
        dS += mma(tl.trans(qg), do_c, DOT_DTYPE, PRECISION)
        if not OPS:
            kg = k_c * e_g
        dS -= mma(tl.trans(kg), dx, DOT_DTYPE, PRECISION)
    if STORE_DH0:
        tl.store(dh0 + (i_n * HV + i_hv) * K * V + s_off, dS, mask=m_kv)


@triton.jit(do_not_specialize=["T", "NT", "NBH"])
def chunk_grads(
    q, k, v, G, Rs, beta, Aqk, M, Minv, h, dh, do, dq, dk, dv, dg, dbeta, P, DL, cu_seqlens, chunks, scale, T, NT, NBH,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, RESETS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    RELOAD: tl.constexpr = False, MATS_ROWS: tl.constexpr = False,
):  # fmt: skip
    """The gradient terms of one chunk of one value head that sum over V: dv [B*T, HV, V]
    (final), and the parts of dq, dk [B*T, HV, K], dG (before its cumulative sum; written to
    dg) and dbeta [B*T, HV] through S0, X and SC, all fp32; and the [BT, BT] pair weights P =
    scale Tril(dO V'^T) and dL = StrictTril(-dY V'^T) [B*T, HV, BT] fp32 that chunk_pair_grads
    turns into the pair terms. The value columns are walked in blocks of BV.

    Split from chunk_pair_grads because one program holding both phases needed about fifteen
    [BT, BK] fp32 tiles and five [BT, BT] ones: 255 registers and 16 KB of spill stores at
    bf16 K = 128 (kernels/sm90_fit.py --usage)."""
    i_c, i_bh = one_dim_grid(NBH)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    _, _, eos, t0 = chunk_span(i_c, i_b, cu_seqlens, chunks, T, BT, IS_VARLEN)
    if IS_VARLEN:
        gc = i_c  # the chunk table lists every sequence's chunks in order
    else:
        gc = i_b.to(tl.int64) * NT + i_c
    o_t = tl.arange(0, BT)
    cols_k = tl.arange(0, BK)
    rows = t0 + o_t
    m = rows < eos
    m_k = m[:, None] & (cols_k[None, :] < K)
    k_c = load_rows(k, rows, m, H, i_h, cols_k, K)
    b_c = tl.load(beta + rows * HV + i_hv, mask=m, other=0.0).to(tl.float32)
    a_qk = _load_tril(Aqk, rows, m, HV, i_hv, o_t, eos, t0, BT, MATS_ROWS)
    m_c = _load_tril(M, rows, m, HV, i_hv, o_t, eos, t0, BT, MATS_ROWS)
    m_inv = _load_tril(Minv, rows, m, HV, i_hv, o_t, eos, t0, BT, MATS_ROWS)
    last = tl.minimum(t0 + BT, eos) - 1
    _, _, e_g, e_d, _ = chunk_decays(G, Rs, rows, m, last, HV, i_hv, cols_k, K, RESETS)
    kg = k_c * e_g
    kd = k_c * e_d

    d_aqk = tl.zeros([BT, BT], dtype=tl.float32)  # dO V'^T
    d_l = tl.zeros([BT, BT], dtype=tl.float32)  # -dY V'^T
    dq_s = tl.zeros([BT, BK], dtype=tl.float32)  # dO S0^T
    dkg_s = tl.zeros([BT, BK], dtype=tl.float32)  # -dX S0^T
    dkd_s = tl.zeros([BT, BK], dtype=tl.float32)  # V' dSC^T
    dgc = tl.zeros([BK], dtype=tl.float32)  # rowsum(S0 * dSC)
    db = tl.zeros([BT], dtype=tl.float32)
    s_base = (gc * HV + i_hv) * K * V
    for i_v in range(0, (V + BV - 1) // BV):
        cols_v = i_v * BV + tl.arange(0, BV)
        m_kv = (cols_k[:, None] < K) & (cols_v[None, :] < V)
        s_off = s_base + cols_k[:, None] * V + cols_v[None, :]
        # RELOAD (fp32 dots at BK = 256, ChunkBlocks.fitting): each [BT, BK] and [BK, BV]
        # operand is loaded again just before its dot (L2 hits), so shared memory stages one
        # or two of them at a time instead of keeping Gam K, Kd, S0, dSC and their transposes
        # for the whole loop. The values, and so the results, are the same bit for bit.
        s0 = tl.load(h + s_off, mask=m_kv, other=0.0)
        v_c = load_rows(v, rows, m, HV, i_hv, cols_v, V)
        do_c = load_rows(do, rows, m, HV, i_hv, cols_v, V)
        if RELOAD:
            x = v_c - mma(load_rows(k, rows, m, H, i_h, cols_k, K) * e_g, s0, DOT_DTYPE, PRECISION)
        else:
            x = v_c - mma(kg, s0, DOT_DTYPE, PRECISION)
        vp = mma_split(m_c, x, DOT_DTYPE, PRECISION)  # as the forward forms it
        dsc = tl.load(dh + s_off, mask=m_kv, other=0.0)
        dgc += tl.sum(s0 * dsc, axis=1)
        dvp = mma(tl.trans(a_qk), do_c, DOT_DTYPE, PRECISION)
        if RELOAD:
            dvp += mma(load_rows(k, rows, m, H, i_h, cols_k, K) * e_d, dsc, DOT_DTYPE, PRECISION)
        else:
            dvp += mma(kd, dsc, DOT_DTYPE, PRECISION)
        dy = mma(tl.trans(m_inv), dvp, DOT_DTYPE, PRECISION)
        dx = b_c[:, None] * dy
        tl.store(
            dv + (rows[:, None] * HV + i_hv) * V + cols_v[None, :],
            round_to(dx, dv.dtype.element_ty),
            mask=m[:, None] & (cols_v[None, :] < V),
        )
        db += tl.sum(dy * x, axis=1)
        vp_t = tl.trans(vp)
        d_aqk += mma(do_c, vp_t, DOT_DTYPE, PRECISION)
        d_l -= mma(dy, vp_t, DOT_DTYPE, PRECISION)
        if RELOAD:
            s0 = tl.load(h + s_off, mask=m_kv, other=0.0)
        s0_t = tl.trans(s0)
        dq_s += mma(do_c, s0_t, DOT_DTYPE, PRECISION)
        dkg_s -= mma(dx, s0_t, DOT_DTYPE, PRECISION)
        if RELOAD:
            dsc = tl.load(dh + s_off, mask=m_kv, other=0.0)
        dkd_s += mma(vp, tl.trans(dsc), DOT_DTYPE, PRECISION)

    # Terms through S0, X and SC (no pairs): O = scale (Gam Q) S0, X = V - (Gam K) S0,
    # SC = Gam_C S0 + Kd^T V'.
    # q, k and the decays loaded again (L2 hits) instead of held through the loop: registers
    k_c = load_rows(k, rows, m, H, i_h, cols_k, K)
    q_c = load_rows(q, rows, m, H, i_h, cols_k, K)
    _, _, e_g, e_d, gam_c = chunk_decays(G, Rs, rows, m, last, HV, i_hv, cols_k, K, RESETS)
    dq_c = (scale * e_g) * dq_s
    dG = q_c * dq_c
    dk_c = e_g * dkg_s
    dG += k_c * dk_c
    dkd = e_d * dkd_s
    dk_c += dkd
    dG -= k_c * dkd
    dG_last = tl.sum(k_c * dkd, axis=0) + gam_c * dgc  # d/dG_C, added to the last row

    # the pair weights, for chunk_pair_grads
    p = tl.where(o_t[None, :] <= o_t[:, None], scale * d_aqk, 0.0)
    d_l = tl.where(o_t[None, :] < o_t[:, None], d_l, 0.0)
    dG = tl.where((rows == last)[:, None], dG + dG_last[None, :], dG)
    out_k = (rows[:, None] * HV + i_hv) * K + cols_k[None, :]
    tl.store(dq + out_k, dq_c, mask=m_k)
    tl.store(dk + out_k, dk_c, mask=m_k)
    tl.store(dg + out_k, dG, mask=m_k)  # before the cumulative sum: chunk_pair_grads finishes it
    tl.store(dbeta + rows * HV + i_hv, db, mask=m)
    out_t = (rows[:, None] * HV + i_hv) * BT + o_t[None, :]
    tl.store(P + out_t, p, mask=m[:, None])
    tl.store(DL + out_t, d_l, mask=m[:, None])


@triton.jit(do_not_specialize=["T", "NBH"])
def chunk_pair_grads(
    q, k, G, Rs, beta, P, DL, dq, dk, dg, dbeta, cu_seqlens, chunks, T, NBH,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, RESETS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    DIAG_COLS: tl.constexpr, ONLY: tl.constexpr = 0, KP: tl.constexpr = 16, SPAN: tl.constexpr = 1,
):  # fmt: skip
    """The pair terms of the rows of one sub-chunk I (BC tokens) of one chunk of one value
    head, from chunk_grads' P and dL, added to its partial dq, dk, dG [B*T, HV, K] and dbeta
    [B*T, HV] (fp32). dG is left before its cumulative sum (chunk_dg_cumsum finishes it).

    One program per (chunk, value head, sub-chunk), as chunk_pairs in the forward: the rows
    of I take their rowpair terms (columns i < r) and, as columns, their colpair terms (rows
    r > i). Three parts (the module docstring has the sums):
    - the pairs inside I, elementwise: BC steps over the token src = a + j (a = I's first
      token), each a [BK] row of q, k, G broadcast over I's rows and [BC] columns of P, dL
      (DIAG_COLS = 1); or BC / DC steps of DC tokens each, as [BC, DC, BK] products summed
      over their DC axis (DIAG_COLS = DC > 1: the same terms added in another order);
    - rows of I, columns in earlier sub-chunks: dots around the anchor a, exp(G_r - G_a)
      exp(G_a - G_i), [BC, BT] x [BT, BK];
    - columns of I, rows in later sub-chunks: dots around the anchor a2 = the first token of
      sub-chunk I + 1, exp(G_r - G_a2) exp(G_a2 - G_i), [BC, BT] x [BT, BK].
    Every exponent is a later token's G minus an earlier one's (r >= a >= i): <= 0. One
    program per chunk held [BT, BK] tiles of all four sub-chunks and ran the dots on [BT, BT]
    weights of which one [BC, I BC] block was non-zero: 12.9 ms at B1 T16K H32 K = V = 128
    bf16 on an H100 (kernels/NOTES.md)."""
    NB: tl.constexpr = BT // BC
    i_c, rest = one_dim_grid(NBH * (NB // SPAN))  # SPAN sub-chunks per program (ChunkBlocks.span)
    i_bh, I0 = rest // (NB // SPAN), (rest % (NB // SPAN)) * SPAN
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    _, _, eos, t0 = chunk_span(i_c, i_b, cu_seqlens, chunks, T, BT, IS_VARLEN)
    last = tl.minimum(t0 + BT, eos) - 1
    if (t0 + I0 * BC < eos) & chunk_selected(
        Rs, last, HV, i_hv + tl.arange(0, 1), K, KP, ONLY
    ):  # ONLY: ChunkBlocks.reset_passes
        for s in range(SPAN):
            I = I0 + s
            a = t0 + I * BC  # this sub-chunk's first token: the anchor of its rows' earlier pairs
            if span_has(a, eos, SPAN):
                o = tl.arange(0, BC)
                oc = tl.arange(0, BT)
                rows = a + o
                m = rows < eos
                chunk = t0 + oc
                b_r = tl.load(beta + rows * HV + i_hv, mask=m, other=0.0).to(tl.float32)
                # The weights, [BC, BT] rows of I and [BT, BC] columns of I, loaded once here
                # (fp32, 4 KiB each): P and dL of row r hold its pairs (r, i) with i <= r.
                w_rows = (rows[:, None] * HV + i_hv) * BT + oc[None, :]
                earlier = m[:, None] & (oc < I * BC)[None, :]  # columns in sub-chunks before I
                p_b = tl.load(P + w_rows, mask=earlier, other=0.0)
                l_b = tl.load(DL + w_rows, mask=earlier, other=0.0)
                w_cols = (chunk[:, None] * HV + i_hv) * BT + I * BC + o[None, :]
                later = ((oc >= (I + 1) * BC) & (chunk < eos))[:, None] & m[None, :]  # rows in sub-chunks after I
                p_t = tl.trans(tl.load(P + w_cols, mask=later, other=0.0))  # [BC, BT]: P[r, i] at [i, r]
                b_n = tl.load(beta + chunk * HV + i_hv, mask=chunk < eos, other=0.0).to(tl.float32)
                lb_t = tl.trans(tl.where(later, b_n[:, None] * tl.load(DL + w_cols, mask=later, other=0.0), 0.0))
                # P[r, r] (0 with DIAG_COLS = 0: chunk_pair_grads_diag adds its terms)
                p_diag = tl.load(P + (rows * HV + i_hv) * BT + I * BC + o, mask=m & (DIAG_COLS > 0), other=0.0)
                db = tl.load(dbeta + rows * HV + i_hv, mask=m, other=0.0)  # chunk_grads' part
                a2 = a + BC  # the anchor of the later rows' pairs with I's columns
                for i_k in range(0, (K + BK - 1) // BK):
                    cols = i_k * BK + tl.arange(0, BK)
                    m_k = m[:, None] & (cols[None, :] < K)
                    q_r = load_rows(q, rows, m, H, i_h, cols, K)
                    k_r = load_rows(k, rows, m, H, i_h, cols, K)
                    g_r = load_rows(G, rows, m, HV, i_hv, cols, K)
                    cnt_r = load_counts(Rs, rows, m, HV, i_hv, cols, K, RESETS)
                    row_pq = tl.zeros([BC, BK], dtype=tl.float32)  # rowpair(P, K): dQ, and Q * it into dG
                    row_pl = tl.zeros([BC, BK], dtype=tl.float32)  # rowpair(dL, K)
                    col = tl.zeros([BC, BK], dtype=tl.float32)  # colpair(P, Q) + colpair(beta dL, K)

                    # pairs inside I: step j takes token src = a + j, as column of the later rows
                    # (rowpair: P[r, src] K_src exp(G_r - G_src), src < r) and as row of the earlier
                    # columns (colpair: (P[src, i] Q_src + beta_src dL[src, i] K_src) exp(G_src - G_i),
                    # src > i); a pair across a reset has ratio 0 (the counts differ)
                    if DIAG_COLS == 1:  # (DIAG_COLS = 0: none here, chunk_pair_grads_diag adds them)
                        for j in range(BC):
                            src = a + j
                            ok = src < eos
                            m_j = ok & (cols < K)
                            k_j = tl.load(k + (src * H + i_h) * K + cols, mask=m_j, other=0.0).to(tl.float32)
                            q_j = tl.load(q + (src * H + i_h) * K + cols, mask=m_j, other=0.0).to(tl.float32)
                            g_j = tl.load(G + (src * HV + i_hv) * K + cols, mask=m_j, other=0.0)
                            same = cnt_r == load_counts_row(Rs, src, ok, HV, i_hv, cols, K, RESETS)[None, :]
                            at_j = (rows * HV + i_hv) * BT + I * BC + j  # P[r, src] for each row r of I
                            p_r = tl.load(P + at_j, mask=m, other=0.0)
                            l_r = tl.load(DL + at_j, mask=m, other=0.0)
                            ke = k_j[None, :] * tl.exp(
                                tl.where((m & (o > j))[:, None] & same, g_r - g_j[None, :], float("-inf"))
                            )
                            row_pq += p_r[:, None] * ke
                            row_pl += l_r[:, None] * ke
                            from_j = (src * HV + i_hv) * BT + I * BC + o  # P[src, i] for each column i of I
                            p_c = tl.load(P + from_j, mask=ok, other=0.0)
                            b_j = tl.load(beta + src * HV + i_hv, mask=ok, other=0.0).to(tl.float32)
                            lb_c = b_j * tl.load(DL + from_j, mask=ok, other=0.0)
                            after = (ok & m & (o < j))[:, None] & same
                            col += (p_c[:, None] * q_j[None, :] + lb_c[:, None] * k_j[None, :]) * tl.exp(
                                tl.where(after, g_j[None, :] - g_r, float("-inf"))
                            )
                    elif DIAG_COLS > 1:  # DIAG_COLS tokens src = a + jc per step: [BC, DC, BK] terms summed over jc
                        for s in range(BC // DIAG_COLS):
                            jc = s * DIAG_COLS + tl.arange(0, DIAG_COLS)
                            src = a + jc
                            ok = src < eos
                            k_c = load_rows(k, src, ok, H, i_h, cols, K)
                            q_c = load_rows(q, src, ok, H, i_h, cols, K)
                            g_c = load_rows(G, src, ok, HV, i_hv, cols, K)
                            same = cnt_r[:, None, :] == load_counts(Rs, src, ok, HV, i_hv, cols, K, RESETS)[None, :, :]
                            at_c = (rows[:, None] * HV + i_hv) * BT + I * BC + jc[None, :]  # P[r, src] [BC, DC]
                            p_r = tl.load(P + at_c, mask=m[:, None], other=0.0)
                            l_r = tl.load(DL + at_c, mask=m[:, None], other=0.0)
                            before = (m[:, None] & (o[:, None] > jc[None, :]))[:, :, None] & same
                            ke = k_c[None, :, :] * tl.exp(
                                tl.where(before, g_r[:, None, :] - g_c[None, :, :], float("-inf"))
                            )
                            row_pq += tl.sum(p_r[:, :, None] * ke, axis=1)
                            row_pl += tl.sum(l_r[:, :, None] * ke, axis=1)
                            from_c = (src[None, :] * HV + i_hv) * BT + I * BC + o[:, None]  # P[src, i] at [i, j]
                            p_c = tl.load(P + from_c, mask=ok[None, :], other=0.0)
                            b_c = tl.load(beta + src * HV + i_hv, mask=ok, other=0.0).to(tl.float32)
                            lb_c = b_c[None, :] * tl.load(DL + from_c, mask=ok[None, :], other=0.0)
                            after = (ok[None, :] & m[:, None] & (o[:, None] < jc[None, :]))[:, :, None] & same
                            term = p_c[:, :, None] * q_c[None, :, :] + lb_c[:, :, None] * k_c[None, :, :]
                            col += tl.sum(
                                term * tl.exp(tl.where(after, g_c[None, :, :] - g_r[:, None, :], float("-inf"))), axis=1
                            )

                    # rows of I, columns before a (anchor a; a reset between i and r lies in (i, a] or
                    # (a, r]: one factor is 0). Each product is three 16-bit dots (mma_hilo; the pair
                    # terms' dG contributions cancel in dg: one bf16 dot each was too coarse for it).
                    if I > 0:
                        g_a = tl.load(G + (a * HV + i_hv) * K + cols, mask=cols < K, other=0.0)
                        cnt_a = load_counts_row(Rs, a, a < eos, HV, i_hv, cols, K, RESETS)
                        m_p = oc < I * BC
                        g_p = load_rows(G, chunk, m_p, HV, i_hv, cols, K)
                        same_p = load_counts(Rs, chunk, m_p, HV, i_hv, cols, K, RESETS) == cnt_a[None, :]
                        kp = load_rows(k, chunk, m_p, H, i_h, cols, K) * tl.exp(
                            tl.where(m_p[:, None] & same_p, g_a[None, :] - g_p, float("-inf"))
                        )
                        e_r = tl.exp(
                            tl.where(m[:, None] & (cnt_r == cnt_a[None, :]), g_r - g_a[None, :], float("-inf"))
                        )
                        row_pq += e_r * mma_hilo(p_b, kp, DOT_DTYPE, PRECISION)
                        row_pl += e_r * mma_hilo(l_b, kp, DOT_DTYPE, PRECISION)

                    # columns of I, rows after I (anchor a2, the next sub-chunk's first token)
                    if (I + 1 < NB) & (a2 < eos):
                        g_a2 = tl.load(G + (a2 * HV + i_hv) * K + cols, mask=cols < K, other=0.0)
                        cnt_a2 = load_counts_row(Rs, a2, a2 < eos, HV, i_hv, cols, K, RESETS)
                        m_n = (oc >= (I + 1) * BC) & (chunk < eos)
                        g_n = load_rows(G, chunk, m_n, HV, i_hv, cols, K)
                        same_n = load_counts(Rs, chunk, m_n, HV, i_hv, cols, K, RESETS) == cnt_a2[None, :]
                        e_n = tl.exp(tl.where(m_n[:, None] & same_n, g_n - g_a2[None, :], float("-inf")))
                        c_b = mma_hilo(p_t, load_rows(q, chunk, m_n, H, i_h, cols, K) * e_n, DOT_DTYPE, PRECISION)
                        c_b += mma_hilo(lb_t, load_rows(k, chunk, m_n, H, i_h, cols, K) * e_n, DOT_DTYPE, PRECISION)
                        e_i = tl.exp(
                            tl.where(m[:, None] & (cnt_r == cnt_a2[None, :]), g_a2[None, :] - g_r, float("-inf"))
                        )
                        col += e_i * c_b

                    out_k = (rows[:, None] * HV + i_hv) * K + cols[None, :]
                    dq_c = tl.load(dq + out_k, mask=m_k, other=0.0)  # chunk_grads' parts
                    dk_c = tl.load(dk + out_k, mask=m_k, other=0.0)
                    dG = tl.load(dg + out_k, mask=m_k, other=0.0)
                    # the diagonal pairs of Aqk (r = i, ratio exactly 1) feed dq and dk only: their dG
                    # terms q_r P_rr k_r and -k_r P_rr q_r cancel exactly in the algebra but not after
                    # two roundings, and a residual where the true dg is 0 is an infinite relative error
                    dq_c += row_pq + p_diag[:, None] * k_r
                    dG += q_r * row_pq
                    db += tl.sum(k_r * row_pl, axis=1)  # a sum over K: across the blocks
                    dk_c += b_r[:, None] * row_pl + col + p_diag[:, None] * q_r
                    dG += (b_r[:, None] * k_r) * row_pl - k_r * col
                    tl.store(dq + out_k, dq_c, mask=m_k)
                    tl.store(dk + out_k, dk_c, mask=m_k)
                    tl.store(dg + out_k, dG, mask=m_k)
                tl.store(dbeta + rows * HV + i_hv, db, mask=m)


@triton.jit(do_not_specialize=["T", "NBH"])
def chunk_pair_grads_diag(
    q, k, G, Rs, beta, P, DL, dq, dk, dg, dbeta, cu_seqlens, chunks, T, NBH,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BH: tl.constexpr, IS_VARLEN: tl.constexpr, RESETS: tl.constexpr,
    ONLY: tl.constexpr = 0, KP: tl.constexpr = 16, SPAN: tl.constexpr = 1,
):  # fmt: skip
    """The pair terms inside each sub-chunk, token-parallel (chunk_pair_grads with DIAG_COLS = 0
    leaves them out), as chunk_diag takes the forward's diagonal tiles: one program per
    (chunk, block of BH value heads of one batch row, token r of the chunk). Row r takes its
    rowpair terms from the earlier tokens j of its sub-chunk (P[r, j] K_j exp(G_r - G_j), and
    dL's) and, as a column, its colpair terms from the later ones ((P[j, r] Q_j + beta_j
    dL[j, r] K_j) exp(G_j - G_r)); then P[r, r]'s terms (q_r and k_r, no dG), all added to
    dq, dk, dG and dbeta of (r, head) after chunk_pair_grads, which owns no other program's
    row. Every step is a [BH, BK] vector: at most BC - 1 of them per block of K, where
    chunk_pair_grads' token loop runs BC steps over [BC, BK] tiles in one program per
    sub-chunk (BT times fewer, longer programs). Memory: q, k, G of the sub-chunk's rows
    again (L1/L2 hits), P and dL's diagonal blocks, and one more read and write of dq, dk,
    dG (fp32) than with the token loop inside chunk_pair_grads."""
    eos, t0, i_r0, r0, hb = token_program(cu_seqlens, chunks, T, NBH, HV, BT, BH, IS_VARLEN, SPAN)
    if r0 < eos:
        hv = hb * BH + tl.arange(0, BH)  # the block's value heads
        m_h = hv < HV
        h = hv // (HV // H)
        last = tl.minimum(t0 + BT, eos) - 1
        if chunk_selected(Rs, last, HV, hv, K, KP, ONLY):  # ONLY: ChunkBlocks.reset_passes
            for s in range(SPAN):  # the span's tokens (ChunkBlocks.span)
                i_r = i_r0 + s
                r = r0 + s
                if span_has(r, eos, SPAN):
                    rr, hq, hg = r + hv * 0, h[:, None], hv[:, None]  # load_rows' rows: r for every head
                    jr = i_r % BC  # r's place in its sub-chunk
                    a = r - jr  # the sub-chunk's first token
                    w_r = (r * HV + hv) * BT + (i_r - jr)  # P[r, a + j] at w_r + j
                    n_in = tl.minimum(eos - a, BC)  # the sub-chunk's tokens inside the sequence
                    b_r = tl.load(beta + r * HV + hv, mask=m_h, other=0.0).to(tl.float32)
                    p_diag = tl.load(P + w_r + jr, mask=m_h, other=0.0)  # P[r, r]
                    db = tl.load(dbeta + r * HV + hv, mask=m_h, other=0.0)
                    for i_k in range(0, (K + BK - 1) // BK):
                        cols = i_k * BK + tl.arange(0, BK)
                        m_k = m_h[:, None] & (cols[None, :] < K)
                        q_r = load_rows(q, rr, m_h, H, hq, cols, K)
                        k_r = load_rows(k, rr, m_h, H, hq, cols, K)
                        g_r = load_rows(G, rr, m_h, HV, hg, cols, K)
                        c_r = load_counts(Rs, rr, m_h, HV, hg, cols, K, RESETS)
                        row_pq = tl.zeros([BH, BK], dtype=tl.float32)  # rowpair(P, K) at r
                        row_pl = tl.zeros([BH, BK], dtype=tl.float32)  # rowpair(dL, K) at r
                        col = tl.zeros([BH, BK], dtype=tl.float32)  # colpair(P, Q) + colpair(beta dL, K) at r
                        for j in range(0, jr):  # earlier tokens of the sub-chunk: r's row terms
                            s_j = a + j + hv * 0
                            same = c_r == load_counts(Rs, s_j, m_h, HV, hg, cols, K, RESETS)  # no reset in (j, r]
                            ke = load_rows(k, s_j, m_h, H, hq, cols, K) * tl.exp(
                                tl.where(same, g_r - load_rows(G, s_j, m_h, HV, hg, cols, K), float("-inf"))
                            )
                            row_pq += tl.load(P + w_r + j, mask=m_h, other=0.0)[:, None] * ke
                            row_pl += tl.load(DL + w_r + j, mask=m_h, other=0.0)[:, None] * ke
                        for j in range(jr + 1, n_in):  # later tokens: r as their column
                            s_j = a + j + hv * 0
                            same = c_r == load_counts(Rs, s_j, m_h, HV, hg, cols, K, RESETS)
                            w_j = (s_j * HV + hv) * BT + i_r  # P[a + j, r]
                            b_j = tl.load(beta + s_j * HV + hv, mask=m_h, other=0.0).to(tl.float32)
                            p_c = tl.load(P + w_j, mask=m_h, other=0.0)
                            lb_c = b_j * tl.load(DL + w_j, mask=m_h, other=0.0)
                            term = p_c[:, None] * load_rows(q, s_j, m_h, H, hq, cols, K)
                            term += lb_c[:, None] * load_rows(k, s_j, m_h, H, hq, cols, K)
                            col += term * tl.exp(
                                tl.where(same, load_rows(G, s_j, m_h, HV, hg, cols, K) - g_r, float("-inf"))
                            )
                        out_k = (r * HV + hg) * K + cols[None, :]
                        dq_c = tl.load(dq + out_k, mask=m_k, other=0.0)  # chunk_grads' and chunk_pair_grads' parts
                        dk_c = tl.load(dk + out_k, mask=m_k, other=0.0)
                        dG = tl.load(dg + out_k, mask=m_k, other=0.0)
                        dq_c += row_pq + p_diag[:, None] * k_r  # P[r, r]: dq and dk only (chunk_pair_grads says why)
                        dG += q_r * row_pq
                        db += tl.sum(k_r * row_pl, axis=1)
                        dk_c += b_r[:, None] * row_pl + col + p_diag[:, None] * q_r
                        dG += (b_r[:, None] * k_r) * row_pl - k_r * col
                        tl.store(dq + out_k, dq_c, mask=m_k)
                        tl.store(dk + out_k, dk_c, mask=m_k)
                        tl.store(dg + out_k, dG, mask=m_k)
                    tl.store(dbeta + r * HV + hv, db, mask=m_h)


@triton.jit(do_not_specialize=["T", "NBH"])
def chunk_dg_cumsum(
    dg, Rs, cu_seqlens, chunks, T, NBH,
    HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, RESETS: tl.constexpr, ONLY: tl.constexpr = 0, KP: tl.constexpr = 16,
    ROWS: tl.constexpr = False,
):  # fmt: skip
    """dg [B*T, HV, K] fp32 in place: dg_r = the sum of dG_s over s >= r inside r's chunk (G is
    the in-chunk cumulative sum of g), restarted at each reset: a reset token's g (-inf)
    gets 0, as in the oracle (its decay multiplies a zero state).

    ROWS (ChunkBlocks.DG_ROWS): the chunk's rows walked from its last back to its first, BK
    columns at a time, one running sum per column (restarted where the reset count changes),
    instead of a [BT, BK] tile's scan (no reset) or its BT masked sums (a reset): each row
    read and written once, no shared memory. The sums then run in the other order (each
    suffix summed directly, without the scan's total - prefix cancellation). The restart at
    a reset and the zero at a reset token change only rounding: past a reset the loss depends
    on G only through differences inside the segment (the state entering the chunk is cut),
    so the segment's dG sums to zero (a mutant without either passed the oracle tests)."""
    i_c, i_bh = one_dim_grid(NBH)
    i_b, i_hv = i_bh // HV, i_bh % HV
    _, _, eos, t0 = chunk_span(i_c, i_b, cu_seqlens, chunks, T, BT, IS_VARLEN)
    last = tl.minimum(t0 + BT, eos) - 1
    if chunk_selected(Rs, last, HV, i_hv + tl.arange(0, 1), K, KP, ONLY):  # ONLY: ChunkBlocks.reset_passes
        if ROWS:
            for i_k in range(0, (K + BK - 1) // BK):
                cols = i_k * BK + tl.arange(0, BK)
                acc = tl.zeros([BK], dtype=tl.float32)
                cnt_next = load_counts_row(Rs, last, True, HV, i_hv, cols, K, RESETS)
                for j in range(0, last - t0 + 1):
                    r = last - j
                    ptr = dg + (r * HV + i_hv) * K + cols
                    cnt = load_counts_row(Rs, r, True, HV, i_hv, cols, K, RESETS)
                    acc = tl.where(cnt == cnt_next, acc, 0.0) + tl.load(ptr, mask=cols < K, other=0.0)
                    cnt_prev = load_counts_row(Rs, r - 1, r > t0, HV, i_hv, cols, K, RESETS)
                    tl.store(ptr, tl.where(cnt > cnt_prev, 0.0, acc), mask=cols < K)  # a reset token: 0
                    cnt_next = cnt
        else:
            o_t = tl.arange(0, BT)
            rows = t0 + o_t
            m = rows < eos
            for i_k in range(0, (K + BK - 1) // BK):
                cols = i_k * BK + tl.arange(0, BK)
                m_k = m[:, None] & (cols[None, :] < K)
                out_k = (rows[:, None] * HV + i_hv) * K + cols[None, :]
                dG = tl.load(dg + out_k, mask=m_k, other=0.0)
                cnt_c = load_counts(Rs, rows, m, HV, i_hv, cols, K, RESETS)
                if tl.max(tl.max(cnt_c, axis=1), axis=0) > 0:
                    dg_c = tl.zeros([BT, BK], dtype=tl.float32)
                    for s in range(0, BT):
                        at_s = (o_t == s)[:, None]
                        dG_s = tl.sum(tl.where(at_s, dG, 0.0), axis=0)
                        c_s = tl.sum(tl.where(at_s, cnt_c, 0), axis=0)
                        dg_c += tl.where((o_t <= s)[:, None] & (cnt_c == c_s[None, :]), dG_s[None, :], 0.0)
                    prev = load_counts(Rs, rows - 1, m & (o_t > 0), HV, i_hv, cols, K, RESETS)
                    dg_c = tl.where(cnt_c > prev, 0.0, dg_c)
                else:
                    dg_c = dG - tl.cumsum(dG, axis=0) + tl.sum(dG, axis=0)[None, :]  # sum over s >= r
                tl.store(dg + out_k, dg_c, mask=m_k)
