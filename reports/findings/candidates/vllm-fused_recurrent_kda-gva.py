"""Candidate (not yet a finding): vLLM 0.33.0's fused_recurrent_kda
(vllm/third_party/flash_linear_attention/ops/kda.py) writes past its output buffer when the
value heads hold more elements per token than the key heads: grouped value heads (HV > H)
or V > K.

The wrapper allocates o like k ([B, T, H, K]) and the kernel stores o as [B, T, HV, V]
(token stride HV * V). With HV * V > H * K the stores past B * T * H * K elements land
outside o; the returned o has k's shape either way.

To see the stores past o on any device, this script hands the wrapper a guarded o: during
the call torch.empty_like(k) returns the front of a larger buffer filled with NaN, so what
the kernel writes past o's end stays visible (the kernel's arithmetic is untouched). The
values found there are then compared with the float64 oracle: they are the missing heads.
With --no-guard the call is plain, for compute-sanitizer on a GPU:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python vllm-fused_recurrent_kda-gva.py --device cuda --no-guard

(each tensor its own allocation, so a store past o is reported as an invalid global write).
Under Triton's interpreter (no GPU) --no-guard stores into the host heap past o and can take
the process down (the interpreter does not check bounds).

Run with vLLM's files from the wheel or an installed vllm==0.33.0 --no-deps:

    KDAVERIFY_VLLM=path/to/vllm-0.33.0-...whl python vllm-fused_recurrent_kda-gva.py [--device cuda]

The state pool and index are passed as vLLM's own callers do: slot 0 is vLLM's null block,
so the one sequence uses slot 1; the index has a column per token. Exits 1 while a shape
with HV * V > H * K stores past o (or, with --no-guard, while o comes back in k's shape).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from kdaverify.equivalence.public_kernels import vllm_module
from kdaverify.reference import kda_recurrent_np

# (H, HV, K, V): the control, GVA (the suite's gva check), V > K
SHAPES = [(1, 1, 16, 16), (1, 2, 16, 16), (1, 1, 16, 32)]
TOLERANCE = 1e-5  # relative to the oracle's largest magnitude; float32 FMAs, no TF32 here


class GuardedEmptyLike:
    """torch.empty_like for the call: for k, the front of a NaN-filled buffer twice k's size
    plus a margin; anything else as torch allocates it."""

    def __init__(self, k):
        self.k, self.real, self.buffer = k, torch.empty_like, None

    def __enter__(self):
        def empty_like(x, *args, **kwargs):
            if x is self.k and self.buffer is None:
                self.buffer = torch.full((2 * x.numel() + 64,), float("nan"), dtype=x.dtype, device=x.device)
                return self.buffer[: x.numel()].view(x.shape)
            return self.real(x, *args, **kwargs)

        torch.empty_like = empty_like
        return self

    def __exit__(self, *exc):
        torch.empty_like = self.real


def case(kda, H, HV, K, V, device, guard):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, 1, H, K, generator=gen), dim=-1)
    v, g = torch.randn(1, 1, HV, V, generator=gen), -torch.rand(1, 1, HV, K, generator=gen)
    beta, h0 = torch.rand(1, 1, HV, generator=gen), torch.randn(1, HV, K, V, generator=gen)
    o_ref, _ = kda_recurrent_np(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    pool = torch.zeros(2, HV, V, K, device=device)  # [slots, HV, V, K]; slot 0 is the null block
    pool[1] = h0[0].transpose(-1, -2)
    slots = torch.ones(1, 1, dtype=torch.int32, device=device)  # [N, tokens]
    q, k, v, g, beta = (x.to(device) for x in (q, k, v, g, beta))
    call = dict(initial_state=pool, inplace_final_state=True, use_qk_l2norm_in_kernel=False, ssm_state_indices=slots)
    print(f"\nH = {H}, HV = {HV}, K = {K}, V = {V} (B = T = 1, float32): contract o {tuple(v.shape)}")
    if not guard:
        o, _ = kda.fused_recurrent_kda(q, k, v, g, beta, **call)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"  returned o {tuple(o.shape)}")
        return tuple(o.shape) != tuple(v.shape)
    with GuardedEmptyLike(k) as guarded:
        o, _ = kda.fused_recurrent_kda(q, k, v, g, beta, **call)
    if guarded.buffer is None:
        raise SystemExit("the wrapper did not allocate o with torch.empty_like(k): this is not the code described")
    buffer = guarded.buffer.cpu().double()
    n = k.numel()
    past = int((~torch.isnan(buffer[n:])).sum())
    print(f"  returned o {tuple(o.shape)} ({n} elements); elements stored past its end: {past}")
    stored = buffer[: v.numel()].numpy().reshape(v.shape)  # what the kernel wrote, read as [B, T, HV, V]
    for hv in range(HV):
        where = "inside o" if (hv + 1) * V <= n else "past o's end" if hv * V >= n else "partly past o's end"
        err = float(np.abs(stored[0, 0, hv] - o_ref[0, 0, hv]).max()) / float(np.abs(o_ref).max())
        print(f"  head {hv} ({where}): rel max err {err:.3g} against the oracle")
        print(f"    expected {np.round(o_ref[0, 0, hv, :4], 5)}, stored {np.round(stored[0, 0, hv, :4], 5)}")
        if err > TOLERANCE:
            print("    (differs: not the overflow this script describes)")
    return past > 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-guard", action="store_true", help="plain calls (for compute-sanitizer)")
    a = p.parse_args()
    kda = vllm_module("kda")
    print(f"device {a.device}")
    overflows = [case(kda, *shape, a.device, not a.no_guard) for shape in SHAPES]
    if overflows[0]:
        print("\nthe control (H = HV, K = V) misbehaves too: not the defect described here")
    failed = any(overflows[1:])
    print(f"\n{'FAILS' if failed else 'agrees'}: o is {'not ' if failed else ''}sized for [B, T, HV, V]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
