"""Chunked KDA forward (the chunkwise WY/UT algorithm of DESIGN.md section 4) in Triton, a
drop-in for flash-linear-attention's chunk_kda forward (calling convention: section 3).

Three launches, no loop over chunks or heads on the host:

    chunk_gate_cumsum  (NC, B*HV)      G [B*T, HV, K] fp32: in-chunk cumsum of g (gate from z if asked)
    chunk_intra        (NC, B*HV)      Aqk, Minv = (I + L)^{-1} [B*T, HV, BT] (bounded exponents)
    chunk_recurrence   (NV, N*HV)      o, final state; S carried in registers across chunks

NC = number of chunks (B * NT, or the chunks of all packed sequences). Memory besides inputs
and outputs: G (4 B*T*HV*K bytes) and Aqk, Minv (B*T*HV*BT each, in the dot operand dtype:
2 bytes for 16-bit inputs at the default precision, else 4); no state history.
In-kernel options (q/k L2 norm, beta sigmoid) are applied where q, k, beta are loaded; the
gate from z is computed in chunk_gate_cumsum.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from kdaverify.equivalence.capabilities import Capabilities

from .kda_chunk_inter import chunk_recurrence
from .kda_chunk_intra import chunk_gate_cumsum, chunk_intra
from .runtime import check_call, check_gate

PRECISIONS = (None, "ieee")


@dataclass(frozen=True)
class ChunkBlocks:
    """Block sizes. BT = 64: the chunk (the algorithm's C), as in the public kernels; large
    enough that the state recurrence runs T / 64 sequential steps, small enough that the
    BT x BT matrices stay in registers. BC = 16: the sub-chunk of the bounded-exponent
    factorisation and the smallest tl.dot tile. BV: value columns per recurrence program,
    at most 64 (32 when K > 128) so that the fp32 state [BK, BV] stays within registers
    and V = 128 gives two programs per (sequence, head)."""

    BT: int = 64
    BC: int = 16
    BV_MAX: int = 64

    def bk(self, K: int) -> int:
        return max(16, triton.next_power_of_2(K))  # tl.dot needs every tile dimension >= 16

    def warps(self, K: int) -> int:
        """8 warps once the [BT, BK] fp32 tiles (q, k, G) pass 32 KiB each, else 4: a guess
        against register spills, not yet measured."""
        return 8 if self.bk(K) >= 128 else 4

    def bv(self, K: int, V: int) -> int:
        cap = self.BV_MAX if self.bk(K) <= 128 else self.BV_MAX // 2
        return max(16, min(triton.next_power_of_2(V), cap))


BLOCKS = ChunkBlocks()


@functools.lru_cache(maxsize=64)
def _chunk_table(offsets: tuple[int, ...], BT: int) -> list[int]:
    """(sequence, chunk within it) of every chunk of a packed batch, flattened."""
    table = []
    for n, (a, b) in enumerate(zip(offsets, offsets[1:], strict=False)):
        for c in range(triton.cdiv(b - a, BT)):
            table += [n, c]
    return table


def _beta_sigmoid_check(use_beta_sigmoid_in_kernel, allow_neg_eigval):
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError(
            "allow_neg_eigval: only meaningful with use_beta_sigmoid_in_kernel=True "
            "(beta = 2 sigmoid(b)); pass beta in [0, 2] directly otherwise"
        )


def chunk_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, *,
    use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
    use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None, precision=None,
):  # fmt: skip
    """KDA forward by chunks.

    Args (DESIGN.md section 3): q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, K] (the raw
    gate projection z when use_gate_in_kernel); beta [B, T, HV] (pre-sigmoid b when
    use_beta_sigmoid_in_kernel); initial_state [N, HV, K, V] fp32; cu_seqlens int [N+1]
    (B == 1; empty sequences allowed: their final state is their initial state).
    A_log [HV], dt_bias [HV*K] or None, lower_bound None or in [-5, 0): the in-kernel gate.
    precision: None (tensor-core dots: bf16 operands for 16-bit inputs, tf32 for float32) or
    "ieee" (fp32 operands). Accumulation is fp32 in both.
    Returns (o [B, T, HV, V] in q's dtype, final_state [N, HV, K, V] fp32 or None).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    _beta_sigmoid_check(use_beta_sigmoid_in_kernel, allow_neg_eigval)
    c = check_call(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    gate = check_gate(c, use_gate_in_kernel, A_log, dt_bias, lower_bound)
    B, T, H, HV, K, V, N = c.B, c.T, c.H, c.HV, c.K, c.V, c.N
    BT, BC = BLOCKS.BT, BLOCKS.BC
    BK, BV = BLOCKS.bk(K), BLOCKS.bv(K, V)
    device = c.q.device
    o = torch.empty(B, T, HV, V, dtype=c.q.dtype, device=device)
    ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=device) if output_final_state else None
    if c.offsets is None:
        NT = triton.cdiv(T, BT)
        NC, i_b_heads, chunks, varlen = NT, B * HV, None, False
    else:
        table = _chunk_table(c.offsets, BT)
        chunks = torch.tensor(table, dtype=torch.int32, device=device)
        NC, i_b_heads, varlen = len(table) // 2, HV, True
        NT = max(triton.cdiv(b - a, BT) for a, b in zip(c.offsets, c.offsets[1:], strict=False))
    if T == 0 or NC == 0:  # nothing to compute: every sequence is empty
        if ht is not None:
            ht.copy_(c.initial_state) if c.initial_state is not None else ht.zero_()
        return o, ht
    G = torch.empty(B, T, HV, K, dtype=torch.float32, device=device)
    fp32_dots = precision == "ieee" or c.q.dtype == torch.float32
    dot_dtype, matrices = (tl.float32, torch.float32) if fp32_dots else (tl.bfloat16, torch.bfloat16)
    Aqk = torch.empty(B, T, HV, BT, dtype=matrices, device=device)
    Minv = torch.empty(B, T, HV, BT, dtype=matrices, device=device)
    dot_precision = "ieee" if precision == "ieee" else "tf32"
    gate_kind = 0 if gate is None else (1 if gate.lower_bound is None else 2)
    grid = (NC * i_b_heads,)  # one axis: see kda_chunk_intra.one_dim_grid
    chunk_gate_cumsum[grid](
        c.g, G,
        None if gate is None else gate.A_log, None if gate is None else gate.dt_bias,
        0.0 if gate is None or gate.lower_bound is None else gate.lower_bound,
        c.cu_seqlens, chunks, T, i_b_heads,
        HV=HV, K=K, BT=BT, BK=BK, IS_VARLEN=varlen, GATE=gate_kind,
        HAS_DT_BIAS=gate is not None and gate.dt_bias is not None,
    )  # fmt: skip
    flags = dict(
        L2NORM=bool(use_qk_l2norm_in_kernel), BETA_SIGMOID=bool(use_beta_sigmoid_in_kernel),
        NEG_EIGVAL=bool(allow_neg_eigval), DOT_DTYPE=dot_dtype, PRECISION=dot_precision,
    )  # fmt: skip
    chunk_intra[grid](
        c.q, c.k, G, c.beta, Aqk, Minv, c.cu_seqlens, chunks, c.scale, T, i_b_heads,
        H=H, HV=HV, K=K, BT=BT, BC=BC, BK=BK, IS_VARLEN=varlen,
        SOLVE_PRECISION="ieee" if precision == "ieee" else "tf32x3", num_warps=BLOCKS.warps(K), **flags,
    )  # fmt: skip
    chunk_recurrence[(triton.cdiv(V, BV) * N * HV,)](
        c.q, c.k, c.v, G, c.beta, Aqk, Minv, o, c.initial_state, ht, c.cu_seqlens, c.scale, T, NT,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BV, IS_VARLEN=varlen,
        HAS_H0=c.initial_state is not None, STORE_HT=ht is not None, num_warps=BLOCKS.warps(K), **flags,
    )  # fmt: skip
    return o, ht


def chunk_kda_ieee(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    """chunk_kda with precision="ieee": full fp32 dot operands, for verification-grade results."""
    if "precision" in kw:
        raise ValueError("precision: chunk_kda_ieee fixes precision='ieee'; call chunk_kda to choose")
    return chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, precision="ieee", **kw)


# float16 inputs work (equivalence/test_kda_chunk.py) but are not declared: the suite draws
# input scales up to 100, where its own float16 same-precision reference overflows (|o| > 65504)
# and the case is rejected as out of range.
_CAPS = dict(dtypes=("float32", "bfloat16"), gva=True, varlen=True, gate_in_kernel=True, l2norm_in_kernel=True)
chunk_kda.kdaverify_capabilities = Capabilities(precision="tf32", **_CAPS)
chunk_kda_ieee.kdaverify_capabilities = Capabilities(precision="ieee", **_CAPS)
