"""Oracle self-consistency (DESIGN.md section 5, tiers 1-3): the NumPy gold, its PyTorch
twin, the chunkwise WY/UT algorithm, the DPLR mapping and the gate activations agree with
each other, each checked against something computed independently in the test.

Cases are CaseSpecs drawn from strategies.py with the default Capabilities (everything
declared), so every shape, gate regime, beta range and input scale of the suite is seen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.implementation import Capabilities
from kdaverify.equivalence.strategies import CASE_FAMILIES, SHORT_T, case_specs, seeds
from kdaverify.equivalence.tolerance import errors
from kdaverify.reference import (
    beta_activation,
    chunk_decay,
    compose_affine,
    dplr_recurrent,
    dplr_recurrent_np,
    kda_as_dplr,
    kda_chunkwise,
    kda_gate,
    kda_recurrent,
    kda_recurrent_np,
    l2norm,
    round_operand,
    ut_transform,
    wy_representation,
)

CAPS = Capabilities()
EPS = float(np.finfo(np.float64).eps)  # 2 u of float64

# Two float64 evaluations of the same recurrence that differ only in the order of their
# roundings drift apart by a few u (1.1e-16) per token; over the longest histories drawn
# (T = 3072) that is at most ~1e-12, and the transition is a contraction (unit k, beta <=
# 2, g <= 0) so nothing amplifies it. Measured: under 1e-15 on every family.
SELF_TOL = 1e-12
# Chunkwise ratios Gam_r / Gam_i = exp(G_r - G_i) come from a cumulative sum G of up to
# |G| = C * 1000 (masked tokens); each rounded G carries ~u |G| absolute error, which
# exp turns into a relative error of the same size. The error is inherent to forming
# ratios from a chunk-wide cumulative sum (not a bug), so the budget grows with the
# largest |G| actually seen. Measured: at most 0.34 eps |G|; 4 eps |G| leaves room.
LOG_DECAY_UNITS = 4.0


def as_torch(arrays: dict) -> dict:
    return {n: None if x is None else torch.as_tensor(x) for n, x in arrays.items()}


def kda_args(a: dict, spec: CaseSpec) -> tuple[tuple, dict]:
    args = tuple(a[n] for n in ("q", "k", "v", "g", "beta"))
    kw = dict(scale=spec.scale, initial_state=a["initial_state"], output_final_state=True, cu_seqlens=a["cu_seqlens"])
    return args, kw


def gold(spec: CaseSpec, a: dict | None = None):
    """(o, final_state) of the NumPy float64 recurrence on the spec's arrays."""
    args, kw = kda_args(spec.arrays() if a is None else a, spec)
    return kda_recurrent_np(*args, **kw)


def assert_close(what: str, x, target, tol: float) -> None:
    e = errors(x, target)
    assert e.rel_rms <= tol and e.rel_max <= tol, f"{what}: {e} exceeds {tol:.3g}"


def assert_pair(what: str, x, target, tol: float) -> None:
    assert_close(f"{what}: o", x[0], target[0], tol)
    assert_close(f"{what}: final_state", x[1], target[1], tol)


def max_chunk_log_decay(g: np.ndarray, cu_seqlens, chunk_size: int) -> float:
    """The largest |G| (cumulative log decay inside one chunk) the chunkwise algorithm
    forms, chunks counted from each sequence's start as kda_chunkwise does."""
    g = np.where(np.isneginf(g), 0.0, g)  # a reset (g = -inf) is handled exactly, outside the sums
    T = g.shape[1]
    spans = [(0, T)] if cu_seqlens is None else list(zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True))
    worst = 0.0
    for a, b in spans:
        for s in range(int(a), int(b), chunk_size):
            worst = max(worst, float(np.abs(np.cumsum(g[:, s : min(s + chunk_size, int(b))], axis=1)).max()))
    return worst


def chunk_tol(g, cu_seqlens, chunk_size: int) -> float:
    return SELF_TOL + LOG_DECAY_UNITS * EPS * max_chunk_log_decay(g, cu_seqlens, chunk_size)


def heads_first(a: dict, spec: CaseSpec):
    """One unpacked batch as [B, HV, T, *] tensors (k expanded to the value heads), the
    layout of ut_transform and wy_representation."""

    def to(x):
        return torch.as_tensor(np.ascontiguousarray(np.moveaxis(x, 2, 1)))

    k = np.repeat(a["k"], spec.G, axis=2)  # value head j reads key head j // G
    return to(k), to(a["v"]), to(a["g"]), to(a["beta"])


# ------------------------------------------------------------- tier 1 == tier 2


@pytest.mark.parametrize("family", ["general", "long", "length_one", "varlen", "gva", "batch", "zero_beta"])
@given(data=st.data())
def test_numpy_equals_torch_float64(family, data):
    """kda_recurrent (float64) equals kda_recurrent_np: o and final state."""
    spec = data.draw(CASE_FAMILIES[family](CAPS), label="spec")
    a = spec.arrays()
    args, kw = kda_args(as_torch(a), spec)
    o, S = kda_recurrent(*args, **kw)
    assert o.dtype == torch.float64 and S.dtype == torch.float64
    assert_pair("torch vs numpy", (o, S), gold(spec, a), SELF_TOL)


# ------------------------------------------------------------- tier 3 == tier 1

CHUNK_FAMILIES = {
    # T not a multiple of the chunk (where it can be), always with an initial state
    "ragged": lambda C: case_specs(CAPS, T=SHORT_T.filter(lambda t: C == 1 or t % C), h0=True),
    "varlen": lambda C: CASE_FAMILIES["varlen"](CAPS),
    "gva": lambda C: CASE_FAMILIES["gva"](CAPS),
}


@pytest.mark.parametrize("family", sorted(CHUNK_FAMILIES))
@pytest.mark.parametrize("chunk_size", [1, 2, 16, 64])
@given(data=st.data())
def test_chunkwise_equals_recurrent(chunk_size, family, data):
    """kda_chunkwise (float64) equals the gold recurrence at every chunk size."""
    spec = data.draw(CHUNK_FAMILIES[family](chunk_size), label="spec")
    a = spec.arrays()
    args, kw = kda_args(as_torch(a), spec)
    got = kda_chunkwise(*args, chunk_size=chunk_size, **kw)
    tol = chunk_tol(a["g"], a["cu_seqlens"], chunk_size)
    assert_pair(f"chunkwise C={chunk_size} vs recurrent", got, gold(spec, a), tol)


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@given(spec=case_specs(CAPS, T=st.integers(2, 150), gate="reset", h0=True))
def test_chunkwise_hard_reset(chunk_size, spec):
    """g = -inf (a hard reset, inside the contract) gives finite results in every tier, equal
    to the gold: at a reset the state restarts from the token's own write."""
    a = spec.arrays()
    if not np.isneginf(a["g"]).any():  # the regime draws -inf with p = 0.1: small cases can miss it
        a["g"][0, spec.T // 2, 0, 0] = -np.inf
    args, kw = kda_args(as_torch(a), spec)
    want = gold(spec, a)
    assert np.all(np.isfinite(want[0])) and np.all(np.isfinite(want[1]))
    got = kda_chunkwise(*args, chunk_size=chunk_size, **kw)
    assert_pair(f"chunkwise C={chunk_size} under resets vs recurrent", got, want, chunk_tol(a["g"], None, chunk_size))
    assert_pair("torch recurrence under resets vs numpy", kda_recurrent(*args, **kw), want, SELF_TOL)


def test_reset_wipes_the_state():
    """A reset on every channel at token t makes everything after t independent of the
    tokens before it (and of the initial state), in the gold and the chunkwise tier."""
    spec = CaseSpec(T=40, K=3, V=2, h0=True, seed=3, gate="mild")
    a = spec.arrays()
    b = CaseSpec(T=40, K=3, V=2, h0=True, seed=4, gate="mild").arrays()
    for x in (a, b):
        x["g"][:, 20] = -np.inf
    for n in ("q", "k", "v", "g", "beta"):
        b[n][:, 20:] = a[n][:, 20:]
    for run in (kda_recurrent_np, kda_chunkwise):
        (oa, _), (ob, _) = (run(*kda_args(as_torch(x), spec)[0], **kda_args(as_torch(x), spec)[1]) for x in (a, b))
        assert np.all(np.isfinite(np.asarray(oa)))
        np.testing.assert_array_equal(np.asarray(oa)[:, 20:], np.asarray(ob)[:, 20:])


@given(spec=CASE_FAMILIES["long"](CAPS))
def test_chunkwise_long_history(spec):
    """Thousands of tokens through the chunk hand-off (C = 64) still equal the gold."""
    a = spec.arrays()
    args, kw = kda_args(as_torch(a), spec)
    got = kda_chunkwise(*args, chunk_size=64, **kw)
    assert_pair("chunkwise C=64 long vs recurrent", got, gold(spec, a), chunk_tol(a["g"], None, 64))


# ------------------------------------------------------------- KDA as DPLR


@pytest.mark.parametrize("family", ["general", "varlen", "gva"])
@given(data=st.data())
def test_kda_equals_dplr_mapping(family, data):
    """dplr_recurrent_np on kda_as_dplr's arguments equals kda_recurrent_np, and the torch
    form of the mapping through dplr_recurrent (float64) gives the same."""
    spec = data.draw(CASE_FAMILIES[family](CAPS), label="spec")
    a = spec.arrays()
    want = gold(spec, a)
    for name, x in (("numpy", a), ("torch", as_torch(a))):
        args, kw = kda_args(x, spec)
        run = dplr_recurrent_np if name == "numpy" else dplr_recurrent
        assert_pair(
            f"dplr_recurrent({name} kda_as_dplr) vs kda_recurrent_np", run(**kda_as_dplr(*args), **kw), want, SELF_TOL
        )


@pytest.mark.parametrize("family", ["general", "varlen", "gva"])
@given(data=st.data())
def test_dplr_torch_equals_numpy(family, data):
    """dplr_recurrent (float64) equals dplr_recurrent_np with a and b not tied to k."""
    spec = data.draw(CASE_FAMILIES[family](CAPS), label="spec")
    a = spec.arrays()
    d = spec.dplr_arrays()
    dplr = {n: d[n] for n in ("q", "k", "v", "a", "b", "gk")}
    t = as_torch(a)
    want = dplr_recurrent_np(**dplr, **kda_args(a, spec)[1])
    got = dplr_recurrent(**as_torch(dplr), **kda_args(t, spec)[1])
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    assert_pair("dplr torch vs numpy", got, want, SELF_TOL)


# ------------------------------------------------------------- one chunk: UT and WY

# One chunk of up to 16 tokens (a kernel's secondary chunk), one unpacked sequence, with a
# random entering state S0.
one_chunk = case_specs(CAPS, T=st.integers(1, 16), packed=False, B=1, h0=True)


def prefix_states(a: dict, spec: CaseSpec) -> torch.Tensor:
    """S_r for r = 1..T from kda_recurrent (float64) run on the first r tokens: [HV, T, K, V]."""
    t = as_torch(a)
    out = []
    for r in range(1, spec.T + 1):
        args = tuple(t[n][:, :r] for n in ("q", "k", "v", "g", "beta"))
        out.append(kda_recurrent(*args, initial_state=t["initial_state"], output_final_state=True)[1][0])
    return torch.stack(out, dim=1)


def wy_term_sizes(k, v, g, beta):
    """Elementwise sizes of the terms the WY sums add up, [..., C, K, K] and [..., C, K, V]:
    Diag(Gam_r) + sum_i Diag(Gam_r / Gam_i) |k_i| |w_i|^T and sum_i Diag(Gam_r / Gam_i) |k_i| |u_i|^T.
    These sums cancel heavily (a product of near-projections I - beta k k^T with beta ~ 1
    is tiny while its terms are O(1)), and rounding in a sum is relative to the size of its
    terms (Higham, section 3.1), not to the size of the result."""
    G, R = chunk_decay(g)
    _, W, U = ut_transform(k, v, beta, (G, R))
    P = torch.diag_embed(G.exp()) + torch.einsum("...rik,...ik,...ij->...rkj", R, k.abs(), W.abs())
    return P, torch.einsum("...rik,...ik,...iv->...rkv", R, k.abs(), U.abs())


def assert_within(what: str, x, target, tol: float, size: float) -> None:
    err = (x - target).abs().max().item()
    assert err <= tol * size, f"{what}: max |error| {err:.3g} > {tol:.3g} x term size {size:.3g}"


@given(spec=one_chunk)
def test_wy_map_reproduces_recurrence(spec):
    """P_r S0 + H_r from wy_representation equals the recurrence's state after r tokens."""
    a = spec.arrays()
    k, v, g, beta = (x[0] for x in heads_first(a, spec))  # [HV, C, *]
    P, H = wy_representation(k, v, g, beta)
    assert P.shape == (spec.HV, spec.T, spec.K, spec.K) and H.shape == (spec.HV, spec.T, spec.K, spec.V)
    S0 = torch.as_tensor(a["initial_state"][0])[:, None]  # [HV, 1, K, V]
    want = prefix_states(a, spec)
    absP, absH = wy_term_sizes(k, v, g, beta)
    tol = chunk_tol(a["g"], None, spec.T)
    for r in range(spec.T):  # each S_r on its own scale, so a small late state is checked too
        # the WY form's terms, or the largest state the recurrence passed through to get here
        size = max((absP[:, r] @ S0[:, 0].abs() + absH[:, r]).max().item(), want[:, : r + 1].abs().max().item())
        assert_within(f"P_r S0 + H_r at r={r + 1}", (P @ S0 + H)[:, r], want[:, r], tol, size)


@given(spec=case_specs(CAPS, T=st.integers(2, 16), packed=False, B=1), cut=st.integers(1, 15))
def test_compose_affine_joins_chunks(spec, cut):
    """compose_affine of two consecutive chunks' final maps equals the joined chunk's map."""
    cut = min(cut, spec.T - 1)
    k, v, g, beta = (x[0] for x in heads_first(spec.arrays(), spec))

    def final_map(s, e):
        maps = wy_representation(k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e])
        sizes = wy_term_sizes(k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e])
        return tuple(x[:, -1] for x in maps), tuple(x[:, -1] for x in sizes)

    (P1, H1), (aP1, aH1) = final_map(0, cut)
    (P2, H2), (aP2, aH2) = final_map(cut, spec.T)
    (Pj, Hj), (aPj, aHj) = final_map(0, spec.T)
    P, H = compose_affine((P1, H1), (P2, H2))
    # the factors' errors (each tol x their term sizes) propagate through the product, so
    # twice the tolerance against the larger of the composed and the joined term sizes
    tol = 2 * chunk_tol(spec.arrays()["g"], None, spec.T)
    assert_within(f"composed P (cut {cut})", P, Pj, tol, max((aP2 @ aP1).max().item(), aPj.max().item()))
    assert_within(f"composed H (cut {cut})", H, Hj, tol, max((aP2 @ aH1 + aH2).max().item(), aHj.max().item()))


@given(spec=case_specs(CAPS, T=st.integers(1, 64), packed=False))
def test_ut_transform_inverts(spec):
    """M from ut_transform solves (I + L) M = Diag(beta) with L built here from
    exp(G_r - G_i), and W = M (Gam * K), U = M V."""
    a = spec.arrays()
    k, v, g, beta = heads_first(a, spec)  # [B, HV, C, *]
    M, W, U = ut_transform(k, v, beta, chunk_decay(g))
    k, v, g, beta, M = (x.numpy() for x in (k, v, g, beta, M))
    C = spec.T
    G = np.cumsum(g, axis=-2)
    # Gam_r / Gam_i for i < r as the product of exp(g_j) over i < j <= r (zero above the
    # diagonal): independent of the log-space form, and exact under g = -inf (a reset)
    decay = np.exp(g)
    ratio = np.zeros(g.shape[:-1] + (C, g.shape[-1]))
    for r in range(C):
        acc = np.ones_like(decay[..., 0, :])
        for i in range(r - 1, -1, -1):
            acc = acc * decay[..., i + 1, :]
            ratio[..., r, i, :] = acc
    L = beta[..., :, None] * np.einsum("...rc,...ric,...ic->...ri", k, ratio, k)
    eye = np.eye(C)
    assert np.all(np.triu(M, 1) == 0), "M: not lower triangular"
    # Forward substitution is backward stable: (I + L + dL) M = Diag(beta) with |dL| <=
    # C u |I + L| (Higham, Thm. 8.5); this L differs from the reference's by a K-term
    # summation order and by the exp(G_r - G_i) rounding of chunk_tol. So the residual is
    # bounded by that relative size times |I + L| |M|, normwise.
    ratio_err = 2 * (C + spec.K) * EPS + chunk_tol(a["g"], None, C)
    residual = np.abs((eye + L) @ M - beta[..., None] * eye).max()
    scale = (np.abs(eye + L) @ np.abs(M)).max()
    assert residual <= ratio_err * scale, f"(I + L) M - Diag(beta): {residual:.3g} > {ratio_err:.3g} x {scale:.3g}"
    # W and U are C-term products of M: |error| <= C u |M| |X| for X = Gam * K or V
    gam_k = np.exp(G) * k
    for name, got, X in (("W", W.numpy(), gam_k), ("U", U.numpy(), v)):
        err = np.abs(got - M @ X).max()
        bound = ratio_err * (np.abs(M) @ np.abs(X)).max()
        assert err <= bound, f"{name} vs M X: {err:.3g} > {bound:.3g}"


# ------------------------------------------------------------- gates and activations


def gate_inputs(seed: int, HV: int, K: int, z_scale: float, dtype):
    rng = np.random.default_rng(seed)
    z = torch.as_tensor(z_scale * rng.standard_normal((2, 3, HV, K)), dtype=dtype)
    A_log = torch.as_tensor(rng.uniform(-2, 2, HV), dtype=dtype)
    dt_bias = torch.as_tensor(rng.uniform(-2, 2, HV * K), dtype=dtype)
    return z, A_log, dt_bias


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) in float64, to a few u; exp(-x) may overflow to inf, giving 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


gate_draws = dict(
    seed=seeds, HV=st.integers(1, 4), K=st.integers(1, 8), z_scale=st.sampled_from([0.1, 1.0, 10.0, 100.0])
)


@given(**gate_draws, bias=st.booleans())
def test_kda_gate_softplus_form(seed, HV, K, z_scale, bias):
    """g = -exp(A_log[h]) * softplus(z + dt_bias[h, :]) <= 0, against the formula in NumPy."""
    z, A_log, dt_bias = gate_inputs(seed, HV, K, z_scale, torch.float64)
    g = kda_gate(z, A_log, dt_bias if bias else None)
    assert g.dtype == torch.float64 and g.shape == z.shape
    x = z.numpy() + (dt_bias.numpy().reshape(HV, K) if bias else 0.0)
    want = -np.exp(A_log.numpy())[:, None] * np.logaddexp(0.0, x)
    # torch's softplus returns x itself above its threshold 20, dropping log1p(exp(-x)):
    # a relative error of at most exp(-20) / 20 = 1.03e-10 there; elsewhere a few u.
    tol = np.exp(-20.0) / 20 * 1.01 + 8 * EPS
    assert np.all(np.abs(g.numpy() - want) <= tol * np.abs(want)), "softplus gate differs from its formula"
    assert np.all(g.numpy() <= 0)
    assert kda_gate(z.to(torch.bfloat16), A_log.float()).dtype == torch.float32  # 16-bit z: float32 math


# a bound so close to 0 that lower_bound * sigmoid underflows is legal but meaningless
@given(**gate_draws, lower_bound=st.floats(-5.0, -(2.0**-20)))
def test_kda_gate_safe_form(seed, HV, K, z_scale, lower_bound):
    """g = lower_bound * sigmoid(exp(A_log[h]) * (z + dt_bias)), inside [lower_bound, 0]."""
    z, A_log, dt_bias = gate_inputs(seed, HV, K, z_scale, torch.float64)
    g = kda_gate(z, A_log, dt_bias, lower_bound=lower_bound).numpy()
    Ax = np.exp(A_log.numpy())[:, None] * (z.numpy() + dt_bias.numpy().reshape(HV, K))
    want = lower_bound * sigmoid(Ax)
    # sigmoid and the products are each a few u off; A = exp(A_log) may differ from NumPy's
    # by an ulp, so A x carries ~1.5 EPS |A x| and sigmoid's relative sensitivity to x is
    # 1 - sigmoid(x) <= 1, which turns that into a relative error of up to 1.5 EPS |A x|
    tol = 8 * EPS + 2 * EPS * np.abs(Ax)
    assert np.all(np.abs(g - want) <= tol * np.abs(want)), "safe gate differs from its formula"
    # In floating point a saturated sigmoid reaches 0 or 1 exactly, so the bounds are
    # attained; away from saturation (|A x| <= 30 in float64) g is strictly inside.
    assert np.all((lower_bound <= g) & (g <= 0))
    inner = np.abs(Ax) <= 30
    assert np.all((lower_bound < g[inner]) & (g[inner] < 0))
    g32 = kda_gate(z.float(), A_log.float(), dt_bias.float(), lower_bound=lower_bound)
    lb32 = torch.tensor(lower_bound, dtype=torch.float32)  # the bound as float32 can hold it
    assert g32.dtype == torch.float32 and bool(((lb32 <= g32) & (g32 <= 0)).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@given(seed=seeds, K=st.integers(1, 130), x_scale=st.sampled_from([1e-4, 1e-2, 1.0, 1e2]))
def test_l2norm_unit_rows(dtype, seed, K, x_scale):
    """Rows of l2norm(x) have squared norm s / (s + eps), s = sum x^2: unit up to eps."""
    x = torch.as_tensor(x_scale * np.random.default_rng(seed).standard_normal((3, 4, K)), dtype=dtype)
    y = l2norm(x)
    assert y.dtype == dtype
    s = (x.double() ** 2).sum(-1)
    norm2 = (y.double() ** 2).sum(-1)
    want = s / (s + 1e-6)
    # each element is x_i / sqrt(s + eps) computed in the compute dtype (K-term sum, rsqrt,
    # product: (K + 4) u_c relative) and then rounded to dtype (u_d); squaring doubles it
    u_c = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
    u_d = torch.finfo(dtype).eps / 2
    tol = 2 * ((K + 4) * u_c + u_d)
    assert bool(((norm2 - want).abs() <= tol * want).all()), (
        f"|l2norm(x)|^2 vs s/(s+eps): {(norm2 - want).abs().max():.3g}"
    )
    assert bool((norm2 <= 1 + tol).all())
    assert torch.equal(l2norm(torch.zeros(2, K, dtype=dtype)), torch.zeros(2, K, dtype=dtype))  # eps keeps 0 finite


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(seed=seeds, b_scale=st.sampled_from([1.0, 10.0, 1e3]), neg=st.booleans())
def test_beta_activation_range(dtype, seed, b_scale, neg):
    """beta = sigmoid(b) in [0, 1], or 2 sigmoid(b) in [0, 2] with negative eigenvalues."""
    b = torch.as_tensor(b_scale * np.random.default_rng(seed).standard_normal(64), dtype=dtype)
    beta = beta_activation(b, allow_neg_eigval=neg)
    top = 2.0 if neg else 1.0
    want = top * sigmoid(b.double().numpy())
    # sigmoid is a few unit roundoffs of dtype off (the factor 2 is exact); below the
    # smallest normal number of dtype the result underflows, so that is the floor
    fi = torch.finfo(dtype)
    assert np.all(np.abs(beta.double().numpy() - want) <= 4 * (fi.eps / 2) * want + fi.tiny)
    assert bool(((beta >= 0) & (beta <= top)).all())
    # saturation reaches the bounds exactly; |b| <= 10 stays strictly inside in fp32 and fp64
    inner = b.abs() <= 10
    assert bool(((beta[inner] > 0) & (beta[inner] < top)).all())


# ------------------------------------------------------------- round_operand


def finite_float32(seed: int, n: int = 4096) -> torch.Tensor:
    """Normal float32 values of every exponent except the top one (rounding up there
    would leave the float32 range) and every mantissa, both signs, from raw bits."""
    rng = np.random.default_rng(seed)
    bits = (rng.integers(0, 2, n) << 31) | (rng.integers(1, 254, n) << 23) | rng.integers(0, 1 << 23, n)
    return torch.as_tensor(bits.astype(np.uint32).view(np.int32)).view(torch.float32)


def tf32_low_bits_clear(r: torch.Tensor) -> bool:
    """tf32 keeps 10 of float32's 23 mantissa bits: the low 13 must be zero."""
    return bool(((r.view(torch.int32) & 0x1FFF) == 0).all())


@given(seed=seeds)
def test_round_operand_tf32_truncates(seed):
    """Precision "tf32" (Triton's tl.dot) truncates to 10 mantissa bits: toward zero, by less than
    one tf32 ulp, i.e. 0 <= |x| - |r| < 2**-10 |x|."""
    x = finite_float32(seed)
    r = round_operand(x, "tf32")
    assert r.dtype == torch.float32 and tf32_low_bits_clear(r), "tf32: low 13 mantissa bits not dropped"
    assert bool((torch.sign(r) == torch.sign(x)).all() and (r.abs() <= x.abs()).all()), "tf32: not toward zero"
    rel = ((x.double() - r.double()).abs() / x.double().abs()).max().item()
    assert rel < 2.0**-10, f"tf32: relative truncation error {rel:.3g} >= 2**-10"
    assert torch.equal(round_operand(r, "tf32"), r)  # representable values are kept


@given(seed=seeds)
def test_round_operand_tf32_rn_rounds_to_nearest(seed):
    """Precision "tf32_rn" (cuBLAS, cvt.rna) rounds to 10 mantissa bits: |x - r| <= 2**-11 |x|."""
    x = finite_float32(seed)
    r = round_operand(x, "tf32_rn")
    assert r.dtype == torch.float32 and tf32_low_bits_clear(r), "tf32_rn: low 13 mantissa bits not dropped"
    rel = ((x.double() - r.double()).abs() / x.double().abs()).max().item()
    assert rel <= 2.0**-11, f"tf32_rn: relative rounding error {rel:.3g} > 2**-11"
    assert torch.equal(round_operand(r, "tf32_rn"), r)


def test_round_operand_tf32_ties():
    """At a tie "tf32_rn" rounds away from zero (not to even) and "tf32" toward zero."""
    tie = 1 + 2.0**-11  # halfway between 1 and 1 + 2**-10
    up = 1 + 2.0**-10
    x = torch.tensor([tie, -tie, tie - 2.0**-23, up - 2.0**-23, 2.0**40 * tie], dtype=torch.float32)
    rn = torch.tensor([up, -up, 1.0, up, 2.0**40 * up], dtype=torch.float32)
    trunc = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0**40], dtype=torch.float32)
    assert torch.equal(round_operand(x, "tf32_rn"), rn)
    assert torch.equal(round_operand(x, "tf32"), trunc)


@given(seed=seeds)
def test_round_operand_bf16(seed):
    """bf16 equals torch's bfloat16 cast: 8 significant bits, |x - r| <= 2**-8 |x|."""
    x = finite_float32(seed)
    x = x[x.abs() < 3e38]  # values that round past the bfloat16 maximum become inf
    r = round_operand(x, "bf16")
    assert r.dtype == torch.float32
    assert torch.equal(r, x.to(torch.bfloat16).to(torch.float32))
    assert bool(((r.view(torch.int32) & 0xFFFF) == 0).all())
    assert ((x.double() - r.double()).abs() / x.double().abs()).max().item() <= 2.0**-8
    for none in (None, "ieee"):
        assert round_operand(x, none) is x


# ------------------------------------------------------------- layering


def test_reference_does_not_import_kernels():
    """The oracle stands alone: nothing in reference/ imports from kernels/ (or from the
    suite), so a kernel bug can never leak into the definition it is checked against."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "reference"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                # a relative import that climbs out of reference/ counts as reaching above it
                names = (
                    [node.module or ""] if node.level == 0 else ([".." + (node.module or "")] if node.level > 1 else [])
                )
            above = ("kdaverify.kernels", "kdaverify.equivalence", "kdaverify.perf", "kdaverify.cli", "..")
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(above) or n == "kdaverify"]
    assert not offenders, f"reference/ imports project layers above it: {offenders}"


# ------------------------------------------------------------- empty sequences


@given(spec=CASE_FAMILIES["empty_sequences"](CAPS))
def test_empty_sequences_in_every_tier(spec):
    """A zero-length sequence (a repeated offset) changes nothing else, and its final state
    is its initial state (zeros without one), in every tier: the NumPy gold, the PyTorch
    recurrence, the chunkwise algorithm and the DPLR mapping."""
    assert 0 in spec.seqlens
    a = spec.arrays()
    kept = [n for n, length in enumerate(spec.seqlens) if length]
    h0 = a["initial_state"]
    dense = dict(a, cu_seqlens=np.concatenate([[0], np.cumsum([spec.seqlens[n] for n in kept])]).astype(np.int64))
    dense["initial_state"] = None if h0 is None else h0[kept]
    want_o, want_S = gold(spec, dense)
    t = as_torch(a)
    runs = {
        "numpy": lambda: kda_recurrent_np(*kda_args(a, spec)[0], **kda_args(a, spec)[1]),
        "torch": lambda: kda_recurrent(*kda_args(t, spec)[0], **kda_args(t, spec)[1]),
        "chunkwise": lambda: kda_chunkwise(*kda_args(t, spec)[0], **kda_args(t, spec)[1], chunk_size=4),
        "dplr": lambda: dplr_recurrent_np(**kda_as_dplr(*kda_args(a, spec)[0]), **kda_args(a, spec)[1]),
    }
    for name, run in runs.items():
        o, S = run()
        S = np.asarray(S)
        assert_close(f"{name}: o", o, want_o, SELF_TOL)
        assert_close(f"{name}: states of the non-empty sequences", S[kept], want_S, SELF_TOL)
        for n, length in enumerate(spec.seqlens):
            if length == 0:
                expected = np.zeros_like(S[n]) if h0 is None else h0[n]
                assert np.array_equal(S[n], expected), f"{name}: empty sequence {n} state is not its initial state"


@pytest.mark.parametrize("precision", ["tf32", "tf32_rn", "bf16"])
def test_round_operand_carries_a_rounded_gradient(precision):
    """The emulated roundings are differentiable (the gradient references of gradients.py go
    through them): the gradient passes through, rounded as the forward rounds."""
    x = torch.randn(64, dtype=torch.float32, requires_grad=True)
    up = torch.randn(64, dtype=torch.float32)
    (got,) = torch.autograd.grad(round_operand(x, precision), x, up)
    assert torch.equal(got, round_operand(up, precision))
    assert not torch.equal(got, up)  # float32 draws are not all representable in the narrower format
