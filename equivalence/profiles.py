"""Hypothesis profiles: ci (derandomized, bounded), dev (the default), deep, gpu and mutants.

Pick one with the environment variable KDAVERIFY_PROFILE or Hypothesis' own pytest option
--hypothesis-profile=NAME (the option wins). Every failure prints the falsifying CaseSpec
and a @reproduce_failure blob, so it can be replayed exactly.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

# Examples are whole kernel calls plus two oracles: Hypothesis' per-example deadline and
# its "too slow" check would flag the long-history cases, which are slow by design.
_common = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=12, derandomize=True, **_common)
settings.register_profile("dev", max_examples=40, **_common)
settings.register_profile("deep", max_examples=500, **_common)
# The kill table asks only which checks reject each wrong implementation: no shrinking, so
# a mutant that fails on thousand-token cases does not spend minutes minimising them.
settings.register_profile(
    "mutants", max_examples=12, derandomize=True, phases=[Phase.explicit, Phase.generate], **_common
)
# A GPU run of a Triton kernel compiles (and autotunes) for every new head count and size,
# so it draws fewer, derandomized examples.
settings.register_profile("gpu", max_examples=6, derandomize=True, **_common)

PROFILE_ENV = "KDAVERIFY_PROFILE"


def load_default() -> str:
    name = os.environ.get(PROFILE_ENV, "dev")
    if name not in ("ci", "dev", "deep", "gpu", "mutants"):
        raise ValueError(f"{PROFILE_ENV}: expected ci, dev, deep, gpu or mutants, got {name!r}")
    settings.load_profile(name)
    return name
