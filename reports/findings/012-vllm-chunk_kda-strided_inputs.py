"""Finding 012: vLLM 0.33.0's chunk_kda reads q and k as if they were contiguous. Handed
q and k that are views with a batch stride larger than T * H * K (the first T tokens of
longer buffers), batch row 0 is right and every later row's o and final state are wrong;
handed q, k and v as views of one fused projection [B, T, 3, H, K] (token stride 3 H K), every
row is wrong. v, g and beta sliced by batch are read right. The same call on contiguous copies
agrees with the float64 recurrence. Nothing refuses the strided input: the answer is silently
wrong. Only with use_qk_l2norm_in_kernel=False: with True (what vLLM's own model code passes)
q and k are made contiguous on the way to the L2 norm.

Reproduced on an NVIDIA H200 in a fresh process (2026-11-29, this script, --device cuda,
float32, B2 T80 K = V = 16): batch-sliced q and k, row 1 off by 1.43 relative RMS (o) and 1.51
(state), row 0 at 7.7e-5 (TF32 products); the fused projection, o off by 7.97 and 8.14 on rows
0 and 1; batch-sliced v, g, beta and the contiguous call at 1e-4 (o) and 1e-3 (state). Seen first in the perf
sweep on an H200 (2026-11-29): its check before timing handed a strided prefix of [8, 4096,
32, 128] bf16 inputs, and vllm-chunk_kda was off by 0.2736 relative RMS on batch row 7. The
same figures under Triton's interpreter on a CPU (--device cpu).

Cause, in vllm/third_party/flash_linear_attention/ops/kda.py (the wheel's files): chunk_kda
(line 1392) passes v, g, beta and the initial state through .contiguous() and q and k only
when use_qk_l2norm_in_kernel is set (lines 1408-1410); the kernels that read q and k then
build their pointers from the shapes, as an offset of (bos * H + i_h) * K with row stride
H * K, never from the tensors' strides: chunk_kda_scaled_dot_kkt_fwd_kernel_intra_sub_inter
(lines 598-599), recompute_w_u_fwd_kernel (lines 892 and 900), chunk_gla_fwd_kernel_o (line
1031). flash-linear-attention 0.6.0's chunk_kda is guarded by its input_guard decorator,
which makes every input contiguous.

Needs torch, NumPy and vLLM's files: an installed vllm, or a vllm wheel or unpacked folder
named by --vllm or KDAVERIFY_VLLM, of which only the kernel files are imported:

    KDAVERIFY_VLLM=path/to/vllm-0.33.0-...whl python 012-vllm-chunk_kda-strided_inputs.py [--device cuda|cpu]

--device cpu runs the kernels under Triton's interpreter in float32. Exits 1 while a later
batch row with strided q and k differs from the recurrence by more than TOLERANCE and the
contiguous call agrees, 0 once it agrees, 2 when the check cannot run.
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


def inputs(B, T, K, pad):
    """q, k (unit rows), v, g (logsigmoid of normal draws), beta for B sequences of T tokens,
    one head, K = V, float64 on the host, each laid out in a buffer of T + pad tokens."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T + pad, K))
    k = rng.standard_normal((B, T + pad, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T + pad, K))
    g = -np.log1p(np.exp(-rng.standard_normal((B, T + pad, K))))
    beta = rng.uniform(0.2, 0.9, (B, T + pad))
    return q, k, v, g, beta


def call_chunk(kda, arrays, T, layout, scale, device):
    """vLLM's chunk_kda on [B, T, 1, .] float32 inputs from a zero state, laid out as `layout`
    says: "contiguous"; "q, k batch slices" (q and k the first T tokens of [B, T + pad, 1, K]
    buffers: batch stride (T + pad) K); "v, g, beta batch slices" (the same for those three);
    "q, k, v of one fused projection" (views q = qkv[:, :, 0] of one [B, T, 3, 1, K] buffer:
    token stride 3K, as a fused QKV projection gives). o [B, T, V] and the final state [B, K, V]."""

    def dev(x):
        return torch.tensor(x, dtype=torch.float32, device=device).unsqueeze(2).contiguous()  # [B, T + pad, 1, .]

    t = {name: dev(x)[:, :T] for name, x in arrays.items()}
    sliced = {"q, k batch slices": ("q", "k"), "v, g, beta batch slices": ("v", "g", "beta")}.get(layout, ())
    t = {name: x if name in sliced else x.contiguous() for name, x in t.items()}
    if layout == "q, k, v of one fused projection":
        qkv = torch.stack([t["q"], t["k"], t["v"]], dim=2).contiguous()  # [B, T, 3, 1, K]
        t.update(q=qkv[:, :, 0], k=qkv[:, :, 1], v=qkv[:, :, 2])
    B, K = t["q"].shape[0], t["q"].shape[-1]
    h0 = torch.zeros(B, 1, K, K, dtype=torch.float32, device=device)  # vLLM's chunk_kda needs one ([N, HV, V, K])
    # vLLM writes o into v's buffer; in the fused layout that buffer is the projection's own
    v = t["v"] if layout == "q, k, v of one fused projection" else t["v"].clone()
    o, final = kda.chunk_kda(t["q"], t["k"], v, t["g"], t["beta"], scale=scale, initial_state=h0,
                             output_final_state=True, use_qk_l2norm_in_kernel=False)  # fmt: skip
    return o[:, :, 0].cpu().double().numpy(), final[:, 0].transpose(-1, -2).cpu().double().numpy()


def relative(x, ref) -> float:
    return float(np.sqrt(((x - ref) ** 2).sum() / (ref**2).sum())) if np.isfinite(x).all() else float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--vllm", default=os.environ.get(ENV), help=f"vllm wheel or folder (default: ${ENV}, else installed)"
    )
    p.add_argument("--T", type=int, default=80, help="tokens per sequence (default 80)")
    p.add_argument("--K", type=int, default=16, help="key and value head size (default 16)")
    a = p.parse_args()
    if a.device == "cpu":  # Triton's interpreter, switched on before the kernel files import Triton
        os.environ["TRITON_INTERPRET"] = "1"
    kda, version = load_kda(a.vllm)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        interpreter_fixes()
    import triton  # imported by the kernel files already

    B, pad = 2, 48
    print(f"vllm {version}, torch {torch.__version__}, triton {triton.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))  # fmt: skip
    print(f"B = {B} sequences of T = {a.T}, H = HV = 1, K = V = {a.K}, float32; strided inputs are the first T "
          f"tokens of buffers of T + {pad}")  # fmt: skip
    q, k, v, g, beta = inputs(B, a.T, a.K, pad)
    scale = a.K**-0.5
    arrays = dict(q=q, k=k, v=v, g=g, beta=beta)
    refs = [recurrence(q[b, : a.T], k[b, : a.T], v[b, : a.T], g[b, : a.T], beta[b, : a.T], np.zeros((a.K, a.K)), scale)
            for b in range(B)]  # fmt: skip
    verdicts = {}
    layouts = ("contiguous", "q, k batch slices", "v, g, beta batch slices", "q, k, v of one fused projection")
    for label in layouts:
        try:
            o, S = call_chunk(kda, arrays, a.T, label, scale, a.device)
        except Exception:
            traceback.print_exc()
            stop(f"vLLM's chunk_kda raised (above) with {label}: the check could not run")
        errs = [(relative(o[b], refs[b][0]), relative(S[b], refs[b][1])) for b in range(B)]
        verdicts[label] = all(e_o <= TOLERANCE and e_S <= TOLERANCE for e_o, e_S in errs)
        rows = ", ".join(f"row {b}: o {e_o:.3g}, state {e_S:.3g}" for b, (e_o, e_S) in enumerate(errs))
        print(f"  {label:32s} rel RMS err against the recurrence: {rows}: {'ok' if verdicts[label] else 'WRONG'}")
    if not verdicts["contiguous"]:
        print("\nthe contiguous call differs too: not the defect described")
        return 2
    failed = not (verdicts["q, k batch slices"] and verdicts["q, k, v of one fused projection"])
    print(f"\n{'FAILS' if failed else 'agrees'} (tolerance {TOLERANCE:g} relative RMS)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
