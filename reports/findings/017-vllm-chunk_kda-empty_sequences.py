"""Finding 017: vLLM 0.33.0's chunk_kda does not compute a sequence that follows an empty one in cu_seqlens.

Seen in the matrix on an NVIDIA H200 (2026-11-29, the suite's empty_sequences check, bf16 and
float32): cu_seqlens [0, 0, 1] (an empty sequence, then one token), H = 2, K = V = 256, no
initial state; o off by 1.26e3 relative RMS, the final state not finite (bf16) or off by 92.5
relative RMS (float32).

Likely cause, read in vllm/third_party/flash_linear_attention/ops/index.py (the wheel's
files): prepare_chunk_indices (line 25), the (sequence, chunk) table the chunk kernels run
over, numbers each row's sequence by counting the rows so far whose chunk counter is 0
(line 30); an empty sequence has no chunk, so it takes no number and every later sequence's
number falls behind by one. The rows of the later sequence then carry the empty sequence's
number, whose length is 0, and compute nothing: its o stays v (chunk_kda writes o into v's
buffer), and the state kernel, which numbers sequences correctly, builds its final state from
buffers the chunk kernels never wrote. Finding 003 (SGLang 0.5.23's Triton chunk_kda) is the
same table in SGLang's copy of these kernels.

Reproduced on an NVIDIA H200 in a fresh process (2026-11-29, this script, --device cuda,
float32, H = HV = 1, K = V = 16, an initial state per sequence; the run on a machine whose
Triton autotuning cache was filled beforehand, an earlier run on a cold machine having been cut
off at 150 s while vLLM's kernels compiled and autotuned): with cu_seqlens [0, 0, 1] sequence 1
is off by 1.87 (o) and 0.725 (final state), largest absolute error over the oracle's largest
magnitude; the empty sequence's final state equals its initial state (2.3e-8); the control
without the empty sequence agrees (6.7e-4 and 1.5e-4); exit 1. Under Triton's interpreter on a
CPU (--device cpu) sequence 1 is off by 1.87 (o) and its final state far off (not finite in
the first run, 0.725 in a rerun: it is built from buffers nothing wrote), and the control
agrees (8e-8).

Needs torch, NumPy and vLLM's files: an installed vllm, or a vllm wheel or unpacked folder
named by --vllm or KDAVERIFY_VLLM, of which only the kernel files are imported:

    KDAVERIFY_VLLM=path/to/vllm-0.33.0-...whl python 017-vllm-chunk_kda-empty_sequences.py [--device cuda|cpu]

--device cpu runs the kernels under Triton's interpreter in float32. Exits 1 while a
non-empty sequence's o or final state, or an empty sequence's final state (which must equal
its initial state), differs from the recurrence by more than TOLERANCE and the call without
the empty sequences agrees, 0 once it agrees, 2 when the check cannot run.
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
import traceback
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

ENV = "KDAVERIFY_VLLM"
OPS = "vllm.third_party.flash_linear_attention.ops"
KDA = OPS + ".kda"
LOOP_INDEX_CAST = OPS + ".chunk_delta_h"  # its kernel calls .to() on its chunk loop's index
# Relative to the oracle's largest magnitude: chunk_kda's float32 dots run as TF32 on a GPU,
# about 1e-3 at these sizes (finding 002); a misread row is off by order 1.
TOLERANCE = 1e-2


# ---------------------------------------------------------------- the recurrence, float64


def recurrence(q, k, v, g, beta, h0, scale):
    """One sequence, one head, in float64 (q, k, g: [T, K]; v: [T, V]; beta: [T]; h0: [K, V]):

        S = Diag(exp(g_t)) S;   S += beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T (scale q_t)

    exp(-inf) = 0 here, so a reset clears the channel before the token's own write. Returns o
    [T, V] and the final state [K, V]."""
    S = h0.copy()
    o = np.zeros((q.shape[0], v.shape[1]))
    for t in range(q.shape[0]):
        S = np.exp(g[t])[:, None] * S  # the gate scales row c of S (key channel c)
        correction = v[t] - S.T @ k[t]  # what the decayed state gets wrong about v_t
        S = S + beta[t] * np.outer(k[t], correction)
        o[t] = S.T @ (scale * q[t])
    return o, S


# ---------------------------------------------------------------- loading vLLM's kernel files


def load_kda(path: str | None):
    """vLLM's ops/kda.py module and vLLM's version.

    Without a path: the installed vllm, imported as a user imports it. With a path (a wheel, or
    a folder holding vllm/): vLLM's package __init__ files pull in the whole engine, so the
    packages above the kernel files are registered as empty packages (their folders known,
    their __init__ never run) and the handful of engine helpers the kernel files import are
    answered by engine_stubs."""
    if not path:
        try:
            return importlib.import_module(KDA), importlib.metadata.version("vllm")
        except ImportError as e:
            stop(f"vllm is not importable ({e}); name a vllm wheel or folder with --vllm or {ENV}")
    root = Path(path)
    if root.is_file() and root.suffix == ".whl":
        root = unpack(root)
    elif root.name == "vllm":
        root = root.parent
    if not root.joinpath(*KDA.split(".")).with_suffix(".py").is_file():
        stop(f"{path}: no {KDA.replace('.', '/')}.py there (expected vLLM 0.33.0's files)")
    parts = KDA.split(".")
    for name in ("vllm.utils", "vllm.model_executor", *(".".join(parts[:i]) for i in range(1, len(parts)))):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    for name, attributes in engine_stubs().items():
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        sys.modules[name] = stub
    try:
        kda = importlib.import_module(KDA)
    except ImportError as e:
        stop(f"vLLM's kernel files do not import: {e}")
    metadata = sorted(root.glob("vllm-*.dist-info/METADATA"))
    found = re.search(r"^Version: (\S+)$", metadata[0].read_text(), re.M) if metadata else None
    return kda, found.group(1) if found else "unknown"


def stop(message: str):
    """Exit with status 2: the check could not run (status 1 means the defect showed)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def unpack(wheel: Path) -> Path:
    """The FLA kernel files, vllm/utils and the wheel's metadata, unpacked into a temporary
    folder that is removed at exit (Triton reads a kernel's source file when it first runs it)."""
    folder = Path(tempfile.mkdtemp(prefix="vllm-kda-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        wanted = ("vllm/third_party/flash_linear_attention/", "vllm/utils/")
        names = [n for n in zf.namelist() if n.startswith(wanted) and n.endswith(".py")]
        zf.extractall(folder, names + [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")])
    return folder


def engine_stubs() -> dict[str, dict]:
    """The names the kernel files take from the engine, answered from torch and Triton here."""
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice

    def cuda() -> bool:
        return torch.cuda.is_available() and torch.version.hip is None

    def capability_family(major, device_id=None) -> bool:
        return cuda() and torch.cuda.get_device_capability(device_id)[0] * 10 == major

    platform = types.SimpleNamespace(
        is_cuda=cuda,
        is_cuda_alike=torch.cuda.is_available,
        is_rocm=lambda: torch.version.hip is not None,
        is_device_capability_family=capability_family,
    )

    class CustomOp(torch.nn.Module):  # decorates the layer classes beside the kernels, never called here
        register = classmethod(lambda cls, name: lambda c: c)

    def to_device(data, dtype, device, pin_memory=False):
        return torch.as_tensor(data, dtype=dtype, device=device)

    return {
        "vllm.triton_utils": {"triton": triton, "tl": tl, "tldevice": tldevice},
        "vllm.platforms": {"current_platform": platform},
        "vllm.model_executor.custom_op": {"CustomOp": CustomOp},
        "vllm.utils.gpu_sync_debug": {"gpu_sync_allowed": contextlib.nullcontext},
        "vllm.utils.torch_utils": {"async_tensor_h2d": to_device},
    }


class CastableIndex(int):
    """A chunk loop index under the interpreter: an int whose .to(dtype) is itself. Compiled,
    the index is a Triton integer and .to(tl.int64) widens it; a Python int needs no widening."""

    def to(self, *args, **kwargs):
        return self


def castable_range(*args):
    return (CastableIndex(i) for i in range(*args))


def interpreter_fixes() -> None:
    """Under Triton's interpreter only (--device cpu), gaps between Triton 3.6's interpreter and
    these files; none changes what the kernels compute:
    - ops/op.py binds tl.exp, exp2, log and log2 to module names that the kernels call. The
      interpreter swaps in its own versions of tl's functions for a launch but not of such
      copies, and refuses to call them; each copy becomes a small function that looks tl's
      function up when it is called.
    - with NumPy >= 2.4 the interpreter's int() of a runtime scalar (a loop bound, held as a
      one-element array) raises; such a scalar is given an __index__ that reads its element.
    - ops/chunk_delta_h.py's kernel casts its chunk loop's index with .to(tl.int64); the
      interpreter runs that loop in Python, where the index is a plain int without .to(). In
      that module only (its kernel is its only user of range), range yields CastableIndex.
    - an autotuned kernel keeps only its first configuration: the interpreter has no timer to
      choose among them (block sizes and warps change the order of sums, not the math)."""
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    late = {
        id(tl.exp): lambda x: tl.exp(x),
        id(tl.math.exp2): lambda x: tl.math.exp2(x),
        id(tl.log): lambda x: tl.log(x),
        id(tl.log2): lambda x: tl.log2(x),
    }
    for name, module in list(sys.modules.items()):
        if name.startswith(OPS + ".") and module is not None:
            for attribute, value in list(vars(module).items()):
                if id(value) in late and not attribute.startswith("__"):
                    setattr(module, attribute, late[id(value)])
                while isinstance(value, KernelInterface):  # heuristics around autotune around jit
                    if isinstance(value, Autotuner):
                        value.configs = value.configs[:1]
                    value = getattr(value, "fn", None)
    sys.modules[LOOP_INDEX_CAST].range = castable_range
    patch = interpreter._patch_lang_tensor

    def patch_with_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_with_index


# ---------------------------------------------------------------- the check


def offsets(text: str) -> list[int]:
    cu = [int(x) for x in text.split(",")]
    if len(cu) < 2 or cu[0] != 0 or cu != sorted(cu):
        raise argparse.ArgumentTypeError("expected non-decreasing offsets from 0, such as 0,0,1")
    return cu


def inputs(T, N, K, seed=0):
    """q, k (unit rows), v, g (logsigmoid of normal draws), beta for T packed tokens, one head,
    K = V, and an initial state for each of N sequences, float64 on the host."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, K))
    k = rng.standard_normal((T, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((T, K))
    g = -np.log1p(np.exp(-rng.standard_normal((T, K))))
    beta = rng.uniform(0.2, 0.9, T)
    h0 = rng.standard_normal((N, K, K))
    return q, k, v, g, beta, h0


def call_chunk(kda, arrays, h0, cu, scale, device):
    """vLLM's chunk_kda on one packed row [1, T, 1, .] float32 with cu_seqlens, the initial
    states in vLLM's [N, HV, V, K] layout; o [T, V] and the final states [N, K, V]."""

    def dev(x):
        return torch.tensor(x, dtype=torch.float32, device=device).reshape(1, x.shape[0], 1, *x.shape[1:])

    t = {name: dev(x) for name, x in arrays.items()}
    state = torch.tensor(h0, dtype=torch.float32, device=device).transpose(-1, -2).unsqueeze(1).contiguous()
    o, final = kda.chunk_kda(t["q"], t["k"], t["v"].clone(), t["g"], t["beta"], scale=scale, initial_state=state,
                             output_final_state=True, use_qk_l2norm_in_kernel=False,
                             cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device))  # fmt: skip
    return o[0, :, 0].cpu().double().numpy(), final[:, 0].transpose(-1, -2).cpu().double().numpy()


def relative(x, ref) -> float:
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(x - ref).max()) / scale if np.isfinite(x).all() else float("inf")


def compare(label, cu, o, S, arrays, h0, scale) -> bool:
    """Each sequence of the call against the recurrence (an empty one: its final state against
    its initial state); prints a line per sequence, returns whether all agree."""
    ok = True
    print(f"{label} (cu_seqlens {cu}):")
    for n in range(len(cu) - 1):
        lo, hi = cu[n], cu[n + 1]
        o_ref, S_ref = recurrence(*(arrays[x][lo:hi] for x in ("q", "k", "v", "g", "beta")), h0[n], scale)
        e_o = relative(o[lo:hi], o_ref) if hi > lo else 0.0
        e_S = relative(S[n], S_ref)
        bad = e_o > TOLERANCE or e_S > TOLERANCE
        ok &= not bad
        print(f"  sequence {n} (tokens {lo}..{hi}): o rel max err {e_o:.3g}, final state {e_S:.3g}"
              f"{'  <-- fails' if bad else ''}")  # fmt: skip
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--vllm", default=os.environ.get(ENV), help=f"vllm wheel or folder (default: ${ENV}, else installed)"
    )
    p.add_argument("--cu-seqlens", type=offsets, default="0,0,1", help="offsets of the packed batch (default 0,0,1)")
    p.add_argument("--K", type=int, default=16, help="key and value head size (default 16)")
    a = p.parse_args()
    if a.device == "cpu":  # Triton's interpreter, switched on before the kernel files import Triton
        os.environ["TRITON_INTERPRET"] = "1"
    kda, version = load_kda(a.vllm)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        interpreter_fixes()
    import triton  # imported by the kernel files already

    cu = a.cu_seqlens
    print(f"vllm {version}, torch {torch.__version__}, triton {triton.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))  # fmt: skip
    print(f"H = HV = 1, K = V = {a.K}, float32, an initial state per sequence\n")
    q, k, v, g, beta, h0 = inputs(cu[-1], len(cu) - 1, a.K)
    arrays = dict(q=q, k=k, v=v, g=g, beta=beta)
    scale = a.K**-0.5
    keep = [n for n in range(len(cu) - 1) if cu[n + 1] > cu[n]]  # the control: the empty sequences left out
    cu_kept = [0] + [int(x) for x in np.cumsum([cu[n + 1] - cu[n] for n in keep])]
    try:
        o, S = call_chunk(kda, arrays, h0, cu, scale, a.device)
        o_c, S_c = call_chunk(kda, arrays, h0[keep], cu_kept, scale, a.device)
    except Exception:
        traceback.print_exc()
        stop("vLLM's chunk_kda raised (above): the check could not run")
    agrees = compare("with the empty sequences", cu, o, S, arrays, h0, scale)
    control = compare("without them (the control)", cu_kept, o_c, S_c, arrays, h0[keep], scale)
    if not control:
        print("\nthe call without empty sequences differs too: not the defect described")
        return 2
    print(f"\n{'agrees' if agrees else 'FAILS'} (tolerance {TOLERANCE:g} relative to the oracle's largest magnitude)")
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
