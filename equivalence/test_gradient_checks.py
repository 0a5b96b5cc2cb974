"""The gradient checks (gradients.py) on one fixed case each, in the normal test run: the
correct control (autograd through the float32 recurrence) passes every grad_* check, and
each wrong-backward negative control is rejected by the check written for its bug. The
kill table (`nox -s mutants`) runs the same through Hypothesis; this is the fast guard.
"""

from __future__ import annotations

import pytest
import torch
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.implementation import load_implementation
from kdaverify.equivalence.relations import CHECKS, Harness

CASE = CaseSpec(B=1, T=20, H=1, G=2, K=3, V=4, gate="logsigmoid", beta_max=2.0, h0=True, seed=5)
PACKED = CaseSpec(B=1, T=20, H=1, G=2, K=3, V=4, gate="mild", h0=True, seqlens=(1, 16, 3), seed=6)
GRAD_CHECKS = [name for name in CHECKS if name.startswith("grad_")]
MUTANT = "kdaverify.equivalence.mutants:"


def _run(target: str, check: str, spec: CaseSpec):
    impl = load_implementation(MUTANT + target)
    CHECKS[check].fn(Harness(impl, torch.float32), spec)


@pytest.mark.parametrize("check", GRAD_CHECKS)
@pytest.mark.parametrize("spec", [CASE, PACKED], ids=["batch", "packed"])
def test_correct_control_passes(check, spec):
    _run("correct_control", check, spec)


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


def test_not_applicable_without_a_same_precision_reference():
    """grad checks judged by the rule need the full-fp32 reference's precision class."""
    impl = load_implementation("kdaverify.equivalence.adapters:fla_chunk_kda")  # declares tf32, not imported
    why = CHECKS["grad_oracle"].not_applicable(impl.caps, "float32")
    assert why and "tf32" in why
    assert CHECKS["grad_determinism"].not_applicable(impl.caps, "bfloat16") is None
    assert CHECKS["grad_oracle"].not_applicable(load_implementation(MUTANT + "correct_control").caps, "float32") is None
