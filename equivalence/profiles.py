"""Hypothesis profiles: ci (derandomized, bounded), dev (the default) and deep.

Pick one with the environment variable KDAVERIFY_PROFILE or Hypothesis' own pytest option
--hypothesis-profile=NAME (the option wins). Every failure prints the falsifying CaseSpec
and a @reproduce_failure blob, so it can be replayed exactly.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

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

PROFILE_ENV = "KDAVERIFY_PROFILE"


def load_default() -> str:
    name = os.environ.get(PROFILE_ENV, "dev")
    if name not in ("ci", "dev", "deep"):
        raise ValueError(f"{PROFILE_ENV}: expected ci, dev or deep, got {name!r}")
    settings.load_profile(name)
    return name
