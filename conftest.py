"""kdaverify's own test run (this repository only; not part of the installed package): the
suite's Hypothesis profile (--kda-profile or KDAVERIFY_PROFILE, default dev) becomes the
default for the oracle and bad-input tests too. The conformance tests apply it themselves."""

from __future__ import annotations

# First: on a machine without a GPU it sets TRITON_INTERPRET before anything imports triton.
# torch.utils.flop_counter (test_perf_models) imports triton; imported before this, the
# interpreter ran our kernels with triton.language's jit functions in compiled mode, and
# test_perf_ab failed with "Cannot call @triton.jit'd outside of the scope of a kernel"
# whenever it ran after test_perf_models in one process.
import kdaverify.kernels.runtime  # noqa: F401, I001
from kdaverify.equivalence import profiles


def pytest_configure(config):
    if config.getoption("hypothesis_profile", None) is None:
        profiles.load(config.getoption("kda_profile"))
