"""Accuracy of a chunk_kda implementation on one long sequence, against the float64 oracle:
issue 7's accuracy figure (T = 16384, K = V = 128, DESIGN.md section 7's inputs).

    python -m kdaverify.perf.accuracy [--T 16384] [--K 128] [--H 1] [--device cuda]
        [--impl kdaverify.kernels:chunk_kda] [--dtypes float32:ieee,bfloat16] [--grad]

--grad also takes every gradient of <o, do> + <final_state, dht> (do, dht ~ N(0, 1), seeded)
through the implementation's autograd and holds each to the float64 adjoint recurrence
(reference.kda_recurrent_backward_np): issue 9's figure (T = 4096, every gradient within
1e-5 relative RMS with precision="ieee" and float32 inputs).

Each dtype runs as `dtype` or `dtype:precision` (the implementation's `precision` argument).
The inputs are perf.providers.inputs, the same as a perf sweep's. The oracle is the float64
NumPy recurrence on the very rounded inputs the implementation saw, on the CPU. Errors are
tolerance.errors: relative RMS, relative max and bias. On a CPU, Triton kernels run under
the interpreter. Its fp32 products are the "ieee" arithmetic of a GPU, and for bf16 it
rounds the dot operands the way the tensor cores read them. tf32 is not emulated there.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def measure(impl: str, T: int, H: int, K: int, V: int, dtype: str, precision: str | None, device: str) -> dict:
    """Errors of o and of the final state of one call, and the call's wall time in seconds."""
    from kdaverify.equivalence.implementation import load_implementation
    from kdaverify.equivalence.tolerance import errors
    from kdaverify.reference import kda_recurrent_np

    from .providers import Case, inputs

    fn = load_implementation(impl, device=device).fn
    t = inputs(Case(1, T, H, H, K, V, op="chunk_kda", provider="impl", mode="fwd", dtype=dtype), device)
    kw = {} if precision is None else {"precision": precision}
    start = time.perf_counter()
    o, S = fn(t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    want_o, want_S = kda_recurrent_np(*(t[n].double().cpu().numpy() for n in ("q", "k", "v", "g", "beta")),
                                      output_final_state=True)  # fmt: skip
    return dict(o=errors(o.float().cpu(), want_o), final_state=errors(S.float().cpu(), want_S), seconds=seconds)


GRAD_NAMES = ("q", "k", "v", "g", "beta")


def measure_grads(impl: str, T: int, H: int, K: int, V: int, dtype: str, precision: str | None, device: str) -> dict:
    """Errors of dq, dk, dv, dg, dbeta of one forward+backward against the float64 adjoint
    recurrence on the same rounded inputs and cotangents, and the wall time in seconds."""
    from kdaverify.equivalence.implementation import load_implementation
    from kdaverify.equivalence.tolerance import errors
    from kdaverify.reference import kda_recurrent_backward_np

    from .providers import Case, inputs

    fn = load_implementation(impl, device=device).fn
    t = inputs(Case(1, T, H, H, K, V, op="chunk_kda", provider="impl", mode="fwdbwd", dtype=dtype), device)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(1, T, H, V, generator=gen).to(device=device, dtype=t["v"].dtype)
    dht = torch.randn(1, H, K, V, generator=gen).to(device)
    xs = [t[n].detach().requires_grad_() for n in GRAD_NAMES]
    kw = {} if precision is None else {"precision": precision}
    start = time.perf_counter()
    o, S = fn(*xs, output_final_state=True, **kw)
    got = torch.autograd.grad((o.float() * do.float()).sum() + (S.float() * dht).sum(), xs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    arrays = [x.detach().double().cpu().numpy() for x in xs]
    want = kda_recurrent_backward_np(*arrays, do.double().cpu().numpy(), dht.double().cpu().numpy())
    return dict({f"d{n}": errors(a.float().cpu(), w) for n, a, w in zip(GRAD_NAMES, got, want, strict=False)},
                seconds=seconds)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdaverify.perf.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="kdaverify.kernels:chunk_kda", help="MODULE:FUNC (default: ours)")
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--H", type=int, default=1)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=None, help="default: K")
    p.add_argument("--dtypes", default="float32:ieee,bfloat16", help="comma-separated dtype[:precision]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grad", action="store_true", help="the gradients instead of o and the final state")
    a = p.parse_args(argv)
    for item in a.dtypes.split(","):
        dtype, _, precision = item.partition(":")
        if a.grad:
            r = measure_grads(a.impl, a.T, a.H, a.K, a.V or a.K, dtype, precision or None, a.device)
            each = ", ".join(f"{n} {r[n].rel_rms:.2e}" for n in (f"d{m}" for m in GRAD_NAMES))
            head = f"{a.impl} T={a.T} H={a.H} K={a.K} V={a.V or a.K} {dtype} precision={precision or 'default'}"
            print(f"{head} on {a.device}: gradient rel RMS {each}; forward+backward {r['seconds']:.1f} s", flush=True)
            continue
        r = measure(a.impl, a.T, a.H, a.K, a.V or a.K, dtype, precision or None, a.device)
        print(f"{a.impl} T={a.T} H={a.H} K={a.K} V={a.V or a.K} {dtype} precision={precision or 'default'} on "
              f"{a.device}: o rel RMS {r['o'].rel_rms:.2e} (rel max {r['o'].rel_max:.2e}), final state rel RMS "
              f"{r['final_state'].rel_rms:.2e}; call {r['seconds']:.1f} s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
