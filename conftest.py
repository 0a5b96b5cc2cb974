"""kdaverify's own test run (this repository only; not part of the installed package): the
suite's Hypothesis profile (--kda-profile or KDAVERIFY_PROFILE, default dev) becomes the
default for the oracle and bad-input tests too. The conformance tests apply it themselves."""

from __future__ import annotations

from kdaverify.equivalence import profiles


def pytest_configure(config):
    if config.getoption("hypothesis_profile", None) is None:
        profiles.load(config.getoption("kda_profile"))
