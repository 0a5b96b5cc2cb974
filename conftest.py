"""kdaverify's own test run (this repository only; not part of the installed package): the
suite's Hypothesis profile (--kda-profile or KDAVERIFY_PROFILE, default dev) becomes the
default for the oracle and bad-input tests too. The conformance tests apply it themselves."""

from __future__ import annotations

import os

# First: on a machine without a GPU it sets TRITON_INTERPRET before anything imports triton.
# torch.utils.flop_counter (test_perf_models) imports triton; imported before this, the
# interpreter ran our kernels with triton.language's jit functions in compiled mode, and
# test_perf_ab failed with "Cannot call @triton.jit'd outside of the scope of a kernel"
# whenever it ran after test_perf_models in one process.
import kdaverify.kernels.runtime  # noqa: F401, I001
from kdaverify.equivalence import profiles

# Our kernels' scratch buffers filled with NaN in this repository's tests (runtime.scratch):
# a kernel that reads an element it never wrote fails here instead of passing on the stale,
# often right, values of the buffers the previous call freed. KDAVERIFY_POISON_SCRATCH=0
# turns it off (to see whether a failure needs it).
kdaverify.kernels.runtime.POISON_SCRATCH = os.environ.get("KDAVERIFY_POISON_SCRATCH") != "0"


def pytest_configure(config):
    if config.getoption("hypothesis_profile", None) is None:
        profiles.load(config.getoption("kda_profile"))
