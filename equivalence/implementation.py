"""The one adapter mechanism: how the suite calls an implementation it did not write.

An implementation is any callable with flash-linear-attention's chunk_kda contract

    fn(q, k, v, g, beta, scale=..., initial_state=..., output_final_state=True, cu_seqlens=...)
        -> (o [B, T, HV, V], final_state [N, HV, K, V])

plus a Capabilities record of what it claims to support. Capabilities come from, in order:
the defaults of capabilities.Capabilities, an attribute `kdaverify_capabilities` on the callable (a Capabilities
or a dict of its fields), and the user's --kda-* options. Cases outside the declared
capabilities are not applicable: never run, never counted as passed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import time

import numpy as np
import torch

from .capabilities import Capabilities, parse_capabilities

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Implementation:
    """A callable under test, with its declared capabilities and the device it runs on."""

    def __init__(self, fn, name: str, caps: Capabilities, device: str = "cpu"):
        self.fn, self.name, self.caps, self.device = fn, name, caps, torch.device(device)
        self.seconds = 0.0  # wall time inside the implementation's calls (call), compiles included

    def __repr__(self) -> str:
        return f"Implementation({self.name}, {self.caps}, device={self.device})"

    def tensors(self, arrays: dict, dtype: torch.dtype, side_dtypes: dict | None = None) -> dict:
        """The inputs as the implementation sees them: q, k, v, g, beta in dtype on the
        device (g or beta in another dtype where side_dtypes, {"g" or "beta": torch dtype},
        says so); initial_state float32; cu_seqlens int64."""
        side = side_dtypes or {}
        out = {}
        for name in ("q", "k", "v", "g", "beta"):
            out[name] = torch.as_tensor(arrays[name]).to(self.device, side.get(name, dtype))
        h0, cu = arrays.get("initial_state"), arrays.get("cu_seqlens")
        out["initial_state"] = None if h0 is None else torch.as_tensor(h0).to(self.device, torch.float32)
        out["cu_seqlens"] = None if cu is None else torch.as_tensor(np.asarray(cu)).to(self.device, torch.int64)
        return out

    @contextlib.contextmanager
    def timed(self):
        """Count the block's wall time as the implementation's (seconds): its calls, and the
        backward passes through its outputs. On CUDA the block ends with a synchronize, so the
        kernels' own time counts, not only their launch."""
        started = time.perf_counter()
        try:
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            self.seconds += time.perf_counter() - started

    def call(self, t: dict, scale=None, output_final_state: bool = True, form: str = "mixed", **extra):
        """Call the implementation on prepared tensors; returns (o, final_state in KV layout
        or None).

        form: how the contract's arguments are passed. "mixed" (the default): q, k, v, g,
        beta positionally, the rest by keyword; "positional": scale, initial_state and
        output_final_state positionally too (in the contract's order; cu_seqlens and the
        in-kernel options by keyword); "keyword": everything by keyword."""
        if form not in CALL_FORMS:
            raise ValueError(f"form: expected one of {CALL_FORMS}, got {form!r}")
        h0 = t["initial_state"]
        if h0 is not None and self.caps.state_layout == "VK":
            h0 = h0.transpose(-1, -2).contiguous()
        tensors = [t[n] for n in ("q", "k", "v", "g", "beta")]
        options = dict(scale=scale, initial_state=h0, output_final_state=output_final_state)
        with self.timed():
            o, S = self._call(tensors, options, t["cu_seqlens"], form, extra)
        if S is not None and self.caps.state_layout == "VK":
            S = S.transpose(-1, -2)
        return o, S

    def _call(self, tensors, options, cu_seqlens, form, extra):
        if form == "positional":
            return self.fn(*tensors, *options.values(), cu_seqlens=cu_seqlens, **extra)
        if form == "keyword":
            named = dict(zip(("q", "k", "v", "g", "beta"), tensors, strict=True))
            return self.fn(**named, **options, cu_seqlens=cu_seqlens, **extra)
        return self.fn(*tensors, **options, cu_seqlens=cu_seqlens, **extra)


CALL_FORMS = ("mixed", "positional", "keyword")
IMPL_OPTION = "--kda-impl"
# Optional dependencies an implementation may need, and the command that installs each.
INSTALL = {
    "triton": "pip install triton (kdaverify's kernels; on a machine without a GPU they run under its interpreter)",
    "fla": "pip install 'kdaverify[fla]' (flash-linear-attention 0.6.0)",
    "matplotlib": "pip install 'kdaverify[perf]'",
}


def install_hint(module: str | None) -> str:
    top = (module or "").split(".")[0]
    return f"; install it with: {INSTALL[top]}" if top in INSTALL else ""


def load_callable(target: str):
    """Import 'package.module:function' (a dotted attribute path after the colon)."""
    if ":" not in target:
        raise ValueError(f"{IMPL_OPTION}: expected MODULE:FUNC, got {target!r}")
    mod, _, attr = target.partition(":")
    try:
        fn = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"{IMPL_OPTION}: cannot import module {mod!r}: {e}{install_hint(e.name)}") from e
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"{IMPL_OPTION}: {mod!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{IMPL_OPTION}: {target} is not callable")
    return fn


def check_requirements(fn, name: str) -> None:
    """An implementation may name the optional modules it needs in an attribute
    `kdaverify_requires = (module, ...)`; a missing one is a usage error that says how to
    install it, before any check runs. Where finding a module is not the whole answer (kernel
    files loaded from a wheel an environment variable names, see shim.py), an attribute
    `kdaverify_available`, a function of no arguments, raises ImportError with the install
    command instead; that becomes the same usage error."""
    for module in getattr(fn, "kdaverify_requires", ()):
        if importlib.util.find_spec(module) is None:
            raise ValueError(
                f"{IMPL_OPTION}: {name} needs the module {module!r}, which is not installed{install_hint(module)}"
            )
    available = getattr(fn, "kdaverify_available", None)
    if available is not None:
        try:
            available()
        except ImportError as e:
            raise ValueError(f"{IMPL_OPTION}: {name} cannot run here: {e}") from e


def load_implementation(target, options: dict | None = None, device: str = "cpu") -> Implementation:
    """target: 'MODULE:FUNC' or the callable itself. options: Capabilities overrides."""
    fn = load_callable(target) if isinstance(target, str) else target
    name = target if isinstance(target, str) else f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
    check_requirements(fn, name)
    base = getattr(fn, "kdaverify_capabilities", Capabilities())
    if isinstance(base, dict):
        base = Capabilities(**base)
    return Implementation(fn, name, parse_capabilities(base, options or {}), device)
