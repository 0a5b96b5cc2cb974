"""Fused recurrent KDA in Triton: token by token, the state kept in registers; also the
decode kernel (one token per sequence, the state read from and written back to a pool).

Per value head, state S in R^{K x V} (DESIGN.md section 4; arXiv 2510.26692v2, eq. (1)):

    S' = exp(g_t)[:, None] * S;   S = S' + beta_t k_t (v_t - S'^T k_t)^T;   o_t = S^T (scale q_t)

One program owns a [BK, BV] tile of one sequence's state for one value head (BK =
next_power_of_2(K) covers all of K, BV a block of V) and walks that sequence's tokens: per
token it loads q_t, k_t, g_t (K lanes), v_t (BV lanes) and beta_t once, updates the tile with
fp32 FMAs (no tl.dot: "ieee" precision) and stores o_t. The state is read once and written
once, which is the whole of the decode traffic. Lanes past K or V are masked on every load and
store, and all offsets are int64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from kdaverify.equivalence.capabilities import Capabilities
from kdaverify.reference.gates import L2NORM_EPS, check_gate_args
from triton.language.extra import libdevice

from .kda_chunk_intra import INTERPRET
from .runtime import cdiv, check_call, next_power_of_2, scratch, state_out


@dataclass(frozen=True)
class RecurrentConfig:
    """Tile width BV (V per program) and warps per program.

    The state tile is BK x BV fp32 in registers. For K <= 64 a 64-wide tile keeps 4096 values
    (32 per thread at 4 warps); for K up to 256 a 32-wide tile keeps 4096 to 8192 values, so
    registers never spill, and a decode of [N, 32, 128, 128] still has N * 32 * 4 programs to
    fill the GPU's SMs. Tiles smaller than 4096 values (small K and V) use fewer warps so
    that lanes are not left idle.
    """

    BV: int
    num_warps: int
    # Load each token's rows one step ahead (the kernel's PREFETCH): see launch_config. The
    # DPLR kernel always does (2.1x at T = 4096 on an H200, dplr_fused_recurrent).
    prefetch: bool = False


# Programs in flight above which narrow one-warp tiles win: about 4 per SM of an H100 (132).
WIDE_GRID = 512


@functools.lru_cache(maxsize=1024)  # a pure function of three ints, on every call's path
def config_for(K: int, V: int, NHV: int = 1) -> RecurrentConfig:
    """The launch configuration for head sizes K, V and N * HV (sequences times value heads).

    Measured on an H100 (decode, one bf16 token, fp32 state [N, 32, 128, 128], copy ceiling
    3.00 TB/s; every BV in 16..128 by 1..8 warps): with many programs (N = 64, 256), BV = 16 on
    one warp streams the state fastest (103.5 us = 86% of copy at N = 64, 389 us = 92% at
    N = 256; the former default BV = 32 on 4 warps: 61% and 64%); with few (N = 1, 128
    programs) BV = 32 on 8 warps is fastest (11.1 us against 48.8 us or more on one warp).
    Small tiles (K, V < 128) keep the register-sized rule below.

    Rerun on an H200 (seventeenth session, copy ceiling 4.25 TB/s, kernel time by
    torch.profiler): BV = 16 on one warp is still the fastest, 77-79% of copy at N = 64 and
    81-83% at N = 256; BV 32 on one warp within 1%, BV 8 on one warp 66% and 68%, two warps or
    more 64% or less. Loading and storing the state with L2's evict-first policy was 1-4%
    slower in every configuration (not taken). Addressing the token rows from scalar row
    indices instead of loop-carried pointer tensors took BV 16 on one warp from 145 to 128
    registers (13 -> 16 programs per SM); eighteenth session, same card, kernel time, two
    rounds: kv N = 64 75-76% -> 86%, N = 256 79-81% -> 90%; vk N = 64 91-93% either way."""
    BK = next_power_of_2(K)
    if BK >= 128:
        BV = min(next_power_of_2(V), 32)
        if NHV * cdiv(V, 16) >= WIDE_GRID:  # one warp per 2048 state values: 64 registers a thread
            return RecurrentConfig(BV=min(BV, 16), num_warps=max(1, BK * min(BV, 16) // 2048))
        return RecurrentConfig(BV=BV, num_warps=8 if BK * BV >= 4096 else 4)
    BV = min(next_power_of_2(V), 64)
    return RecurrentConfig(BV=BV, num_warps=4 if BK * BV >= 4096 else (2 if BK * BV >= 1024 else 1))


def token_loop_config(K: int, V: int, NHV: int) -> RecurrentConfig:
    """Launch configuration for a walk over many tokens (NHV: sequences times value heads).
    One warp per program: the two sums over K per token then stay inside a warp (shuffles, no
    barrier), and a step's latency, not bandwidth, sets the time. BV = 8 columns per program
    while that gives at most 1024 programs, else 16 (BV 8 on one warp at BK = 256 too: a
    16-wide tile there is 128 registers a thread). Measured on the DPLR kernel, which loads
    each token's rows a step ahead (dplr_fused_recurrent; seventeenth session, H200, bf16
    K = V = 128, T = 4096), ms:

    | BV x warps | 32 x 8 | 32 x 4 | 16 x 4 | 16 x 2 | 16 x 1 | 8 x 1 | 8 x 2 |
    |---|---|---|---|---|---|---|---|
    | B1 (NHV 32) | 6.20 | 8.15 | 5.38 | 4.43 | 4.34 | **3.02** | 4.31 |
    | B8 (NHV 256) | 33.8 | 37.9 | 38.2 | 24.2 | **12.7** | 15.3 | 30.4 |

    The decode kernel's config_for (one token, bandwidth-bound) gave 32 x 8 and 16 x 1."""
    BK = next_power_of_2(K)
    narrow = BK >= 256 or NHV * cdiv(V, 8) <= 1024
    return RecurrentConfig(BV=min(next_power_of_2(V), 8 if narrow else 16), num_warps=1)


# Tokens per sequence (on average over the call) from which a call is a walk over tokens,
# whose time a step's latency sets, rather than one read and write of the state (a decode,
# set by bandwidth). Provisional (eighteenth session): between the decode (1 token, where
# config_for's wide tiles win at small N) and the measured T = 4096; the crossover is timed
# with perf/bench_fused_recurrent.py --tokens.
TOKEN_LOOP_FROM = 16


def launch_config(K: int, V: int, NHV: int, tokens_per_sequence: float) -> RecurrentConfig:
    """The KDA kernel's launch: config_for for decode-like calls (fewer than TOKEN_LOOP_FROM
    tokens per sequence), else token_loop_config, loading each token's rows a step ahead when
    the grid is small (at most 1024 programs of BV 8: one wave, latency-bound). Measured on an
    H200 (eighteenth session, bf16, K = V = 128, T = 4096, ms, two rounds within 0.5%):

    | call | config_for | + prefetch | token_loop_config | + prefetch |
    |---|---|---|---|---|
    | B1 (NHV 32) | 10.05 (BV 32 x 8 warps) | 5.77 | 4.72 (BV 8 x 1) | **3.54** |
    | B8 (NHV 256) | 11.28 (BV 16 x 1) | 12.40 | **11.28** (BV 16 x 1) | 12.40 |

    At B8 the extra rows in flight cost residency (2048 programs, more than one wave)."""
    if tokens_per_sequence < TOKEN_LOOP_FROM:
        return config_for(K, V, NHV)
    cfg = token_loop_config(K, V, NHV)
    return replace(cfg, prefetch=NHV * cdiv(V, 8) <= 1024)


# tl.sum compiles to tl.reduce with this combine function. Called directly: under the
# interpreter, tl.sum is a nested jit call that re-patches triton.language each time
# (milliseconds, most of a token's time), while tl.reduce with it runs as one numpy sum.
_ADD = tl.standard._sum_combine


@triton.jit
def col_sum(x, y):
    """sum over axis 0 of x * y, x [BK, N] and y [BK, 1] -> [1, N]: the sums over K of the
    recurrences' token step (S^T k, a^T S, S^T q) and of the in-kernel L2 norm.

    Each product is rounded before it is summed (mul_rn, which the compiler may not contract
    into an fma). Where one thread holds a single row of a column (one warp, BK <= 32), the
    sum's first step across lanes was compiled as fma(x_i, y_i, p_j) with p_j the other lane's
    rounded product, so lanes i and j ended with sums differing in the last bit; every lane
    then stored its copy of the [1, BV] row to the same shared-memory word, and
    compute-sanitizer's racecheck reported the write-write conflict (6980 hazards in the DPLR
    kernel on one warp at K = 20, BV = 8; seventeenth session, H200): which lane's bits reached
    o was left to the hardware. With rounded products every lane adds the same numbers in
    mirrored order, and gets the same bits. Under the interpreter (NumPy, no contraction, no
    lanes) a plain product."""
    if INTERPRET:
        p = x * y
    else:
        p = libdevice.mul_rn(x, tl.broadcast_to(y, x.shape))
    return tl.reduce(p, 0, _ADD, keep_dims=True)


@triton.jit
def recurrent_program(cu_seqlens, T, H, HV, V: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """This program's place in a token-by-token launch, grid (N * HV * cdiv(V, BV),): (its
    block of V columns i_v, sequence i_n, value head i_hv, query/key head i_h, the sequence's
    first token bos and end eos). One grid axis, because CUDA caps the others at 65535 and a
    decode batch times HV passes that. Sequence n spans tokens [cu_seqlens[n],
    cu_seqlens[n+1]) (or [n T, (n+1) T))."""
    pid = tl.program_id(0).to(tl.int64)
    i_v = pid % ((V + BV - 1) // BV)
    i_nh = pid // ((V + BV - 1) // BV)
    i_n = i_nh // HV
    i_hv = i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return i_v, i_n, i_hv, i_h, bos, eos


@triton.jit
def load_f32(p, m):
    """tl.load(p) where m, 0 elsewhere, in fp32."""
    return tl.load(p, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _kda_token(q, k, g, v, beta, r_qk, r_v, o_k, o_v, K: tl.constexpr, V: tl.constexpr, m_k, m_v, live):
    """One token's q, k, g columns [BK, 1], v row [1, BV] and beta, in fp32 (masked lanes 0):
    q and k from row r_qk, the rest from row r_v."""
    return (load_f32(q + r_qk * K + o_k, m_k), load_f32(k + r_qk * K + o_k, m_k), load_f32(g + r_v * K + o_k, m_k),
            load_f32(v + r_v * V + o_v, m_v), load_f32(beta + r_v, live))  # fmt: skip


# STORE_HT and INPLACE are runtime flags (runtime.state_out says why): as constexpr they gave
# o differing in the last bit without a final state (197 of 1064 fp32 outputs on the H100).
@triton.jit(do_not_specialize=["T", "STORE_HT", "INPLACE"])
def _fused_recurrent_kda_kernel(
    q, k, v, g, beta, o, h0, ht, cu_seqlens, state_indices, A_log, dt_bias,
    scale, lower_bound, T, H, HV, STORE_HT, INPLACE,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_INDICES: tl.constexpr, STATE_VK: tl.constexpr, L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr,
    BETA_SCALE: tl.constexpr, GATE: tl.constexpr, HAS_DT_BIAS: tl.constexpr, SAFE_GATE: tl.constexpr,
    EPS: tl.constexpr, PREFETCH: tl.constexpr = False,
):  # fmt: skip
    """Grid (N * HV * cdiv(V, BV),): one axis, because CUDA caps the others at 65535 and a
    decode batch times HV passes that. q, k [B*T, H, K]; v, o [B*T, HV, V]; g [B*T, HV, K];
    beta [B*T, HV]; h0 [P, HV, K, V] (or [.., V, K] with STATE_VK); ht [N, HV, K, V], or h0
    itself with INPLACE. Sequence n spans tokens [cu_seqlens[n], cu_seqlens[n+1]) (or
    [n T, (n+1) T)) and reads state slot state_indices[n] (or n); slot -1 is padding: no
    state is read, o rows are zero, and only the non-INPLACE ht row (zero) is written."""
    i_v, i_n, i_hv, i_h, bos, eos = recurrent_program(cu_seqlens, T, H, HV, V, BV, IS_VARLEN)
    if USE_INDICES:
        slot = tl.load(state_indices + i_n).to(tl.int64)
    else:
        slot = i_n.to(tl.int64)
    live = slot >= 0

    # Column [BK, 1] and row [1, BV] tiles: per-token vectors come in already shaped to
    # broadcast against the [BK, BV] state (no expand per token; the interpreter pays per op).
    o_k = tl.arange(0, BK)[:, None]
    o_v = i_v * BV + tl.arange(0, BV)[None, :]
    in_k = o_k < K
    in_v = o_v < V
    m_k = in_k & live  # loads of a padding sequence read nothing and give zeros
    m_v = in_v & live
    m_h = in_k & in_v
    if STATE_VK:
        o_h = o_v.to(tl.int64) * K + o_k
    else:
        o_h = o_k.to(tl.int64) * V + o_v

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + (slot * HV + i_hv) * K * V + o_h, mask=m_h & live, other=0.0)
    if GATE:
        b_A = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        if HAS_DT_BIAS:
            b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=in_k, other=0.0).to(tl.float32)

    # Rows of token t: q, k row t * H + i_h (K lanes), g, v, o, beta row t * HV + i_hv. Only
    # these scalars cross iterations; each token's pointer tensors are formed from them where
    # they are used. Carried across the loop, the [BK, 1] and [1, BV] pointer tensors held
    # 64-bit addresses for every row a thread owns (ptxas, sm_90, bf16, K = V = 128, BV 16
    # on one warp: 145 registers, so 13 programs per SM; see RecurrentConfig).
    r_qk = bos * H + i_h
    r_v = bos * HV + i_hv
    t = bos
    if PREFETCH:  # RecurrentConfig.prefetch: each token's rows loaded one step ahead
        ahead = live & (t < eos)
        n_q, n_k, n_g, n_v, n_beta = _kda_token(q, k, g, v, beta, r_qk, r_v, o_k, o_v, K, V,
                                                m_k & ahead, m_v & ahead, ahead)  # fmt: skip
    while t < eos:  # a while loop: the interpreter cannot take tensor bounds in range()
        if PREFETCH:
            b_q, b_k, b_g, b_v, b_beta = n_q, n_k, n_g, n_v, n_beta
            ahead = live & (t + 1 < eos)
            n_q, n_k, n_g, n_v, n_beta = _kda_token(q, k, g, v, beta, r_qk + H, r_v + HV, o_k, o_v, K, V,
                                                    m_k & ahead, m_v & ahead, ahead)  # fmt: skip
        else:
            b_q, b_k, b_g, b_v, b_beta = _kda_token(q, k, g, v, beta, r_qk, r_v, o_k, o_v, K, V, m_k, m_v, live)
        if L2NORM:  # x / sqrt(sum x^2 + eps), in fp32 (reference.gates.l2norm)
            b_q = b_q / tl.sqrt(col_sum(b_q, b_q) + EPS)
            b_k = b_k / tl.sqrt(col_sum(b_k, b_k) + EPS)
        if BETA_SIGMOID:  # beta = sigmoid(b), or 2 sigmoid(b) (reference.gates.beta_activation)
            b_beta = BETA_SCALE / (1.0 + tl.exp(-b_beta))
        if GATE:  # g from the raw projection z (reference.gates.kda_gate)
            if HAS_DT_BIAS:
                b_g = b_g + b_bias
            if SAFE_GATE:
                b_g = lower_bound / (1.0 + tl.exp(-b_A * b_g))
            else:  # softplus(x) = max(x, 0) + log(1 + exp(-|x|)): no overflow for large x
                b_g = -b_A * (tl.maximum(b_g, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(b_g))))
        # S' = Diag(exp(g_t)) S. The decay is the one factor every state entry takes at every
        # token, so its error compounds over T: exp runs in fp64 and is rounded once to fp32
        # (K exps per token, off the [BK, BV] critical path). fp32 exp (numpy's under the
        # interpreter, ex2.approx on the GPU) is up to 2 ulp off and doubled the state's error
        # over 63 beta = 0 tokens against the fp32 recurrence.
        b_h *= tl.exp(b_g.to(tl.float64)).to(tl.float32)
        b_u = b_beta * (b_v - col_sum(b_h, b_k))  # beta_t (v_t - S'^T k_t), [1, BV]
        b_h += b_k * b_u
        b_o = col_sum(b_h, b_q * scale)  # S_t^T (scale q_t), [1, BV]
        tl.store(o + r_v * V + o_v, b_o.to(o.dtype.element_ty), mask=in_v)
        r_qk += H
        r_v += HV
        t += 1
    if STORE_HT != 0:
        if INPLACE != 0:
            tl.store(ht + (slot * HV + i_hv) * K * V + o_h, b_h, mask=m_h & live)
        else:
            tl.store(ht + (i_n.to(tl.int64) * HV + i_hv) * K * V + o_h, b_h, mask=m_h)


def _gate_params(use_gate_in_kernel, A_log, dt_bias, lower_bound, HV, K, device):
    """A_log and dt_bias as float32 for the kernel (None when the gate is not fused)."""
    if not use_gate_in_kernel:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias), ("lower_bound", lower_bound)):
            if x is not None:
                raise ValueError(f"{name}: given without use_gate_in_kernel=True, where it would be ignored")
        return None, None
    if A_log is None:
        raise ValueError("A_log: expected a tensor [HV] with use_gate_in_kernel=True, got None")
    check_gate_args(A_log, dt_bias, lower_bound, HV, K)
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x is not None and x.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (where q is), got {x.device}")
    return A_log.float().contiguous(), (None if dt_bias is None else dt_bias.float().contiguous())


def fused_recurrent_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    *, use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
    use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
    state_layout="kv", state_indices=None, inplace_final_state=False,
):  # fmt: skip
    """KDA by its recurrence, fused into one Triton kernel (forward only; drop-in for
    flash-linear-attention's fused_recurrent_kda; calling convention DESIGN.md section 3).

    Args:
        q, k: [B, T, H, K] in float32, bfloat16 or float16.  v: [B, T, HV, V], same dtype.
        g: [B, T, HV, K] log-space decay (or the raw gate projection z with
            use_gate_in_kernel), in the dtype of q or float32.
        beta: [B, T, HV] (or the logit b with use_beta_sigmoid_in_kernel), likewise.
        scale: default K ** -0.5.  K, V: any size 1..256.
        initial_state: float32 [N, HV, K, V] ([N, HV, V, K] with state_layout="vk"), or None
            (zeros); with state_indices a pool [P, HV, K, V] (or [P, HV, V, K]).
        output_final_state: return the final state (float32, in state_layout).
        cu_seqlens: int64/int32 [N + 1] offsets of a packed batch (B == 1). A repeated offset
            is an empty sequence: its final state is its initial state (or zeros).
        use_qk_l2norm_in_kernel: q, k <- x / sqrt(sum x^2 + 1e-6) per token, in fp32.
        use_beta_sigmoid_in_kernel: beta <- sigmoid(beta); with allow_neg_eigval
            2 * sigmoid(beta). (allow_neg_eigval changes nothing else: a beta given directly
            is used as it is.)
        use_gate_in_kernel: g <- -exp(A_log[h]) * softplus(g + dt_bias[h, :]) or, with
            lower_bound, lower_bound * sigmoid(exp(A_log[h]) * (g + dt_bias[h, :]));
            A_log [HV], dt_bias [HV * K] or None, lower_bound in [-5, 0) or None.
        state_layout: "kv" or "vk", for initial_state and the returned state alike.
        state_indices: int32/int64 [N] or None. Given, sequence n starts from pool slot
            state_indices[n]. Index -1 is padding: the sequence's o rows are zero, no state
            is read or written for it, and its row of a returned (not in-place) final state
            is zero. Every index must lie in [-1, P) (checked on the host: one sync).
        inplace_final_state: write each sequence's final state into its own slot of
            initial_state (slot state_indices[n], or n without state_indices) and return
            initial_state itself as the final state (whatever output_final_state says).
            Slots no sequence names (and those of padding) stay bitwise unchanged. Needs a
            contiguous float32 initial_state and distinct non-negative indices.
    Returns:
        (o [B, T, HV, V] in the dtype of q, final_state or None): final_state is a new
        [N, HV, K, V] float32 tensor (in state_layout) when output_final_state, the pool
        itself with inplace_final_state, else None.
    Raises:
        ValueError naming the argument for any input the kernel does not take.
    """
    c = check_call(
        q, k, v, g, beta, scale, initial_state, cu_seqlens,
        state_layout=state_layout, state_indices=state_indices, inplace_state=inplace_final_state,
    )  # fmt: skip
    A32, bias32 = _gate_params(use_gate_in_kernel, A_log, dt_bias, lower_bound, c.HV, c.K, c.q.device)
    if not isinstance(allow_neg_eigval, bool):
        raise ValueError(f"allow_neg_eigval: expected a bool, got {allow_neg_eigval!r}")
    cfg = launch_config(c.K, c.V, c.N * c.HV, c.B * c.T / max(c.N, 1))
    o = scratch(*c.v.shape, dtype=c.v.dtype, device=c.v.device)
    shape = (c.N, c.HV, c.K, c.V) if state_layout == "kv" else (c.N, c.HV, c.V, c.K)
    if inplace_final_state:
        ht = c.initial_state  # the caller's tensor: check_call refused a copy
    elif output_final_state:
        ht = scratch(*shape, dtype=torch.float32, device=c.q.device)
    else:
        ht = None
    grid = (cdiv(c.V, cfg.BV) * c.N * c.HV,)
    ht_arg, store_ht = state_out(ht, c.q.device)
    _fused_recurrent_kda_kernel[grid](
        c.q, c.k, c.v, c.g, c.beta, o, c.initial_state, ht_arg, c.cu_seqlens, c.state_indices, A32, bias32,
        float(c.scale), float(lower_bound) if lower_bound is not None else 0.0, c.T, c.H, c.HV,
        store_ht, int(bool(inplace_final_state)),
        K=c.K, V=c.V, BK=next_power_of_2(c.K), BV=cfg.BV,
        USE_H0=c.initial_state is not None,
        IS_VARLEN=c.cu_seqlens is not None, USE_INDICES=c.state_indices is not None,
        STATE_VK=state_layout == "vk", L2NORM=bool(use_qk_l2norm_in_kernel),
        BETA_SIGMOID=bool(use_beta_sigmoid_in_kernel), BETA_SCALE=2.0 if allow_neg_eigval else 1.0,
        GATE=bool(use_gate_in_kernel), HAS_DT_BIAS=bias32 is not None, SAFE_GATE=lower_bound is not None,
        EPS=L2NORM_EPS, PREFETCH=cfg.prefetch, num_warps=cfg.num_warps,
    )  # fmt: skip
    return o, ht


# What the tests in equivalence/test_kda_fused_recurrent.py and the conformance run check.
fused_recurrent_kda.kdaverify_capabilities = Capabilities(
    dtypes=("float32", "bfloat16", "float16"),
    head_sizes=None,
    precision="ieee",
    gva=True,
    varlen=True,
    gate_in_kernel=True,
    l2norm_in_kernel=True,
)
