"""Every check of relations.py against the implementation under test (--kda-impl; by default
the project's own, see adapters.DEFAULT_IMPL), at each input dtype.

A check whose capability or dtype the implementation does not declare is reported as not
applicable (skipped with that reason), never as passed. The Hypothesis profile is the
suite's own (--kda-profile), applied here, so a host project's settings are left alone.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from kdaverify.equivalence.implementation import DTYPES
from kdaverify.equivalence.relations import CHECKS, Harness
from kdaverify.equivalence.strategies import CASE_FAMILIES

PARAMS = [pytest.param(c, d, id=f"{c.name}-{d}") for c in CHECKS.values() for d in DTYPES]


@pytest.mark.parametrize(("check", "dtype"), PARAMS)
def test_conformance(impl, record, kda_profile, check, dtype):
    if dtype not in impl.caps.dtypes:
        pytest.skip(f"not applicable: {dtype} inputs not declared")
    if check.needs and not getattr(impl.caps, check.needs):
        pytest.skip(f"not applicable: {check.needs} not declared")
    why = check.not_applicable and check.not_applicable(impl.caps, dtype)
    if why:
        pytest.skip(f"not applicable: {why}")
    harness = Harness(impl, DTYPES[dtype], record)

    @kda_profile
    @given(spec=CASE_FAMILIES[check.cases](impl.caps))
    def run(spec):
        check.fn(harness, spec)

    run()
