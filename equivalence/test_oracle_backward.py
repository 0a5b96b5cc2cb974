"""The gradient oracle checks itself (DESIGN.md section 5, "Gradients"): the NumPy float64
adjoint recurrence (kda_recurrent_backward_np) equals autograd through the float64 PyTorch
recurrence and central finite differences of the NumPy forward, on the suite's own case
families (GVA, packed batches, initial states, ragged and length-1 sequences, every gate
regime); the gradients of the fused activations equal autograd through reference/gates.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.gradients import LOSSES
from kdaverify.equivalence.implementation import Capabilities
from kdaverify.equivalence.strategies import CASE_FAMILIES, case_specs, seeds
from kdaverify.reference import (
    beta_activation,
    beta_activation_backward_np,
    kda_chunkwise,
    kda_gate,
    kda_gate_backward_np,
    kda_recurrent,
    kda_recurrent_backward_np,
    kda_recurrent_np,
    l2norm,
    l2norm_backward_np,
)

CAPS = Capabilities()
NAMES = ("q", "k", "v", "g", "beta", "initial_state")

# Two float64 evaluations of the same gradient that differ only in the order of their
# roundings (the adjoint loop vs autograd's reversed graph): a few u (1.1e-16) per token
# and operation, through a contraction (unit k, beta <= 2, g <= 0) over at most ~100
# tokens here (300 in the long case), so ~1e-13 of the gradient's size at worst; 1e-12
# is DESIGN.md's float64 agreement. Measured: at most 7e-13 relative to dh0's own norm
# (300 cases), far less relative to the whole gradient.
SELF_TOL = 1e-12
# Central differences with step FD_H on inputs of unit scale: truncation ~ FD_H^2 |L'''| / 6
# (L is a polynomial in q, k, v, beta and the initial state and exp-like in g, so |L'''| is
# of the order of the gradient itself on these short sequences), rounding ~ u |L| / FD_H
# ~ 1e-11 |L|. Both are near 1e-10 of the largest gradient entry; 1e-6 leaves four orders
# of magnitude and still rejects any wrong term (a wrong term is O(1) of the gradient).
FD_H = 1e-5
FD_TOL = 1e-6


def _cotangents(spec: CaseSpec, loss: str):
    use_o, use_state = LOSSES[loss]
    rng = np.random.default_rng(spec.seed + 17)
    do = rng.standard_normal((spec.B, spec.T, spec.HV, spec.V)) if use_o else None
    dht = rng.standard_normal((spec.N, spec.HV, spec.K, spec.V)) if use_state else None
    return do, dht


def _oracle(a: dict, spec: CaseSpec, do, dht) -> dict:
    grads = kda_recurrent_backward_np(
        a["q"], a["k"], a["v"], a["g"], a["beta"], do, dht, scale=spec.scale,
        initial_state=a["initial_state"], cu_seqlens=a["cu_seqlens"],
    )  # fmt: skip
    return dict(zip(NAMES, grads, strict=True))


def _autograd(a: dict, spec: CaseSpec, do, dht) -> dict:
    """Gradients by torch.autograd through kda_recurrent in float64 (initial_state: the
    zero state when none is given, to compare dh0 there too)."""
    h0 = a["initial_state"] if a["initial_state"] is not None else np.zeros((spec.N, spec.HV, spec.K, spec.V))
    t = {n: torch.tensor(a[n] if n != "initial_state" else h0, requires_grad=True) for n in NAMES}
    cu = None if a["cu_seqlens"] is None else torch.as_tensor(a["cu_seqlens"])
    o, S = kda_recurrent(
        *(t[n] for n in NAMES[:5]), scale=spec.scale, initial_state=t["initial_state"],
        output_final_state=True, cu_seqlens=cu,
    )  # fmt: skip
    loss = sum((x * torch.as_tensor(c)).sum() for x, c in ((o, do), (S, dht)) if c is not None)
    loss.backward()
    return {
        n: np.zeros_like(a[n] if a[n] is not None else h0) if t[n].grad is None else t[n].grad.numpy() for n in NAMES
    }


def _assert_grads_close(what: str, got: dict, want: dict, tol: float) -> None:
    """Each gradient's error relative to the size of the whole gradient (all six tensors):
    a gradient that the contraction shrinks (dh0 after strong or masked gates, far below
    the adjoint it comes from) carries rounding errors of the size of that adjoint, so its
    error relative to its own tiny norm says nothing; any wrong term is still O(1) of it."""
    total_rms = np.sqrt(sum(float((x * x).sum()) for x in want.values()))
    total_max = max(float(np.abs(x).max(initial=0.0)) for x in want.values())
    for n in NAMES:
        d = got[n] - want[n]
        rms, mx = float(np.sqrt((d * d).sum())) / total_rms, float(np.abs(d).max(initial=0.0)) / total_max
        assert rms <= tol and mx <= tol, f"{what}: d{n}: rel_rms={rms:.3g} rel_max={mx:.3g} exceed {tol:.3g}"


# ------------------------------------------------------------- adjoint == autograd


@pytest.mark.parametrize(
    "family", ["general", "with_initial_state", "ragged", "length_one", "varlen", "gva", "shared_gate", "zero_beta"]
)
@given(data=st.data())
def test_backward_equals_autograd_float64(family, data):
    """Every gradient of the adjoint oracle equals autograd through the float64 recurrence,
    for a loss on o and the final state, on o only, and on the final state only."""
    spec = data.draw(CASE_FAMILIES[family](CAPS), label="spec")
    loss = data.draw(st.sampled_from(sorted(LOSSES)), label="loss")
    a = spec.arrays()
    do, dht = _cotangents(spec, loss)
    _assert_grads_close(
        f"adjoint vs autograd ({loss})", _oracle(a, spec, do, dht), _autograd(a, spec, do, dht), SELF_TOL
    )


def test_backward_equals_autograd_long():
    """300 tokens: five checkpoint blocks of the adjoint (the last one ragged), against autograd."""
    spec = CaseSpec(B=1, T=300, H=1, G=2, K=3, V=2, gate="mild", beta_max=2.0, h0=True, seed=11)
    a = spec.arrays()
    do, dht = _cotangents(spec, "o and final_state")
    _assert_grads_close("long adjoint vs autograd", _oracle(a, spec, do, dht), _autograd(a, spec, do, dht), SELF_TOL)


# ------------------------------------------------------------- adjoint == finite differences


def _loss(a: dict, spec: CaseSpec, do, dht) -> float:
    o, S = kda_recurrent_np(
        a["q"], a["k"], a["v"], a["g"], a["beta"], scale=spec.scale, initial_state=a["initial_state"],
        output_final_state=True, cu_seqlens=a["cu_seqlens"],
    )  # fmt: skip
    return float((o * do).sum() + (S * dht).sum())


@settings(max_examples=8)
@given(spec=case_specs(CAPS, T=st.integers(1, 6), small_heads=True, input_scale=1.0, h0=True))
def test_backward_equals_finite_differences(spec):
    """Every gradient entry of the adjoint oracle equals a central difference of the NumPy
    forward, relative to the largest gradient entry (inputs of unit scale)."""
    a = spec.arrays()
    do, dht = _cotangents(spec, "o and final_state")
    grads = _oracle(a, spec, do, dht)
    largest = max(float(np.abs(x).max()) for x in grads.values())
    for n in NAMES:
        fd = np.zeros_like(a[n])
        for i in np.ndindex(a[n].shape):
            x = a[n].copy()
            x[i] += FD_H
            up = _loss(dict(a, **{n: x}), spec, do, dht)
            x[i] -= 2 * FD_H
            fd[i] = (up - _loss(dict(a, **{n: x}), spec, do, dht)) / (2 * FD_H)
        worst = float(np.abs(fd - grads[n]).max()) / largest
        assert worst <= FD_TOL, f"d{n}: central differences differ by {worst:.3g} of the largest gradient"


# ------------------------------------------------------------- the fused activations
# autograd through gates.py forms s (1 - s) from a rounded sigmoid s (an absolute error of
# u in 1 - s, however small 1 - s is) and the L2 norm's gradient as a difference of two
# terms that nearly cancel along x; the oracle avoids the first and shares the second. So
# these compare elementwise against a forward-error bound: ACT_UNITS u of the size of the
# terms each result is formed from (a few roundings per term, plus sums of at most 50
# terms here), not relative to the result itself.
U64 = float(np.finfo(np.float64).eps) / 2
ACT_UNITS = 64


def _torch_grads(fn, dy, *xs):
    ts = [None if x is None else torch.tensor(x, requires_grad=True) for x in xs]
    (fn(*ts) * torch.as_tensor(dy)).sum().backward()
    return [None if t is None else t.grad.numpy() for t in ts]  # every input is used


def _assert_within(name: str, got, want, terms) -> None:
    excess = np.abs(got - want) - ACT_UNITS * U64 * terms
    assert excess.max() <= 0, f"{name}: differs by {np.abs(got - want).max():.3g} beyond {ACT_UNITS} u of its terms"


@given(
    seed=seeds, HV=st.integers(1, 3), K=st.integers(1, 5), z_scale=st.sampled_from([0.1, 1.0, 10.0]),
    bias=st.booleans(), lower_bound=st.one_of(st.none(), st.floats(-5.0, -0.01)),
)  # fmt: skip
def test_gate_backward_equals_autograd(seed, HV, K, z_scale, bias, lower_bound):
    """dz, dA_log and ddt_bias of both gate forms equal autograd through kda_gate (float64)."""
    rng = np.random.default_rng(seed)
    z = z_scale * rng.standard_normal((2, 5, HV, K))
    A_log = rng.uniform(-1, 1, HV)
    dt_bias = rng.uniform(-1, 1, HV * K) if bias else None
    dg = rng.standard_normal(z.shape)
    want = _torch_grads(lambda z_, a_, b_: kda_gate(z_, a_, b_, lower_bound), dg, z, A_log, dt_bias)
    dz, dA_log, ddt_bias = kda_gate_backward_np(z, A_log, dt_bias, lower_bound, dg)
    x = z if dt_bias is None else z + dt_bias.reshape(HV, K)
    a_dg = np.exp(A_log)[:, None] * np.abs(dg) * (1.0 if lower_bound is None else -lower_bound)
    _assert_within("dz", dz, want[0], a_dg)
    _assert_within("dA_log", dA_log, want[1], (a_dg * (np.abs(x) + np.logaddexp(0.0, x))).sum((0, 1, 3)))
    if dt_bias is None:
        assert ddt_bias is None, "ddt_bias: expected None without dt_bias"
    else:
        _assert_within("ddt_bias", ddt_bias, want[2], a_dg.sum((0, 1)).reshape(-1))


@given(seed=seeds, K=st.integers(1, 9), x_scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_l2norm_backward_equals_autograd(seed, K, x_scale):
    """The gradient of the q/k L2 norm equals autograd through gates.l2norm (float64)."""
    rng = np.random.default_rng(seed)
    x = x_scale * rng.standard_normal((2, 3, 2, K))
    dy = rng.standard_normal(x.shape)
    (want,) = _torch_grads(l2norm, dy, x)
    r = 1 / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
    y = x * r
    _assert_within(
        "dx", l2norm_backward_np(x, dy), want, r * (np.abs(dy) + np.abs(y) * np.abs(y * dy).sum(-1, keepdims=True))
    )


@given(seed=seeds, b_scale=st.sampled_from([0.1, 1.0, 30.0]), neg=st.booleans())
def test_beta_activation_backward_equals_autograd(seed, b_scale, neg):
    """The gradient of beta = sigmoid(b) and 2 sigmoid(b) equals autograd (float64)."""
    rng = np.random.default_rng(seed)
    b = b_scale * rng.standard_normal((2, 7, 3))
    dbeta = rng.standard_normal(b.shape)
    (want,) = _torch_grads(lambda b_: beta_activation(b_, neg), dbeta, b)
    _assert_within("db", beta_activation_backward_np(b, dbeta, neg), want, (2.0 if neg else 1.0) * np.abs(dbeta))


# ------------------------------------------------------------- bad input


def test_backward_bad_input_names_the_argument():
    a = CaseSpec(B=1, T=4, H=1, G=2, K=3, V=2, h0=True).arrays()
    args = [a[n] for n in NAMES[:5]]
    with pytest.raises(ValueError, match=r"^do: expected shape \[B, T, HV, V\]"):
        kda_recurrent_backward_np(*args, np.zeros((1, 4, 1, 2)))
    with pytest.raises(ValueError, match=r"^dht: expected shape \[N, HV, K, V\]"):
        kda_recurrent_backward_np(*args, None, np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="^beta: expected shape"):
        kda_recurrent_backward_np(*args[:4], args[4][..., :1], None)
    with pytest.raises(ValueError, match="^dg: expected the shape of z"):
        kda_gate_backward_np(np.zeros((1, 2, 2, 3)), np.zeros(2), None, None, np.zeros((1, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"^A_log: expected shape \[HV\]"):
        kda_gate_backward_np(np.zeros((1, 2, 2, 3)), np.zeros(3), None, None, np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="^dy: expected the shape of x"):
        l2norm_backward_np(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="^dbeta: expected the shape of b"):
        beta_activation_backward_np(np.zeros((1, 2, 3)), np.zeros((1, 2, 2)))


def _graph_nodes(root) -> list:
    seen, stack = [], [root]
    while stack:
        node = stack.pop()
        if node is None or any(node is x for x in seen):
            continue
        seen.append(node)
        stack.extend(f for f, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("fn", [kda_recurrent, kda_chunkwise], ids=["recurrent", "chunkwise"])
def test_packed_backward_splits_each_input_once(fn):
    """The PyTorch oracles take a packed batch apart with one split per input (packing.run_torch),
    never a slice per sequence of a whole input: the backward of each such slice writes a
    zero tensor of the whole input, which made the gradient references quadratic in the
    number of sequences (15 s of 15.6 s at 323 sequences; GPU runs pack up to 2000). Sequences
    of one length run as the rows of one batch, which the chunkwise scan slices per chunk:
    those slices are per chunk, so their number must not grow with the number of sequences."""

    def whole_slices(N):
        spec = CaseSpec(B=1, T=2 * N, H=1, K=3, V=2, seqlens=(2,) * N, h0=True, seed=1)
        a = spec.arrays()
        t = {n: torch.tensor(a[n], requires_grad=True) for n in NAMES}
        o, S = fn(*(t[n] for n in NAMES[:5]), initial_state=t["initial_state"], output_final_state=True,
                  cu_seqlens=torch.as_tensor(a["cu_seqlens"]))  # fmt: skip
        slices = [n for n in _graph_nodes((o.sum() + S.sum()).grad_fn) if type(n).__name__ == "SliceBackward0"]
        return [n for n in slices if n._saved_self_sym_sizes[1] == 2 * N or n._saved_self_sym_sizes[0] == N]

    few, many = whole_slices(20), whole_slices(40)
    assert len(few) == len(many) < 10, f"{len(few)} and {len(many)} slices of a whole input for 20 and 40 sequences"
