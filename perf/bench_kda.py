"""The sweep as pytest-benchmark tests: one test per row (see perf.sweep for the presets).

    pytest -p kdaverify.perf.plugin perf/bench_kda.py --perf-preset=quick --perf-out=DIR \\
        [--benchmark-json=FILE] [--benchmark-autosave] [--benchmark-compare] [--benchmark-disable]

The row's figure is perf.timing's (on a GPU the do_bench median) in extra_info["ms"];
pytest-benchmark's own statistics time the same call, synchronised, a few rounds. A provider
that cannot run is a skipped test whose reason is the row's status; a provider whose output
fails verification is timed, recorded as unverified, and fails the test.
"""

from __future__ import annotations

import pytest
from kdaverify.perf.timing import synchronized

ROUNDS = 3


def test_perf(perf_case, perf_sweep, benchmark):
    row, call = perf_sweep.run(perf_case)
    benchmark.extra_info.update(row)
    if call is None:
        pytest.skip(row["status"])
    benchmark.pedantic(synchronized(call, perf_sweep.device), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if not row["verified"]:
        pytest.fail(
            f"{perf_case.id}: unverified: {row['check']}: rel_rms {row['err_rel_rms']} (budget "
            f"{row['budget_rel_rms']:.3g}), rel_max {row['err_rel_max']} (budget {row['budget_rel_max']:.3g})"
        )
