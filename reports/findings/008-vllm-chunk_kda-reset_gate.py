"""Finding 008: vLLM 0.33.0's chunk_kda returns NaN for the whole chunk (the tokens before the
reset as well as after it) and a NaN final state when a gate entry is g = -inf (a hard reset:
exp(-inf) = 0 clears that channel of the state). vLLM's own fused_recurrent_kda gets the same
input right, and chunk_kda is right when the -inf is replaced by -1000, whose exp is 0 in
float32 too. Reproduced on an NVIDIA H200 in a fresh process (2026-11-28); first reduced under
Triton's interpreter on a CPU. vLLM carries a copy of flash-linear-attention's chunk kernels,
and finding 002 (flash-linear-attention's chunk_kda) is the same symptom; in vLLM's copy a
second step produces the NaN as well (below).

Cause, in vllm/third_party/flash_linear_attention/ops/ (the wheel's files): chunk_kda_fwd
(kda.py line 1324) first replaces g by its running sum inside each 64-token chunk (line 1332
rescales it to base 2). A -inf turns into NaN at two places after that:
- the running sum itself. For a gate of shape [B, T, H, K], chunk_local_cumsum runs
  chunk_local_cumsum_vector_kernel, which forms the sum as the product of a lower-triangular
  matrix of ones and zeros with the chunk's gates (cumsum.py line 129). In the rows of the
  tokens before the reset the -inf meets a zero, and 0 * (-inf) is NaN: those tokens' sums
  are NaN in that channel, the later tokens' -inf. (flash-linear-attention 0.6.0 forms this
  sum with tl.cumsum, which gives -inf from the reset on and finite sums before it.)
- the decays between two tokens, each formed as exp2 of the difference of two running sums,
  where -inf - (-inf) is NaN even when the sums are right: line 717 for the diagonal 16 x 16
  blocks of the key-key and query-key matrices (the kernel ..._intra_sub_intra); lines 629,
  634 and 638 for the blocks between two sub-chunks (the kernel ..._intra_sub_inter, only
  with more than 16 tokens in a chunk, so not reached at the default T); line 911 for the
  keys decayed to the chunk's last token, which the state update uses
  (recompute_w_u_fwd_kernel). Handed a right running sum (the script's "right running sum"
  row, under the interpreter), these alone give NaN rows from the reset on, and the
  output's product of the query-key matrix with the new values (chunk_gla_fwd_kernel_o,
  line 1056) carries them into the earlier rows through its zeros above the diagonal
  (0 * NaN is NaN).
This second step is the mechanism of finding 002 in flash-linear-attention. The state update
(chunk_delta_h.py) takes the NaN keys and carries the NaN to every later chunk and to the
final state. The recurrent kernel scales the state by exp(g_t) one token at a time and never
adds or subtracts sums across a reset, which is why it is right. The script prints
chunk_local_cumsum's running sum of one reset channel beside the right one, and runs the
steps after it on a right running sum, so that a GPU run shows each of the two steps.

The script runs one sequence whose token RESET (2) has g = -inf on every channel, then the same
inputs with -1000 there, through chunk_kda and fused_recurrent_kda, each against the float64
recurrence written out below. chunk_kda is called as vLLM calls it: an initial state laid out
[N, HV, V, K] and o written into the buffer of v (a copy is passed); fused_recurrent_kda
with vLLM's state pool (slot 0 the null block) and index.

Needs torch, NumPy and vLLM's files: an installed vllm (imported as a user imports it), or a
vllm wheel or unpacked folder named by --vllm or KDAVERIFY_VLLM, of which only the kernel files
are imported (no vLLM dependency beyond torch and Triton):

    KDAVERIFY_VLLM=path/to/vllm-0.33.0-...whl python 008-vllm-chunk_kda-reset_gate.py [--device cuda|cpu]

--device cpu runs the kernels under Triton's interpreter (TRITON_INTERPRET=1, set before Triton
is imported) in float32 (under Triton 3.6's interpreter vLLM's chunked kernels do not run in
bfloat16). Exits 1 while chunk_kda's o or final state at g = -inf is not finite or differs from
the recurrence by more than TOLERANCE, 0 once it agrees, 2 when the check cannot run (no vLLM
files, files that do not import, or a call that raises).
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
RESET = 2  # the token whose gate is -inf (then -1000)
# Relative to the oracle's largest magnitude: chunk_kda's float32 dots run as TF32 on a GPU,
# about 1e-3 at these sizes (finding 002); a reset bug gives NaN, not 1e-2.
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
        return torch.tensor(data, dtype=dtype, device=device)

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


def inputs(T, K):
    """q, k (unit rows), v, g (logsigmoid of normal draws: finite, < 0), beta, h0 [K, V] for
    one sequence and one head, V = K, float64 on the host."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((T, K))
    k = rng.standard_normal((T, K))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    v = rng.standard_normal((T, K))
    g = -np.log1p(np.exp(-rng.standard_normal((T, K))))
    beta = rng.uniform(0.2, 0.9, T)
    h0 = rng.standard_normal((K, K))
    return q, k, v, g, beta, h0


def call_chunk(kda, q, k, v, g, beta, h0, scale, device):
    """vLLM's chunk_kda on [1, T, 1, .] float32 inputs with an initial state [1, 1, V, K]; o
    [T, V] and the final state [K, V]."""

    def dev(x):
        return torch.tensor(x, dtype=torch.float32, device=device)[None, :, None].contiguous()

    h0_vk = torch.tensor(h0.T, dtype=torch.float32, device=device)[None, None].contiguous()
    o, final = kda.chunk_kda(dev(q), dev(k), dev(v).clone(), dev(g), dev(beta), scale=scale, initial_state=h0_vk,
                             output_final_state=True, use_qk_l2norm_in_kernel=False)  # fmt: skip
    return o[0, :, 0].cpu().double().numpy(), final[0, 0].T.cpu().double().numpy()


def call_recurrent(kda, q, k, v, g, beta, h0, scale, device):
    """vLLM's fused_recurrent_kda on the same inputs, through vLLM's state pool (slot 0 the null
    block, the sequence in slot 1) and a [sequences, tokens] index; o [T, V] and the final
    state [K, V]."""

    def dev(x):
        return torch.tensor(x, dtype=torch.float32, device=device)[None, :, None].contiguous()

    T = q.shape[0]
    pool = torch.zeros(2, 1, v.shape[1], k.shape[1], device=device)
    pool[1, 0] = torch.tensor(h0.T, dtype=torch.float32, device=device)
    slots = torch.ones(1, T, dtype=torch.int32, device=device)
    o, _ = kda.fused_recurrent_kda(dev(q), dev(k), dev(v), dev(g), dev(beta), scale=scale, initial_state=pool,
                                   inplace_final_state=True, use_qk_l2norm_in_kernel=False,
                                   ssm_state_indices=slots)  # fmt: skip
    return o[0, :, 0].cpu().double().numpy(), pool[1, 0].T.cpu().double().numpy()


def running_sum(kda, g, device) -> None:
    """Print vLLM's in-chunk running sum of g (chunk_local_cumsum, the first step of chunk_kda)
    for channel 0 beside the right one (the tokens of one chunk; diagnostic only)."""
    n = min(g.shape[0], 64)
    measured = kda.chunk_local_cumsum(torch.tensor(g, dtype=torch.float32, device=device)[None, :, None].contiguous(),
                                      chunk_size=64)[0, :n, 0, 0].cpu().double().numpy()  # fmt: skip
    with np.errstate(invalid="ignore"):
        expected = np.cumsum(g[:n, 0])
    print(f"  running sum of g, channel 0: vLLM {np.round(measured, 4)}, right {np.round(expected, 4)}")


def later_steps(kda, q, k, v, g, beta, h0, scale, device):
    """chunk_kda's steps after the running sum (kda.py's _chunk_kda_fwd_with_cumulative_g),
    handed a right in-chunk running sum of g in base 2 (torch.cumsum per 64-token chunk: -inf
    from a reset on, finite before it); o [T, V] and the final state [K, V]. Diagnostic only:
    it separates the differences of running sums from the running sum itself."""

    def dev(x):
        return torch.tensor(x, dtype=torch.float32, device=device)[None, :, None].contiguous()

    G = torch.cat([chunk.cumsum(0) for chunk in torch.tensor(g, dtype=torch.float32).split(64)]) / np.log(2.0)
    h0_vk = torch.tensor(h0.T, dtype=torch.float32, device=device)[None, None].contiguous()
    o, final = kda._chunk_kda_fwd_with_cumulative_g(
        q=dev(q), k=dev(k), v=dev(v).clone(), g=G.to(device)[None, :, None].contiguous(), beta=dev(beta),
        scale=scale, initial_state=h0_vk, output_final_state=True,
    )  # fmt: skip
    return o[0, :, 0].cpu().double().numpy(), final[0, 0].T.cpu().double().numpy()


def relative(x, ref) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max()) if np.isfinite(x).all() else float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--vllm", default=os.environ.get(ENV), help=f"vllm wheel or folder (default: ${ENV}, else installed)"
    )
    p.add_argument("--T", type=int, default=4, help=f"tokens (default 4; more than {RESET})")
    p.add_argument("--K", type=int, default=16, help="key and value head size (default 16)")
    a = p.parse_args()
    if a.T <= RESET:
        stop(f"--T must exceed {RESET}, the reset token")
    if a.device == "cpu":  # Triton's interpreter, switched on before the kernel files import Triton
        os.environ["TRITON_INTERPRET"] = "1"
    kda, version = load_kda(a.vllm)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        interpreter_fixes()
    import triton  # imported by the kernel files already

    print(f"vllm {version}, torch {torch.__version__}, triton {triton.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))  # fmt: skip
    print(f"one sequence of T = {a.T}, B = H = HV = 1, K = V = {a.K}, float32, an initial state; "
          f"token {RESET}'s gate set on every channel")  # fmt: skip
    q, k, v, g, beta, h0 = inputs(a.T, a.K)
    scale = a.K**-0.5
    failed = control_failed = False
    for label, value in (("g = -inf", -np.inf), ("g = -1000", -1000.0)):
        g_case = g.copy()
        g_case[RESET] = value
        o_ref, S_ref = recurrence(q, k, v, g_case, beta, h0, scale)
        print(f"\n{label} at token {RESET}:")
        if value == -np.inf:
            running_sum(kda, g_case, a.device)
        calls = [("chunk_kda", call_chunk), ("fused_recurrent_kda", call_recurrent)]
        if value == -np.inf and hasattr(kda, "_chunk_kda_fwd_with_cumulative_g"):
            calls.append(("(right running sum)", later_steps))
        for name, call in calls:
            try:
                o, S = call(kda, q, k, v, g_case, beta, h0, scale, a.device)
            except Exception:
                traceback.print_exc()
                stop(f"vLLM's {name} raised (above): the check could not run")
            e_o, e_S = relative(o, o_ref), relative(S, S_ref)
            bad = e_o > TOLERANCE or e_S > TOLERANCE
            finite = "".join("y" if np.isfinite(o[t]).all() else "n" for t in range(a.T))
            print(f"  {name:20s} o finite per token {finite}, final state finite {np.isfinite(S).all()!s:5s}, "
                  f"rel max err o {e_o:.3g}, state {e_S:.3g}: {'WRONG' if bad else 'ok'}")  # fmt: skip
            if bad:
                print(f"    o[0, :4] oracle {np.round(o_ref[0, :4], 5)}, measured {np.round(o[0, :4], 5)}")
            if name == "chunk_kda" and value == -np.inf:
                failed = bad
            elif not name.startswith("("):
                control_failed |= bad
    print("\n(right running sum): chunk_kda's later steps handed a right running sum of g; diagnostic, not counted")
    if control_failed:
        print("\na control differs too (fused_recurrent_kda, or chunk_kda at -1000): not only the defect described")
    print(f"\n{'FAILS' if failed else 'agrees'} (tolerance {TOLERANCE:g} relative to the oracle's largest magnitude)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
