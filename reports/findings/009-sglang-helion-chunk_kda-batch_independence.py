"""Finding 009: SGLang 0.5.23's Helion chunk_kda computes only the first row
of a dense batch (B > 1, no cu_seqlens) once it has run a dense batch of one row (B = 1) in
the same process. The other rows' o is built from chunk states nobody wrote (torch.empty) and
their final state is left as it came in. The same batch is right when it is the first dense
shape the process compiles, and SGLang's Triton chunk_kda is right on it.

Seen in the conformance suite on an H200 (batch_independence, bf16, CaseSpec(B=2, T=2, H=2,
K=V=256, gate='logsigmoid', input_scale=0.01, seed=0): the check runs the rows alone first,
then the batch) and reproduced on a CPU under Triton's interpreter (float32, K = V = 16). Reproduced by this
script in a fresh process on an NVIDIA H200 (2026-11-28, fifteenth session).

Cause, in sglang/kernels/ops/attention/helion/kda_prefill.py (the wheel's file): the state
kernel _chunk_state (line 1067) runs one program per (sequence, head, value block),
hl.tile([N, H, V]) at line 1132, with N = B = kg.size(0) for a dense batch (lines 1083 and
1088). The kernels are declared with static_shapes=False (line 1063), and Helion 1.4.0 keys
its compiled kernels by the tensors' sizes bucketed to one value, 0 and 1 included
(helion/runtime/kernel.py lines 1475-1481, used by the key at line 1525): a call with B = 2
reuses the kernel compiled for B = 1. But a kernel traced with B = 1 does not keep B symbolic:
the code Helion generates for _chunk_state then has the sequence count as the literal 1 (its
launch grid is 1 * H * cdiv(V, 16)), where traced with B = 2 it takes B as an argument. After
a B = 1 call, only sequence 0 of a later batch goes through the state kernel: the other
sequences' chunk states h (torch.empty, line 1118) are never written but _chunk_output
(line 1263) reads them, and their pool slots are never stored (line 1202). The other kernels
tile over B * chunks (lines 201, 413, 716, 1312) and stay right; a packed batch (B = 1 with
cu_seqlens, N from cu_seqlens at line 1088) is right under the interpreter whatever ran
first. SGLang knows this class of problem: the comment at line 1417 (size-one dimensions
constant-folded by tracing, the kernel shared with longer inputs) is why T = 1 goes to the
Triton kernel (line 1416); B = 1 has no such guard. A ten-line Helion kernel with a 2-D
hl.tile over [x.size(0), x.size(1)], first called with x.size(0) = 1 and then 3, computes
only row 0 the same way, so the root is in Helion 1.4.0 and SGLang's dense path is where it
shows.

The script runs, in one process: each row alone (the first Helion calls), then the batch,
then the batch again after clearing Helion's compiled kernels (Kernel.reset), and SGLang's
Triton chunk_kda on the batch, each against the float64 recurrence written out below (kda_float64).
All calls are made as SGLang's backend makes them: a
VK state pool [N, H, V, K] updated in place, slot n for sequence n, o written into a copy of v.

Needs torch, Triton, Helion 1.4.0, NumPy and SGLang's files: an installed sglang or a wheel or
folder named by KDAVERIFY_SGLANG, of which only the kernel files are imported:

    KDAVERIFY_SGLANG=path/to/sglang-0.5.23-py3-none-any.whl python 009-sglang-helion-chunk_kda-batch_independence.py \\
        [--device cuda|cpu] [--K 256 --H 2 for the suite's case]

On a GPU the first calls compile the kernels (allow a few minutes). With --device cpu the
Helion and Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1; Helion still
compiles, so its kernel cache behaves as on a GPU), in float32 by default. Exits 1 while the
batch after the rows differs from the recurrence by more than TOLERANCE, 0 once it agrees, 2
when the check cannot run (missing files or packages, or a call that raises).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import traceback
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

ENV = "KDAVERIFY_SGLANG"
ATTENTION = "sglang.kernels.ops.attention"  # fla/kda.py (Triton), helion/kda_prefill.py (Helion)
# Relative to the oracle's largest magnitude: bf16 inputs and bf16 dot operands leave errors of
# a few bf16 units (2**-8) here; the defect gives errors of order 1 or more.
TOLERANCE = 0.05


# ---------------------------------------------------------------- loading SGLang's kernel files


def load_sglang(path: str | None):
    """SGLang's Helion kda_prefill and Triton fla/kda modules, and SGLang's version.

    SGLang's package __init__ files import the whole engine, so the packages above the kernel
    files are registered empty (their folders found, their __init__ not run; helion/__init__.py
    holds one constant that kda_prefill does not use) and the few engine helpers the kernel
    files import are stood in for by engine_stubs."""
    if path:
        root = Path(path)
        if root.is_file() and root.suffix == ".whl":
            root = unpack(root)
        elif root.name == "sglang":
            root = root.parent
    else:
        spec = importlib.util.find_spec("sglang")  # finds the folder without running its __init__
        if spec is None or not spec.submodule_search_locations:
            stop(f"sglang is not installed; give an sglang wheel or folder with --sglang or {ENV}")
        root = Path(next(iter(spec.submodule_search_locations))).parent
    folder = root.joinpath(*ATTENTION.split("."))
    if not (folder / "helion" / "kda_prefill.py").is_file() or not (folder / "fla" / "kda.py").is_file():
        stop(f"{path or root}: no helion/kda_prefill.py and fla/kda.py under {folder} (expected SGLang 0.5.23)")
    parts = ATTENTION.split(".")
    packages = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for name in ("sglang.srt", "sglang.kernels.jit", *packages, ATTENTION + ".fla", ATTENTION + ".helion"):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    for name, attributes in engine_stubs().items():
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        sys.modules[name] = stub
    try:
        prefill = importlib.import_module(ATTENTION + ".helion.kda_prefill")
        triton_kda = importlib.import_module(ATTENTION + ".fla.kda")
    except ImportError as e:
        stop(f"SGLang's kernel files do not import (Helion 1.4.0 installed?): {e}")
    metadata = sorted(root.glob("sglang-*.dist-info/METADATA"))  # the wheel's, or site-packages'
    found = re.search(r"^Version: (\S+)$", metadata[0].read_text(), re.M) if metadata else None
    return prefill, triton_kda, found.group(1) if found else "unknown"


def stop(message: str):
    """Exit with status 2: the check could not run (status 1 is kept for the defect)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def unpack(wheel: Path) -> Path:
    """The fla/ and helion/ kernel files and the wheel's metadata, unpacked into a folder
    removed at exit (not earlier: Triton and Helion read a kernel's source when compiling it)."""
    folder = Path(tempfile.mkdtemp(prefix="sglang-helion-kda-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    wanted = tuple(ATTENTION.replace(".", "/") + f"/{sub}/" for sub in ("fla", "helion"))
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.startswith(wanted) and n.endswith(".py")]
        zf.extractall(folder, names + [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")])
    return folder


def engine_stubs() -> dict[str, dict]:
    """What the kernel files take from the engine: fla/utils.py reads torch's release, and
    fla/fused_norm_gate.py (imported by kda.py for a layer norm that chunk_kda does not call)
    asks at import whether it runs on an NPU or an AMX CPU and imports four more helpers."""

    def unused(*args, **kwargs):
        raise RuntimeError("an SGLang engine helper this script stands in for was called")

    no = lambda *args, **kwargs: False  # noqa: E731
    release = tuple(int(x) for x in re.match(r"[\d.]*\d", torch.__version__).group().split("."))
    return {
        "sglang.srt.utils": {"__path__": [], "is_npu": no, "is_cpu": no, "cpu_has_amx_support": no,
                             "cdiv": unused, "next_power_of_2": unused},
        "sglang.srt.utils.common": {"torch_release": release},
        "sglang.kernels.jit.utils": {"get_jit_cuda_arch": unused, "is_arch_support_pdl": unused},
    }  # fmt: skip


def interpreter_fixes() -> None:
    """Under Triton's interpreter only (--device cpu), where Triton 3.6's interpreter and these
    files disagree; none of these touches the kernels' arithmetic:
    - fla/op.py binds Triton's math functions to module names (exp = tl.exp, ...) that the
      kernels call, and the code Helion generates calls libdevice.exp2 and its kin; the
      interpreter patches tl's own functions for a launch, not these, and refuses the call.
      Each becomes a function that looks up the tl function at call time, the patched one.
    - with NumPy >= 2.4 the interpreter's int() of a runtime scalar raises; its __index__ is
      made to read the one element.
    - fla/utils.py's input_guard enters torch.<device>.device(index), which has no CPU form.
    - an autotuned Triton kernel keeps only its first configuration (no timer to choose)."""
    import triton.language as tl
    from torch._inductor.runtime.triton_compat import libdevice
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    def late(name):
        return lambda x: getattr(tl.math, name)(x)

    wrappers = {id(getattr(tl.math, n)): late(n) for n in ("exp", "exp2", "log", "log2")}
    for name, module in list(sys.modules.items()):
        if name.startswith(ATTENTION + ".fla."):
            for attribute, value in list(vars(module).items()):
                if id(value) in wrappers:
                    setattr(module, attribute, wrappers[id(value)])
                while isinstance(value, KernelInterface):  # heuristics around autotune around jit
                    if isinstance(value, Autotuner):
                        value.configs = value.configs[:1]
                    value = getattr(value, "fn", None)
    for name in ("exp", "exp2", "log", "log2", "sqrt", "rsqrt"):
        setattr(libdevice, name, late(name))
    sys.modules[ATTENTION + ".fla.utils"].custom_device_ctx = lambda index: contextlib.nullcontext()
    patch = interpreter._patch_lang_tensor

    def patch_with_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_with_index


def kda_float64(q, k, v, g, beta, scale, output_final_state=True):
    """KDA by its recurrence in float64, per batch row and head, state S in R^{K x V} from zero:

        S = Diag(exp(g_t)) S;  S += beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T (scale q_t)

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] (tensors or arrays). Returns o
    [B, T, H, V] and the final states [B, H, K, V]. exp(-inf) = 0 wipes a channel (a reset)."""
    q, k, v, g, beta = (np.asarray(x, dtype=np.float64) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    o, final = np.zeros(v.shape), np.zeros((B, H, K, v.shape[-1]))
    for b in range(B):
        S = final[b]
        for t in range(T):
            S = np.exp(g[b, t])[..., None] * S
            error = v[b, t] - np.einsum("hk,hkv->hv", k[b, t], S)  # the delta rule's correction
            S = S + beta[b, t, :, None, None] * k[b, t][..., None] * error[:, None, :]
            o[b, t] = scale * np.einsum("hk,hkv->hv", q[b, t], S)
        final[b] = S
    return o, final


# ---------------------------------------------------------------- the check


def case_arrays(seed, B, T, H, K, V, input_scale=0.01, beta_max=1.0):
    """The suite's CaseSpec(...).arrays() for gate='logsigmoid', G = 1, no initial state, drawn
    in the same order: q, k (unit rows), v, g = logsigmoid(z) (the gate's uniform draw unused
    by this regime), beta; float64 NumPy arrays."""
    rng = np.random.default_rng(seed)
    q = input_scale * rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    k /= np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    v = input_scale * rng.standard_normal((B, T, H, V))
    z, _ = rng.standard_normal((B, T, H, K)), rng.uniform(size=(B, T, H, K))
    g = -np.logaddexp(0.0, -z)
    beta = rng.uniform(0.0, beta_max, size=(B, T, H))
    return q, k, v, g, beta


def call(fn, q, k, v, g, beta, scale):
    """fn (either chunk_kda) as SGLang's backend calls it: a zero VK state pool [N, H, V, K]
    float32 updated in place, slot n for sequence n, o written into a copy of v. Returns o
    [B, T, H, V] and the final states [N, H, K, V] in float64."""
    N, H, K, V = q.shape[0], v.shape[2], k.shape[3], v.shape[3]
    pool = torch.zeros(N, H, V, K, dtype=torch.float32, device=q.device)
    slots = torch.arange(N, dtype=torch.int32, device=q.device)
    o = fn(q, k, v.clone(), g, beta, scale=scale, initial_state=pool, initial_state_indices=slots)
    return o.double().cpu().numpy(), pool.transpose(-1, -2).double().cpu().numpy()


def relative(x, ref) -> float:
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(x - ref).max()) / scale if np.isfinite(x).all() else float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--B", type=int, default=2, help="batch rows (default 2)")
    p.add_argument("--T", type=int, default=2, help="tokens per row (default 2; T = 1 goes to Triton)")
    p.add_argument("--H", type=int, default=1, help="heads (default 1; the suite's case has 2)")
    p.add_argument("--K", type=int, default=16, help="K = V (default 16; the suite's case has 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sglang", default=os.environ.get(ENV), help=f"sglang wheel or folder (default: ${ENV}, else installed)"
    )
    a = p.parse_args()
    if a.B < 2 or a.T < 2:
        stop("--B and --T must be at least 2")
    if a.device == "cpu":  # Triton's interpreter, switched on before the kernel files import Triton
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.pop("HELION_INTERPRET", None)  # Helion's eager mode would not compile (nor cache)
    elif not torch.cuda.is_available():
        stop("no CUDA GPU here; run with --device cpu for Triton's interpreter")
    prefill, triton_kda, version = load_sglang(a.sglang)
    if a.device == "cpu":
        interpreter_fixes()
    kda_recurrent_np = kda_float64
    import helion
    import triton

    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    arrays = case_arrays(a.seed, a.B, a.T, a.H, a.K, a.K)
    q, k, v, g, beta = (torch.tensor(x).to(a.device, dtype) for x in arrays)
    scale = a.K**-0.5
    # the oracle on the inputs as the kernels get them (rounded to dtype)
    o_ref, S_ref = kda_recurrent_np(*(x.double().cpu() for x in (q, k, v, g, beta)), scale=scale,
                                    output_final_state=True)  # fmt: skip

    def rows_alone():
        parts = [call(prefill.chunk_kda, *(x[b : b + 1] for x in (q, k, v, g, beta)), scale) for b in range(a.B)]
        return np.concatenate([o for o, _ in parts]), np.concatenate([S for _, S in parts])

    def recompiled_batch():
        for kernel in vars(prefill).values():
            if isinstance(kernel, helion.Kernel):
                kernel.reset()  # forget the kernels compiled so far: the batch is traced first
        return call(prefill.chunk_kda, q, k, v, g, beta, scale)

    runs = [
        ("Helion, each row alone (B = 1), the process's first calls", rows_alone),
        (f"Helion, the batch (B = {a.B}) after them", lambda: call(prefill.chunk_kda, q, k, v, g, beta, scale)),
        (f"Helion, the batch after Kernel.reset() (compiled for B = {a.B})", recompiled_batch),
        ("Triton chunk_kda, the batch (control)", lambda: call(triton_kda.chunk_kda, q, k, v, g, beta, scale)),
    ]
    print(f"sglang {version}, helion {importlib.metadata.version('helion')}, torch {torch.__version__}, "
          f"triton {triton.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))  # fmt: skip
    print(f"dense batch B = {a.B}, T = {a.T}, H = HV = {a.H}, K = V = {a.K}, {dtype}, gate logsigmoid, "
          f"input_scale 0.01, no initial state, seed {a.seed}, no cu_seqlens")  # fmt: skip
    failed = control_failed = False
    for i, (label, run) in enumerate(runs):
        try:
            o, S = run()
        except Exception:
            traceback.print_exc()
            stop(f"{label}: SGLang's code raised (above): the check could not run")
        print(f"\n{label}:")
        for b in range(a.B):
            e_o, e_S = relative(o[b], o_ref[b]), relative(S[b], S_ref[b])
            bad = e_o > TOLERANCE or e_S > TOLERANCE
            failed |= bad and i == 1
            control_failed |= bad and i != 1
            print(f"  row {b}: o rel max err {e_o:.3g}, final state {e_S:.3g}{'  <-- WRONG' if bad else ''}")
            if bad:
                print(f"    o[{b}, 0, 0, :4] oracle {np.round(o_ref[b, 0, 0, :4], 5)}, "
                      f"measured {np.round(o[b, 0, 0, :4], 5)}")  # fmt: skip
                print(f"    largest |final state|: oracle {np.abs(S_ref[b]).max():.4g}, "
                      f"measured {np.abs(S[b]).max():.4g}")  # fmt: skip
    if control_failed:
        print("\na control differs too (rows alone, the recompiled batch or Triton): not only the defect described")
    print(f"\n{'FAILS' if failed else 'agrees'} (tolerance {TOLERANCE:g} relative to the oracle's largest magnitude)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
