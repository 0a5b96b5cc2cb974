"""Every check of relations.py against the implementation under test (--kda-impl; by default
the project's own, see adapters.DEFAULT_IMPL), at each input dtype.

A check whose capability or dtype the implementation does not declare is reported as not
applicable (skipped with that reason), never as passed. The Hypothesis profile is the
suite's own (--kda-profile), applied here, so a host project's settings are left alone.
On a GPU every check shares the device's memory with the other workers through
relations.device_memory_lock (the large-offset cases take it alone).
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from kdaverify.equivalence.compiles import CompileClock
from kdaverify.equivalence.implementation import DTYPES
from kdaverify.equivalence.relations import CHECKS, Harness, device_memory_lock
from kdaverify.equivalence.strategies import cases_for

PARAMS = [pytest.param(c, d, id=f"{c.name}-{d}") for c in CHECKS.values() for d in DTYPES]


@pytest.mark.parametrize(("check", "dtype"), PARAMS)
def test_conformance(impl, record, kda_profile, check, dtype):
    if dtype not in impl.caps.dtypes:
        pytest.skip(f"not applicable: {dtype} inputs not declared")
    if check.needs and not getattr(impl.caps, check.needs):
        pytest.skip(f"not applicable: {check.needs} not declared")
    reason = check.applies(impl, DTYPES[dtype]) if check.applies else None
    if reason:
        pytest.skip(reason)
    harness = Harness(impl, DTYPES[dtype], record)

    profile = kda_profile
    if check.max_examples is not None:
        profile = settings(kda_profile, max_examples=min(kda_profile.max_examples, check.max_examples))

    @profile
    @cases_for(check.cases, impl.caps, impl.device, check.state_elements)
    def run(spec):
        check.fn(harness, spec)

    before = impl.seconds
    with CompileClock() as clock:
        try:
            if check.name.startswith("large_"):
                run()  # takes the device alone inside (relations.large_offset)
            else:
                with device_memory_lock(impl.device):
                    run()
        finally:  # where the check's time went: the implementation's calls (its compiles), the suite
            record.impl_seconds(impl.seconds - before, clock)
