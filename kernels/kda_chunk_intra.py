"""The per-chunk stages of chunk_kda (DESIGN.md section 4): everything that does not depend on
the state entering a chunk.

    chunk_gate_cumsum   (chunk, block of K, value head)
                        G = inclusive cumulative sum of g inside each chunk (summed in fp64,
                        stored fp32), with the gate computed from z first when asked
    chunk_pairs         (chunk, value head, sub-chunk)
                        Aqk  = scale * Tril((Gam * Q)(K / Gam)^T)          (diagonal included)
                        L    = StrictTril(Diag(beta) (Gam * K)(K / Gam)^T)   (eq. (6)), fp32
                        (on a GPU without the diagonal 16 x 16 tiles: chunk_diag forms them)
    chunk_diag          (chunk, block of value heads, token)   the diagonal tiles' rows
    chunk_solve         (chunk, value head)      M = (I + L)^{-1} Diag(beta) (eq. (6))

Layouts (tokens flattened over the batch, t in [0, B*T)): q, k [B*T, H, K]; g, G [B*T, HV, K];
beta [B*T, HV]; Aqk, L, M [B*T, HV, BT] (row t holds its chunk's row of the BT x BT
matrix, column j is the chunk's j-th token). Chunks: NT per sequence; with cu_seqlens a
table [NC, 2] of (sequence, chunk within the sequence).

Bounded exponents (the bug class of DESIGN.md section 4): Gam_r / Gam_i = exp(G_r - G_i) is
never formed as exp(G_r) * exp(-G_i). The chunk is cut into BC = 16-token sub-chunks. The
tiles strictly below the diagonal (sub-chunk rows I, columns J < I) factor around the anchor
a = the first row of sub-chunk I: exp(G_r - G_a) * exp(G_a - G_i), both exponents <= 0
because g <= 0 and i < a <= r. The anchor is at or before every row that uses it, so no gate
of a token after r enters row r, not even through rounding. Diagonal tiles are formed
elementwise, exp(G_r - G_i) masked to i <= r. Rows past the end of a sequence get exponent
-inf (factor 0), never exp of a positive number.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .runtime import INTERPRET as _INTERPRET

L2NORM_EPS: tl.constexpr = tl.constexpr(1e-6)  # reference/gates.L2NORM_EPS
INTERPRET: tl.constexpr = tl.constexpr(_INTERPRET)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x rounded to dtype (to nearest, ties to even), returned in dtype: a GPU's
    conversion rounds so, and under the interpreter runtime.py makes its float32 ->
    bfloat16 cast round so too (Triton 3.6's truncates). It rounded on the bits here before,
    in eight interpreted operations; the two agree bit for bit (ties, NaN, Inf, 2026-11-28)."""
    return x.to(dtype)


@triton.jit
def mma(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation, the fp32 operands rounded to DOT_DTYPE first. Under the
    interpreter a bfloat16 tl.dot returns garbage (Triton 3.6 with NumPy 2.4 multiplies the
    bf16 bits as integers), so there the rounded operands are multiplied in fp32, which is
    exact for bf16 products; on a GPU the tensor cores read DOT_DTYPE operands directly."""
    if INTERPRET:
        a = round_to(a, DOT_DTYPE).to(tl.float32)
        b = round_to(b, DOT_DTYPE).to(tl.float32)
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit
def mma_split(a, x, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """a @ x with x carried to about 16 bits through 16-bit dots: x = hi + lo, both rounded
    to DOT_DTYPE, two dots (a is rounded once, as in mma). For V' = M (V - W S): rounding
    V - W S to bf16 before M, and V' again as the operand of the state update, put a bias of
    up to 4x its budget on bf16 final states at K = V = 256, where the reference rounds V'
    once (kernels/NOTES.md "bf16 rounding of V - W S"). The forward (chunk_recurrence) and
    the backward's recomputation of V' (chunk_grads) both use it, so they agree. With fp32
    dots (tf32 or ieee) one dot, as mma."""
    if DOT_DTYPE == tl.float32:
        return mma(a, x, DOT_DTYPE, PRECISION)
    else:
        hi = round_to(x, DOT_DTYPE).to(tl.float32)
        return mma(a, hi, DOT_DTYPE, PRECISION) + mma(a, x - hi, DOT_DTYPE, PRECISION)


@triton.jit
def mma_hilo(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with both operands carried to about 16 bits through 16-bit dots: a = a_hi +
    a_lo and b = b_hi + b_lo, each part rounded to DOT_DTYPE, three dots (a_lo b_lo, below
    the bf16 products' own rounding, is left out). For chunk_grads' pair terms, whose
    contributions to dG cancel in dg's reverse cumulative sum: with one bf16 dot each, dg
    and the gate-parameter gradients it feeds were up to 3.3x the bf16 references' error
    (ddt_bias 1.54e-2 against 4.7e-3, kernels/NOTES.md "bf16 pair terms of dg"); with three,
    2.3e-3 to 3.4e-3, the same as fp32 dots. With fp32 dots (tf32 or ieee) one dot, as mma."""
    if DOT_DTYPE == tl.float32:
        return mma(a, b, DOT_DTYPE, PRECISION)
    else:
        a_hi = round_to(a, DOT_DTYPE).to(tl.float32)
        b_hi = round_to(b, DOT_DTYPE).to(tl.float32)
        hi = mma(a_hi, b_hi, DOT_DTYPE, PRECISION)
        return hi + mma(a_hi, b - b_hi, DOT_DTYPE, PRECISION) + mma(a - a_hi, b_hi, DOT_DTYPE, PRECISION)


@triton.jit
def one_dim_grid(inner):
    """(outer, inner) program indices of a one-dimensional grid of outer * inner programs.
    Grids are one-dimensional because CUDA caps the second and third grid axes at 65535, and
    both the chunk count (one long sequence) and the batch-times-heads count (many rows, or
    thousands of packed sequences times HV) pass that."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // inner, pid % inner


@triton.jit
def sequence_span(i_nh, chunk_first, cu_seqlens, T, NT, HV: tl.constexpr, H: tl.constexpr, IS_VARLEN: tl.constexpr):
    """For a program of the per-sequence launches (index i_nh = sequence * HV + value head):
    (sequence n, value head, its query/key head, first token bos, end eos, the row of its
    first chunk in the per-chunk buffers: chunk_first[n], or n * NT without cu_seqlens).
    chunk_first may be None where no per-chunk buffer is read (then c0 is 0 with cu_seqlens)."""
    i_n, i_hv = (i_nh // HV).to(tl.int64), i_nh % HV
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        if chunk_first is None:
            c0 = i_n * 0
        else:
            c0 = tl.load(chunk_first + i_n).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
        c0 = i_n * NT
    return i_n, i_hv, i_hv // (HV // H), bos, eos, c0


@triton.jit
def chunk_span(i_c, i_b, cu_seqlens, chunks, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(sequence n, first token bos, end eos, first token t0 of this chunk), int64."""
    if IS_VARLEN:
        n = tl.load(chunks + 2 * i_c).to(tl.int64)
        c = tl.load(chunks + 2 * i_c + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + n).to(tl.int64)
        eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    else:
        n = i_b.to(tl.int64)
        c = i_c.to(tl.int64)
        bos = n * T
        eos = bos + T
    return n, bos, eos, bos + c * BT


@triton.jit
def token_program(
    cu_seqlens, chunks, T, NBH, HV: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, IS_VARLEN: tl.constexpr,
    SPAN: tl.constexpr = 1,
):  # fmt: skip
    """This program's place in a token-parallel launch (chunk_diag, chunk_pair_grads_diag): one
    program per (chunk, block of BH value heads of one batch row, SPAN tokens of the chunk), a
    grid of NC * B * cdiv(HV, BH) * BT / SPAN. Returns (eos, t0: the chunk's first token, i_r:
    the place in the chunk of the span's first token, r = t0 + i_r, hb: the block of value
    heads); the program has work only where r < eos. (Its heads are formed by the caller
    inside that branch: returned from here they cost chunk_diag 162 -> 199 registers at sm_90.)"""
    NHB: tl.constexpr = (HV + BH - 1) // BH
    NS: tl.constexpr = BT // SPAN
    i_c, rest = one_dim_grid((NBH // HV) * NHB * NS)
    i_bhb, i_r = rest // NS, (rest % NS) * SPAN
    i_b, hb = i_bhb // NHB, i_bhb % NHB
    _, _, eos, t0 = chunk_span(i_c, i_b, cu_seqlens, chunks, T, BT, IS_VARLEN)
    return eos, t0, i_r, t0 + i_r, hb


@triton.jit
def load_beta(beta, rows, mask, HV: tl.constexpr, i_hv, SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr):
    """beta at token rows of value head i_hv in fp32 (0 where masked); sigmoid(b), or
    2 sigmoid(b) with negative eigenvalues allowed, when SIGMOID (reference/gates)."""
    b = tl.load(beta + rows * HV + i_hv, mask=mask, other=0.0).to(tl.float32)
    if SIGMOID:
        b = tl.where(mask, tl.sigmoid(b), 0.0)
        if NEG_EIGVAL:
            b = 2.0 * b
    return b


@triton.jit
def load_rows(x, rows, mask, heads, head, cols, D: tl.constexpr):
    """x[rows, head, cols] of a [tokens, heads, D] tensor as fp32 [len(rows), len(cols)], 0 outside."""
    return load_rows_stored(x, rows, mask, heads, head, cols, D).to(tl.float32)


@triton.jit
def load_rows_stored(x, rows, mask, heads, head, cols, D: tl.constexpr):
    """load_rows in x's own dtype: for a tile that only feeds mma (whose rounding to the dot
    dtype then gives the same operand bit for bit). Kept 16-bit, such a load can go straight
    to shared memory for the tensor cores, and Triton's pipeliner can issue it a chunk ahead;
    widened to fp32 it is held in registers (twice the bytes) and converted back."""
    ptr = x + (rows[:, None] * heads + head) * D + cols[None, :]
    return tl.load(ptr, mask=mask[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def load_qk_rows(q, k, rows, mask, H: tl.constexpr, i_h, cols, K: tl.constexpr, L2NORM: tl.constexpr, q_norm, k_norm):
    """q and k at token rows as fp32 [len(rows), len(cols)] (load_rows); with L2NORM divided
    by their row norms q_norm, k_norm and rounded to the input dtype, as the oracle's inputs."""
    q_r = load_rows(q, rows, mask, H, i_h, cols, K)
    k_r = load_rows(k, rows, mask, H, i_h, cols, K)
    if L2NORM:
        q_r = round_to(q_r / q_norm[:, None], q.dtype.element_ty).to(tl.float32)
        k_r = round_to(k_r / k_norm[:, None], k.dtype.element_ty).to(tl.float32)
    return q_r, k_r


@triton.jit
def load_counts(Rs, rows, mask, HV: tl.constexpr, i_hv, cols, K: tl.constexpr, RESETS: tl.constexpr):
    """Resets so far in the chunk at token rows, as int32 [len(rows), len(cols)]: from Rs
    [B*T, HV, K] int8 when the gate is given (RESETS), else zeros (a gate computed in the
    kernel is finite)."""
    if RESETS:
        ptr = Rs + (rows[:, None] * HV + i_hv) * K + cols[None, :]
        return tl.load(ptr, mask=mask[:, None] & (cols[None, :] < K), other=0).to(tl.int32)
    else:
        return rows[:, None].to(tl.int32) * 0 + cols[None, :] * 0


@triton.jit
def load_counts_row(Rs, row, ok, HV: tl.constexpr, i_hv, cols, K: tl.constexpr, RESETS: tl.constexpr):
    """load_counts at one token (a scalar row, read when ok) as int32 [len(cols)]."""
    if RESETS:
        return tl.load(Rs + (row * HV + i_hv) * K + cols, mask=ok & (cols < K), other=0).to(tl.int32)
    else:
        return cols * 0


@triton.jit
def chunk_selected(Rs, last, HV: tl.constexpr, hv, K: tl.constexpr, KP: tl.constexpr, ONLY: tl.constexpr):
    """Whether a program of a launch split by resets (ONLY: 0, no split: every chunk; 1, the
    chunks without a reset, compiled with RESETS off; 2, the chunks holding one) has work, for
    value heads hv ([NH]; a block of heads holds a reset if one of them does). Rs counts the
    resets from the chunk's start (chunk_gate_cumsum), so the counts of its last token `last`
    over all K columns (KP >= K lanes) are all zero exactly when the chunk has none.

    Why: the reset handling (counts loaded and compared for every pair) cost the forward 0.29 of
    2.77 ms with no reset anywhere (H200, B1 T16384 H32 K = V = 128 bf16, fifteenth session:
    chunk_pairs 0.570 -> 0.447 ms and chunk_diag 0.675 -> 0.530 when the gate, computed in
    the kernel, cannot hold one). A given g rarely holds -inf, so each such kernel runs twice
    (ChunkBlocks.reset_passes): RESETS off over the chunks without a reset, on over the rest.
    Measured: forward 2.78 -> 2.70 ms, fwd+bwd 14.28 -> 13.99 ms (ChunkBlocks.RESET_SPLIT)."""
    if ONLY == 0:
        return True  # a constexpr: the caller's `if` is resolved at compile time, no branch
    else:
        cols = tl.arange(0, KP)
        n = tl.load(Rs + (last * HV + hv[:, None]) * K + cols[None, :], mask=(hv < HV)[:, None] & (cols < K)[None, :],
                    other=0)  # fmt: skip
        has = tl.max(tl.max(n.to(tl.int32), axis=1), axis=0) > 0
        return has == (ONLY == 2)


@triton.jit
def span_has(x, end, SPAN: tl.constexpr):
    """Whether unit x (a sub-chunk's first token, or a token) of a program's span lies before
    end: x < end, or a constexpr True for a span of one unit, whose program checked it already
    (so an unsplit launch compiles to its code without spans)."""
    if SPAN == 1:
        return True
    else:
        return x < end


@triton.jit
def chunk_decays(G, Rs, rows, m, last, HV: tl.constexpr, i_hv, cols, K: tl.constexpr, RESETS: tl.constexpr):
    """The decays of one chunk, every exponent <= 0 and a reset (g = -inf) honoured exactly:
    G holds the in-chunk cumulative sum restarted at each reset, Rs the resets so far
    (load_counts). Returns (g_c, cnt_c) [BT, BK] for pair terms, e_g = Gam_r = exp(G_r) (0 once
    a reset lies in [start, r]), e_d = Gam_C / Gam_r = exp(G_C - G_r) (0 if a reset lies in
    (r, C]), and gam_c = Gam_C [BK]. Rows outside the sequence get 0 in e_g and e_d."""
    g_c = load_rows(G, rows, m, HV, i_hv, cols, K)
    cnt_c = load_counts(Rs, rows, m, HV, i_hv, cols, K, RESETS)
    e_g, e_d = row_decays(G, Rs, g_c, cnt_c, m, last, HV, i_hv, cols, K, RESETS)
    return g_c, cnt_c, e_g, e_d, chunk_end_decay(G, Rs, last, HV, i_hv, cols, K, RESETS)


@triton.jit
def chunk_end_decay(G, Rs, last, HV: tl.constexpr, i_hv, cols, K: tl.constexpr, RESETS: tl.constexpr):
    """Gam_C = exp(G_C) [len(cols)] at the chunk's last token `last` (0 once a reset lies in
    the chunk): the decay of the state across the chunk.

    The one factor the carried state takes at every chunk, so its error compounds over the
    sequence (under beta = 0 it is the whole final state). fp32 exp on the GPU is ex2.approx of
    x * log2(e) rounded to fp32: a relative error of about |x| * 1e-8 with a fixed sign, and a
    chunk of strong gates has |G_C| ~ 50. Measured on an H100: beta_zero float32 final state
    rel RMS 1.03e-6, almost all of it bias (1.02e-6), against a budget of 6.35e-7 (B1 T17
    seqlens (10, 7), K = V = 256, strong gate). So it runs in fp64 (libdevice exp, correctly
    rounded to within an ulp at any |x|) and is rounded once to fp32: BK exps per chunk, off
    the [BT, BK] critical path, as the decode kernel's per-token decay does."""
    g_last = tl.load(G + (last * HV + i_hv) * K + cols, mask=cols < K, other=0.0)
    cnt_last = load_counts_row(Rs, last, last >= 0, HV, i_hv, cols, K, RESETS)
    return tl.exp(tl.where(cnt_last == 0, g_last, float("-inf")).to(tl.float64)).to(tl.float32)


@triton.jit
def row_decays(G, Rs, g_c, cnt_c, m, last, HV: tl.constexpr, i_hv, cols, K: tl.constexpr, RESETS: tl.constexpr):
    """e_g = Gam_r = exp(G_r) and e_d = Gam_C / Gam_r = exp(G_C - G_r) at rows whose G and
    reset counts are g_c, cnt_c (masked by m: 0 outside), C = the chunk's last token `last`;
    0 where a reset lies in [start, r] (e_g) or in (r, C] (e_d). Every exponent <= 0."""
    g_last = tl.load(G + (last * HV + i_hv) * K + cols, mask=cols < K, other=0.0)
    cnt_last = load_counts_row(Rs, last, last >= 0, HV, i_hv, cols, K, RESETS)
    e_g = tl.exp(tl.where(m[:, None] & (cnt_c == 0), g_c, float("-inf")))
    e_d = tl.exp(tl.where(m[:, None] & (cnt_c == cnt_last[None, :]), g_last[None, :] - g_c, float("-inf")))
    return e_g, e_d


@triton.jit
def _gate_values(x, cols, i_hv, A_log, dt_bias, lower_bound, K: tl.constexpr, GATE: tl.constexpr,
                 HAS_DT_BIAS: tl.constexpr):  # fmt: skip
    """The gate from its raw input x ([rows, len(cols)] or [len(cols)], fp32) for GATE 1
    (-exp(A_log) softplus(x + dt_bias)) or 2 (lower_bound sigmoid(exp(A_log) (x + dt_bias)))."""
    if HAS_DT_BIAS:
        x += tl.load(dt_bias + i_hv * K + cols, mask=cols < K, other=0.0)
    a = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
    if GATE == 1:
        # softplus(x) = max(x, 0) + log(1 + exp(-|x|)), with no overflow for large |x|
        return -a * (tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))
    else:
        return lower_bound * tl.sigmoid(a * x)


@triton.jit
def _gate_cumsum_rows(
    g, G, Rs, A_log, dt_bias, lower_bound, cu_seqlens, chunks, T, NBH,
    HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
    IS_VARLEN: tl.constexpr, GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
):  # fmt: skip
    """chunk_gate_cumsum with ROWS: one row of BK columns at a time (its docstring)."""
    i_ck, i_bh = one_dim_grid(NBH)
    i_c, i_kb = i_ck // NKB, i_ck % NKB
    i_b, i_hv = i_bh // HV, i_bh % HV
    _, _, eos, t0 = chunk_span(i_c, i_b, cu_seqlens, chunks, T, BT, IS_VARLEN)
    cols = i_kb * BK + tl.arange(0, BK)
    mc = cols < K
    acc = tl.zeros([BK], dtype=tl.float64)
    cnt = tl.zeros([BK], dtype=tl.int32)
    for r in range(0, tl.minimum(eos - t0, BT)):
        ptr = ((t0 + r) * HV + i_hv) * K + cols
        x = tl.load(g + ptr, mask=mc, other=0.0).to(tl.float32)
        if GATE != 0:
            acc += tl.where(mc, _gate_values(x, cols, i_hv, A_log, dt_bias, lower_bound, K, GATE, HAS_DT_BIAS),
                            0.0).to(tl.float64)  # fmt: skip
        else:
            reset = mc & (x == float("-inf"))
            cnt += reset.to(tl.int32)
            tl.store(Rs + ptr, cnt.to(tl.int8), mask=mc)
            acc = tl.where(reset, 0.0, acc + tl.where(reset, 0.0, x).to(tl.float64))
        tl.store(G + ptr, acc.to(tl.float32), mask=mc)


@triton.jit
def _gate_cumsum_tile(
    g, G, Rs, A_log, dt_bias, lower_bound, cu_seqlens, chunks, T, NBH,
    HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
    IS_VARLEN: tl.constexpr, GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
):  # fmt: skip
    """chunk_gate_cumsum without ROWS: the [BT, BK] tile at once, a scan over its rows."""
    i_ck, i_bh = one_dim_grid(NBH)
    i_c, i_kb = i_ck // NKB, i_ck % NKB
    i_b, i_hv = i_bh // HV, i_bh % HV
    _, _, eos, t0 = chunk_span(i_c, i_b, cu_seqlens, chunks, T, BT, IS_VARLEN)
    rows = t0 + tl.arange(0, BT)
    cols = i_kb * BK + tl.arange(0, BK)
    m = rows < eos
    x = load_rows(g, rows, m, HV, i_hv, cols, K)
    if GATE != 0:
        x = tl.where(m[:, None] & (cols[None, :] < K), _gate_values(x, cols, i_hv, A_log, dt_bias, lower_bound, K,
                                                                    GATE, HAS_DT_BIAS), 0.0)  # fmt: skip
    keep = m[:, None] & (cols[None, :] < K)
    ptr = (rows[:, None] * HV + i_hv) * K + cols[None, :]
    if GATE == 0:
        reset = (keep & (x == float("-inf"))).to(tl.int32)
        # the reset counts' scan only where this block holds a reset: a reduction, where every
        # block paid a second scan before (the counts are 0 everywhere else, as the scan gives)
        if tl.max(tl.max(reset, axis=1), axis=0) > 0:
            cnt = tl.cumsum(reset, axis=0)
            tl.store(Rs + ptr, cnt.to(tl.int8), mask=keep)
            x = tl.where(reset > 0, 0.0, x)
            # segmented sum, one source row j at a time: G_r = sum of x_j, j <= r, same segment
            o = tl.arange(0, BT)
            Gc = tl.zeros([BT, BK], dtype=tl.float64)
            for j in range(0, BT):
                at_j = (o == j)[:, None]
                x_j = tl.sum(tl.where(at_j, x, 0.0), axis=0).to(tl.float64)
                c_j = tl.sum(tl.where(at_j, cnt, 0), axis=0)
                Gc += tl.where((o >= j)[:, None] & (cnt == c_j[None, :]), x_j[None, :], 0.0)
        else:
            tl.store(Rs + ptr, tl.zeros([BT, BK], dtype=tl.int8), mask=keep)
            Gc = tl.cumsum(x.to(tl.float64), axis=0)
    else:
        Gc = tl.cumsum(x.to(tl.float64), axis=0)
    # summed in fp64 and rounded to fp32 once: G's error is carried by every decay of the
    # chunk (under beta = 0 it is all of the final state's). With the fp32 scan, the CPU
    # conformance run failed beta_zero float32 (final state at 1.2x its budget: B2 T11 K = V =
    # 2, logsigmoid gates, h0), whose references sum the gates with torch.cumsum (float64
    # accumulation on the CPU, one rounding); with this sum it is at 0.18x.
    tl.store(G + ptr, Gc.to(tl.float32), mask=keep)


@triton.jit(do_not_specialize=["T", "NBH"])  # lengths: one compile for any T (NOTES.md, "Lengths not specialized")
def chunk_gate_cumsum(
    g, G, Rs, A_log, dt_bias, lower_bound, cu_seqlens, chunks, T, NBH,
    HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr,
    IS_VARLEN: tl.constexpr, GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr, ROWS: tl.constexpr = False,
):  # fmt: skip
    """G [B*T, HV, K] fp32 = the in-chunk inclusive cumulative sum of g, BK of the K columns per
    program (NKB programs per chunk and value head). GATE: 0 = g as given;
    1 = g = -exp(A_log) softplus(z + dt_bias); 2 = g = lower_bound sigmoid(exp(A_log) (z + dt_bias)).

    g = -inf is a hard reset (the state is wiped; DESIGN.md's contract includes it). With g
    as given (GATE 0) Rs [B*T, HV, K] int8 counts the resets in [chunk start, r], and the sum
    restarts after each one (G = 0 at the reset itself), so that a ratio Gam_r / Gam_i is
    exp(G_r - G_i) between tokens of one segment and 0 across a reset (chunk_decays): no
    -inf - -inf. Without a reset in the chunk this is the plain cumulative sum, bit for bit.

    ROWS (ChunkBlocks.CUMSUM_ROWS): the chunk's rows in turn, each [BK] row added to a running
    fp64 sum held per column (restarted at a reset) and stored at once, instead of a scan
    across the [BT, BK] tile (whose sm_90 code at BK 32 on 4 warps has 379 shuffles and 20
    barriers) and the segmented sum's loop over source rows where a reset lies. The same sums
    in the same order as the scan under the interpreter (bit for bit there); on a GPU the
    scan's tree order can differ in the fp64 sum's last bits, rarely in the fp32 rounding."""
    if ROWS:
        _gate_cumsum_rows(g, G, Rs, A_log, dt_bias, lower_bound, cu_seqlens, chunks, T, NBH,
                          HV, K, BT, BK, NKB, IS_VARLEN, GATE, HAS_DT_BIAS)  # fmt: skip
    else:
        _gate_cumsum_tile(g, G, Rs, A_log, dt_bias, lower_bound, cu_seqlens, chunks, T, NBH,
                          HV, K, BT, BK, NKB, IS_VARLEN, GATE, HAS_DT_BIAS)  # fmt: skip


@triton.jit(do_not_specialize=["T", "NBH"])  # lengths: one compile for any T (NOTES.md, "Lengths not specialized")
def chunk_pairs(
    q, k, G, Rs, beta, Aqk, L, QG, KG, KD, cu_seqlens, chunks, scale, T, NBH,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    IS_VARLEN: tl.constexpr, RESETS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DIAG_COLS: tl.constexpr,
    ONLY: tl.constexpr = 0, KP: tl.constexpr = 16, SPAN: tl.constexpr = 1,
):  # fmt: skip
    """The rows of one sub-chunk I (BC tokens) of one chunk of one value head: Aqk [BC, BT]
    (diagonal included; in the Aqk buffer's dtype) and L = StrictTril(Diag(beta) ...) [BC, BT]
    in fp32 (the L buffer, read by chunk_solve). Rows past the sequence end are not written.
    Also the recurrence's operands of these rows, [BC, K] in the dot operand dtype:
    QG = scale * Gam * Q, KG = Gam * K, KD = (Gam_C / Gam) * K (kda_chunk_inter), so that the
    sequential recurrence reads them ready for its dots and forms no exponent.

    One program per (chunk, value head, sub-chunk): four per chunk, each holding [BC, BK] and
    [BT, BK] tiles (BK <= 32), where one program per chunk held [BT, BK] tiles of everything
    and the [BT, BT] solve (3.3 ms at B1 T16K H32 on an H100, 4 warps). K is summed in blocks
    of BK; the L2 norm takes a first pass for the row norms.

    Columns of the sub-chunk itself (the diagonal tile): elementwise, exp(G_r - G_j) masked to
    j <= r. With DIAG_COLS = 1, one column j per step inside the loop over K blocks, added
    into the [BC, BT] accumulators; with DIAG_COLS = DC > 1, after that loop, DC columns per
    step as [BC, DC, BK] products, each step's [BC, DC] block stored on its own (the same
    products and sums in the same order: bitwise equal under the interpreter); with
    DIAG_COLS = 0 not here at all: chunk_diag writes it, one program per token. DC = BC is the
    interpreter's form (one step); on an H100 its forerunner, all [BC, BC] pairs at once in
    the K loop, was 1.5x slower than the column loop (2.58 -> 3.93 ms, kernels/NOTES.md).
    Earlier columns (sub-chunks J < I): one dot around the anchor a = the first row of
    sub-chunk I, exp(G_r - G_a) exp(G_a - G_i), both <= 0: over all BT rows of the chunk, the
    rows from a on masked to 0. (One [BC, BC] block per earlier sub-chunk instead, loading and
    exponentiating only the I * BC rows needed, was slower on an H200: 0.484 -> 0.562 ms,
    kernels/NOTES.md, twenty-second session.)"""
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
            a = t0 + I * BC  # the anchor: this sub-chunk's first token
            if span_has(a, eos, SPAN):
                o = tl.arange(0, BC)
                oc = tl.arange(0, BT)
                rows = a + o
                m = rows < eos
                prev = t0 + oc  # the chunk's tokens; those before the anchor are the earlier columns
                m_prev = oc < I * BC
                b_r = load_beta(beta, rows, m, HV, i_hv, BETA_SIGMOID, NEG_EIGVAL)
                if L2NORM:  # row norms over all of K first (each block below sees BK columns)
                    q_ss = tl.zeros([BC], dtype=tl.float32)
                    k_ss = tl.zeros([BC], dtype=tl.float32)
                    p_ss = tl.zeros([BT], dtype=tl.float32)
                    for i_k in range(0, (K + BK - 1) // BK):
                        cols = i_k * BK + tl.arange(0, BK)
                        x = load_rows(q, rows, m, H, i_h, cols, K)
                        q_ss += tl.sum(x * x, axis=1)
                        x = load_rows(k, rows, m, H, i_h, cols, K)
                        k_ss += tl.sum(x * x, axis=1)
                        x = load_rows(k, prev, m_prev, H, i_h, cols, K)
                        p_ss += tl.sum(x * x, axis=1)
                    q_norm = tl.sqrt(q_ss + L2NORM_EPS)  # x / sqrt(sum x^2 + eps), as reference/gates.l2norm
                    k_norm = tl.sqrt(k_ss + L2NORM_EPS)
                    p_norm = tl.sqrt(p_ss + L2NORM_EPS)
                else:  # not read (load_qk_rows takes them only with L2NORM)
                    q_norm = tl.full([BC], 1.0, tl.float32)
                    k_norm = tl.full([BC], 1.0, tl.float32)

                a_qk = tl.zeros([BC, BT], dtype=tl.float32)
                a_kk = tl.zeros([BC, BT], dtype=tl.float32)
                for i_k in range(0, (K + BK - 1) // BK):
                    cols = i_k * BK + tl.arange(0, BK)
                    q_r, k_r = load_qk_rows(q, k, rows, m, H, i_h, cols, K, L2NORM, q_norm, k_norm)
                    g_r = load_rows(G, rows, m, HV, i_hv, cols, K)
                    cnt_r = load_counts(Rs, rows, m, HV, i_hv, cols, K, RESETS)  # a pair spans a reset: ratio 0
                    e_g, e_d = row_decays(G, Rs, g_r, cnt_r, m, last, HV, i_hv, cols, K, RESETS)
                    ops = (rows[:, None] * HV + i_hv) * K + cols[None, :]
                    m_ops = m[:, None] & (cols[None, :] < K)
                    tl.store(QG + ops, round_to(q_r * (scale * e_g), QG.dtype.element_ty), mask=m_ops)
                    tl.store(KG + ops, round_to(k_r * e_g, KG.dtype.element_ty), mask=m_ops)
                    tl.store(KD + ops, round_to(k_r * e_d, KD.dtype.element_ty), mask=m_ops)
                    q_r = q_r * scale

                    if DIAG_COLS == 1:  # the diagonal tile, one column j (token a + j) per step
                        for j in range(BC):
                            src = a + j
                            ok = src < eos
                            k_j = tl.load(k + (src * H + i_h) * K + cols, mask=ok & (cols < K), other=0.0).to(
                                tl.float32
                            )
                            if L2NORM:  # token a + j is row j of this sub-chunk
                                norm_j = tl.sum(tl.where(o == j, k_norm, 0.0), axis=0)
                                k_j = round_to(k_j / norm_j, k.dtype.element_ty).to(tl.float32)
                            g_j = tl.load(G + (src * HV + i_hv) * K + cols, mask=ok & (cols < K), other=0.0)
                            same = cnt_r == load_counts_row(Rs, src, ok, HV, i_hv, cols, K, RESETS)[None, :]
                            use = (m & (o >= j))[:, None] & same  # i <= r, inside the sequence
                            k_j = k_j[None, :] * tl.exp(tl.where(use, g_r - g_j[None, :], float("-inf")))
                            at_j = (oc == I * BC + j)[None, :]
                            a_qk += tl.where(at_j, tl.sum(q_r * k_j, axis=1)[:, None], 0.0)
                            a_kk += tl.where(at_j & (o > j)[:, None], tl.sum(k_r * k_j, axis=1)[:, None], 0.0)

                    # the earlier sub-chunks, around the anchor (a reset between i and r lies in
                    # (i, a] or in (a, r]: one of the two factors is 0)
                    if I > 0:
                        g_a = tl.load(G + (a * HV + i_hv) * K + cols, mask=cols < K, other=0.0)
                        cnt_a = load_counts_row(Rs, a, a < eos, HV, i_hv, cols, K, RESETS)
                        k_p = load_rows(k, prev, m_prev, H, i_h, cols, K)
                        if L2NORM:
                            k_p = round_to(k_p / p_norm[:, None], k.dtype.element_ty).to(tl.float32)
                        g_p = load_rows(G, prev, m_prev, HV, i_hv, cols, K)
                        same_p = load_counts(Rs, prev, m_prev, HV, i_hv, cols, K, RESETS) == cnt_a[None, :]
                        e_r = tl.exp(
                            tl.where(m[:, None] & (cnt_r == cnt_a[None, :]), g_r - g_a[None, :], float("-inf"))
                        )
                        e_p = tl.exp(tl.where(m_prev[:, None] & same_p, g_a[None, :] - g_p, float("-inf")))
                        k_p = tl.trans(k_p * e_p)
                        a_qk += mma(q_r * e_r, k_p, DOT_DTYPE, PRECISION)
                        a_kk += mma(k_r * e_r, k_p, DOT_DTYPE, PRECISION)

                out = (rows[:, None] * HV + i_hv) * BT + oc[None, :]
                if DIAG_COLS == 1:
                    tl.store(Aqk + out, round_to(a_qk, Aqk.dtype.element_ty), mask=m[:, None])
                    tl.store(L + out, a_kk * b_r[:, None], mask=m[:, None])
                else:  # every column but the diagonal tile's here (disjoint stores: no element written twice)
                    off_diag = m[:, None] & ((oc < I * BC) | (oc >= I * BC + BC))[None, :]
                    tl.store(Aqk + out, round_to(a_qk, Aqk.dtype.element_ty), mask=off_diag)
                    tl.store(L + out, a_kk * b_r[:, None], mask=off_diag)
                if DIAG_COLS > 1:
                    # the diagonal tile, DIAG_COLS columns jc (tokens a + jc) per step, summed over the
                    # K blocks in the loop's order; rows and columns read again (L1/L2 hits)
                    for s in range(BC // DIAG_COLS):
                        jc = s * DIAG_COLS + tl.arange(0, DIAG_COLS)
                        src = a + jc
                        ok = src < eos
                        d_qk = tl.zeros([BC, DIAG_COLS], dtype=tl.float32)
                        d_kk = tl.zeros([BC, DIAG_COLS], dtype=tl.float32)
                        for i_k in range(0, (K + BK - 1) // BK):
                            cols = i_k * BK + tl.arange(0, BK)
                            q_r, k_r = load_qk_rows(q, k, rows, m, H, i_h, cols, K, L2NORM, q_norm, k_norm)
                            k_c = load_rows(k, src, ok, H, i_h, cols, K)
                            if L2NORM:  # column jc is row jc of this sub-chunk: its norm is k_norm[jc]
                                norm_c = tl.sum(tl.where(o[None, :] == jc[:, None], k_norm[None, :], 0.0), axis=1)
                                k_c = round_to(k_c / norm_c[:, None], k.dtype.element_ty).to(tl.float32)
                            q_r = q_r * scale
                            g_r = load_rows(G, rows, m, HV, i_hv, cols, K)
                            g_c = load_rows(G, src, ok, HV, i_hv, cols, K)
                            same = (
                                load_counts(Rs, rows, m, HV, i_hv, cols, K, RESETS)[:, None, :]
                                == load_counts(Rs, src, ok, HV, i_hv, cols, K, RESETS)[None, :, :]
                            )
                            use = (m[:, None] & (o[:, None] >= jc[None, :]))[
                                :, :, None
                            ] & same  # j <= r, in the sequence
                            k_d = k_c[None, :, :] * tl.exp(
                                tl.where(use, g_r[:, None, :] - g_c[None, :, :], float("-inf"))
                            )
                            d_qk += tl.sum(q_r[:, None, :] * k_d, axis=2)
                            d_kk += tl.sum(k_r[:, None, :] * k_d, axis=2)
                        out_d = (rows[:, None] * HV + i_hv) * BT + I * BC + jc[None, :]
                        tl.store(Aqk + out_d, round_to(d_qk, Aqk.dtype.element_ty), mask=m[:, None])
                        d_kk = tl.where(o[:, None] > jc[None, :], d_kk, 0.0)  # L is strictly lower triangular
                        tl.store(L + out_d, d_kk * b_r[:, None], mask=m[:, None])


@triton.jit(do_not_specialize=["T", "NBH"])  # lengths: one compile for any T (NOTES.md, "Lengths not specialized")
def chunk_diag(
    q, k, G, Rs, beta, Aqk, L, cu_seqlens, chunks, scale, T, NBH,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BH: tl.constexpr, IS_VARLEN: tl.constexpr, RESETS: tl.constexpr,
    L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr,
    ONLY: tl.constexpr = 0, KP: tl.constexpr = 16, SPAN: tl.constexpr = 1, EACH: tl.constexpr = False,
):  # fmt: skip
    """The diagonal tiles of Aqk and L, token-parallel (chunk_pairs with DIAG_COLS = 0 leaves
    them out): one program per (chunk, block of BH value heads of one batch row, token r of
    the chunk) writes row r's BC entries of its sub-chunk, exp(G_r - G_j) for j <= r, as
    [BH, BK] vectors (columns j > r: 0; L strictly lower). Where chunk_pairs walks the BC
    columns in sequence inside one program of BC rows, here each row is a program of its own,
    BT times more programs with a loop of at most BC steps over [BH, BK] tiles: many small
    independent programs to hide the loads' latency (flash-linear-attention's intra kernel
    takes the diagonal token by token too). Reads q, k, G of each row once and of its
    sub-chunk's earlier rows once more (L1/L2 hits): about one more read of q, k and G.

    The products and sums are chunk_pairs' own, in its order (K in blocks of BK, each block
    summed, blocks added in turn; q scaled before the product), so the tiles are bitwise those
    of the column loop under the interpreter (test_kda_chunk).

    EACH (only where one block of BK holds all of K): each column's two sums are stored as
    soon as they are formed, [BH] values to Aqk and L, after one masked store of zeros over
    the columns the loop does not reach, instead of being gathered into [BH, BC] tiles by a
    select and an add per column (ChunkBlocks.DIAG_EACH). The same values."""
    tl.static_assert((not EACH) or (BK >= K))
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
                    # one token r for a block of heads: load_rows' rows are r repeated, its head a column
                    rr, hq, hg = r + hv * 0, h[:, None], hv[:, None]
                    a = t0 + (i_r // BC) * BC  # the sub-chunk's first token
                    oj = tl.arange(0, BC)
                    b_r = load_beta(beta, r + hv * 0, m_h, HV, hv, BETA_SIGMOID, NEG_EIGVAL)
                    if L2NORM:  # row r's norms over all of K (chunk_pairs' first pass)
                        q_ss = tl.zeros([BH], dtype=tl.float32)
                        k_ss = tl.zeros([BH], dtype=tl.float32)
                        for i_k in range(0, (K + BK - 1) // BK):
                            cols = i_k * BK + tl.arange(0, BK)
                            x = load_rows(q, rr, m_h, H, hq, cols, K)
                            q_ss += tl.sum(x * x, axis=1)
                            x = load_rows(k, rr, m_h, H, hq, cols, K)
                            k_ss += tl.sum(x * x, axis=1)
                        q_norm = tl.sqrt(q_ss + L2NORM_EPS)
                        k_norm = tl.sqrt(k_ss + L2NORM_EPS)
                    d_qk = tl.zeros([BH, BC], dtype=tl.float32)
                    d_kk = tl.zeros([BH, BC], dtype=tl.float32)
                    out = (r * HV + hv[:, None]) * BT + (a - t0) + oj[None, :]
                    if EACH:  # the columns past r (Aqk) and from r on (L: strictly lower) are 0
                        tl.store(Aqk + out, d_qk.to(Aqk.dtype.element_ty), mask=m_h[:, None] & (oj > i_r % BC)[None, :])
                        tl.store(L + out, d_kk, mask=m_h[:, None] & (oj >= i_r % BC)[None, :])
                    # row r's q, k, G and counts loaded once per block of K, not once per column j;
                    # each column's sum over K is still block 0 + block 1 + ..., so bitwise the same
                    if L2NORM:  # the columns' norms first: column j's over all of K
                        n_j = tl.zeros([BH, BC], dtype=tl.float32)
                        for j in range(0, i_r % BC + 1):
                            j_ss = tl.zeros([BH], dtype=tl.float32)
                            for i_k in range(0, (K + BK - 1) // BK):
                                cols = i_k * BK + tl.arange(0, BK)
                                x = load_rows(k, a + j + hv * 0, m_h, H, hq, cols, K)
                                j_ss += tl.sum(x * x, axis=1)
                            n_j += tl.where((oj == j)[None, :], tl.sqrt(j_ss + L2NORM_EPS)[:, None], 0.0)
                    for i_k in range(0, (K + BK - 1) // BK):
                        cols = i_k * BK + tl.arange(0, BK)
                        q_r = load_rows(q, rr, m_h, H, hq, cols, K)
                        k_r = load_rows(k, rr, m_h, H, hq, cols, K)
                        if L2NORM:
                            q_r = round_to(q_r / q_norm[:, None], q.dtype.element_ty).to(tl.float32)
                            k_r = round_to(k_r / k_norm[:, None], k.dtype.element_ty).to(tl.float32)
                        q_r = q_r * scale
                        g_r = load_rows(G, rr, m_h, HV, hg, cols, K)
                        c_r = load_counts(Rs, rr, m_h, HV, hg, cols, K, RESETS)
                        for j in range(0, i_r % BC + 1):
                            src = a + j
                            at_j = (oj == j)[None, :]
                            k_j = load_rows(k, src + hv * 0, m_h, H, hq, cols, K)
                            if L2NORM:
                                norm_j = tl.sum(tl.where(at_j, n_j, 0.0), axis=1)
                                k_j = round_to(k_j / norm_j[:, None], k.dtype.element_ty).to(tl.float32)
                            g_j = load_rows(G, src + hv * 0, m_h, HV, hg, cols, K)
                            same = c_r == load_counts(Rs, src + hv * 0, m_h, HV, hg, cols, K, RESETS)
                            k_j = k_j * tl.exp(tl.where(same, g_r - g_j, float("-inf")))
                            if EACH:
                                col = (r * HV + hv) * BT + (a - t0) + j
                                tl.store(Aqk + col, round_to(tl.sum(q_r * k_j, axis=1), Aqk.dtype.element_ty), mask=m_h)
                                tl.store(L + col, tl.sum(k_r * k_j, axis=1) * b_r, mask=m_h & (j < i_r % BC))
                            else:
                                d_qk += tl.where(at_j, tl.sum(q_r * k_j, axis=1)[:, None], 0.0)
                                d_kk += tl.where(at_j & (j < i_r % BC), tl.sum(k_r * k_j, axis=1)[:, None], 0.0)
                    if not EACH:
                        tl.store(Aqk + out, round_to(d_qk, Aqk.dtype.element_ty), mask=m_h[:, None])
                        tl.store(L + out, d_kk * b_r[:, None], mask=m_h[:, None])


@triton.jit
def solve_block(n, I: tl.constexpr, NB: tl.constexpr):
    """D_I = (I + Ld_I)^{-1} as [BC, BC] from the [NB, BC, BC] batch n = Dinv - I."""
    blk = tl.arange(0, NB)[:, None, None]
    r16 = tl.arange(0, n.shape[1])
    return tl.sum(tl.where(blk == I, n, 0.0), axis=0) + tl.where(r16[:, None] == r16[None, :], 1.0, 0.0)


@triton.jit
def solve_store(M, Minv, x, b_j, rows, ok, cols, HV: tl.constexpr, i_hv, BT: tl.constexpr):
    """Block (I, J) of (I + L)^{-1}: M gets it times Diag(beta_J), Minv (when given) as is.
    beta is folded into M before the rounding to the dot dtype, as eq. (6) writes M: rounding
    Minv and beta * (V - W S) separately cost bf16 inputs up to 3x the same-precision
    reference's error in the final state (conformance, K = V = 4, T = 116; 1.0x folded)."""
    ptr = (rows[:, None] * HV + i_hv) * BT + cols[None, :]
    tl.store(M + ptr, round_to(x * b_j[None, :], M.dtype.element_ty), mask=ok[:, None])
    if Minv is not None:
        tl.store(Minv + ptr, round_to(x, Minv.dtype.element_ty), mask=ok[:, None])


@triton.jit(do_not_specialize=["T", "NBH"])  # lengths: one compile for any T (NOTES.md, "Lengths not specialized")
def chunk_solve(
    L, beta, M, Minv, cu_seqlens, chunks, T, NBH,
    HV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    IS_VARLEN: tl.constexpr, BETA_SIGMOID: tl.constexpr, NEG_EIGVAL: tl.constexpr, SOLVE_PRECISION: tl.constexpr,
    ROWS: tl.constexpr = False,
):  # fmt: skip
    """M = (I + L)^{-1} Diag(beta) of one chunk of one value head (eq. (6)), and Minv =
    (I + L)^{-1} itself when Minv is given (for the backward), from L of chunk_pairs and
    chunk_diag; written as [BT, BT] rows in the buffers' dtype (rows past the sequence end are
    not written).

    (I + L)^{-1} in fp32 on [BC, BC] blocks, its dots in SOLVE_PRECISION ("ieee", or "tf32x3":
    three tensor-core passes that keep about fp32 accuracy, for the default precision). Split
    L = Ld + Lo (block diagonal, strictly block lower). The four diagonal blocks
    D_I = (I + Ld_I)^{-1} are one [NB, BC, BC] batch solved by forward substitution, one row
    of every block per step: with N = D - I, row j is r + r N, r = -Ld_j (Ld_ji = 0 for
    i >= j), a batched [BC, BC] dot. Then the block forward substitution over the sub-chunks,
    written out: X_II = D_I and X_IJ = -D_I sum_{J <= K < I} Lo_IK X_KJ for J < I, 16 [BC, BC]
    dots, each Lo_IK loaded from L as a block; the six blocks above the diagonal are stored
    as zeros.

    Measured on an H200 (B1 T16384 H32 K = V = 128 bf16, 2026-11-28, twelfth session,
    python -m kdaverify.perf.ab, two rounds agreeing within 1%): 0.49 ms, against 0.73 ms for
    the form it replaced (the same substitution on the [BT, BT] tile, six [BT, BT] x [BT, BT]
    dots masked to one block row each: 24x the multiply-adds, 98 KiB of shared memory and
    register spills at sm_90) and 0.65 ms with the diagonal blocks' rows done as fp32
    broadcast products and sums instead of batched dots; forward 3.44 -> 3.20 ms. o moved by
    2.1e-5 relative (the sums in another order). (The Neumann product (I - E)(I + E^2),
    E = Dinv Lo, is shorter but its intermediates grow and cancel: it lost 3.4x the
    reference's accuracy over 2633 tokens with beta near 2.)"""
    tl.static_assert(BT == 4 * BC)
    NB: tl.constexpr = BT // BC
    i_c, i_bh = one_dim_grid(NBH)
    i_b, i_hv = i_bh // HV, i_bh % HV
    _, _, eos, t0 = chunk_span(i_c, i_b, cu_seqlens, chunks, T, BT, IS_VARLEN)
    o16 = tl.arange(0, BC)
    # the diagonal blocks as one [NB, BC, BC] batch: 4 KiB of the chunk's 16 KiB of L
    r3 = tl.arange(0, NB)[:, None, None] * BC + o16[None, :, None]
    c3 = tl.arange(0, NB)[:, None, None] * BC + o16[None, None, :]
    if ROWS:  # the row mask alone, the strict lower triangle selected after (ChunkBlocks.SOLVE_ROWS)
        n = tl.load(L + ((t0 + r3) * HV + i_hv) * BT + c3, mask=(t0 + r3 < eos) & (c3 < BT), other=0.0)
        n = -tl.where(c3 < r3, n, 0.0)
    else:
        n = -tl.load(L + ((t0 + r3) * HV + i_hv) * BT + c3, mask=(t0 + r3 < eos) & (c3 < r3), other=0.0)
    for j in range(1, BC):
        sel = (o16 == j)[None, :, None]
        r = tl.where(sel, n, 0.0)
        n = tl.where(sel, r + tl.dot(r, n, input_precision=SOLVE_PRECISION), n)
    d0 = solve_block(n, 0, NB)
    d1 = solve_block(n, 1, NB)
    d2 = solve_block(n, 2, NB)
    d3 = solve_block(n, 3, NB)
    ra, rb, rc, rd = t0 + o16, t0 + BC + o16, t0 + 2 * BC + o16, t0 + 3 * BC + o16
    oa, ob, oc, od = ra < eos, rb < eos, rc < eos, rd < eos
    ca, cb, cc, cd = o16, BC + o16, 2 * BC + o16, 3 * BC + o16
    l10 = tl.load(L + (rb[:, None] * HV + i_hv) * BT + ca[None, :], mask=ob[:, None], other=0.0)
    l20 = tl.load(L + (rc[:, None] * HV + i_hv) * BT + ca[None, :], mask=oc[:, None], other=0.0)
    l21 = tl.load(L + (rc[:, None] * HV + i_hv) * BT + cb[None, :], mask=oc[:, None], other=0.0)
    l30 = tl.load(L + (rd[:, None] * HV + i_hv) * BT + ca[None, :], mask=od[:, None], other=0.0)
    l31 = tl.load(L + (rd[:, None] * HV + i_hv) * BT + cb[None, :], mask=od[:, None], other=0.0)
    l32 = tl.load(L + (rd[:, None] * HV + i_hv) * BT + cc[None, :], mask=od[:, None], other=0.0)
    P: tl.constexpr = SOLVE_PRECISION
    x10 = -tl.dot(d1, tl.dot(l10, d0, input_precision=P), input_precision=P)
    x21 = -tl.dot(d2, tl.dot(l21, d1, input_precision=P), input_precision=P)
    x20 = -tl.dot(d2, tl.dot(l20, d0, input_precision=P) + tl.dot(l21, x10, input_precision=P), input_precision=P)
    x32 = -tl.dot(d3, tl.dot(l32, d2, input_precision=P), input_precision=P)
    x31 = -tl.dot(d3, tl.dot(l31, d1, input_precision=P) + tl.dot(l32, x21, input_precision=P), input_precision=P)
    s30 = tl.dot(l30, d0, input_precision=P) + tl.dot(l31, x10, input_precision=P)
    x30 = -tl.dot(d3, s30 + tl.dot(l32, x20, input_precision=P), input_precision=P)
    ba = load_beta(beta, ra, oa, HV, i_hv, BETA_SIGMOID, NEG_EIGVAL)
    bb = load_beta(beta, rb, ob, HV, i_hv, BETA_SIGMOID, NEG_EIGVAL)
    bc = load_beta(beta, rc, oc, HV, i_hv, BETA_SIGMOID, NEG_EIGVAL)
    bd = load_beta(beta, rd, od, HV, i_hv, BETA_SIGMOID, NEG_EIGVAL)
    zero = tl.zeros((BC, BC), dtype=tl.float32)
    solve_store(M, Minv, d0, ba, ra, oa, ca, HV, i_hv, BT)
    solve_store(M, Minv, zero, bb, ra, oa, cb, HV, i_hv, BT)
    solve_store(M, Minv, zero, bc, ra, oa, cc, HV, i_hv, BT)
    solve_store(M, Minv, zero, bd, ra, oa, cd, HV, i_hv, BT)
    solve_store(M, Minv, x10, ba, rb, ob, ca, HV, i_hv, BT)
    solve_store(M, Minv, d1, bb, rb, ob, cb, HV, i_hv, BT)
    solve_store(M, Minv, zero, bc, rb, ob, cc, HV, i_hv, BT)
    solve_store(M, Minv, zero, bd, rb, ob, cd, HV, i_hv, BT)
    solve_store(M, Minv, x20, ba, rc, oc, ca, HV, i_hv, BT)
    solve_store(M, Minv, x21, bb, rc, oc, cb, HV, i_hv, BT)
    solve_store(M, Minv, d2, bc, rc, oc, cc, HV, i_hv, BT)
    solve_store(M, Minv, zero, bd, rc, oc, cd, HV, i_hv, BT)
    solve_store(M, Minv, x30, ba, rd, od, ca, HV, i_hv, BT)
    solve_store(M, Minv, x31, bb, rd, od, cb, HV, i_hv, BT)
    solve_store(M, Minv, x32, bc, rd, od, cc, HV, i_hv, BT)
    solve_store(M, Minv, d3, bd, rd, od, cd, HV, i_hv, BT)
