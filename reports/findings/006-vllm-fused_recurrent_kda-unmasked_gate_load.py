"""Finding 006: vLLM 0.33.0's fused_recurrent_kda reads past the end of the gate g when the key
head size K is not a power of two, and returns NaN when what lies there is NaN or larger than
about 88.7.

Reproduced by this script on an H200 in a fresh process (--device cuda), and before that on a
CPU under Triton's interpreter (--device cpu): the same verdict on both.

Cause, in vllm/third_party/flash_linear_attention/ (the wheel's files): fused_recurrent_kda
(ops/kda.py) launches fused_recurrent_gated_delta_rule_fwd_kernel (ops/fused_recurrent.py)
with IS_KDA=True and one block of BK = next_power_of_2(K) key lanes (ops/kda.py line 49). The
kernel masks q, k and the state to the K real lanes (the mask o_k < K, fused_recurrent.py
line 99), but it reads the gate row with no mask at all (line 137, the pointer set up at line
95). So lanes K .. BK - 1 take the BK - K floats that follow the row. For every row but the
last one of the call those are the next head's or token's gates: values <= 0, whose exp is at
most 1, applied to state lanes that hold 0, so nothing shows. For the last (token, value
head) they lie past the end of g. Line 138 scales the state by exp of what was read; the
spare lanes hold 0, and 0 * exp(x) is NaN when x is NaN or above about 88.7 (exp overflows
float32 to inf). Line 140 sums those lanes into the delta rule's correction, so the NaN
reaches every element of that token's o and of the state stored for it.

The script does not depend on what the allocator leaves after g: g is the front of a larger
buffer whose tail (a guard band right after g's last element) holds a value the script picks.
The same inputs are run with a NaN band, a finite band of 100, a band of zeros (harmless: the
control that the kernel's arithmetic is otherwise right), and at K = 4 (a power of two: no
spare lanes) with a NaN band, each against the float64 recurrence written out below. The call
is made as vLLM's callers make it: a state pool updated in place whose slot 0 is vLLM's null
block (the sequence uses slot 1) and a [sequences, tokens] index of slots.

Needs torch, NumPy and vLLM's files: an installed vllm (imported as a user imports it), or a
vllm wheel or unpacked folder named by --vllm or KDAVERIFY_VLLM, of which only the kernel files
are imported (no vLLM dependency beyond torch and Triton):

    KDAVERIFY_VLLM=path/to/vllm-0.33.0-...whl \\
        python 006-vllm-fused_recurrent_kda-unmasked_gate_load.py [--device cuda|cpu]

--device cpu runs the kernel under Triton's interpreter (TRITON_INTERPRET=1, set before Triton
is imported). Exits 1 while a K = 3 call with a NaN or large band differs from the recurrence,
0 once both agree, 2 when the check cannot run (no vLLM files, files that do not import, a call
that raises, or a wrapper that copies g so that the band no longer follows it).
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
BAND = 16  # elements of the guard band after g (more than BK - K for any K here)
# Relative to the oracle's largest magnitude: the kernel has no dot products (float32 FMAs),
# so a correct answer is within a few float32 roundings of the recurrence.
TOLERANCE = 1e-5


# ---------------------------------------------------------------- the recurrence, float64


def recurrence(q, k, v, g, beta, h0, scale):
    """One sequence, one head, in float64 (q, k, g: [T, K]; v: [T, V]; beta: [T]; h0: [K, V]):

        S = Diag(exp(g_t)) S;   S += beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T (scale q_t)

    Returns o [T, V] and the final state [K, V]."""
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


def interpreter_fixes() -> None:
    """Under Triton's interpreter only (--device cpu), two gaps between Triton 3.6's interpreter
    and these files; neither changes what the kernel computes:
    - ops/op.py binds tl.exp (and exp2, log, log2) to module names that the kernels call. The
      interpreter swaps in its own versions of tl's functions for a launch but not of such
      copies, and refuses to call them; each copy becomes a small function that looks tl's
      function up when it is called.
    - with NumPy >= 2.4 the interpreter's int() of a runtime scalar (the loop bound T, held as
      a one-element array) raises; such a scalar is given an __index__ that reads its element."""
    import triton.language as tl
    from triton.runtime import interpreter

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
    patch = interpreter._patch_lang_tensor

    def patch_with_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_with_index


# ---------------------------------------------------------------- the check


def case(kda, T, K, band, device) -> tuple[float, float, list[float]]:
    """One call at B = H = HV = 1, V = K, float32, an initial state, g followed in memory by
    BAND elements of `band`. Returns the relative max errors of o and of the final state and
    the error of each token's o."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 1, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(1, T, 1, K, generator=gen), dim=-1)
    v = torch.randn(1, T, 1, K, generator=gen)
    g = -torch.rand(1, T, 1, K, generator=gen)  # log decays in (-1, 0]
    beta = torch.rand(1, T, 1, generator=gen)
    h0 = torch.randn(K, K, generator=gen)  # [K, V]
    scale = K**-0.5
    o_ref, S_ref = recurrence(*(x[0, :, 0].double().numpy() for x in (q, k, v, g)), beta[0, :, 0].double().numpy(),
                              h0.double().numpy(), scale)  # fmt: skip

    buffer = torch.full((g.numel() + BAND,), band, dtype=torch.float32, device=device)
    buffer[: g.numel()] = g.flatten().to(device)
    g_guarded = buffer[: g.numel()].view(g.shape)  # g itself; the band follows its last element
    pool = torch.zeros(2, 1, K, K, device=device)  # vLLM's state pool [slots, HV, V, K]; slot 0 the null block
    pool[1, 0] = h0.T.to(device)
    slots = torch.ones(1, T, dtype=torch.int32, device=device)  # [sequences, tokens]: slot 1 at every token
    if not g_guarded.contiguous().data_ptr() == buffer.data_ptr():
        stop("g would be copied before the call: the guard band would not follow it")
    q, k, v, beta = (x.to(device) for x in (q, k, v, beta))
    try:
        o, _ = kda.fused_recurrent_kda(
            q, k, v, g_guarded, beta, scale=scale, initial_state=pool, inplace_final_state=True,
            use_qk_l2norm_in_kernel=False, ssm_state_indices=slots,
        )  # fmt: skip
    except Exception:
        traceback.print_exc()
        stop("vLLM's code raised (above): the check could not run")
    if not torch.equal(buffer[g.numel() :].cpu().view(torch.int32), torch.full((BAND,), band).view(torch.int32)):
        stop("the guard band was written to: not the code described")
    o = o[0, :, 0].cpu().double().numpy()  # [T, V]
    S = pool[1, 0].T.cpu().double().numpy()  # back to [K, V]

    def relative(x, ref):
        return float(np.abs(x - ref).max() / np.abs(ref).max()) if np.isfinite(x).all() else float("inf")

    per_token = [relative(o[t], o_ref[t]) for t in range(T)]
    print(f"  oracle o[{T - 1}] {np.round(o_ref[T - 1, :4], 5)}")
    print(f"  vLLM   o[{T - 1}] {np.round(o[T - 1, :4], 5)}")
    return relative(o, o_ref), relative(S, S_ref), per_token


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--vllm", default=os.environ.get(ENV), help=f"vllm wheel or folder (default: ${ENV}, else installed)"
    )
    p.add_argument("--T", type=int, default=2, help="tokens (default 2: only the last token reads past g)")
    a = p.parse_args()
    if a.device == "cpu":  # Triton's interpreter, switched on before the kernel files import Triton
        os.environ["TRITON_INTERPRET"] = "1"
    kda, version = load_kda(a.vllm)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        interpreter_fixes()
    import triton  # imported by the kernel files already

    print(f"vllm {version}, torch {torch.__version__}, triton {triton.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))  # fmt: skip
    print(f"one sequence of T = {a.T}, B = H = HV = 1, V = K, float32, an initial state; g followed by {BAND} "
          "elements of the band value")  # fmt: skip
    cases = [  # (K, band value, whether this case shows the defect)
        (3, float("nan"), True),
        (3, 100.0, True),  # finite, but exp(100) overflows float32
        (3, 0.0, False),  # control: the same spare lane reads a harmless 0
        (4, float("nan"), False),  # control: K a power of two, no spare lane
    ]
    failed = control_failed = False
    for K, band, shows in cases:
        print(f"\nK = V = {K} (BK = {triton.next_power_of_2(K)}), band {band}:")
        e_o, e_S, per_token = case(kda, a.T, K, band, a.device)
        bad = e_o > TOLERANCE or e_S > TOLERANCE
        tokens = ", ".join(f"{e:.3g}" for e in per_token)
        print(f"  o rel max err {e_o:.3g} (per token {tokens}), final state {e_S:.3g}: {'WRONG' if bad else 'ok'}")
        if shows:
            failed |= bad
        else:
            control_failed |= bad
    if control_failed:
        print("\na control differs too: not (only) the defect described here")
    print(f"\n{'FAILS' if failed else 'agrees'} (tolerance {TOLERANCE:g} relative to the oracle's largest magnitude)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
