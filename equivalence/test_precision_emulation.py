"""The same-precision reference rounds matmul operands the way the hardware does.

The tolerance rule scales every budget by a reference that emulates a kernel's matmul
precision (reference.round_operand). If the emulation rounds differently from the tensor
cores, every tf32 budget is off by that difference, so it is measured here against a real
Triton tl.dot and a real TF32 torch.matmul. Needs a CUDA GPU; skipped without one.
"""

from __future__ import annotations

import pytest
import torch
from kdaverify.reference import round_operand

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: it measures the tensor cores")
N = 64


def _emulated(a, b, rounding):
    return (rounding(a).double() @ rounding(b).double()).float()


def _distance(c, ref):
    return ((c.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _triton_dot(a, b):
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        a = tl.load(a_ptr + i[:, None] * N + i[None, :])
        b = tl.load(b_ptr + i[:, None] * N + i[None, :])
        c = tl.dot(a, b, input_precision="tf32")
        tl.store(c_ptr + i[:, None] * N + i[None, :], c)

    c = torch.empty_like(a)
    dot_kernel[(1,)](a, b, c, N=N)
    return c


@cuda
@pytest.mark.parametrize(("engine", "precision"), [("triton", "tf32"), ("torch", "tf32_rn")])
def test_tf32_emulation_matches_hardware(engine, precision):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(N, N, device="cuda", generator=g)
    b = torch.randn(N, N, device="cuda", generator=g)
    if engine == "triton":
        c = _triton_dot(a, b)
    else:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            c = a @ b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    dist = {p: _distance(c, _emulated(a, b, lambda x, p=p: round_operand(x, p))) for p in ("tf32", "tf32_rn", "ieee")}
    print(f"{engine}: max relative distance to each emulation: {dist}")
    # Operand rounding moves a 64-long dot product by ~1e-4 relative; fp32 accumulation in
    # another order by ~1e-6. A faithful emulation must sit at the accumulation level.
    assert dist[precision] < 1e-5, f"{precision} emulation is {dist[precision]:.2e} from {engine}: {dist}"
