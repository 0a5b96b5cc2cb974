"""Finding 005: SGLang 0.5.23's Triton chunk_kda (sglang/kernels/ops/attention/fla/kda.py)
returns a wrong o and final state for short inputs whose gate decays by more than about 87
(126 powers of two) inside a 16-token sub-chunk, such as a masked token (g = -1000).
Reproduced by this script on an H200 in a fresh process, and on a CPU under Triton's
interpreter.

When B * NT * H <= 256 chunk-heads (`_small_grid` in chunk_kda_fwd, kda.py), chunk_kda_fwd
asks chunk_kda_fwd_intra (chunk_intra.py) for fuse_diagonal=True: the diagonal 16 x 16
blocks are then built inside chunk_kda_fwd_kernel_inter_solve_fused (its FUSE_DIAGONAL
branches), as (q_r exp2(g_r - g_a)) . (k_c exp2(g_a - g_c)) with a the sub-chunk's first
token and the key's exponent clamped to [-126, 126] (in the first sub-chunk the query's too).
For tokens c <= r that both lie more than 126 (log2 units) below g_a, the product is then not
exp2(g_r - g_c) but 1 in the first sub-chunk, and 0 in the other three, where the query's
unclamped factor underflows. Larger grids take the unfused path, which forms exp2(g_r - g_c)
per pair and is right.

The script runs one sequence alone (a small grid: the fused path) and the same sequence as
the first of 300 identical sequences in one packed batch (300 chunks: the unfused path), both
against the float64 recurrence (written out below).

Needs torch, NumPy and SGLang's files: an installed sglang (pip install sglang==0.5.23
--no-deps is enough), or a wheel or unpacked folder named by --sglang or KDAVERIFY_SGLANG.
Only the kernel files are imported, never the engine's package __init__ files:

    KDAVERIFY_SGLANG=path/to/sglang-0.5.23-...whl python 005-sglang-triton-chunk_kda-masked_gate.py [--device cuda]

With --device cpu the kernels run under Triton's interpreter; keep --T <= 16 there: Triton
3.6's interpreter multiplies the stored bits of bfloat16 dot operands, and chunk_kda's blocks
between sub-chunks are bfloat16 dots, so any longer input comes back as garbage on both paths
(a fault of the interpreter, not of SGLang). Exits 1 while the lone sequence's o or final
state differs from the recurrence by more than TOLERANCE, 0 once it agrees, 2 when the check
cannot run (no SGLang files, files that do not import, or a call that raises).
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


def inputs(T, K, V, device, masked=2):
    """q, k (unit rows), v, g (log decay in (-1, 0], with token `masked` at -1000 on every
    channel: a padding token as masking code writes it), beta, h0 [1, 1, K, V]; H = 1."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 1, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, T, 1, K, generator=gen), dim=-1)
    v = torch.randn(1, T, 1, V, generator=gen)
    g = -torch.rand(1, T, 1, K, generator=gen)
    g[:, masked] = -1000.0
    beta = torch.rand(1, T, 1, generator=gen)
    h0 = torch.randn(1, 1, K, V, generator=gen)
    return [x.to(device) for x in (q, k, v, g, beta, h0)]


def run(kda, q, k, v, g, beta, h0, copies):
    """chunk_kda as SGLang's backend calls it (a VK state pool updated in place, slot n for
    sequence n, o written into a copy of v), on `copies` copies of the sequence packed in one
    batch; o and final state of the first copy."""
    rep = lambda x: torch.cat([x] * copies, dim=1).contiguous()  # noqa: E731
    T = q.shape[1]
    pool = h0.transpose(-1, -2).repeat(copies, 1, 1, 1).contiguous()
    slots = torch.arange(copies, dtype=torch.int32, device=q.device)
    cu = torch.arange(0, (copies + 1) * T, T, device=q.device)
    o = kda.chunk_kda(
        rep(q), rep(k), rep(v).clone(), rep(g), torch.cat([beta] * copies, dim=1).contiguous(),
        initial_state=pool, initial_state_indices=slots, cu_seqlens=cu,
    )  # fmt: skip
    return o[:, :T].cpu().double().numpy(), pool[:1].transpose(-1, -2).cpu().double().numpy()


def relative(x, ref):
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(x - ref).max()) / scale if np.isfinite(x).all() else float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=5, help="tokens (default 5)")
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

    q, k, v, g, beta, h0 = inputs(a.T, a.head_size, a.head_size, a.device)
    o_ref, S_ref = kda_float64(q, k, v, g, beta, h0, [0, a.T], scale=a.head_size**-0.5)
    # 1 copy: B * NT * H = 1 chunk-head (fused path); 300 copies: 300 > 256 (unfused path)
    calls = {"alone (fused diagonal path)": 1, "first of 300 in one batch (unfused path)": 300}
    try:
        results = {label: run(kda, q, k, v, g, beta, h0, n) for label, n in calls.items()}
    except Exception:
        traceback.print_exc()
        stop("SGLang's code raised (above): the check could not run")
    print(f"sglang {version}, torch {torch.__version__}, triton {triton.__version__}, device {a.device}")
    print(f"one sequence of T = {a.T}, H = 1, K = V = {a.head_size}, float32, g = -1000 at token 2")
    failed = control_failed = False
    for label, (o, S) in results.items():
        e_o, e_S = relative(o, o_ref), relative(S, S_ref)
        bad = e_o > TOLERANCE or e_S > TOLERANCE
        if calls[label] == 1:
            failed = bad
        else:
            control_failed = bad
        print(f"{label}: o rel max err {e_o:.3g}, final state {e_S:.3g}{'  <-- fails' if bad else ''}")
        if bad:
            t = int(np.abs(o - o_ref).max(axis=(0, 2, 3)).argmax())
            print(f"  o[{t}, 0, :4] expected {np.round(o_ref[0, t, 0, :4], 5)}, measured {np.round(o[0, t, 0, :4], 5)}")
    if control_failed:
        print("the unfused path differs too: not (only) the defect described here")
    print(f"{'FAILS' if failed else 'agrees'} (tolerance {TOLERANCE:.3g} relative to the oracle's largest magnitude)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
