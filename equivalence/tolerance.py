"""The one tolerance rule of the suite (DESIGN.md section 5, after FlashAttention's).

An implementation's error against the float64 oracle must be at most FACTOR times the error
of a same-precision reference (the chunkwise oracle run in float32 with the implementation's
declared matmul precision, its output rounded to the same dtype; the worst of a few such
references, see relations.Harness.references) plus a floor of
FLOOR_UNITS unit roundoffs of the output dtype. Both the relative RMS error and the max-abs
error (relative to the oracle's largest magnitude) must pass. NaN or Inf never passes.
There is no bare absolute tolerance anywhere in the suite: every budget scales with the
oracle and with a measured reference error.
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


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding to dtype."""
    return torch.finfo(dtype).eps / 2


@dataclass(frozen=True)
class Errors:
    """Distance of a result from a target, both relative to the target's scale."""

    rel_rms: float  # ||x - target||_2 / ||target||_2
    rel_max: float  # max |x - target| / max |target|

    def __str__(self) -> str:
        return f"rel_rms={self.rel_rms:.3g} rel_max={self.rel_max:.3g}"


def as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def errors(x, target) -> Errors:
    """Errors of x against target; a non-finite x (or a shape mismatch) is infinitely wrong."""
    x, target = as_f64(x), as_f64(target)
    if x.shape != target.shape or not np.all(np.isfinite(x)):
        return Errors(float("inf"), float("inf"))
    d = x - target
    tiny = np.finfo(np.float64).tiny  # an all-zero target must be matched exactly
    rms = float(np.sqrt((d * d).sum()) / max(np.sqrt((target * target).sum()), tiny))
    mx = float(np.abs(d).max(initial=0.0) / max(np.abs(target).max(initial=0.0), tiny))
    return Errors(rms, mx)


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
        return m.rel_rms <= b.rel_rms and m.rel_max <= b.rel_max

    @property
    def ratio(self) -> float:
        """How much of the budget was used (> 1 fails)."""
        m, b = self.measured, self.budget
        return max(m.rel_rms / b.rel_rms, m.rel_max / b.rel_max)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.what} [{self.dtype}]: {verdict}: measured {self.measured}; budget {self.budget} "
            f"= {FACTOR:g} x same-precision reference ({self.reference}) + {FLOOR_UNITS:g} u"
        )


def budget_for(reference: Errors, dtype: torch.dtype) -> Errors:
    floor = FLOOR_UNITS * unit_roundoff(dtype)
    return Errors(FACTOR * reference.rel_rms + floor, FACTOR * reference.rel_max + floor)


def judge(what: str, x, target, reference_errors: list[Errors], dtype: torch.dtype) -> Verdict:
    """Compare x with target under the rule. reference_errors: how far the same-precision
    references land (from the oracle, or from the relation being checked); the worst of
    them scales the budget."""
    if not reference_errors:
        raise ValueError("reference_errors: expected at least one measured reference error")
    ref = Errors(max(e.rel_rms for e in reference_errors), max(e.rel_max for e in reference_errors))
    if not np.isfinite(ref.rel_rms):
        raise RuntimeError(f"{what}: a same-precision reference is not finite; the case is out of range")
    return Verdict(what, errors(x, target), budget_for(ref, dtype), ref, str(dtype).replace("torch.", ""))
