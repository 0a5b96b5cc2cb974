"""The oracle checks itself: the three tiers of DESIGN.md section 5 agree, and the gold
NumPy recurrence is fast enough to use. Prints a short summary; exits 1 on disagreement.

    python -m equivalence.selfcheck
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from kdaverify.reference import dplr_recurrent_np, kda_as_dplr, kda_chunkwise, kda_recurrent, kda_recurrent_np

from .cases import CaseSpec
from .tolerance import errors

# float64 agreement between algorithms: rounding of ~T sequential updates at ~1e-16 each
# stays well under 1e-12 for these sizes (and DESIGN.md section 5 asks for ~1e-12).
AGREE = 1e-12
CASES = [
    CaseSpec(B=2, T=100, H=2, G=2, K=16, V=8, gate="logsigmoid", h0=True, seed=1),
    CaseSpec(B=1, T=130, H=1, G=1, K=5, V=7, gate="masked", beta_max=2.0, seed=2),
    CaseSpec(B=1, T=77, H=2, G=1, K=8, V=8, gate="strong", h0=True, seqlens=(1, 40, 1, 35), seed=3),
]


def _torch(arrays):
    return {n: (None if x is None else torch.from_numpy(np.asarray(x))) for n, x in arrays.items()}


def main() -> int:
    worst = 0.0
    print("oracle self-check (float64; relative RMS error against the NumPy recurrence)")
    print(f"  {'case':<46} {'torch':>9} {'chunk 1':>9} {'chunk 16':>9} {'chunk 64':>9} {'DPLR':>9}")
    for spec in CASES:
        a = spec.arrays()
        t = _torch(a)
        gold, S = kda_recurrent_np(**a, output_final_state=True)
        row = [kda_recurrent(**t, output_final_state=True)]
        row += [kda_chunkwise(**t, output_final_state=True, chunk_size=c) for c in (1, 16, 64)]
        dplr = kda_as_dplr(a["q"], a["k"], a["v"], a["g"], a["beta"])
        row.append(
            dplr_recurrent_np(
                **dplr, initial_state=a["initial_state"], cu_seqlens=a["cu_seqlens"], output_final_state=True
            )
        )
        errs = [max(errors(o, gold).rel_rms, errors(s, S).rel_rms) for o, s in row]
        worst = max(worst, *errs)
        name = f"T={spec.T} H={spec.H} HV={spec.HV} K={spec.K} V={spec.V} {spec.gate}" + (
            " varlen" if spec.seqlens else ""
        )
        print(f"  {name:<46} " + " ".join(f"{e:9.1e}" for e in errs))

    big = CaseSpec(B=1, T=4096, H=2, K=64, V=64, seed=4).arrays()
    start = time.perf_counter()
    kda_recurrent_np(**big)
    took = time.perf_counter() - start
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"NumPy recurrence, T=4096 H=2 K=V=64 float64: {took:.3f} s (OMP_NUM_THREADS={threads})")
    ok = worst <= AGREE
    print(f"worst disagreement {worst:.1e} (limit {AGREE:.0e}): {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
