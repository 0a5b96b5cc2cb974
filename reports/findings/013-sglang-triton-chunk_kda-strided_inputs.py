"""Finding 013: SGLang 0.5.23's Triton chunk_kda (sglang/kernels/ops/attention/fla/kda.py)
reads q and k as if they were contiguous. Handed q and k (with or without v) as views of one
fused projection [1, T, 3, H, K] (token stride 3 H K), as a fused QKV projection gives them,
its o and final state are wrong at every token; the same call on contiguous copies agrees with
the float64 recurrence. Nothing refuses the strided input. Only with
use_qk_l2norm_in_kernel=False: with True (what SGLang's own KDA backend passes) q and k are
made contiguous on the way to the L2 norm. The companion of finding 012
(012-vllm-chunk_kda-strided_inputs.py: vLLM carries the same kernels).

Reproduced on an NVIDIA H200 in a fresh process (2026-11-29, this script, --device cuda
--T 1000, float32, H = 2, K = V = 16): o off by 9e3 and the final state by 332 (largest
absolute error over the oracle's largest magnitude) with q and k from one fused projection,
and the same with v too; the contiguous call at 1.6e-3 (TF32 products). The run at the default
T = 16 before it, the first of a cold machine, printed its header and did not finish in 100 s
(its compiles and autotuning, or a stall: not told apart); T = 1000 then finished in the
same call. Seen first in the perf sweep on an H200 (0.2736 relative RMS on the last row of a
batch whose q and k were batch slices, the same figure as vLLM's); reduced under Triton's
interpreter on a CPU (T = 16: q alone sliced 1.31, k alone 1.43, the fused projection 100,
through kdaverify's adapter).

Cause (the wheel's files, sglang/kernels/ops/attention/fla/): chunk_kda (kda.py line 1274)
passes v, g and beta through .contiguous() and q and k only when use_qk_l2norm_in_kernel is
set (lines 1300-1301); the kernels that read q and k address them from their shapes, an
offset of (bos * H + i_h) * K with row stride H * K: chunk_intra.py lines 111-112
(chunk_kda_fwd_kernel_inter_solve_fused) and 843-844 (chunk_kda_fwd_kernel_intra_sub_chunk),
kda.py line 816 (chunk_gla_fwd_kernel_o).

The script calls chunk_kda as SGLang's backend does (one packed row, cu_seqlens, a "VK" state
pool updated in place, o written into v's buffer) three times: contiguous q, k, v; q and k as
views of one fused projection with v a contiguous copy; and all three as views.

Needs torch, NumPy and SGLang's files: an installed sglang (pip install sglang==0.5.23
--no-deps is enough), or a wheel or unpacked folder named by --sglang or KDAVERIFY_SGLANG:

    KDAVERIFY_SGLANG=path/to/sglang-0.5.23-...whl \\
        python 013-sglang-triton-chunk_kda-strided_inputs.py [--device cuda --T 1000]

With --device cpu the kernels run under Triton's interpreter; keep --T <= 16 there (Triton
3.6's interpreter multiplies the stored bits of bfloat16 dot operands, and chunk_kda's blocks
between sub-chunks are bfloat16 dots). Exits 1 while the fused-projection call differs from
the recurrence by more than TOLERANCE and the contiguous call agrees, 0 once it agrees, 2
when the check cannot run.
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
FLA = "sglang.kernels.ops.attention.fla"  # chunk_kda in kda.py, prepare_chunk_indices in index.py
CHUNK = 64  # chunk_kda's chunk size (chunk_kda_fwd)
# Relative to the oracle's largest magnitude: twenty TF32 unit roundoffs (2**-11), far above
# the rounding of a correct float32 kernel with TF32 products on a case this small.
TOLERANCE = 20 * 2.0**-11


# ---------------------------------------------------------------- the recurrence, float64


def kda_float64(q, k, v, g, beta, h0, cu, scale):
    """KDA by its recurrence in float64, per value head with state S in R^{K x V}:

        S = Diag(exp(g_t)) S;  S += beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T (scale q_t)

    q, k, g: [1, T, H, K]; v: [1, T, H, V]; beta: [1, T, H]; h0: [N, H, K, V]. Sequence n is
    tokens cu[n] .. cu[n + 1] - 1, starting from h0[n]. Returns o [1, T, H, V] and the final
    states [N, H, K, V] (an empty sequence's is its initial state)."""
    q, k, v, g, beta = (x.detach().to("cpu", torch.float64).numpy()[0] for x in (q, k, v, g, beta))
    h0 = h0.detach().to("cpu", torch.float64).numpy()
    o, final = np.zeros(v.shape), h0.copy()
    for n in range(len(cu) - 1):
        S = h0[n]
        for t in range(cu[n], cu[n + 1]):
            S = np.exp(g[t])[..., None] * S
            error = v[t] - np.einsum("hk,hkv->hv", k[t], S)  # v_t - S^T k_t: the delta rule's correction
            S = S + beta[t, :, None, None] * k[t][..., None] * error[:, None, :]
            o[t] = scale * np.einsum("hk,hkv->hv", q[t], S)
        final[n] = S
    return o[None], final


# ---------------------------------------------------------------- loading SGLang's kernel files


def load_sglang(path: str | None):
    """SGLang's fla/kda.py and fla/index.py modules, and SGLang's version.

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
        kda, index = importlib.import_module(FLA + ".kda"), importlib.import_module(FLA + ".index")
    except ImportError as e:
        stop(f"SGLang's kernel files do not import: {e}")
    metadata = sorted(root.glob("sglang-*.dist-info/METADATA"))  # the wheel's, or site-packages'
    found = re.search(r"^Version: (\S+)$", metadata[0].read_text(), re.M) if metadata else None
    return kda, index, found.group(1) if found else "unknown"


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
    SGLang's files disagree; none of these touches the kernels' arithmetic:
    - fla/op.py binds Triton's math functions to module names (exp = tl.exp, and exp2, log,
      log2) that the kernels call; the interpreter patches tl's own functions for a launch,
      not such aliases, and refuses the call. Each alias is rebound to a function that looks
      up the tl function at call time, the patched one.
    - with NumPy >= 2.4 the interpreter's int() of a runtime scalar (a loop bound, held as a
      one-element array) raises; its __index__ is made to read the one element.
    - fla/utils.py's input_guard enters torch.<device>.device(index), which has no CPU form:
      it becomes a null context (there is no device to select).
    - an autotuned kernel keeps only its first configuration: the interpreter has no timer
      (block sizes and warps change the order of sums, not the math)."""
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
        if name.startswith(FLA + "."):
            for attribute, value in list(vars(module).items()):
                if id(value) in wrappers:
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


# ---------------------------------------------------------------- the check


def inputs(T, H, K, device):
    """q, k (unit rows), v, g (log decay in (-1, 0)), beta, h0 [1, H, K, V] for one sequence."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T, H, K, generator=gen)
    g = -torch.rand(1, T, H, K, generator=gen)
    beta = torch.rand(1, T, H, generator=gen)
    h0 = torch.randn(1, H, K, K, generator=gen)
    return [x.to(device) for x in (q, k, v, g, beta, h0)]


def run(kda, q, k, v, g, beta, h0, layout):
    """chunk_kda as SGLang's backend calls it; q, k (and v where `layout` says) as views of
    one fused projection [1, T, 3, H, K]. o and the final state (KV layout)."""
    if layout != "contiguous":
        qkv = torch.stack([q, k, v], dim=2).contiguous()  # [1, T, 3, H, K]
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        v = qkv[:, :, 2] if layout == "q, k, v of one fused projection" else v.clone()
    else:
        v = v.clone()  # o is written into v's buffer
    pool = h0.transpose(-1, -2).contiguous()
    cu = torch.tensor([0, q.shape[1]], device=q.device)
    slots = torch.zeros(1, dtype=torch.int32, device=q.device)
    o = kda.chunk_kda(q, k, v, g, beta, initial_state=pool, initial_state_indices=slots, cu_seqlens=cu)
    return o.cpu().double().numpy(), pool.transpose(-1, -2).cpu().double().numpy()


def relative(x, ref):
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(x - ref).max()) / scale if np.isfinite(x).all() else float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=16, help="tokens (default 16)")
    p.add_argument("--H", type=int, default=2, help="heads (default 2)")
    p.add_argument("--head-size", type=int, default=16, help="K = V (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--sglang", default=os.environ.get(ENV), help=f"sglang wheel or folder (default: ${ENV}, else installed)"
    )
    a = p.parse_args()
    if a.device == "cpu":  # Triton's interpreter, switched on before the kernel files import triton
        os.environ["TRITON_INTERPRET"] = "1"
    kda, _, version = load_sglang(a.sglang)
    if a.device == "cpu":
        interpreter_fixes()
    import triton  # imported by the kernel files already

    q, k, v, g, beta, h0 = inputs(a.T, a.H, a.head_size, a.device)
    o_ref, S_ref = kda_float64(q, k, v, g, beta, h0, [0, a.T], scale=a.head_size**-0.5)
    print(f"sglang {version}, torch {torch.__version__}, triton {triton.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))  # fmt: skip
    print(f"one sequence of T = {a.T}, H = {a.H}, K = V = {a.head_size}, float32, an initial state")
    verdicts = {}
    for layout in ("contiguous", "q, k of one fused projection", "q, k, v of one fused projection"):
        try:
            o, S = run(kda, q, k, v, g, beta, h0, layout)
        except Exception:
            traceback.print_exc()
            stop(f"SGLang's chunk_kda raised (above) with {layout}: the check could not run")
        e_o, e_S = relative(o, o_ref), relative(S, S_ref)
        verdicts[layout] = e_o <= TOLERANCE and e_S <= TOLERANCE
        print(f"  {layout:32s} o rel max err {e_o:.3g}, final state {e_S:.3g}: {'ok' if verdicts[layout] else 'WRONG'}")
    if not verdicts["contiguous"]:
        print("the contiguous call differs too: not the defect described")
        return 2
    failed = not verdicts["q, k, v of one fused projection"]
    print(f"{'FAILS' if failed else 'agrees'} (tolerance {TOLERANCE:.3g} relative to the oracle's largest magnitude)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
