"""Finding 016: SGLang 0.5.23's Triton chunk_kda reuses a stale chunk table for a refilled cu_seqlens.

SGLang's Triton chunk_kda (sglang/kernels/ops/attention/fla/kda.py) works from a stale
(sequence, chunk) table and stale state offsets when the cu_seqlens tensor it was given before
comes back refilled in place, as a CUDA graph replay refills its input buffers. SGLang's copy of
fla's index helpers caches them by the identity of cu_seqlens: prepare_chunk_indices and
prepare_chunk_offsets (fla/index.py lines 16 and 29) are wrapped in tensor_cache (fla/utils.py
line 103), whose lookup (line 125) compares each argument with `is` and returns the stored
result whatever the tensor now holds. chunk_kda_fwd asks for the table (kda.py lines 1172-1173)
unless the caller hands one in, and the state kernel's wrapper takes the offsets from the cache
the same way and sizes its buffer of chunk states h from the stale table (fla/chunk_delta_h.py
lines 392-397). A refill whose sequences have other chunk counts than before is then computed
over the old table, and the state kernel stores each sequence's chunk states from its stale
first row (chunk_delta_h.py lines 95, 111 and 167-171): here sequence 1 (3 chunks now) from row
3 of an h of 4 rows, two rows past the end of h. vLLM 0.33.0 and flash-linear-attention 0.6.0
carry the same cache (findings 014 and 015). SGLang's own CUDA-graph path is meant not to reach
it: chunk_kda_fwd's comment says that caller builds chunk_indices and chunk_offsets itself
before every replay, and the state kernel's wrapper says why (a cached table would replay
capture-time values).

The script calls chunk_kda as SGLang's KDA backend does (one packed row with cu_seqlens, a "VK"
state pool [slots, H, V, K] updated in place through initial_state_indices, o written into v's
buffer; the L2-norm flag off, q and k given unit rows) on H = 1, K = V = 16, float32:
- the control first: the second case's inputs with a new cu_seqlens tensor [0, 2, 132];
- then a first case with a cu_seqlens tensor [0, 130, 132] (3 + 1 chunks of 64 tokens), and
  the second case with that same tensor refilled in place with [0, 2, 132] (1 + 3 chunks; only
  cu_seqlens is looked up by identity, so the other inputs are new tensors).
Each sequence of each second-case call is held to the float64 recurrence written out below.
With --reverse the two offsets swap roles ([0, 2, 132], then refilled as [0, 130, 132]): the
stale offsets then keep every store inside h (sequence 0's three chunk states from row 0,
sequence 1's one from row 1, which sequence 0 also writes), so the answer is wrong without a
store past the buffer's end.

Reproduced on an NVIDIA H200 in a fresh process (2026-11-29, this script, --device cuda; largest
absolute error over the oracle's largest magnitude):
- default order: the refilled call computes sequence 1 (tokens 2..132) off by 2.26 (o) and 2.55
  (final state), sequence 0 as right as the control; the control at 1.3e-3 (o) and 1.6e-3
  (final states) at most; exit 1.
- --reverse: sequence 0 (tokens 0..130) off by 3.05 (o) and 2.71 (final state), sequence 1 off
  by 0.853 (o) with its final state right (9.2e-4); the control at 9.9e-4 and 1.4e-3 at most;
  exit 1.
- under compute-sanitizer's memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1, --error-exitcode 9,
  default order): the control as above, then 34 errors, invalid global writes of 16 bytes by
  the state kernel (chunk_gated_delta_rule_fwd_kernel_h_blockdim64) at chunk_delta_h.py:171, by
  block (0,1,0), sequence 1's program, starting right at the end of an allocation of 4,096
  bytes (h's size here: 4 rows of 16 x 16 float32); the kernel then failed ("unspecified launch
  failure") and the process died in the refilled call before its verdict (exit 9).
Seen by the suite's reused_buffers check on the H200 (twenty-second session, K = V = 100, bf16
and float32). Under Triton's interpreter on a CPU (--device cpu, six runs) the control agrees
and the refilled call aborts the process inside chunk_kda (glibc heap corruption, exit status
134); with --reverse it returns sequence 0 off by 3.05 (o) and its final state far off (not
finite in the first run, 43.9 in a rerun: it is built from buffers nothing wrote), sequence 1
right (1.3e-7), exit 1.

Needs torch, NumPy and SGLang's files: an installed sglang (pip install sglang==0.5.23
--no-deps is enough), or a wheel or unpacked folder named by --sglang or KDAVERIFY_SGLANG:

    KDAVERIFY_SGLANG=path/to/sglang-0.5.23-...whl \\
        python 016-sglang-triton-chunk_kda-reused_buffers.py [--device cuda|cpu] [--reverse]

With --device cpu the kernels run under Triton's interpreter, with one more fix than finding
013's script needs: the interpreter's dot of bfloat16 operands is made to widen them to float32
first (Triton 3.6's multiplies their stored bits, and the blocks between sub-chunks are
bfloat16 dots, so without it any sequence longer than 16 tokens comes back as garbage: finding
005, section 5). Exits 1 while the refilled call differs from the recurrence by more than
TOLERANCE and the control agrees, 0 once it agrees, 2 when the check cannot run (the control
differing too counts as that). The stores past h's end may end the process inside the refilled
call before its verdict: under the interpreter by an abort, under compute-sanitizer on a GPU by
the kernel's failure.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
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
FLA = "sglang.kernels.ops.attention.fla"  # chunk_kda in kda.py, the cached helpers in index.py
FIRST, SECOND = [0, 130, 132], [0, 2, 132]  # 3 + 1 chunks of 64 tokens, then 1 + 3
# Relative to the oracle's largest magnitude: chunk_kda's float32 dots run as TF32 on a GPU and
# its blocks between sub-chunks as bfloat16 dots, about 1e-3 at these sizes (finding 013's
# contiguous call); a stale table is off by order 1.
TOLERANCE = 1e-2


# ---------------------------------------------------------------- the recurrence, float64


def recurrence(q, k, v, g, beta, h0, scale):
    """One sequence of one head in float64 (q, k, g: [T, K]; v: [T, V]; beta: [T]; h0: [K, V]):

        S = Diag(exp(g_t)) S;   S += beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T (scale q_t)

    Returns o [T, V] and the final state [K, V] (for an empty sequence, h0)."""
    S = h0.copy()
    o = np.zeros((q.shape[0], v.shape[1]))
    for t in range(q.shape[0]):
        S = np.exp(g[t])[:, None] * S  # key channel c of the state decays by exp(g_t[c])
        residual = v[t] - S.T @ k[t]  # the delta rule's correction toward v_t
        S = S + beta[t] * np.outer(k[t], residual)
        o[t] = S.T @ (scale * q[t])
    return o, S


# ---------------------------------------------------------------- loading SGLang's kernel files


def load_sglang(path: str | None):
    """SGLang's fla/kda.py module and SGLang's version.

    SGLang's package __init__ files import the whole engine, so the packages above the kernel
    files are registered empty (their folders found, their __init__ not run) and the few engine
    helpers the kernel files import are stood in for by engine_stubs."""
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
    if not root.joinpath(*FLA.split("."), "kda.py").is_file():
        stop(f"{path or root}: no {FLA.replace('.', '/')}/kda.py there (expected SGLang 0.5.23's files)")
    parts = FLA.split(".")
    for name in ("sglang.srt", "sglang.kernels.jit", *(".".join(parts[:i]) for i in range(1, len(parts) + 1))):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    for name, attributes in engine_stubs().items():
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        sys.modules[name] = stub
    try:
        kda = importlib.import_module(FLA + ".kda")
    except ImportError as e:
        stop(f"SGLang's kernel files do not import: {e}")
    metadata = sorted(root.glob("sglang-*.dist-info/METADATA"))  # the wheel's, or site-packages'
    found = re.search(r"^Version: (\S+)$", metadata[0].read_text(), re.M) if metadata else None
    return kda, found.group(1) if found else "unknown"


def stop(message: str):
    """Exit with status 2: the check could not run (status 1 is kept for the defect)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def unpack(wheel: Path) -> Path:
    """The FLA kernel files and the wheel's metadata, unpacked into a folder removed at exit
    (not earlier: Triton reads a kernel's source when it compiles it)."""
    folder = Path(tempfile.mkdtemp(prefix="sglang-kda-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        kernels = FLA.replace(".", "/") + "/"
        names = [n for n in zf.namelist() if n.startswith(kernels) and n.endswith(".py")]
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
    """Under Triton's interpreter only (--device cpu), where Triton 3.6's interpreter and
    SGLang's files disagree; none of these changes what the kernels compute on a GPU:
    - fla/op.py binds Triton's math functions to module names (exp = tl.exp, and exp2, log,
      log2) that the kernels call; the interpreter patches tl's own functions for a launch,
      not such aliases, and refuses the call. Each alias is rebound to a function that looks
      up the tl function at call time, the patched one.
    - with NumPy >= 2.4 the interpreter's int() of a runtime scalar (a loop bound, held as a
      one-element array) raises; its __index__ is made to read the one element.
    - fla/utils.py's input_guard enters torch.<device>.device(index), which has no CPU form:
      it becomes a null context (there is no device to select).
    - an autotuned kernel keeps only its first configuration: the interpreter has no timer
      (block sizes and warps change the order of sums, not the math).
    - the interpreter's tl.dot multiplies the 16-bit patterns of bfloat16 operands as if they
      were integers; here each bfloat16 operand is widened to float32 (exactly: its bits
      shifted into the high half) before the product, as a GPU's bfloat16 dot does."""
    import contextlib

    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    wrappers = {
        id(tl.exp): lambda x: tl.exp(x),
        id(tl.math.exp2): lambda x: tl.math.exp2(x),
        id(tl.log): lambda x: tl.log(x),
        id(tl.log2): lambda x: tl.log2(x),
    }
    for name, module in list(sys.modules.items()):
        if name.startswith(FLA + ".") and module is not None:
            for attribute, value in list(vars(module).items()):
                if id(value) in wrappers and not attribute.startswith("__"):
                    setattr(module, attribute, wrappers[id(value)])
                while isinstance(value, KernelInterface):  # heuristics around autotune around jit
                    if isinstance(value, Autotuner):
                        value.configs = value.configs[:1]
                    value = getattr(value, "fn", None)
    sys.modules[FLA + ".utils"].custom_device_ctx = lambda index: contextlib.nullcontext()
    patch = interpreter._patch_lang_tensor

    def patch_with_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_with_index
    dot = interpreter.InterpreterBuilder.create_dot

    def widened(operand):
        if operand.dtype != tl.bfloat16:
            return operand
        bits = operand.data.astype(np.uint32) << np.uint32(16)  # bfloat16 is float32's high half
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def dot_of_widened(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = dot_of_widened


# ---------------------------------------------------------------- the check


def inputs(T, N, K, seed):
    """q, k (unit rows), v, g (log decay in (-1, 0)), beta for T packed tokens of one head,
    K = V, and an initial state [K, V] for each of N sequences: float64 on the host."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, K))
    k = rng.standard_normal((T, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    arrays = dict(q=q, k=k, v=rng.standard_normal((T, K)), g=-rng.uniform(0.0, 1.0, (T, K)),
                  beta=rng.uniform(0.2, 0.9, T))  # fmt: skip
    return arrays, rng.standard_normal((N, K, K))


def call_chunk(kda, arrays, h0, cu, scale, device):
    """SGLang's chunk_kda on one packed row [1, T, 1, .] float32 as its KDA backend calls it:
    the initial states in a VK pool [N, 1, V, K] updated in place through slots 0 .. N - 1, o
    written into v's buffer. cu: offsets (made into a new tensor) or a tensor (handed over as
    it is). Returns o [T, V] and the final states [N, K, V] as float64 arrays."""

    def row(x):
        return torch.tensor(x, dtype=torch.float32, device=device).reshape(1, x.shape[0], 1, *x.shape[1:])

    t = {name: row(x) for name, x in arrays.items()}
    pool = torch.tensor(h0, dtype=torch.float32, device=device).transpose(-1, -2).unsqueeze(1).contiguous()
    slots = torch.arange(h0.shape[0], dtype=torch.int32, device=device)
    if not isinstance(cu, torch.Tensor):
        cu = torch.tensor(cu, dtype=torch.int32, device=device)
    o = kda.chunk_kda(t["q"], t["k"], t["v"].clone(), t["g"], t["beta"], scale=scale, initial_state=pool,
                      initial_state_indices=slots, use_qk_l2norm_in_kernel=False, cu_seqlens=cu)  # fmt: skip
    return o[0, :, 0].cpu().double().numpy(), pool[:, 0].transpose(-1, -2).cpu().double().numpy()


def relative(x, ref) -> float:
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(x - ref).max()) / scale if np.isfinite(x).all() else float("inf")


def compare(label, cu, o, S, arrays, h0, scale) -> bool:
    """Each sequence of a call against the recurrence; prints a line per sequence and returns
    whether all of them agree."""
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
              f"{'  <-- fails' if bad else ''}", flush=True)  # fmt: skip
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sglang", default=os.environ.get(ENV), help=f"sglang wheel or folder (default: ${ENV}, else installed)"
    )
    p.add_argument("--K", type=int, default=16, help="key and value head size (default 16)")
    p.add_argument("--reverse", action="store_true", help=f"first {SECOND}, then refilled as {FIRST}")
    a = p.parse_args()
    first_cu, second_cu = (SECOND, FIRST) if a.reverse else (FIRST, SECOND)
    if a.device == "cpu":  # Triton's interpreter, switched on before the kernel files import triton
        os.environ["TRITON_INTERPRET"] = "1"
    kda, version = load_sglang(a.sglang)
    if a.device == "cpu":
        interpreter_fixes()
    import triton  # imported by the kernel files already

    print(f"sglang {version}, torch {torch.__version__}, triton {triton.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))  # fmt: skip
    print(f"H = 1, K = V = {a.K}, float32, an initial state per sequence; first call cu_seqlens {first_cu},")
    print(f"then a second case with that cu_seqlens tensor refilled in place: {second_cu}\n", flush=True)
    scale = a.K**-0.5
    (first, h0_first), (second, h0_second) = inputs(first_cu[-1], 2, a.K, 0), inputs(second_cu[-1], 2, a.K, 1)
    step = "the control"
    try:
        o, S = call_chunk(kda, second, h0_second, list(second_cu), scale, a.device)
        control = compare("second case, a new cu_seqlens tensor (the control)", second_cu, o, S, second, h0_second,
                          scale)  # fmt: skip
        step = "the first call"
        cu = torch.tensor(first_cu, dtype=torch.int32, device=a.device)
        call_chunk(kda, first, h0_first, cu, scale, a.device)
        step = "the refilled call"
        cu.copy_(torch.tensor(second_cu, dtype=torch.int32))  # the same object, new offsets
        o, S = call_chunk(kda, second, h0_second, cu, scale, a.device)
    except Exception:
        traceback.print_exc()
        stop(f"SGLang's chunk_kda raised (above) in {step}: the check could not run")
    agrees = compare("second call, cu_seqlens refilled in place", second_cu, o, S, second, h0_second, scale)
    if not control:
        print("\nthe control differs too: not the defect described")
        return 2
    print(f"\n{'agrees' if agrees else 'FAILS'} (tolerance {TOLERANCE:g} relative to the oracle's largest magnitude)")
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
