"""Candidate (not yet a finding): SGLang 0.5.23's Triton chunk_kda with an empty sequence
before a non-empty one in cu_seqlens.

The sequence after the empty one is never computed: its o is left as whatever v's buffer
held (chunk_kda writes o into v), and its final state is built from intermediate buffers the
chunk kernels never wrote (torch.empty: garbage, non-finite under Triton's interpreter).

Cause, as read in the wheel: fla/index.py prepare_chunk_indices numbers the (sequence,
chunk) pairs by counting first chunks, so a sequence without chunks (length 0) takes no
number and every later sequence is labelled with the number of the one before it. The
chunk kernels then read that (empty) sequence's bounds from cu_seqlens and return at once.
The same call with the true (sequence, chunk) pairs passed as chunk_kda's chunk_indices
agrees with the oracle; this script runs both.

Run (SGLang's files from the wheel or an installed sglang==0.5.23 --no-deps):

    KDAVERIFY_SGLANG=path/to/sglang-0.5.23-...whl python sglang-triton-chunk_kda-empty_sequences.py
        [--cu-seqlens 0,0,1] [--device cuda]

Without a GPU the kernels run under Triton's interpreter (set by kdaverify). Exits 1 while
the output or the final state differs from the float64 oracle by more than TOLERANCE.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from kdaverify.equivalence.public_kernels import sglang_module
from kdaverify.reference import kda_recurrent_np

CHUNK = 64  # chunk_kda's chunk size (chunk_kda_fwd)
# Relative to the oracle's largest magnitude: twenty TF32 unit roundoffs (2**-11), far above
# the rounding of a correct float32 kernel with TF32 products on a case this small.
TOLERANCE = 20 * 2.0**-11


def inputs(cu, K, V, device):
    gen = torch.Generator().manual_seed(0)
    T = cu[-1]
    q = torch.randn(1, T, 1, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, T, 1, K, generator=gen), dim=-1)
    v = torch.randn(1, T, 1, V, generator=gen)
    g = -torch.rand(1, T, 1, K, generator=gen)  # log decay in (-1, 0]
    beta = torch.rand(1, T, 1, generator=gen)
    h0 = torch.randn(len(cu) - 1, 1, K, V, generator=gen)  # [N, H, K, V]
    return [x.to(device) for x in (q, k, v, g, beta, h0)]


def run(kda, q, k, v, g, beta, h0, cu, chunk_indices=None):
    """chunk_kda as SGLang's backend calls it: a VK state pool updated in place, slot n for
    sequence n, o written into (a copy of) v."""
    pool = h0.transpose(-1, -2).contiguous()
    slots = torch.arange(len(cu) - 1, dtype=torch.int32, device=q.device)
    o = kda.chunk_kda(
        q, k, v.clone(), g, beta, initial_state=pool, initial_state_indices=slots,
        cu_seqlens=torch.tensor(cu, device=q.device), chunk_indices=chunk_indices,
    )  # fmt: skip
    return o.cpu().double().numpy(), pool.transpose(-1, -2).cpu().double().numpy()


def relative(x, ref):
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(x - ref).max()) / scale if np.isfinite(x).all() else float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cu-seqlens", default="0,0,1", help="offsets of the packed batch (default 0,0,1)")
    p.add_argument("--head-size", type=int, default=16, help="K = V (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    cu = [int(x) for x in a.cu_seqlens.split(",")]
    kda, index = sglang_module("fla.kda"), sglang_module("fla.index")
    q, k, v, g, beta, h0 = inputs(cu, a.head_size, a.head_size, a.device)
    o_ref, S_ref = kda_recurrent_np(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), initial_state=h0.cpu(),
                                    output_final_state=True, cu_seqlens=cu)  # fmt: skip

    table = index.prepare_chunk_indices(torch.tensor(cu, device=a.device), CHUNK).tolist()
    pairs = [[n, c] for n in range(len(cu) - 1) for c in range(-(-(cu[n + 1] - cu[n]) // CHUNK))]
    print(f"device {a.device}, cu_seqlens {cu}, H = 1, K = V = {a.head_size}, float32")
    print(f"prepare_chunk_indices (sequence, chunk): {table}; the sequences' own: {pairs}")

    failed = False
    for label, chunk_indices in (("chunk_kda", None), ("chunk_kda, chunk_indices = the sequences' own", pairs)):
        ci = None if chunk_indices is None else torch.tensor(chunk_indices, device=a.device)
        o, S = run(kda, q, k, v, g, beta, h0, cu, ci)
        print(f"\n{label}:")
        for n in range(len(cu) - 1):
            lo, hi = cu[n], cu[n + 1]
            e_o = relative(o[0, lo:hi], o_ref[0, lo:hi]) if hi > lo else 0.0
            e_S = relative(S[n], S_ref[n])
            bad = e_o > TOLERANCE or e_S > TOLERANCE
            failed |= bad and chunk_indices is None
            print(f"  sequence {n} (tokens {lo}..{hi}): o rel max err {e_o:.3g}, final state {e_S:.3g}"
                  f"{'  <-- fails' if bad else ''}")  # fmt: skip
            if bad and hi > lo:
                print(f"    o[{lo}, 0, :4]  expected {np.round(o_ref[0, lo, 0, :4], 5)}")
                print(f"                  measured {np.round(o[0, lo, 0, :4], 5)}")
                print(f"                  v (input) {np.round(v[0, lo, 0, :4].cpu().numpy(), 5)}")
                print(f"    final state [0, 0, :4] expected {np.round(S_ref[n, 0, 0, :4], 5)}")
                print(f"                           measured {np.round(S[n, 0, 0, :4], 5)}"
                      f" ({int((~np.isfinite(S[n])).sum())} of {S[n].size} elements not finite)")  # fmt: skip
    print(f"\n{'FAILS' if failed else 'agrees'} (tolerance {TOLERANCE:.3g} relative to the oracle's largest magnitude)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
