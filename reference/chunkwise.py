"""KDA by the chunkwise WY/UT algorithm, written out plainly (arXiv 2510.26692v2, section 3.1).

A sequence is cut into chunks of C tokens (the last one may be shorter). Inside a chunk,
with G the inclusive cumulative sum of g and Gam_r = exp(G_r):

    L  = StrictTril( Diag(beta) (Gam * K) (K / Gam)^T )      eq. (6), inside the inverse
    M  = (I + L)^{-1} Diag(beta)                              eq. (6), by forward substitution
    W  = M (Gam * K),   U = M V                               eq. (7)
    V' = U - W S                                              pseudo-values
    O  = (Gam * Q) S + Tril( (Gam * Q)(K / Gam)^T ) V'         eq. (9)
    S_next = Diag(Gam_C) S + ((Gam_C / Gam) * K)^T V'          eq. (8)

Every ratio Gam_r / Gam_i is formed as exp(G_r - G_i) from log space, so strong or masking
gates (g = -1000) underflow to zero instead of overflowing: exp(G) and exp(-G) are never
multiplied together. The chunk is also an affine map of its entering state,
S_r = P_r S_0 + H_r (eqs. (2)-(5)); wy_representation builds it and compose_affine chains
two of them, the associativity that context parallelism relies on.

matmul_precision emulates a kernel's precision policy for the same-precision reference of
DESIGN.md section 5: the operands of every product are rounded to tf32 or bf16 and the
products accumulate in the compute dtype (float32 for that use).
"""

from __future__ import annotations

import torch

from .conventions import check_chunk_size, check_kda
from .kda import expand_heads
from .packing import run_torch

MATMUL_PRECISIONS = (None, "ieee", "tf32", "tf32_rn", "bf16")


def round_operand(x: torch.Tensor, precision: str | None) -> torch.Tensor:
    """Round x to what a tensor core reads for the given matmul precision.

    None / "ieee": unchanged. "bf16": round to bfloat16 (8-bit mantissa) and back.
    "tf32": float32 truncated to a 10-bit mantissa: what Triton's tl.dot feeds the tensor
        cores (measured on an H200 with Triton 3.6: a tf32 tl.dot sits 2e-7 from this
        emulation and 8e-4 from round-to-nearest; equivalence/test_precision_emulation.py).
    "tf32_rn": rounded to nearest, ties away from zero (cvt.rna.tf32.f32), as cuBLAS does
        for torch.matmul with allow_tf32 (measured in the same test).
    The result is returned in x's dtype.
    """
    if precision in (None, "ieee"):
        return x
    if precision == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if precision in ("tf32", "tf32_rn"):
        return _RoundTf32.apply(x, precision == "tf32_rn")
    raise ValueError(f"matmul_precision: expected one of {MATMUL_PRECISIONS}, got {precision!r}")


def _tf32(x: torch.Tensor, nearest: bool) -> torch.Tensor:
    bits = x.to(torch.float32).view(torch.int32)
    if nearest:
        bits = bits + 0x1000  # add half of the 13 dropped bits, then drop them
    rounded = (bits & ~0x1FFF).view(torch.float32).to(x.dtype)
    return torch.where(x.isnan(), x, rounded)  # a NaN with a low-bit payload stays NaN


class _RoundTf32(torch.autograd.Function):
    """The tf32 rounding, differentiable the way the bf16 cast is: the gradient passes through
    and is rounded the same way, so that autograd through a tf32-emulating reference rounds
    its gradients at the points where the forward rounds its operands (the gradient
    references of equivalence/gradients.py; integer bit views alone carry no gradient)."""

    @staticmethod
    def forward(ctx, x, nearest):
        ctx.nearest = nearest
        return _tf32(x, nearest)

    @staticmethod
    def backward(ctx, grad):
        return _tf32(grad, ctx.nearest), None


def _mm(a, b, precision):
    return round_operand(a, precision) @ round_operand(b, precision)


def chunk_decay(g: torch.Tensor):
    """Decay factors of one chunk from its per-token gates g [..., C, K].

    Returns (G, R): G [..., C, K] the inclusive cumulative sum, and R [..., C, C, K] with
    R[..., r, i, :] = Gam_r / Gam_i = exp(G_r - G_i) for i <= r and exactly 0 above the
    diagonal (the exponent is masked to -inf before exp, so nothing overflows).

    g = -inf is a hard reset (exp(-inf) = 0: the state is wiped), which masking code
    produces. G_r - G_i is then -inf - -inf = NaN for two positions after the same reset, so
    when a chunk holds a reset the exponent is formed from the cumulative sum restarted at
    each reset (the plain one, bitwise, when there is none) and set to -inf exactly where a
    reset lies in (i, r]: the ratio is exp of sum_{i < j <= r} g_j either way, with no -inf
    arithmetic.
    """
    reset = torch.isneginf(g)
    G = g.cumsum(dim=-2)
    C = g.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    if bool(reset.any()):
        # the cumulative sum restarted after each reset, so nothing before a reset (not even
        # its rounding) reaches the ratios after it
        finite, acc = torch.empty_like(g), torch.zeros_like(g[..., 0, :])
        for r in range(C):
            acc = torch.where(reset[..., r, :], torch.zeros_like(acc), acc + g[..., r, :])
            finite[..., r, :] = acc
        resets = reset.to(torch.int32).cumsum(dim=-2)  # resets in [1, r]
        D = finite[..., :, None, :] - finite[..., None, :, :]
        D = torch.where(resets[..., :, None, :] != resets[..., None, :, :], torch.full_like(D, float("-inf")), D)
    else:
        D = G[..., :, None, :] - G[..., None, :, :]
    R = torch.where(causal[..., None], D, torch.full_like(D, float("-inf"))).exp()
    return G, R


def _pair_products(x, k, R, precision):
    """[..., r, i] = sum_c x[r, c] (Gam_r / Gam_i)[c] k[i, c], i.e. ((Gam * X)(K / Gam)^T)_{ri},
    with the scaled x and k rounded as a kernel's dot operands would be."""
    xr = round_operand(x[..., :, None, :] * R, precision)
    return (xr * round_operand(k, precision)[..., None, :, :]).sum(-1)


def ut_transform(k, v, beta, decay, matmul_precision=None):
    """The UT transform of one chunk: M, W, U of eqs. (6)-(7).

    Args:
        k: [..., C, K] (already expanded to the value heads), v: [..., C, V], beta: [..., C],
        decay: (G, R) from chunk_decay(g).
    Returns:
        M [..., C, C] = (I + L)^{-1} Diag(beta), lower triangular, found row by row by
        forward substitution: M_r = beta_r e_r - sum_{i<r} L_{ri} M_i;
        W [..., C, K] = M (Gam * K);  U [..., C, V] = M V.
    """
    G, R = decay
    C = k.shape[-2]
    L = beta[..., :, None] * _pair_products(k, k, R, matmul_precision).tril(-1)
    # Forward substitution, one row at a time: rows >= r of M are still zero, and L is
    # strictly lower, so L[r] @ M sums exactly over the finished rows i < r. Each row is put
    # in place with torch.where, not an in-place write, so autograd runs through M (the
    # values are the same bit for bit).
    M = torch.zeros(*L.shape, dtype=k.dtype, device=k.device)
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    for r in range(C):
        row = beta[..., r, None] * eye[r] - (L[..., r, None, :] @ M)[..., 0, :]
        M = torch.where(eye[:, r, None] != 0, row[..., None, :], M)
    W = _mm(M, G.exp() * k, matmul_precision)
    U = _mm(M, v, matmul_precision)
    return M, W, U


def wy_representation(k, v, g, beta):
    """One chunk as an affine map of its entering state (eqs. (2)-(5)).

    Args: k, g [..., C, K], v [..., C, V], beta [..., C].
    Returns (P, H): P [..., C, K, K] and H [..., C, K, V] with S_r = P_r S_0 + H_r, where
        P_r = Diag(Gam_r) - sum_{i<=r} Diag(Gam_r / Gam_i) k_i w_i^T
        H_r = sum_{i<=r} Diag(Gam_r / Gam_i) k_i u_i^T.
    """
    decay = chunk_decay(g)
    G, R = decay
    _, W, U = ut_transform(k, v, beta, decay)
    P = torch.diag_embed(G.exp()) - torch.einsum("...rik,...ik,...ij->...rkj", R, k, W)
    H = torch.einsum("...rik,...ik,...iv->...rkv", R, k, U)
    return P, H


def compose_affine(first, second):
    """Chain two affine state maps S -> P S + H: first, then second. Returns (P, H) of
    S -> P2 (P1 S + H1) + H2 = (P2 P1) S + (P2 H1 + H2). Takes maps [..., K, K], [..., K, V]."""
    (P1, H1), (P2, H2) = first, second
    return P2 @ P1, P2 @ H1 + H2


def _chunk_forward(q, k, v, g, beta, S, scale, precision):
    """One chunk of one batch of sequences: q, k, g [B, HV, c, K], v [B, HV, c, V],
    beta [B, HV, c], S [B, HV, K, V]. Returns (O [B, HV, c, V], S_next)."""
    decay = chunk_decay(g)
    G, R = decay
    _, W, U = ut_transform(k, v, beta, decay, precision)
    Vp = U - _mm(W, S, precision)  # V' = U - W S
    A = _pair_products(q, k, R, precision)  # Tril((Gam*Q)(K/Gam)^T), zero above the diagonal
    O = scale * (_mm(G.exp() * q, S, precision) + _mm(A, Vp, precision))
    G_last = G[..., -1:, :]
    K_tail = R[..., -1, :, :] * k  # (Gam_C / Gam) * K: the last row of R, safe under g = -inf
    S_next = G_last.transpose(-1, -2).exp() * S + _mm(K_tail.transpose(-1, -2), Vp, precision)
    return O, S_next


def _scan_chunks(q, k, v, g, beta, scale, S, chunk_size, precision):
    """All chunks of a batch of sequences [B, T, HV, *] in order, carrying the state."""
    q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))  # [B, HV, T, *]
    beta = beta.transpose(1, 2)
    outs = []
    for s in range(0, v.shape[2], chunk_size):
        e = s + chunk_size
        O, S = _chunk_forward(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], g[:, :, s:e], beta[:, :, s:e], S, scale, precision
        )
        outs.append(O)
    return torch.cat(outs, dim=2).transpose(1, 2), S


def kda_chunkwise(
    q,
    k,
    v,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    chunk_size=64,
    matmul_precision=None,
):
    """KDA by the chunkwise WY/UT algorithm in PyTorch (section 3.1 of the paper).

    Differentiable: autograd through it in float32 is the chunkwise same-precision
    reference of the gradient checks (equivalence/gradients.py). The tf32 and bf16
    emulations round through integer bit views, which autograd does not go through.

    Shapes and returns as kda_recurrent: q, k [B, T, H, K], v [B, T, HV, V], g [B, T, HV, K],
    beta [B, T, HV], initial_state [N, HV, K, V]. Computed in the dtype of q. chunk_size is
    any power of two; T need not be a multiple of it (the tail chunk is shorter), and packed
    sequences are chunked each from its own start. matmul_precision in MATMUL_PRECISIONS
    rounds the operands of every product (see round_operand).
    """
    dims, scale, spans = check_kda(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    C = check_chunk_size(chunk_size)
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision: expected one of {MATMUL_PRECISIONS}, got {matmul_precision!r}")
    k, v, g, beta = (x.to(q.dtype) for x in (k, v, g, beta))
    tensors = (expand_heads(q, dims.HV), expand_heads(k, dims.HV), v, g, beta)

    def scan(q, k, v, g, beta, scale, S):
        return _scan_chunks(q, k, v, g, beta, scale, S, C, matmul_precision)

    o, S = run_torch(scan, tensors, scale, dims, initial_state, spans, cu_seqlens is not None)
    return o, (S if output_final_state else None)
