"""FLOP and byte models of the ops the sweep times (DESIGN.md section 6).

A model counts the *useful* work of an op: the multiply-adds of its algorithm (2 FLOPs each)
and the bytes that must cross memory at least once (each input read once, each output
written once). Together with measured ceilings they give a floor time:

    floor = max(flops / peak_flops, bytes / bandwidth)

and a kernel's fraction of roofline is floor / measured. Elementwise work (exp, cumsum,
scaling by beta or a decay) is O(C K) per chunk against the O(C^2 K + C K V) of the
products, and is left out of the chunked models (about 1% at C = 64, K = V = 128).

Notation: B batch, T tokens, H query/key heads, HV value heads, K key size, V value size,
C chunk size (64, as the kernels use), NT = ceil(T / C) chunks, the last one c = T - (NT-1) C
tokens long. Sizes in bytes: `e` the input element size, fp32 states.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdaverify.reference.conventions import Sizes  # for decode, B is the number of sequences N, T = 1

CHUNK = 64
STATE_BYTES = 4  # states are float32 by the calling convention (DESIGN.md section 3)
OPS = ("chunk_kda", "recurrent_kda", "chunk_dplr", "attention")
MODES = ("fwd", "fwdbwd", "decode")


@dataclass(frozen=True)
class Shape(Sizes):
    """Sizes, with inputs of elem_bytes each."""

    elem_bytes: int


def _chunks(T: int, C: int) -> list[int]:
    """Lengths of the chunks of a T-token sequence: full chunks, then a shorter tail."""
    return [min(C, T - s) for s in range(0, T, C)]


def forward_substitution_flops(c: int) -> int:
    """(I + L)^{-1} Diag(beta) of a c x c strictly lower L, row by row: row r multiplies the
    finished r x r block, 1 x r times r x r, 2 r^2 FLOPs; summed over r = 0..c-1 that is
    (c - 1) c (2c - 1) / 3."""
    return (c - 1) * c * (2 * c - 1) // 3


def chunk_kda_flops(s: Shape, C: int = CHUNK) -> int:
    """Forward FLOPs of the chunked KDA algorithm (DESIGN.md section 4), per value head and
    chunk of c tokens (products p x q times q x r cost 2 p q r):

        L   = (Gam K)(K / Gam)^T        c x K x c   2 c^2 K
        M   = (I + L)^{-1} Diag(beta)   forward substitution (see above)
        W   = M (Gam K)                 c x c x K   2 c^2 K
        U   = M V                       c x c x V   2 c^2 V
        W S                             c x K x V   2 c K V
        A   = (Gam Q)(K / Gam)^T        c x K x c   2 c^2 K
        (Gam Q) S                       c x K x V   2 c K V
        A V'                            c x c x V   2 c^2 V
        ((Gam_C / Gam) K)^T V'          K x c x V   2 c K V

    total 6 c^2 K + 4 c^2 V + 6 c K V + (c - 1) c (2c - 1) / 3, times B HV.
    """
    per_head = sum(6 * c * c * s.K + 4 * c * c * s.V + 6 * c * s.K * s.V + forward_substitution_flops(c)
                   for c in _chunks(s.T, C))  # fmt: skip
    return s.B * s.HV * per_head


def chunk_dplr_flops(s: Shape, C: int = CHUNK) -> int:
    """Forward FLOPs of the chunked DPLR delta rule S_t = (D_t + b_t a_t^T) S_{t-1} + k_t v_t^T,
    per value head and chunk of c tokens. With x_i = a_i^T S_{i-1} (the low-rank read),
    x = (I - A_ab)^{-1} ((Gam a) S + A_ak V), so

        A_ab, A_ak, A_qk, A_qb          four c x K x c products   8 c^2 K
        T = (I - A_ab)^{-1}             forward substitution
        W = T (Gam a)                   c x c x K   2 c^2 K
        U = T (A_ak V)                  2 x (c x c x V)           4 c^2 V
        x = W S + U                     c x K x V   2 c K V
        O = (Gam q) S + A_qk V + A_qb x 2 c K V + 4 c^2 V
        S' = Gam_C S + (Gam_C/Gam b)^T x + (Gam_C/Gam k)^T V      4 c K V

    total 10 c^2 K + 8 c^2 V + 8 c K V + forward substitution, times B HV: the extra
    intra-chunk products are what KDA's tying of a and b to k saves."""
    per_head = sum(10 * c * c * s.K + 8 * c * c * s.V + 8 * c * s.K * s.V + forward_substitution_flops(c)
                   for c in _chunks(s.T, C))  # fmt: skip
    return s.B * s.HV * per_head


def recurrent_kda_flops(s: Shape) -> int:
    """FLOPs of the token-by-token recurrence (fused recurrent; decode is T = 1), per value
    head and token, counting each scalar multiply and add once:

        S' = Diag(exp(g)) S        K V multiplies
        S'^T k                     K V multiplies + K V adds
        e = v - S'^T k             V
        beta k                     K
        S = S' + (beta k) e^T      K V multiplies + K V adds
        scale q                    K
        o = S^T (scale q)          K V multiplies + K V adds

    total 7 K V + V + 2 K, times B T HV."""
    return s.B * s.T * s.HV * (7 * s.K * s.V + s.V + 2 * s.K)


def attention_flops(s: Shape) -> int:
    """Causal softmax attention (K = V = head size D): query i scores keys 0..i (2 D (i+1))
    and sums as many values (2 (i+1) V): per head 2 (K + V) T (T + 1) / 2, times B HV.
    The softmax itself is O(T^2) elementwise and left out."""
    return s.B * s.HV * (s.K + s.V) * s.T * (s.T + 1)


def kda_io_bytes(s: Shape) -> int:
    """One pass over a KDA call's tensors: q, k [B, T, H, K], v [B, T, HV, V], g [B, T, HV, K],
    beta [B, T, HV] read, o [B, T, HV, V] written, all of elem_bytes."""
    return s.elem_bytes * s.B * s.T * (2 * s.H * s.K + s.HV * (2 * s.V + s.K + 1))


def dplr_io_bytes(s: Shape) -> int:
    """q, k [B, T, H, K], a, b, gk [B, T, HV, K], v [B, T, HV, V] read, o written."""
    return s.elem_bytes * s.B * s.T * (2 * s.H * s.K + s.HV * (3 * s.K + 2 * s.V))


def attention_io_bytes(s: Shape) -> int:
    """q, k [B, T, H, K] (H = HV), v [B, T, HV, V] read, o [B, T, HV, V] written."""
    return s.elem_bytes * s.B * s.T * (2 * s.H * s.K + 2 * s.HV * s.V)


def state_bytes(s: Shape) -> int:
    """One fp32 state [B, HV, K, V]."""
    return STATE_BYTES * s.B * s.HV * s.K * s.V


def flops(op: str, mode: str, s: Shape) -> int:
    """FLOPs of op in mode. Backward: every product C = A B of the forward has two gradient
    products dA = dC B^T and dB = A^T dC of the same size, so a backward costs twice its
    forward and forward+backward three times (kernels that recompute forward pieces in the
    backward do more than this useful count). Decode is the recurrence at T = 1."""
    if op not in OPS or mode not in MODES:
        raise ValueError(f"op, mode: expected one of {OPS} and {MODES}, got {op!r}, {mode!r}")
    fwd = {
        "chunk_kda": chunk_kda_flops,
        "recurrent_kda": recurrent_kda_flops,
        "chunk_dplr": chunk_dplr_flops,
        "attention": attention_flops,
    }[op](s)
    return 3 * fwd if mode == "fwdbwd" else fwd


def nbytes(op: str, mode: str, s: Shape) -> int:
    """Bytes that must cross memory at least once.

    fwd: the op's tensors once (kda_io_bytes, dplr_io_bytes, attention_io_bytes).
    fwdbwd: the forward (inputs read, o written), then a backward that reads the inputs and
        do and writes one gradient per input: 2 x fwd + the inputs once more.
    decode: the token's tensors once plus the fp32 state read and the new state written
        (2 x state_bytes): at serving sizes the state is nearly all of it.
    """
    if op not in OPS or mode not in MODES:
        raise ValueError(f"op, mode: expected one of {OPS} and {MODES}, got {op!r}, {mode!r}")
    io = {"chunk_kda": kda_io_bytes, "recurrent_kda": kda_io_bytes, "chunk_dplr": dplr_io_bytes,
          "attention": attention_io_bytes}[op](s)  # fmt: skip
    if mode == "decode":
        return io + 2 * state_bytes(s)
    if mode == "fwdbwd":
        out = s.elem_bytes * s.B * s.T * s.HV * s.V
        inputs = io - out
        return io + (inputs + out) + inputs  # forward; inputs and do read; one gradient per input written
    return io


def floor_ms(op: str, mode: str, s: Shape, peak_tflops: float, bandwidth_gbs: float) -> float:
    """The roofline floor in milliseconds under the given ceilings (TFLOP/s, GB/s)."""
    if peak_tflops <= 0 or bandwidth_gbs <= 0:
        raise ValueError(f"peak_tflops, bandwidth_gbs: expected positive ceilings, got {peak_tflops}, {bandwidth_gbs}")
    return max(flops(op, mode, s) / (peak_tflops * 1e9), nbytes(op, mode, s) / (bandwidth_gbs * 1e6))
