"""The kdaverify-based measurement behind finding 011 (../011-fla_chunk_kda-long_history_bias.md,
whose standalone script, ../011-fla_chunk_kda-long_history_bias.py, needs only torch, fla and
NumPy): flash-linear-attention 0.6.0's chunk_kda, bf16 inputs, fails the suite's
oracle_long_history check on its bias alone, at one example (B1 T1024 H16 G4 K = V = 100, mild
gate, input scale 0.01, seed 0): bias -2.55e-4 against a budget of 2.43e-4 (the rms and max
errors are well inside theirs). Seen in two suite runs on an H200 (the second in a fresh
process), then confirmed by the finding's script.

The bias <o - oracle, oracle> / |oracle|^2 of a correct kernel is noise of standard deviation
about rel_rms / sqrt(n_eff) (equivalence/tolerance.py). This script measures it over many
seeds at the example's shape and at K = V = 128, for flash-linear-attention, ours
(kdaverify.kernels.chunk_kda) and the suite's same-precision references, and prints each
one's mean bias with its standard error and its mean in units of its own noise. A kernel
whose mean bias is many standard errors from zero rounds systematically (a finding, or an
intended precision choice); one whose mean is near zero drew a 4-sigma example (then the
candidate is closed). Run on a GPU with fla-core 0.6.0 importable (import the tuning cache
first, `kdaverify tuning import reports/tuning/<card>.tar.gz`: cold, fla autotunes every
kernel and one seed takes over a minute):

    python fla_chunk_kda-long_history_bias_bf16.py [seeds [K ...]]   # default 16 seeds, K = V = 100 and 128
    python fla_chunk_kda-long_history_bias_bf16.py many_tiles [seeds [K ...]]   # default K = V = 256

`many_tiles` measures, the same way, the twenty-third session's candidate from a cold ci run
on an H200 (`reports/conformance/fla_chunk_kda-ci-H200-incomplete/`): oracle_many_tiles bf16
at B65 T6 H2 G2 K = V = 256, logsigmoid gate, seed 103, the final state's bias -9.21e-5
against a budget of 6.84e-5 (its RMS and max errors within budget). Not yet run as such.
Both o's and the final state's biases are printed.

Measured on an H200 (2026-11-29, 16 seeds, K = V = 100): fla -2.571e-4 +- 1.1e-6 (15 of its own
noise units, every seed between -2.49e-4 and -2.66e-4), ours -1.22e-5 +- 1.5e-6, the chunkwise
reference -1.15e-5 +- 1.6e-6. The cause of most of it, as finding 011 gives it: fla forms the
off-diagonal sub-chunk blocks of Aqk and Akk (fla/ops/kda/chunk_intra.py, the off-diagonal loop)
with float32 operands in tl.dot at Triton's default tf32, which Triton feeds to the tensor cores
truncated, not rounded: a one-signed error. With TRITON_F32_DEFAULT=ieee (the finding's script,
--f32-default ieee) the bias falls from -2.58e-4 to -4.9e-5 on the H200. On the CPU, our
chunkwise reference on the same bf16 inputs with every product's operands truncated to tf32
gives a bias of -1.05e-3, rounded to tf32 -3e-6, in full fp32 -3e-6. The K = V = 128 contrast
this script also runs has not completed on a GPU (it timed out, then was dropped).
"""

import sys
from dataclasses import replace

import numpy as np
import torch
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.implementation import load_implementation
from kdaverify.equivalence.relations import Harness
from kdaverify.equivalence.tolerance import errors

SPEC = CaseSpec(B=1, T=1024, H=16, G=4, K=100, V=100, gate="mild", shared_gate=False, beta_max=1.0,
                input_scale=0.01, scale=None, h0=False, seqlens=None, seed=0, zero_beta=False)  # fmt: skip
OUTPUTS = ("o", "final state")
# the examples by the check that drew them, and the head sizes each measures by default
CASES = {
    "long_history": (SPEC, (100, 128)),
    "many_tiles": (replace(SPEC, B=65, T=6, H=2, G=2, K=256, V=256, gate="logsigmoid", seed=103), (256,)),
}


def main(case: str = "long_history", seeds: int = 16, *sizes: int) -> int:
    spec0, default_sizes = CASES[case]
    impls = {
        "fla": load_implementation("kdaverify.equivalence.adapters:fla_chunk_kda", device="cuda"),
        "ours": load_implementation("kdaverify.kernels:chunk_kda", device="cuda"),
    }
    print(f"{torch.cuda.get_device_name()}; {spec0}")
    for KV in sizes or default_sizes:
        _measure(impls, spec0, KV, seeds)
    return 0


def _measure(impls: dict, spec0: CaseSpec, KV: int, seeds: int) -> None:
    """Print each implementation's bias of o and of the final state over seeds at K = V = KV."""
    names = (*impls, "reference (chunkwise, 64)")
    rows = {(w, n): [] for w in OUTPUTS for n in names}
    noise = {key: [] for key in rows}
    print(f"\nK = V = {KV}: seed, then bias (and rel RMS) of each, o | final state")
    for seed in range(seeds):
        spec = replace(spec0, K=KV, V=KV, seed=seed)
        h = Harness(impls["fla"], torch.bfloat16)
        t = h.inputs(spec.arrays())
        oracle = h.oracle(t)
        got = {n: i.call(t) for n, i in impls.items()}
        got["reference (chunkwise, 64)"] = h.references(None, t)[0](t)  # one, not the worst: a signed sample
        cells = []
        for out, w in enumerate(OUTPUTS):
            for n, x in got.items():
                e = errors(x[out], oracle[out])
                rows[w, n].append(e.bias)
                noise[w, n].append(e.rel_rms / np.sqrt(e.n_eff))
                cells.append(f"{n.split()[0]} {e.bias:+.2e} ({e.rel_rms:.2e})")
        print(f"  {seed:3d} " + "  ".join(cells))
    print(f"K = V = {KV}, {seeds} seeds: mean bias +- standard error; mean in units of rel_rms / sqrt(n_eff)")
    for (w, n), b in rows.items():
        b = np.array(b)
        z = b / np.array(noise[w, n])
        print(f"  {w:12s} {n:28s} {b.mean():+.3e} +- {b.std(ddof=1) / np.sqrt(len(b)):.1e}   "
              f"z mean {z.mean():+.2f}, z std {z.std(ddof=1):.2f}")  # fmt: skip


if __name__ == "__main__":
    args = sys.argv[1:]
    case = args.pop(0) if args and args[0] in CASES else "long_history"
    raise SystemExit(main(case, *(int(a) for a in args)))
