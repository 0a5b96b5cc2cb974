"""Hypothesis profiles of the suite: ci (derandomized, bounded), dev (the default), deep, gpu
and mutants.

Pick one with `--kda-profile=NAME` (pytest) or `--profile NAME` (the kdaverify command), or
the environment variable KDAVERIFY_PROFILE; the option wins. The conformance tests apply the
chosen profile to themselves, so a host project that runs the suite through the pytest plugin
keeps its own Hypothesis settings for its own tests. The profiles are also registered with
Hypothesis under prefixed names (kdaverify-ci, ...), never under a bare name a host project
may use itself. Every failure prints the falsifying CaseSpec and a @reproduce_failure blob,
so it can be replayed exactly.
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
PROFILES = {
    "ci": settings(max_examples=12, derandomize=True, **_common),
    "dev": settings(max_examples=40, **_common),
    "deep": settings(max_examples=500, **_common),
    # The kill table asks only which checks reject each wrong implementation: no shrinking,
    # so a mutant that fails on thousand-token cases does not spend minutes minimising them.
    "mutants": settings(max_examples=12, derandomize=True, phases=[Phase.explicit, Phase.generate], **_common),
    # A GPU run of a Triton kernel compiles (and autotunes) for every new head count and
    # size, so it draws fewer, derandomized examples.
    "gpu": settings(max_examples=6, derandomize=True, **_common),
}
PROFILE_ENV = "KDAVERIFY_PROFILE"
DEFAULT = "dev"
# On a GPU the default is the gpu profile: at dev's 40 examples a run of our chunk_kda on an
# H200 (eleventh session, 10 workers) was cut off at 536 s with 53 of 144 pairs not run,
# where the gpu profile had finished every pair in earlier sessions.
GPU_DEFAULT = "gpu"
PREFIX = "kdaverify-"

for _name, _settings in PROFILES.items():
    settings.register_profile(PREFIX + _name, _settings)


def resolve(option: str | None = None, device: str | None = None) -> str:
    """The profile in force: the option if given, else KDAVERIFY_PROFILE, else gpu on a CUDA
    device and dev elsewhere."""
    default = GPU_DEFAULT if device is not None and device.startswith("cuda") else DEFAULT
    name = option or os.environ.get(PROFILE_ENV) or default
    if name not in PROFILES:
        source = "--kda-profile" if option else PROFILE_ENV
        raise ValueError(f"{source}: expected one of {', '.join(PROFILES)}, got {name!r}")
    return name


def load(option: str | None = None) -> str:
    """Make the profile in force Hypothesis' default (for this project's own tests only)."""
    name = resolve(option)
    settings.load_profile(PREFIX + name)
    return name
