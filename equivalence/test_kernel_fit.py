"""Our chunked kernels fit an H100's shared memory, checked without a GPU (kernels/sm90_fit.py:
each launch config compiled for sm_90 on the CPU, whose shared-memory figure is the one the
GPU's OutOfResources error reports). A change that makes a kernel outgrow the card, as the
intra-split recurrence did at fp32 K = 256 (256 KiB against 227), fails here in CI instead of
in a device call.

Cases: the two kernels that have hit the limit on the H100 (chunk_recurrence and chunk_grads)
at K = V = 128 and 256, bf16 and fp32. The fp32 backward at K = 256 fits only through its
RELOAD config (168 KiB; 320 KiB without it even at BV = 32, ChunkBlocks.fitting).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CASES = [
    f"{kernel}:{dtype}:{K}" for kernel in ("recurrence", "grads") for dtype in ("bf16", "fp32") for K in (128, 256)
]
# Cases known not to fit, each with its reason: none since chunk_grads' RELOAD config.
KNOWN_NOT_FITTING: set[tuple[str, str, int]] = set()


@pytest.mark.xdist_group("sm90_fit")
def test_chunk_kernels_fit_h100_shared_memory():
    # about 3 minutes of compiling on one core: the fp32 configs at K = 256 are the slow ones
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "kdaverify.kernels.sm90_fit", *CASES]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(CASES), run.stdout[-3000:]
    wrong = []
    for r in results:
        expect_fit = (r["kernel"], r["dtype"], r["K"]) not in KNOWN_NOT_FITTING
        if (r["fits"] is not None) != expect_fit:
            wrong.append(r)
    assert not wrong, "shared memory against an H100's 227 KiB (expected fits / known not to):\n" + "\n".join(
        json.dumps(r) for r in wrong
    )


def test_register_usage_is_read_from_ptxas():
    """`sm90_fit --usage` adds the fitting config's registers per thread and spill bytes (from
    the ptxas Triton bundles), the figures behind kernels/NOTES.md's spill measurements."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "kdaverify.kernels.sm90_fit", "--usage", "recurrence:bf16:16"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    usage = json.loads(run.stdout.splitlines()[-1])["usage"]
    assert 16 <= usage["registers"] <= 255 and usage["spill_stores"] >= 0 and usage["spill_loads"] >= 0, usage
