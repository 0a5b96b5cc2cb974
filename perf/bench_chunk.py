"""Standalone GPU check and timing of kernels.chunk_kda (DESIGN.md sections 6-7). CUDA only.

    python -m kdaverify.perf.bench_chunk            (or: python perf/bench_chunk.py)

1. Accuracy: chunk_kda (bf16 and fp32 inputs, default and precision="ieee") against the
   float64 recurrence (reference.kda_recurrent in float64 on the GPU) at two mid shapes,
   relative RMS of o and of the final state.
2. Speed: forward medians of triton.testing.do_bench at the anchor shapes of DESIGN.md
   section 7 (bf16, H = 32, K = V = 128, g = logsigmoid(randn) / 16, L2-normalised k,
   beta in (0, 1)), beside flash-linear-attention's chunk_kda when `import fla` works, with
   the peak memory of one call (torch.cuda.max_memory_allocated above the inputs) and the
   relative RMS distance between the two outputs.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F

SHAPES = [(1, 4096), (1, 16384), (8, 4096), (1, 65536)]  # (B, T) of DESIGN.md section 7
H, K, V = 32, 128, 128
FLA_H200_MS = {(1, 4096): 1.05, (1, 16384): 1.95, (8, 4096): 3.81, (1, 65536): 7.62}


def inputs(B, T, H, HV, K, V, dtype, seed=0, h0=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)

    q = randn(B, T, H, K)
    k = F.normalize(randn(B, T, H, K), dim=-1)
    v = randn(B, T, HV, V)
    g = F.logsigmoid(randn(B, T, HV, K)) / 16
    beta = torch.rand(B, T, HV, generator=gen, device="cuda")
    state = randn(B, HV, K, V) if h0 else None
    return [x.to(dtype) for x in (q, k, v, g, beta)], state


def rel_rms(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm())


def accuracy():
    from kdaverify.kernels import chunk_kda
    from kdaverify.reference import kda_recurrent

    rows = []
    for B, T, Hq, HV in [(2, 1000, 4, 4), (1, 1500, 2, 4)]:
        for dtype in (torch.bfloat16, torch.float32):
            (q, k, v, g, beta), h0 = inputs(B, T, Hq, HV, K, V, dtype, seed=T, h0=True)
            o64, S64 = kda_recurrent(
                *(x.double() for x in (q, k, v, g, beta)), initial_state=h0.double(), output_final_state=True
            )
            for precision in (None, "ieee"):
                o, S = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, precision=precision)
                rows.append((f"B{B} T{T} H{Hq} HV{HV}", str(dtype).removeprefix("torch."), str(precision),
                             rel_rms(o, o64), rel_rms(S, S64)))  # fmt: skip
    print("\naccuracy vs float64 recurrence (relative RMS)")
    print(f"{'shape':<22}{'dtype':<10}{'precision':<11}{'o':>10}{'state':>10}")
    for shape, dt, p, eo, es in rows:
        print(f"{shape:<22}{dt:<10}{p:<11}{eo:>10.2e}{es:>10.2e}")
    return rows


def first(fn, args):
    return fn(*args)[0]


def peak_mb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return out, peak / 2**20


def speed():
    import triton.testing
    from kdaverify.kernels import chunk_kda

    try:
        os.environ["FLA_DISABLE_BACKEND_DISPATCH"] = "1"
        from fla.ops.kda import chunk_kda as fla_chunk_kda
    except Exception as e:  # noqa: BLE001 - any import failure means: no FLA column
        print(f"flash-linear-attention not available ({type(e).__name__}: {e}); ours only")
        fla_chunk_kda = None
    rows = []
    for B, T in SHAPES:
        args, _ = inputs(B, T, H, H, K, V, torch.bfloat16)
        ours = functools.partial(first, chunk_kda, args)
        o, mem = peak_mb(ours)
        finite = bool(torch.isfinite(o).all())
        ms = triton.testing.do_bench(ours, warmup=25, rep=100, return_mode="median")
        fla_ms = fla_mem = diff = float("nan")
        if fla_chunk_kda is not None:
            theirs = functools.partial(first, fla_chunk_kda, args)
            o_fla, fla_mem = peak_mb(theirs)
            diff = rel_rms(o, o_fla)
            fla_ms = triton.testing.do_bench(theirs, warmup=25, rep=100, return_mode="median")
            del o_fla
        rows.append((B, T, ms, mem, fla_ms, fla_mem, diff, finite))
        del args, o
        torch.cuda.empty_cache()
    return rows


def main():
    if not torch.cuda.is_available():
        print("bench_chunk: needs a CUDA GPU")
        return 2
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    accuracy()
    rows = speed()
    print("\nforward, bf16, H=32, K=V=128, median ms (do_bench); peak MiB of one call above its inputs")
    cols = ("B", 2), ("T", 6), ("ours ms", 9), ("ours MiB", 9), ("fla ms", 8), ("fla MiB", 8), ("fla/ours", 9)
    cols += ("fla H200 ref", 13), ("o vs fla", 9), ("finite", 7)
    print(" ".join(f"{name:>{w}}" for name, w in cols))
    for B, T, ms, mem, fla_ms, fla_mem, diff, finite in rows:
        print(
            f"{B:>2} {T:>6} {ms:>9.3f} {mem:>9.0f} {fla_ms:>8.3f} {fla_mem:>8.0f} {fla_ms / ms:>9.2f} "
            f"{FLA_H200_MS[(B, T)]:>13.2f} {diff:>9.2e} {str(finite):>7}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
