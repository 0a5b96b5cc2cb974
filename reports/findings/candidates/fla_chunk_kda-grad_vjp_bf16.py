"""Candidate (not a finding yet): flash-linear-attention 0.6.0's chunk_kda, bf16 inputs, fails
the suite's grad_vjp_directions check on one example (an H200, 2026-11-28): <gradient, u> along
one random direction per input, against central differences of the float64 oracle's loss,
measured 3.34e-2 relative RMS against a budget of 2.93e-2 (1.17 of it; the budget is 3 x the
float32 recurrence's error on the same bf16-rounded inputs + 2 bf16 units). Every other
gradient check passed at bf16 and all twelve at float32.

This script reruns that one example in a fresh process and prints, per input direction, the
target, flash-linear-attention's value, ours (kdaverify.kernels.chunk_kda) and the float32
reference's, then each gradient against the float64 adjoint oracle (the grad_oracle check's
comparison) on the same inputs, so that the direction and the gradient that carry the error
show. Run on a GPU with fla-core 0.6.0 importable: python fla_chunk_kda-grad_vjp_bf16.py
"""

import numpy as np
import torch
from kdaverify.equivalence import gradients as G
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.implementation import load_implementation
from kdaverify.equivalence.relations import Harness
from kdaverify.equivalence.tolerance import as_f64, errors

SPEC = CaseSpec(B=1, T=15, H=2, G=2, K=256, V=256, gate="logsigmoid", shared_gate=False, beta_max=2.0,
                input_scale=100.0, scale=None, h0=True, seqlens=(2, 13), seed=245948, zero_beta=False)  # fmt: skip


def main() -> int:
    impls = {
        "fla": load_implementation("kdaverify.equivalence.adapters:fla_chunk_kda", device="cuda"),
        "ours": load_implementation("kdaverify.kernels:chunk_kda", device="cuda"),
    }
    h = Harness(impls["fla"], torch.bfloat16)
    t = h.inputs(SPEC.arrays())
    do, dht = G.cotangents(SPEC, torch.bfloat16, h.impl.device, "o and final_state")
    rng = np.random.default_rng(SPEC.seed + 29)  # the check's directions
    directions = {n: rng.standard_normal(tuple(t[n].shape)) for n in G.GRAD_INPUTS if t[n] is not None}
    target = G.directional_derivatives(t, do, dht, SPEC.scale, directions)
    want = G.oracle_grads(t, do, dht, SPEC.scale)
    ref = G.reference_grads(SPEC.scale, t, do, dht, precision="tf32")[0]
    grads = {n: G.autograd_grads(lambda x, i=i: i.call(x, scale=SPEC.scale), t, do, dht) for n, i in impls.items()}
    grads["float32 reference"] = ref

    def along(g):
        return np.array([float((as_f64(g[n]) * u).sum()) for n, u in directions.items()])

    print(f"{SPEC}\n<gradient, u> per direction (target: float64 central differences)")
    print(f"{'input':16s} {'target':>14s} " + " ".join(f"{n:>18s}" for n in grads))
    rows = {n: along(g) for n, g in grads.items()}
    for j, name in enumerate(directions):
        print(f"{name:16s} {target[j]:14.6g} " + " ".join(f"{rows[n][j]:18.6g}" for n in grads))
    for n in grads:
        e = errors(rows[n], target)
        print(f"{n:18s} rel RMS {e.rel_rms:.3g}  rel max {e.rel_max:.3g}")
    print("\neach gradient against the float64 adjoint (rel RMS)")
    print(f"{'gradient':16s} " + " ".join(f"{n:>18s}" for n in grads))
    for name, w in want.items():
        print(f"d{name:15s} " + " ".join(f"{errors(g[name], w).rel_rms:18.3g}" for g in grads.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
