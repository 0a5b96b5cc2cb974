"""What every kernel wrapper of kdaverify.kernels shares: where Triton runs, and one
validation of the calling convention (DESIGN.md section 3) that fails with a ValueError
naming the argument, never with a wrong answer.

On a machine without a CUDA GPU the kernels run under Triton's interpreter: it must be
switched on (TRITON_INTERPRET=1) before triton.jit wraps the first kernel, so this module
sets it when no GPU is present and the variable is unset. The interpreter runs the same
kernel code on CPU tensors, one program at a time: it proves the math and the indexing, not
the compiled kernel's speed or its memory safety.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from kdaverify.reference.conventions import check_qkv, check_scale

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD = 256  # one K (or V) block per program: next_power_of_2(K) lanes of registers


@dataclass(frozen=True)
class Call:
    """A validated call: sizes, the scale, and the tensors as the kernels read them
    (contiguous; a non-contiguous input is copied once here, never misread)."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int
    scale: float
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None


def _device_ok(x: torch.Tensor, name: str, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where q is), got {x.device}")


def check_call(q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None) -> Call:
    """Validate a KDA kernel call and return the contiguous tensors the kernels read.

    q, k [B, T, H, K], v [B, T, HV, V] of one dtype in INPUT_DTYPES; g [B, T, HV, K] and
    beta [B, T, HV] in that dtype or float32; initial_state [N, HV, K, V] float32;
    cu_seqlens int32/int64 [N+1] (B == 1), offsets checked on the host. All on one device:
    CUDA, or the CPU under the Triton interpreter. K, V <= 256.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    B, T, H, HV, K, V = check_qkv(q, k, v)
    if q.dtype not in INPUT_DTYPES:
        raise ValueError(f"q: expected one of {INPUT_DTYPES}, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: expected the dtype of q ({q.dtype}), got {x.dtype}")
    for name, x, shape in (("g", g, (B, T, HV, K)), ("beta", beta, (B, T, HV))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
        if x.dtype not in (q.dtype, torch.float32):
            raise ValueError(f"{name}: expected float32 or the dtype of q ({q.dtype}), got {x.dtype}")
    if K > MAX_HEAD or V > MAX_HEAD:
        raise ValueError(f"q: expected K <= {MAX_HEAD} and V <= {MAX_HEAD} (head sizes), got K = {K}, V = {V}")
    device = q.device
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"q: expected a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter), got {device}")
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        _device_ok(x, name, device)
    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"cu_seqlens: expected an int32 or int64 tensor, got {getattr(cu_seqlens, 'dtype', cu_seqlens)}"
            )
        _device_ok(cu_seqlens, "cu_seqlens", device)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens: expected a 1-D tensor [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}"
            )
        if B != 1:
            raise ValueError(f"cu_seqlens: a packed batch requires B == 1, got B = {B}")
        offsets = cu_seqlens.tolist()  # one host sync: offsets that would index out of bounds never reach a kernel
        if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T = {T}, got {offsets}")
        N = len(offsets) - 1
        cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (N, HV, K, V):
            got = tuple(getattr(initial_state, "shape", ()))
            raise ValueError(f"initial_state: expected shape [N, HV, K, V] = {(N, HV, K, V)}, got {got}")
        if initial_state.dtype != torch.float32:
            raise ValueError(f"initial_state: expected float32, got {initial_state.dtype}")
        _device_ok(initial_state, "initial_state", device)
        initial_state = initial_state.contiguous()
    return Call(
        B, T, H, HV, K, V, N, check_scale(scale, K),
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
        initial_state, cu_seqlens,
    )  # fmt: skip
