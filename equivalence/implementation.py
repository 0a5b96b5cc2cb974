"""The one adapter mechanism: how the suite calls an implementation it did not write.

An implementation is any callable with flash-linear-attention's chunk_kda contract

    fn(q, k, v, g, beta, scale=..., initial_state=..., output_final_state=True, cu_seqlens=...)
        -> (o [B, T, HV, V], final_state [N, HV, K, V])

plus a Capabilities record of what it claims to support. Capabilities come from, in order:
the defaults below, an attribute `kdaverify_capabilities` on the callable (a Capabilities
or a dict of its fields), and the user's --impl-* options. Cases outside the declared
capabilities are not applicable: never run, never counted as passed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = ("ieee", "tf32", "tf32_rn", "bf16")
LAYOUTS = ("KV", "VK")


@dataclass(frozen=True)
class Capabilities:
    """What an implementation declares.

    dtypes: input dtypes it accepts (o is returned in the input dtype).
    head_sizes: the K and V it supports, or None for any.
    precision: matmul precision class for float32 inputs: "ieee" (full fp32, the default),
        "tf32" (operands truncated to tf32, as Triton's tl.dot does), "tf32_rn" (rounded to
        tf32, as cuBLAS does) or "bf16"; fp32 accumulation in all. 16-bit inputs are always
        held to a bf16-operand reference.
    state_layout: "KV" ([N, HV, K, V], the convention) or "VK" ([N, HV, V, K]); the
        adapter transposes, it never guesses.
    gva: supports HV > H.  varlen: supports cu_seqlens.
    gate_in_kernel: accepts use_gate_in_kernel=True with A_log, dt_bias, lower_bound (g is z).
    l2norm_in_kernel: accepts use_qk_l2norm_in_kernel=True.
    max_T: the longest sequence it is given (None: the suite's own limit).
    """

    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    head_sizes: tuple[int, ...] | None = None
    precision: str = "ieee"
    state_layout: str = "KV"
    gva: bool = True
    varlen: bool = True
    gate_in_kernel: bool = False
    l2norm_in_kernel: bool = False
    max_T: int | None = None

    def __post_init__(self):
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"dtypes: expected names from {sorted(DTYPES)}, got {d!r}")
        if not self.dtypes:
            raise ValueError("dtypes: expected at least one dtype")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.state_layout not in LAYOUTS:
            raise ValueError(f"state_layout: expected one of {LAYOUTS}, got {self.state_layout!r}")
        if self.head_sizes is not None and (not self.head_sizes or min(self.head_sizes) < 1):
            raise ValueError(f"head_sizes: expected positive sizes, got {self.head_sizes}")

    def matmul_precision(self, dtype: torch.dtype) -> str:
        """The precision policy of the same-precision reference for inputs of this dtype."""
        return self.precision if dtype == torch.float32 else "bf16"

    def declared(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_capabilities(base: Capabilities, options: dict) -> Capabilities:
    """Override base with user options; option values of None mean 'not given'."""
    given = {k: v for k, v in options.items() if v is not None}
    return replace(base, **given)


class Implementation:
    """A callable under test, with its declared capabilities and the device it runs on."""

    def __init__(self, fn, name: str, caps: Capabilities, device: str = "cpu"):
        self.fn, self.name, self.caps, self.device = fn, name, caps, torch.device(device)

    def __repr__(self) -> str:
        return f"Implementation({self.name}, {self.caps}, device={self.device})"

    def tensors(self, arrays: dict, dtype: torch.dtype) -> dict:
        """The inputs as the implementation sees them: q, k, v, g, beta in dtype on the
        device; initial_state float32; cu_seqlens int64."""
        out = {}
        for name in ("q", "k", "v", "g", "beta"):
            out[name] = torch.as_tensor(arrays[name]).to(self.device, dtype)
        h0, cu = arrays.get("initial_state"), arrays.get("cu_seqlens")
        out["initial_state"] = None if h0 is None else torch.as_tensor(h0).to(self.device, torch.float32)
        out["cu_seqlens"] = None if cu is None else torch.as_tensor(np.asarray(cu)).to(self.device, torch.int64)
        return out

    def call(self, t: dict, scale=None, **extra):
        """Call the implementation on prepared tensors; returns (o, final_state in KV layout)."""
        h0 = t["initial_state"]
        if h0 is not None and self.caps.state_layout == "VK":
            h0 = h0.transpose(-1, -2).contiguous()
        o, S = self.fn(
            t["q"], t["k"], t["v"], t["g"], t["beta"],
            scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=t["cu_seqlens"], **extra,
        )  # fmt: skip
        if S is not None and self.caps.state_layout == "VK":
            S = S.transpose(-1, -2)
        return o, S


def load_callable(target: str):
    """Import 'package.module:function'."""
    if ":" not in target:
        raise ValueError(f"--impl: expected MODULE:FUNC, got {target!r}")
    mod, _, attr = target.partition(":")
    try:
        fn = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"--impl: cannot import module {mod!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"--impl: {mod!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"--impl: {target} is not callable")
    return fn


def load_implementation(target: str, options: dict | None = None, device: str = "cpu") -> Implementation:
    fn = load_callable(target)
    base = getattr(fn, "kdaverify_capabilities", Capabilities())
    if isinstance(base, dict):
        base = Capabilities(**base)
    return Implementation(fn, target, parse_capabilities(base, options or {}), device)
