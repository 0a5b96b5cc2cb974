"""Finding 001: vLLM 0.33.0's fused_recurrent_kda
(vllm/third_party/flash_linear_attention/ops/kda.py) stores its output past the end of the
buffer it allocated when the value heads hold more elements per token than the key heads:
grouped value heads (HV > H) or V > K.

The wrapper allocates o like k ([B, T, H, K]); the kernel stores o as [B, T, HV, V] (token
stride HV * V). With HV * V > H * K its stores run past o's last element, and the o returned
has k's shape either way. The kernel's arithmetic is right: what it stores past o is the
missing part of the output, equal to the float64 recurrence.

To see those stores on any device, o is guarded: during the call torch.empty_like(k) returns
the front of a larger buffer filled with NaN, so whatever lands past o's end stays visible
(the kernel and its arithmetic are untouched). With --no-guard the calls are plain, for
compute-sanitizer on a GPU:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python 001-vllm-fused_recurrent_kda-gva.py --device cuda --no-guard

(without the caching allocator o is an allocation of its own, so each store past it is an
invalid global write). Without a GPU the kernel runs under Triton's interpreter, which does
not check bounds: there --no-guard writes into the host heap and can kill the process.

Needs torch, NumPy and vLLM's files: an installed vllm (imported as a user imports it), or a
vllm wheel or unpacked folder named by --vllm or KDAVERIFY_VLLM, of which only the kernel
files are imported (no vLLM dependency beyond torch and Triton):

    KDAVERIFY_VLLM=path/to/vllm-0.33.0-...whl python 001-vllm-fused_recurrent_kda-gva.py [--device cuda]

The state pool and index are passed as vLLM's callers pass them: slot 0 is vLLM's null block,
so the one sequence uses slot 1, and the index has one column per token. Exits 1 while a
shape with HV * V > H * K stores past o (with --no-guard: while o comes back in k's shape),
0 once none does, 2 when the check cannot run (no vLLM files, or a wrapper that no longer
allocates o with torch.empty_like).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

ENV = "KDAVERIFY_VLLM"
KDA = "vllm.third_party.flash_linear_attention.ops.kda"
# (H, HV, K, V): the control, grouped value heads, V > K
SHAPES = [(1, 1, 16, 16), (1, 2, 16, 16), (1, 1, 16, 32)]
TOLERANCE = 1e-5  # relative to the oracle's largest magnitude; float32 FMAs, no TF32 here


# ---------------------------------------------------------------- the recurrence, float64


def kda_float64(q, k, v, g, beta, h0, scale):
    """KDA by its recurrence in float64, per value head with state S in R^{K x V}:

        S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
        o_t = S_t^T (scale q_t)

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g: [B, T, HV, K]; beta: [B, T, HV]; h0: [B, HV, K, V].
    Value head j reads query/key head j // (HV / H). Returns o [B, T, HV, V] and S_T."""
    q, k, v, g, beta, S = (x.detach().to("cpu", torch.float64).numpy() for x in (q, k, v, g, beta, h0))
    group = v.shape[2] // q.shape[2]
    q, k = np.repeat(q, group, axis=2), np.repeat(k, group, axis=2)
    o = np.empty(v.shape)
    for t in range(v.shape[1]):
        S = np.exp(g[:, t])[..., None] * S  # Diag(exp(g_t)) S_{t-1}
        kt = k[:, t]
        error = v[:, t] - np.einsum("bhk,bhkv->bhv", kt, S)  # v_t - S'^T k_t: the delta rule's correction
        S = S + beta[:, t, :, None, None] * kt[..., None] * error[..., None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


# ---------------------------------------------------------------- loading vLLM's kernel files


def load_kda(path: str | None):
    """vLLM's ops/kda.py module and vLLM's version.

    Without a path: the installed vllm, imported as a user imports it. With a path (a wheel,
    or a folder holding vllm/): vLLM's package __init__ files import the whole engine, whose
    dependencies a wheel on its own does not bring, so the parent packages of the kernel files
    are registered empty (their files found, their __init__ not run) and the few engine
    helpers the kernel files import are stood in for by engine_stubs."""
    if not path:
        try:
            return importlib.import_module(KDA), importlib.metadata.version("vllm")
        except ImportError as e:
            stop(f"vllm is not importable ({e}); give a vllm wheel or folder with --vllm or {ENV}")
    root = Path(path)
    if root.is_file() and root.suffix == ".whl":
        root = unpack(root)
    elif root.name == "vllm":
        root = root.parent
    if not (root / "vllm").is_dir():
        stop(f"{path}: expected a vllm wheel or a folder holding vllm/")
    for name in ("vllm", "vllm.utils", "vllm.model_executor", *parents(KDA)):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    for name, attributes in engine_stubs().items():
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        sys.modules[name] = stub
    metadata = sorted(root.glob("vllm-*.dist-info/METADATA"))
    found = re.search(r"^Version: (\S+)$", metadata[0].read_text(), re.M) if metadata else None
    return importlib.import_module(KDA), found.group(1) if found else "unknown"


def stop(message: str):
    """Exit with status 2: the check could not run (status 1 is kept for the defect)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def parents(module: str) -> list[str]:
    """The packages above a dotted module name, outermost first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def unpack(wheel: Path) -> Path:
    """The kernel files (the FLA ops and vllm/utils) and the wheel's metadata, unpacked into a
    folder removed at exit (not earlier: Triton reads a kernel's source when it compiles it)."""
    folder = Path(tempfile.mkdtemp(prefix="vllm-kda-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        wanted = ("vllm/third_party/flash_linear_attention/", "vllm/utils/")
        names = [n for n in zf.namelist() if n.startswith(wanted) and n.endswith(".py")]
        zf.extractall(folder, names + [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")])
    return folder


def engine_stubs() -> dict[str, dict]:
    """What the kernel files (ops/kda.py and the modules it imports) take from the engine, each
    answered from torch and Triton on the machine at hand. Only these names are read."""
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice

    def cuda() -> bool:
        return torch.cuda.is_available() and torch.version.hip is None

    platform = types.SimpleNamespace(
        is_cuda=cuda,
        is_cuda_alike=torch.cuda.is_available,
        is_rocm=lambda: torch.version.hip is not None,
        is_device_capability_family=lambda major, device_id=None: (
            cuda() and torch.cuda.get_device_capability(device_id)[0] * 10 == major
        ),
    )

    class CustomOp(torch.nn.Module):  # only decorates the nn.Module classes beside the kernels
        register = classmethod(lambda cls, name: lambda c: c)

    return {
        "vllm.triton_utils": {"triton": triton, "tl": tl, "tldevice": tldevice},
        "vllm.platforms": {"current_platform": platform},
        "vllm.model_executor.custom_op": {"CustomOp": CustomOp},
        "vllm.utils.gpu_sync_debug": {"gpu_sync_allowed": contextlib.nullcontext},
        "vllm.utils.torch_utils": {
            "async_tensor_h2d": lambda data, dtype, device, pin_memory=False: torch.tensor(
                data, dtype=dtype, device=device
            )
        },
    }


def interpreter_fixes() -> None:
    """Under Triton's interpreter only (no GPU), two incompatibilities of Triton 3.6's
    interpreter with this kernel, neither touching its arithmetic:
    - ops/op.py binds tl.exp to a module name (exp) and the kernel calls it; the interpreter
      patches tl's own functions for a launch, not such aliases, and refuses the call. The
      alias is rebound to a function that calls tl.exp at call time, the patched one.
    - with NumPy >= 2.4 the interpreter's int() of a runtime scalar (the loop bound T, a
      one-element array) raises; its __index__ is made to read the one element."""
    import triton.language as tl
    from triton.runtime import interpreter

    recurrent = sys.modules[KDA.rpartition(".")[0] + ".fused_recurrent"]
    recurrent.exp = lambda x: tl.exp(x)
    patch = interpreter._patch_lang_tensor

    def patch_with_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_with_index


# ---------------------------------------------------------------- the check


class GuardedEmptyLike:
    """torch.empty_like during the call: for k, the front of a NaN-filled buffer twice k's
    size plus a margin (what the kernel stores past o lands in the rest); anything else as
    torch allocates it."""

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


def case(kda, H, HV, K, V, device, guard) -> bool:
    """One call at B = T = 1; True when it stores past o (with --no-guard: when o comes back
    in a shape other than [B, T, HV, V])."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, 1, H, K, generator=gen), dim=-1)
    v, g = torch.randn(1, 1, HV, V, generator=gen), -torch.rand(1, 1, HV, K, generator=gen)  # log decay <= 0
    beta, h0 = torch.rand(1, 1, HV, generator=gen), torch.randn(1, HV, K, V, generator=gen)
    o_ref, _ = kda_float64(q, k, v, g, beta, h0, scale=K**-0.5)  # the wrapper's default scale
    pool = torch.zeros(2, HV, V, K, device=device)  # vLLM's state pool [slots, HV, V, K]; slot 0 the null block
    pool[1] = h0[0].transpose(-1, -2)
    slots = torch.ones(1, 1, dtype=torch.int32, device=device)  # [sequences, tokens]
    q, k, v, g, beta = (x.to(device) for x in (q, k, v, g, beta))
    call = dict(initial_state=pool, inplace_final_state=True, use_qk_l2norm_in_kernel=False, ssm_state_indices=slots)
    print(f"\nH = {H}, HV = {HV}, K = {K}, V = {V} (B = T = 1, float32): contract o {tuple(v.shape)}")
    if not guard:
        o, _ = kda.fused_recurrent_kda(q, k, v, g, beta, **call)
        if device == "cuda":
            torch.cuda.synchronize()  # so that a fault is reported at this call
        print(f"  returned o {tuple(o.shape)}")
        return tuple(o.shape) != tuple(v.shape)
    with GuardedEmptyLike(k) as guarded:
        o, _ = kda.fused_recurrent_kda(q, k, v, g, beta, **call)
    if guarded.buffer is None:
        stop("the wrapper did not allocate o with torch.empty_like(k): this is not the code described")
    buffer = guarded.buffer.cpu().double()
    n = k.numel()
    past = int((~torch.isnan(buffer[n:])).sum())
    print(f"  returned o {tuple(o.shape)} ({n} elements); elements stored past its end: {past}")
    stored = buffer[: v.numel()].numpy().reshape(v.shape)  # what the kernel stored, read as [B, T, HV, V]
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
    p.add_argument(
        "--vllm", default=os.environ.get(ENV), help=f"vllm wheel or folder (default: ${ENV}, else installed)"
    )
    p.add_argument("--no-guard", action="store_true", help="plain calls (for compute-sanitizer)")
    a = p.parse_args()
    if a.device == "cpu":  # Triton's interpreter, switched on before the kernels are decorated
        os.environ.setdefault("TRITON_INTERPRET", "1")
    kda, version = load_kda(a.vllm)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        interpreter_fixes()
    import triton  # imported by the kernel files already

    print(f"vllm {version}, torch {torch.__version__}, triton {triton.__version__}, device {a.device}")
    overflows = [case(kda, *shape, a.device, not a.no_guard) for shape in SHAPES]
    if overflows[0]:
        print("\nthe control (H = HV, K = V) misbehaves too: not the defect described here")
    failed = any(overflows[1:])
    print(f"\n{'FAILS' if failed else 'agrees'}: o is {'not ' if failed else ''}sized for [B, T, HV, V]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
