"""The hardware ceilings a roofline is drawn under, measured on the device at the start of
every run, next to the vendor's datasheet peaks where the device is known.

    copy:     a large device-to-device copy, bytes read plus bytes written per second
    bfloat16: a large bf16 matmul, 2 n^3 FLOPs per call
    tf32:     the same in float32 with TF32 tensor cores allowed (what tf32 kernels can reach)
    float32:  the same with TF32 off (full fp32)
"""

from __future__ import annotations

import torch

from .timing import median_ms

# Dense (no sparsity) peaks, keyed by the exact torch.cuda.get_device_name() string.
DATASHEET = {
    "NVIDIA H100 80GB HBM3": dict(copy_gbs=3350, bfloat16=989, tf32=495, float32=67,
                                  source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column"),
    "NVIDIA H100 PCIe": dict(copy_gbs=2000, bfloat16=756, tf32=378, float32=51,
                             source="NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column"),
    "NVIDIA H200": dict(copy_gbs=4800, bfloat16=989, tf32=495, float32=67,
                        source="NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column"),
}  # fmt: skip

GPU_SIZES = dict(copy_bytes=2**30, matmul_n=8192)  # 1 GiB copied: far beyond any cache
# A CPU: seconds, not minutes (bf16 matmuls have no fast CPU path: 1024^3 took 30 s on 2 cores)
CPU_SIZES = dict(copy_bytes=2**26, matmul_n=1024, bf16_matmul_n=256)
SMOKE_SIZES = dict(copy_bytes=2**22, matmul_n=128, bf16_matmul_n=64)


def _matmul_tflops(n: int, dtype: torch.dtype, device: str, tf32: bool, budget_s: float) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        ms, _ = median_ms(lambda: a @ b, device, budget_s)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / (ms * 1e9)


def measure(device: str, smoke: bool = False) -> dict:
    """Measured ceilings: copy_gbs (GB/s), and TFLOP/s per matmul class. smoke: tiny sizes
    and single calls (a check of the machinery, not a measurement)."""
    sizes = GPU_SIZES if device == "cuda" else SMOKE_SIZES if smoke else CPU_SIZES
    budget = 0.0 if smoke else 1.0
    n_elems = sizes["copy_bytes"] // 4
    src = torch.empty(n_elems, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms, how = median_ms(lambda: dst.copy_(src), device, budget)
    copy_gbs = 2 * sizes["copy_bytes"] / (ms * 1e6)  # read + write
    n = sizes["matmul_n"]
    out = dict(copy_gbs=copy_gbs, timer=how, copy_bytes=sizes["copy_bytes"], matmul_n=n)
    n16 = sizes.get("bf16_matmul_n", n)
    out["bf16_matmul_n"] = n16
    out["bfloat16"] = _matmul_tflops(n16, torch.bfloat16, device, False, budget)
    out["float32"] = _matmul_tflops(n, torch.float32, device, False, budget)
    # no TF32 on a CPU: its fp32 matmul is the ceiling of a tf32 kernel there
    out["tf32"] = _matmul_tflops(n, torch.float32, device, True, budget) if device == "cuda" else out["float32"]
    return out


def datasheet(name: str) -> dict | None:
    return DATASHEET.get(name)


def compute_class(dtype: str, precision: str) -> str:
    """The matmul ceiling a kernel of this input dtype and precision class runs under."""
    if dtype != "float32":
        return "bfloat16"
    return "tf32" if precision.startswith("tf32") else "float32"
