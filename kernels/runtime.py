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

import contextlib
import os
from dataclasses import dataclass

import torch
from kdaverify.reference.conventions import Dims, check_qkv, check_scale
from kdaverify.reference.gates import check_gate_args

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

import triton  # noqa: E402  (after TRITON_INTERPRET is settled)

# Host-side block arithmetic. triton.cdiv and triton.next_power_of_2 are ConstexprFunctions:
# from the host each call costs about 5 us (an import and an unwrap per argument: 5.0 and
# 6.0 us on the development CPU, Triton 3.6), and a decode call of fused_recurrent_kda made
# five (about 27 of its 63 us of Python there) for a few microseconds of GPU work; the
# chunk table of a packed batch made one per sequence. Their raw functions, the same
# arithmetic, serve the host.
cdiv = triton.cdiv.fn
next_power_of_2 = triton.next_power_of_2.fn

# Whether scratch() fills floating buffers with NaN (this repository's tests set it, conftest.py;
# KDAVERIFY_POISON_SCRATCH=1 for any run). Under the interpreter the CPU allocator often hands
# a call the buffers the previous call of the same shapes freed, whose stale values can be the
# right ones, so a kernel that skipped writing part of a buffer it later reads could pass a
# test that runs two forms in turn. No such escape has been seen (a mutant of chunk_diag that
# skips Aqk's diagonal column fails test_diagonal_tile_forms_agree_bitwise either way); with
# NaN there it cannot happen.
POISON_SCRATCH = os.environ.get("KDAVERIFY_POISON_SCRATCH", "0") not in ("", "0")


@contextlib.contextmanager
def scratch_poisoned(on: bool):
    """POISON_SCRATCH set to `on` inside the block, restored after it. The perf harness times
    with it off: filling the buffers is not the kernel's work, and at B1 T16384 H32 K = V = 128
    bf16 the fills of chunk_kda's forward cost 0.3 ms of its 2.2 (H200, twenty-third session:
    the sweep, run under this repository's conftest, timed them until then)."""
    global POISON_SCRATCH
    before, POISON_SCRATCH = POISON_SCRATCH, on
    try:
        yield
    finally:
        POISON_SCRATCH = before


def scratch(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape), or filled with NaN (floating dtypes) when POISON_SCRATCH is set:
    an element read before any kernel wrote it then shows as NaN instead of a stale value."""
    x = torch.empty(*shape, dtype=dtype, device=device)
    if POISON_SCRATCH and x.is_floating_point():
        x.fill_(float("nan"))
    return x


def _interpreter_scalar_index() -> None:
    """Let `range(n)` take a runtime scalar under the interpreter with NumPy >= 2.4.

    Triton 3.6's interpreter holds a kernel's scalars as one-element arrays and converts
    them for range() with int(array), which NumPy 2.4 rejects for arrays of one dimension
    ("only 0-dimensional arrays can be converted to Python scalars"). This wraps its tensor
    patching so that __index__ reads the one element with .item(). Compiled kernels on a GPU
    are not affected: the interpreter module is only touched when it is in use."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "kdaverify_shim", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))

    patch.kdaverify_shim = True
    interpreter._patch_lang_tensor = patch


def _interpreter_patch_once_per_launch() -> None:
    """Patch triton.language once per kernel launch under the interpreter, not once per call
    of a @triton.jit helper. Triton 3.6's interpreter re-patches every builtin of
    triton.language (inspect.getmembers over three modules, ~1 ms) on each device-function
    call, although the launch already patched the same module objects and keeps them patched
    until it ends. Kernels that call helpers inside loops (load_rows, mma, round_to) spent
    most of their interpreter time there: 8516 re-patches in one chunk_kda forward at
    B1 T200 HV4 K=V=32, which this shim takes from 8.1 s to 5.3-6.1 s (best of 3, on the
    2-core development machine while it ran other work). Here a device function's re-patch is skipped while a launch is
    running and every triton.language module it sees is already patched by that launch;
    any other case runs the interpreter's own patching, unchanged."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang, "kdaverify_shim", False):
        return
    original_patch, original_launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    active: list[set[int]] = []  # per running launch: ids of the patched language modules

    class _Done:
        def restore(self) -> None:  # the launch that patched restores
            pass

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if active and langs and langs <= active[-1]:
            return _Done()
        scope = original_patch(fn)
        if active:
            active[-1].update(langs)
        return scope

    def launch(self, *args, **kwargs):
        active.append(set())
        try:
            return original_launch(self, *args, **kwargs)
        finally:
            active.pop()

    patch_lang.kdaverify_shim = True
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = launch


def _interpreter_bf16_rounds_to_nearest() -> None:
    """Round float32 to bfloat16 to nearest (ties to even) under the interpreter, as a GPU's
    conversion (cvt.rn.bf16.f32) does. Triton 3.6's interpreter truncates instead (its
    cast passes no rounding mode), so kernels.kda_chunk_intra.round_to rounded on the bits
    in eight interpreted operations, 34% of a small bf16 forward's time (cProfile, B2 T100
    HV2 K = V = 12); here one vectorized conversion (torch's, which rounds to nearest even
    and keeps NaN) replaces them, for every float32 -> bfloat16 cast of an interpreted kernel.
    The way back, bfloat16 -> float32, is torch's too: exact, where the interpreter's own
    conversion got subnormal values wrong (6.15e-39 came back as 5.5e-40)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl
    if getattr(original, "kdaverify_shim", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.array(src.data, dtype=np.float32))  # a copy, 0-d kept
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.uint16).numpy(), dst_type.scalar)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float32:  # exact (subnormals too)
            x = torch.from_numpy(np.array(src.data, dtype=np.uint16)).view(torch.bfloat16)
            return interpreter.TensorHandle(x.float().numpy(), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl.kdaverify_shim = True
    builder.cast_impl = cast_impl


if INTERPRET:
    _interpreter_scalar_index()
    _interpreter_patch_once_per_launch()
    _interpreter_bf16_rounds_to_nearest()
# Launch configurations that fit: kernel name and key -> the index of the first that did.
_FITTING: dict[tuple, int] = {}


def launch_fitting(kernel, key: tuple, configs: list[dict], grid, args: tuple, **meta) -> dict:
    """Launch `kernel` with the first of `configs` (launch options such as BV, num_stages,
    num_warps, merged into meta) that fits the GPU, and remember it under `key`. A config
    that needs more shared memory than the card has fails at load, before it runs
    (triton.runtime.errors.OutOfResources), so trying the next one is safe: nothing was
    written. grid(config) gives the launch grid. Returns the config used. When none fits,
    a ValueError names the kernel and the sizes (never a silent wrong answer).

    Why: the backward's chunk_grads at K = V = 128 asked for 240 KiB of shared memory on an
    H100 (limit 227 KiB) with Triton's default pipelining; smaller cards (an A100's 164 KiB,
    a consumer card's 100 KiB) need smaller blocks still. Under the interpreter the first
    config always runs."""
    from triton.runtime.errors import OutOfResources

    # the list itself is part of the key: an index into one list means nothing in another
    full = (getattr(kernel, "__name__", str(kernel)), *key, tuple(tuple(sorted(c.items())) for c in configs))
    start = _FITTING.get(full, 0)
    for i in range(start, len(configs)):
        config = configs[i]
        try:
            kernel[grid(config)](*args, **meta, **config)
        except OutOfResources as err:
            if i == len(configs) - 1:
                shape = ", ".join(f"{n}={v}" for n, v in meta.items() if n in ("K", "V", "BK", "DOT_DTYPE"))
                raise ValueError(
                    f"{full[0]}: no launch config fits this GPU ({err}); unsupported here at {shape}. Tried {configs}."
                ) from err
            continue
        _FITTING[full] = i
        return config
    raise AssertionError("unreachable")


INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD = 256  # one K (or V) block per program: next_power_of_2(K) lanes of registers
STATE_LAYOUTS = ("kv", "vk")  # [.., K, V] (the convention) or [.., V, K] (some servers)


def state_out(ht: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, int]:
    """(pointer argument, store flag) for a kernel's optional final-state output. The flag is
    a runtime argument (do_not_specialize), and without a state the pointer is a 1-element
    fp32 tensor that is never written: the argument types are the same either way, so one
    compiled kernel serves both calls and o cannot depend on output_final_state. As a
    constexpr, the flag gave fused_recurrent_kda a second kernel whose o differed in the last
    bit (H100, Triton 3.6, 2026-11-27: conformance check final_state_not_requested)."""
    if ht is not None:
        return ht, 1
    return torch.empty(1, dtype=torch.float32, device=device), 0


@dataclass(frozen=True)
class Call(Dims):
    """A validated call: sizes (Dims), the scale, and the tensors as the kernels read them
    (contiguous; a non-contiguous input is copied once here, never misread)."""

    scale: float
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    state_indices: torch.Tensor | None = None
    offsets: tuple[int, ...] | None = None  # cu_seqlens on the host (read once, in check_call)


def _device_ok(x: torch.Tensor, name: str, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where q is), got {x.device}")


def check_call(
    q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None,
    *, state_layout="kv", state_indices=None, inplace_state=False,
) -> Call:  # fmt: skip
    """Validate a KDA kernel call and return the contiguous tensors the kernels read.

    q, k [B, T, H, K], v [B, T, HV, V] of one dtype in INPUT_DTYPES; g [B, T, HV, K] and
    beta [B, T, HV] in that dtype or float32; initial_state [N, HV, K, V] float32;
    cu_seqlens int32/int64 [N+1] (B == 1), non-decreasing offsets (a repeated offset is an
    empty sequence) checked on the host. All on one device: CUDA, or the CPU under the
    Triton interpreter. K, V <= 256.

    Decode options (kernels that serve from a state pool):
        state_layout: "kv" (state [.., K, V], the convention) or "vk" ([.., V, K]).
        state_indices: int32/int64 [N], or None. Given, initial_state is a pool
            [P, HV, K, V] (P >= 1) and sequence n reads slot state_indices[n]; -1 is
            padding. Checked on the host: every index in [-1, P).
        inplace_state: the kernel writes into initial_state, so it must be given and
            contiguous (a copy would take the writes), and no two sequences may share a slot.
    """
    B, T, H, HV, K, V = check_inputs(q, k, v, {"g": (g, "K"), "beta": (beta, None)})
    N, cu_seqlens, offsets = check_offsets(cu_seqlens, B, T, q.device)
    if state_layout not in STATE_LAYOUTS:
        raise ValueError(f"state_layout: expected one of {STATE_LAYOUTS}, got {state_layout!r}")
    if state_indices is not None:
        state_indices = _check_state_indices(state_indices, N, initial_state, q.device, inplace_state)
    if inplace_state and initial_state is None:
        raise ValueError("initial_state: expected a state to update in place (inplace_final_state=True), got None")
    if initial_state is not None:
        rows = "P" if state_indices is not None else "N"
        lead = int(initial_state.shape[0]) if state_indices is not None and initial_state.dim() == 4 else N
        dims = (lead, HV, K, V) if state_layout == "kv" else (lead, HV, V, K)
        names = f"[{rows}, HV, K, V]" if state_layout == "kv" else f"[{rows}, HV, V, K]"
        checked = check_state(initial_state, dims, names, q.device, lead >= 1)
        if inplace_state and not initial_state.is_contiguous():
            raise ValueError("initial_state: expected a contiguous tensor to update in place, got a strided view")
        initial_state = checked
    return Call(
        B, T, H, HV, K, V, N, check_scale(scale, K),
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
        initial_state, cu_seqlens, state_indices, offsets,
    )  # fmt: skip


def check_inputs(q, k, v, per_head: dict) -> tuple[int, int, int, int, int, int]:
    """(B, T, H, HV, K, V) of q, k [B, T, H, K] and v [B, T, HV, V] of one dtype in
    INPUT_DTYPES, K, V <= 256, on a CUDA device (or the CPU under the interpreter), and of the
    value heads' other inputs `per_head` {name: (tensor, "K" for [B, T, HV, K] or None for
    [B, T, HV])}, each in q's dtype or float32 on q's device. ValueError naming the first
    argument that is not so."""
    for name, x in (("q", q), ("k", k), ("v", v), *((n, x) for n, (x, _) in per_head.items())):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    B, T, H, HV, K, V = check_qkv(q, k, v)
    if q.dtype not in INPUT_DTYPES:
        raise ValueError(f"q: expected one of {INPUT_DTYPES}, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: expected the dtype of q ({q.dtype}), got {x.dtype}")
    for name, (x, last) in per_head.items():
        shape = (B, T, HV, K) if last == "K" else (B, T, HV)
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
        if x.dtype not in (q.dtype, torch.float32):
            raise ValueError(f"{name}: expected float32 or the dtype of q ({q.dtype}), got {x.dtype}")
    if K > MAX_HEAD or V > MAX_HEAD:
        raise ValueError(f"q: expected K <= {MAX_HEAD} and V <= {MAX_HEAD} (head sizes), got K = {K}, V = {V}")
    device = q.device
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"q: expected a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter), got {device}")
    for name, x in (("k", k), ("v", v), *((n, x) for n, (x, _) in per_head.items())):
        _device_ok(x, name, device)
    return B, T, H, HV, K, V


def check_offsets(cu_seqlens, B: int, T: int, device: torch.device):
    """(N, cu_seqlens as contiguous int64 or None, the offsets on the host or None): cu_seqlens
    int32/int64 [N+1] on the device (B == 1), non-decreasing from 0 to T, read once on the
    host so that offsets that would index out of bounds never reach a kernel."""
    if cu_seqlens is None:
        return B, None, None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens: expected an int32 or int64 tensor, got {getattr(cu_seqlens, 'dtype', cu_seqlens)}"
        )
    _device_ok(cu_seqlens, "cu_seqlens", device)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"cu_seqlens: a packed batch requires B == 1, got B = {B}")
    offsets = cu_seqlens.tolist()  # one host sync
    if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T = {T}, got {offsets}")
    return len(offsets) - 1, cu_seqlens.to(torch.int64).contiguous(), tuple(offsets)


def check_state(initial_state, dims: tuple, names: str, device: torch.device, ok: bool = True) -> torch.Tensor:
    """initial_state of shape dims (written `names` in the error), float32, on the device
    (and ok: a further condition on its shape), returned contiguous."""
    if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != dims or not ok:
        raise ValueError(
            f"initial_state: expected shape {names} = {dims}, got {tuple(getattr(initial_state, 'shape', ()))}"
        )
    if initial_state.dtype != torch.float32:
        raise ValueError(f"initial_state: expected float32, got {initial_state.dtype}")
    _device_ok(initial_state, "initial_state", device)
    return initial_state.contiguous()


def _check_state_indices(idx, N: int, pool, device: torch.device, inplace: bool) -> torch.Tensor:
    """state_indices int32/int64 [N] with every entry in [-1, P) (one host sync), distinct
    non-negative entries when the pool is written in place. Returns it as int64."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_indices: expected an int32 or int64 tensor, got {getattr(idx, 'dtype', type(idx))}")
    if tuple(idx.shape) != (N,):
        raise ValueError(f"state_indices: expected shape [N] = ({N},), one slot per sequence, got {tuple(idx.shape)}")
    _device_ok(idx, "state_indices", device)
    if not isinstance(pool, torch.Tensor) or pool.dim() != 4:
        got = tuple(getattr(pool, "shape", ())) if pool is not None else None
        raise ValueError(f"initial_state: expected a state pool [P, HV, K, V] to go with state_indices, got {got}")
    P = int(pool.shape[0])
    values = idx.tolist()
    bad = [i for i in values if not -1 <= i < P]
    if bad:
        raise ValueError(f"state_indices: expected slots in [-1, P) = [-1, {P}) (-1: padding), got {bad}")
    live = [i for i in values if i >= 0]
    if inplace and len(set(live)) != len(live):
        raise ValueError(f"state_indices: expected distinct slots when updating the pool in place, got {values}")
    return idx.to(torch.int64).contiguous()


@dataclass(frozen=True)
class Gate:
    """The in-kernel gate (DESIGN.md section 3, reference/gates.kda_gate), validated: g holds
    the raw projection z and the kernel computes the decay from it.

    A_log [HV] and dt_bias [HV * K] (or None) as float32 on the device of q; lower_bound
    None (softplus form) or a float in [-5, 0) (the "safe" sigmoid form)."""

    A_log: torch.Tensor
    dt_bias: torch.Tensor | None
    lower_bound: float | None


def check_gate(call: Call, use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None) -> Gate | None:
    """Validate the in-kernel gate options of a checked call; None when the gate is off
    (then A_log, dt_bias and lower_bound must not be given: they would be silently ignored)."""
    if not use_gate_in_kernel:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias), ("lower_bound", lower_bound)):
            if x is not None:
                raise ValueError(f"{name}: given without use_gate_in_kernel=True, where it has no effect")
        return None
    HV, K, device = call.HV, call.K, call.q.device
    if not isinstance(A_log, torch.Tensor) or tuple(A_log.shape) != (HV,):
        raise ValueError(f"A_log: expected a tensor of shape [HV] = ({HV},), got {getattr(A_log, 'shape', A_log)}")
    _device_ok(A_log, "A_log", device)
    if dt_bias is not None:
        if not isinstance(dt_bias, torch.Tensor) or tuple(dt_bias.shape) != (HV * K,):
            got = getattr(dt_bias, "shape", dt_bias)
            raise ValueError(f"dt_bias: expected a tensor of shape [HV * K] = ({HV * K},), got {got}")
        _device_ok(dt_bias, "dt_bias", device)
        dt_bias = dt_bias.float().contiguous()
    check_gate_args(A_log, dt_bias, lower_bound, HV, K)
    return Gate(A_log.float().contiguous(), dt_bias, None if lower_bound is None else float(lower_bound))
