"""The gradient checks (gradients.py) on one fixed case each, in the normal test run: the
correct control (autograd through the float32 recurrence) passes every grad_* check, and
each wrong-backward negative control is rejected by the check written for its bug. The
kill table (`nox -s mutants`) runs the same through Hypothesis; this is the fast guard.
"""

from __future__ import annotations

import time

import pytest
import torch
from kdaverify.equivalence.adapters import reference_recurrent_kda
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.implementation import Capabilities, load_implementation
from kdaverify.equivalence.relations import CHECKS, Harness
from kdaverify.reference import kda_gate, l2norm

CASE = CaseSpec(B=1, T=20, H=1, G=2, K=3, V=4, gate="logsigmoid", beta_max=2.0, h0=True, seed=5)
PACKED = CaseSpec(B=1, T=20, H=1, G=2, K=3, V=4, gate="mild", h0=True, seqlens=(1, 16, 3), seed=6)
IN_KERNEL = ("grad_gate_in_kernel", "grad_l2norm_in_kernel")
GRAD_CHECKS = [name for name in CHECKS if name.startswith("grad_") and name not in IN_KERNEL]
MUTANT = "kdaverify.equivalence.mutants:"


def _run(target, check: str, spec: CaseSpec):
    impl = load_implementation(MUTANT + target if isinstance(target, str) else target)
    CHECKS[check].fn(Harness(impl, torch.float32), spec)


@pytest.mark.parametrize("check", GRAD_CHECKS)
@pytest.mark.parametrize("spec", [CASE, PACKED], ids=["batch", "packed"])
def test_correct_control_passes(check, spec):
    _run("correct_control", check, spec)


def recurrence_with_options(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                            cu_seqlens=None, use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
                            use_qk_l2norm_in_kernel=False):  # fmt: skip
    """The float32 recurrence with the in-kernel gate and L2 norm done in PyTorch first."""
    if use_gate_in_kernel:
        g = kda_gate(g.float(), A_log, dt_bias, lower_bound)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.float()), l2norm(k.float())
    return reference_recurrent_kda(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


recurrence_with_options.kdaverify_capabilities = Capabilities(backward=True, gate_in_kernel=True, l2norm_in_kernel=True)


@pytest.mark.parametrize("check", IN_KERNEL)
@pytest.mark.parametrize("spec", [CASE, PACKED.with_(gate="safe")], ids=["softplus-gate", "safe-gate"])
def test_in_kernel_options_pass(check, spec):
    _run(recurrence_with_options, check, spec)


def test_in_kernel_gate_gradient_checked():
    """An implementation whose dA_log is lost (zero) is rejected by grad_gate_in_kernel."""

    def wrong(q, k, v, g, beta, *args, A_log=None, dt_bias=None, lower_bound=None, **kw):
        A_log = A_log.detach().requires_grad_(False) + 0 * A_log  # dA_log lost: zero
        return recurrence_with_options(q, k, v, g, beta, *args, A_log=A_log, dt_bias=dt_bias,
                                       lower_bound=lower_bound, **kw)  # fmt: skip

    wrong.kdaverify_capabilities = recurrence_with_options.kdaverify_capabilities
    with pytest.raises(AssertionError, match="dA_log"):
        _run(wrong, "grad_gate_in_kernel", CASE)


@pytest.mark.parametrize(
    ("mutant", "check"),
    [
        ("backward_tail_unmasked", "grad_ragged_tail"),
        ("backward_dh0_dropped", "grad_initial_state"),
        ("backward_last_dg_lost", "grad_final_state_only"),
        ("backward_gva_not_summed", "grad_gva"),
    ],
)
def test_wrong_backward_rejected(mutant, check):
    with pytest.raises(AssertionError, match="FAIL"):
        _run(mutant, check, CASE)


def test_reduced_precision_kernels_are_judged():
    """grad checks apply to kernels of every declared matmul precision (tf32 and bf16 through
    the differentiable roundings of reference.round_operand), and the tf32 budget still
    rejects each wrong backward."""
    from dataclasses import replace

    from kdaverify.equivalence.adapters import fla_chunk_kda  # declares tf32; fla itself is not imported
    from kdaverify.equivalence.implementation import Implementation

    impl = Implementation(fla_chunk_kda, "fla_chunk_kda", fla_chunk_kda.kdaverify_capabilities)
    assert CHECKS["grad_oracle"].applies(impl, torch.float32) is None
    assert CHECKS["grad_oracle"].applies(impl, torch.bfloat16) is None
    for mutant, check in [("backward_tail_unmasked", "grad_ragged_tail"), ("backward_gva_not_summed", "grad_gva")]:
        wrong = load_implementation(MUTANT + mutant)
        wrong = Implementation(wrong.fn, wrong.name, replace(wrong.caps, precision="tf32"))
        with pytest.raises(AssertionError, match="FAIL"):
            CHECKS[check].fn(Harness(wrong, torch.float32), CASE)


class _Probe(torch.autograd.Function):
    """Identity whose backward sleeps DELAY seconds and adds EXTRA to the gradient."""

    DELAY = 0.0
    EXTRA = 0.0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, dx):
        time.sleep(_Probe.DELAY)
        return dx + _Probe.EXTRA


def slow_backward_recurrence(q, *args, **kw):
    return reference_recurrent_kda(_Probe.apply(q), *args, **kw)


slow_backward_recurrence.kdaverify_capabilities = Capabilities(backward=True)


def test_backward_time_counts_as_the_implementations():
    """A gradient check's backward pass through the implementation is timed as the
    implementation's (impl_seconds), not as the suite's: at least the backward's own sleep."""
    impl = load_implementation(slow_backward_recurrence)
    _Probe.DELAY = 0.2
    try:
        CHECKS["grad_determinism"].fn(Harness(impl, torch.float32), CASE)  # two backward passes
    finally:
        _Probe.DELAY = 0.0
    assert impl.seconds >= 2 * 0.2, f"{impl.seconds:.3f} s counted as the implementation's"


def dg_offset_recurrence(q, k, v, g, *args, **kw):
    """The float32 recurrence whose dg is off by _Probe.EXTRA."""
    return reference_recurrent_kda(q, k, v, _Probe.apply(g), *args, **kw)


dg_offset_recurrence.kdaverify_capabilities = Capabilities(backward=True)


@pytest.mark.parametrize(("offset", "passes"), [(1e-9, True), (1e-4, False)])
def test_zero_gate_gradient_judged_against_its_terms(offset, passes):
    """Where the exact dg is identically zero (T = 1, no initial state), a dg off by a
    rounding residue of the terms a chunked kernel cancels (1e-9 of them: gradients.sensitivity)
    passes, one off by 1e-4 of them fails (float32 budget: 2 unit roundoffs, 1.2e-7)."""
    from kdaverify.equivalence.gradients import cotangents, oracle_grads, sensitivity

    spec = CaseSpec(B=1, T=1, H=1, G=2, K=8, V=8, gate="logsigmoid", input_scale=0.01, h0=False, seed=3)
    h = Harness(load_implementation(dg_offset_recurrence), torch.float32)
    t = h.inputs(spec.arrays())
    do, dht = cotangents(spec, torch.float32, "cpu", "o and final_state")
    want = oracle_grads(t, do, dht, spec.scale)
    assert not want["g"].any(), "the case must have an identically zero dg"
    _Probe.EXTRA = offset * sensitivity(t, want)
    try:
        if passes:
            CHECKS["grad_oracle"].fn(h, spec)
        else:
            with pytest.raises(AssertionError, match="dg"):
                CHECKS["grad_oracle"].fn(h, spec)
    finally:
        _Probe.EXTRA = 0.0


@pytest.mark.parametrize("spec", [CASE, PACKED], ids=["batch", "packed"])
def test_torch_twin_of_the_gradient_oracle(spec):
    """The PyTorch twin that GPU runs take for the gradient oracle (autograd through the
    float64 recurrence on the device, and the central differences of grad_vjp_directions)
    gives the NumPy adjoint's gradients to 1e-10 relative, here on the host: GVA, an initial
    state and a packed batch included."""
    import numpy as np
    from kdaverify.equivalence.gradients import cotangents, directional_derivatives, oracle_grads

    t = Harness(load_implementation(reference_recurrent_kda), torch.float32).inputs(spec.arrays())
    do, dht = cotangents(spec, torch.float32, "cpu", "o and final_state")
    numpy_way, torch_way = (oracle_grads(t, do, dht, spec.scale, torch_twin=w) for w in (False, True))
    assert numpy_way.keys() == torch_way.keys() == {"q", "k", "v", "g", "beta", "initial_state"}
    for n, want in numpy_way.items():
        assert isinstance(torch_way[n], np.ndarray) and torch_way[n].shape == want.shape, n
        np.testing.assert_allclose(torch_way[n], want, rtol=1e-10, atol=1e-10 * np.abs(want).max(), err_msg=n)
    rng = np.random.default_rng(0)
    directions = {n: rng.standard_normal(tuple(t[n].shape)) for n in ("k", "g")}
    fd = [directional_derivatives(t, do, dht, spec.scale, directions, torch_twin=w) for w in (False, True)]
    np.testing.assert_allclose(fd[1], fd[0], rtol=1e-7)
