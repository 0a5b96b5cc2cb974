"""The one tolerance rule of the suite (DESIGN.md section 5, after FlashAttention's).

An implementation's error against the float64 oracle must be at most FACTOR times the error
of a same-precision reference (the chunkwise oracle run in float32 with the implementation's
declared matmul precision, its output rounded to the same dtype; the worst of a few such
references, see relations.Harness.references) plus a floor of
FLOOR_UNITS unit roundoffs of the output dtype. Both the relative RMS error and the max-abs
error (relative to the oracle's largest magnitude) must pass. NaN or Inf never passes.
There is no bare absolute tolerance anywhere in the suite: every budget scales with the
oracle and with a measured reference error.

A third, signed statistic catches precision that hides under those two: the bias
<x - oracle, oracle> / |oracle|^2, the relative error along the oracle itself. Correct
rounding averages out in it (errors of either sign cancel over many elements); a systematic
scale error does not (a 0.4% scaling of o is a bias of 0.004, inside a bf16 rel_rms budget
of ~0.02). Its budget is FACTOR times the same-precision references' own |bias| plus the
noise an unbiased error of the references' size leaves in it, plus FLOOR_UNITS float32 unit
roundoffs (BIAS_FLOOR), see budget_for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# A correct kernel of the same precision class lands within about 1x of the reference (it
# rounds the same operands, in another order); 3x is the top of DESIGN.md's 2-3 range and
# leaves room for a different but legitimate accumulation order.
FACTOR = 3.0
# One rounding of the output on each side: the implementation's and the reference's final
# cast can each be off by a unit roundoff, and neither is the kernel's fault.
FLOOR_UNITS = 2.0
# The bias of an unbiased error e_i (relative rms r) over n_eff equally weighted elements has
# a standard deviation of about r / sqrt(n_eff). An implementation is allowed errors of the
# references' rms plus the floor, so their bias noise is allowed up to BIAS_SIGMAS standard
# deviations: 4 sigma, a false alarm well under 1e-4 per comparison for independent
# roundings. n_eff counts the independent pieces of error, and elements are not that: a
# kernel rounds a per-row factor once (a decay, a beta, a norm, a row of an operator such as
# the chunk's K x K transition) and every element of the row takes the same relative error.
# So n_eff is the participation ratio (sum r^2)^2 / sum r^4 of the row norms r of the target
# along its last axis (the rows of o [B, T, HV, V] are tokens x heads, those of a state
# [N, HV, K, V] are K-rows x heads). Measured: bf16 dh0 of our chunk_kda at B1 T17 HV2 K80 V192
# over 20 draws: bias mean 0.05e-4, std 2.3e-4 at rel_rms 1.7e-3 (the chunkwise bf16 reference:
# std 1.3e-4), about 1 / sqrt(55) of the rms; the elementwise count (~30000) allowed 4 sigma
# = 2.2e-4 and failed a correct kernel at -3.6e-4 (an H100 conformance run; the CPU gives the
# same figures). Counted by rows, 4 sigma is about 7.6e-4 there, while a 0.4% scale error of a
# bf16 o is a bias of 4e-3.
BIAS_SIGMAS = 4.0
# Every implementation computes in float32 at least (the state, the decays), and a correct one
# may still bias its result systematically by a fraction of a float32 ulp: hardware exp (and
# exp2) approximations are not correctly rounded, and their small signed error compounds
# through a product of decays, which the float32 references (torch's exp) do not share.
# Measured on an H100 (Triton 3.6): flash-linear-attention's fused_recurrent_kda, float32,
# final state under beta = 0: bias -2.0e-8 (0.34 u of float32) with rel_rms 4.5e-8, inside its
# rms budget of 2.4e-7. So the bias budget also gets FLOOR_UNITS float32 unit roundoffs,
# whatever the output dtype; a scale error of a bf16 output (0.4% = 4e-3) is far above it.
BIAS_FLOOR = FLOOR_UNITS * torch.finfo(torch.float32).eps / 2


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding to dtype."""
    return torch.finfo(dtype).eps / 2


@dataclass(frozen=True)
class Errors:
    """Distance of a result from a target, both relative to the target's scale."""

    rel_rms: float  # ||x - target||_2 / ||target||_2
    rel_max: float  # max |x - target| / max |target|
    bias: float = 0.0  # <x - target, target> / ||target||_2^2, signed (as a budget: the allowed |bias|)
    n_eff: float = 1.0  # (sum r^2)^2 / sum r^4 over the target's rows r: how many rows carry its norm

    def __str__(self) -> str:
        return f"rel_rms={self.rel_rms:.3g} rel_max={self.rel_max:.3g} bias={self.bias:.3g}"


def as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def errors(x, target, zero_scale: float | None = None) -> Errors:
    """Errors of x against target; a non-finite x (or a shape mismatch) is infinitely wrong.

    zero_scale: for a target that may be identically zero while x is computed as a sum of
    terms that cancel (a gradient such as dg at T = 1 with no initial state, see
    gradients.sensitivity), the magnitude of those terms. When the target is all zero, the
    errors are then relative to it (rms and max of |x| / zero_scale; no bias: a zero target
    has no direction); without it, an all-zero target must be matched exactly."""
    x, target = as_f64(x), as_f64(target)
    if x.shape != target.shape or not np.all(np.isfinite(x)):
        return Errors(float("inf"), float("inf"), float("inf"))
    d = x - target
    if zero_scale is not None and zero_scale > 0 and not target.any():
        e = np.abs(d) / zero_scale
        return Errors(float(np.sqrt(np.mean(e * e))) if e.size else 0.0, float(e.max(initial=0.0)), 0.0)
    tiny = np.finfo(np.float64).tiny  # an all-zero target must be matched exactly
    # norms taken after scaling by the largest |target|, so squares neither overflow nor underflow
    top = max(np.abs(target).max(initial=0.0), tiny)
    ts, ds = target / top, d / top
    norm2 = float((ts * ts).sum())
    rms = float(np.sqrt((ds * ds).sum()) / max(np.sqrt(norm2), tiny))
    mx = float(np.abs(d).max(initial=0.0) / top)
    bias = float((ds * ts).sum() / norm2) if norm2 > 0 else (0.0 if not d.any() else float("inf"))
    rows = (ts * ts).reshape(-1, ts.shape[-1]).sum(-1) if ts.ndim else ts * ts  # squared row norms
    n_eff = norm2 * norm2 / float((rows * rows).sum()) if norm2 > 0 else 1.0
    return Errors(rms, mx, bias, n_eff)


@dataclass(frozen=True)
class Verdict:
    """One comparison: what was measured, against what budget, and whether it passed."""

    what: str
    measured: Errors
    budget: Errors
    reference: Errors  # the same-precision reference's own error, the budget's scale
    dtype: str

    @property
    def passed(self) -> bool:
        m, b = self.measured, self.budget
        return m.rel_rms <= b.rel_rms and m.rel_max <= b.rel_max and abs(m.bias) <= b.bias

    @property
    def ratio(self) -> float:
        """How much of the budget was used (> 1 fails)."""
        m, b = self.measured, self.budget
        return max(m.rel_rms / b.rel_rms, m.rel_max / b.rel_max, abs(m.bias) / b.bias)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.what} [{self.dtype}]: {verdict}: measured {self.measured}; budget {self.budget} "
            f"= {FACTOR:g} x same-precision reference ({self.reference}) + {FLOOR_UNITS:g} u"
        )


def budget_for(reference: Errors, dtype: torch.dtype, n_eff: float = 1.0) -> Errors:
    """The budget from the references' errors (reference.bias: their largest |bias|) for a
    target of n_eff effective elements."""
    floor = FLOOR_UNITS * unit_roundoff(dtype)
    noise = BIAS_SIGMAS * (reference.rel_rms + floor) / float(np.sqrt(max(n_eff, 1.0)))
    return Errors(
        FACTOR * reference.rel_rms + floor,
        FACTOR * reference.rel_max + floor,
        FACTOR * reference.bias + noise + BIAS_FLOOR,
    )


def judge(
    what: str, x, target, reference_errors: list[Errors], dtype: torch.dtype, zero_scale: float | None = None
) -> Verdict:
    """Compare x with target under the rule. reference_errors: how far the same-precision
    references land (from the oracle, or from the relation being checked); the worst of
    them scales the budget. zero_scale: as errors' (the references' errors must be measured
    with the same one)."""
    if not reference_errors:
        raise ValueError("reference_errors: expected at least one measured reference error")
    ref = Errors(
        max(e.rel_rms for e in reference_errors),
        max(e.rel_max for e in reference_errors),
        max(abs(e.bias) for e in reference_errors),
    )
    if not np.isfinite(ref.rel_rms):
        raise RuntimeError(f"{what}: a same-precision reference is not finite; the case is out of range")
    measured = errors(x, target, zero_scale)
    budget = budget_for(ref, dtype, measured.n_eff)
    return Verdict(what, measured, budget, ref, str(dtype).replace("torch.", ""))
