"""Finding 015: flash-linear-attention 0.6.0's chunk_kda reuses a stale chunk table for a refilled cu_seqlens.

In its default mode it reuses a stale (sequence, chunk) table and stale state offsets when
cu_seqlens is refilled in place, as a CUDA graph replay refills its input buffers.
prepare_chunk_indices and prepare_chunk_offsets (fla/ops/utils/index.py lines 156 and 168) are
wrapped in fla's tensor_cache (fla/utils/decorators.py line 33), which returns the cached result
for an argument that `is` the same tensor object, whatever it now holds (lines 69-74);
chunk_kda's input_guard hands a contiguous cu_seqlens over as the same object. A refill whose
sequences have other chunk counts than before is then computed over the old table, and the state
kernel (fla/ops/common/chunk_delta_h.py) stores each sequence's chunk states from its stale
first row (line 118) into an h sized from the stale table (lines 713 and 722): the store at line
185 then writes past h's end.

Here: a call with cu_seqlens [0, 130, 132] (3 + 1 chunks of 64 tokens), then a second case with
the same cu_seqlens tensor refilled in place with [0, 2, 132] (1 + 3 chunks): sequence 1's
three chunk states start at the stale row 3 of a 4-row buffer, two rows past its end.

Reproduced on an NVIDIA H200 in a fresh process (2026-11-29, this script, --device cuda,
float32, one head, K = V = 16): the refilled call with fla's defaults is off by 0.634 (o) and
0.639 (final states) relative RMS; both controls agree at 1.0e-3 (o) and 8.4e-4 (the second
case with a new cu_seqlens tensor, and the refilled call with FLA_DISABLE_TENSOR_CACHE on);
exit 1. Under compute-sanitizer's memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1, --error-exitcode
9): 66 errors, invalid global writes of 16 bytes by the state kernel
(chunk_gated_delta_rule_fwd_kernel_h_blockdim64) at chunk_delta_h.py:185, one of them by
block (1,0,0), sequence 1's program, 49 bytes past the end of an allocation of 4,096 bytes
(h's size here: 4 rows of 16 x 16 float32); the kernel then failed ("unspecified launch
failure") and the process died in the refilled call before printing its verdict (exit 9).
Seen by the suite's reused_buffers check on the H200 (twenty-second session, K = V = 128, bf16
and float32). Under Triton's interpreter on a CPU (--device cpu) the controls agree (4.8e-7)
and the refilled call aborts the process in each of four runs (glibc: "corrupted size vs.
prev_size", "double free or corruption", "corrupted double-linked list"; exit status 134).
fla's tensor_cache documents its identity test and the switch; chunk_kda documents a graph mode
(use_graph=True, which builds the table on the device on every call; not tried here) for
replays after only the contents of cu_seqlens change, but not that its default mode must not
see cu_seqlens refilled.

    python 015-fla_chunk_kda-reused_buffers.py [--device cuda|cpu]

Needs torch, NumPy and fla-core 0.6.0 (and einops, which fla imports). Prints each call's
error against the float64 recurrence written out below and exits 1 while the refilled call
is off by more than TOLERANCE and both controls agree, 0 once it agrees, 2 when the check
cannot run. It exits with os._exit right after its verdict, so that no cleanup runs over a
corrupted heap. The refilled call itself may end the process first: under the interpreter by
an abort (134), under compute-sanitizer on a GPU by the kernel's failure (the sanitizer's
--error-exitcode).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

CHUNK = 64  # chunk_kda's chunk size
FIRST, SECOND = [0, 130, 132], [0, 2, 132]  # 3 + 1 chunks, then 1 + 3
# Relative RMS: chunk_kda's float32 dots run as TF32 on a GPU (about 1e-3 at this size); a
# stale table is off by order 1.
TOLERANCE = 1e-2


def recurrence(q, k, v, g, beta, h0, cu, scale):
    """KDA by its recurrence in float64, one head, per sequence of the packed row (q, k, g:
    [T, K]; v: [T, V]; beta: [T]; h0: [N, K, V]):

        S = Diag(exp(g_t)) S;   S += beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T (scale q_t)

    Returns o [T, V] and the final states [N, K, V]."""
    o = np.zeros((q.shape[0], v.shape[1]))
    finals = []
    for n in range(len(cu) - 1):
        S = h0[n].copy()
        for t in range(cu[n], cu[n + 1]):
            S = np.exp(g[t])[:, None] * S
            S = S + beta[t] * np.outer(k[t], v[t] - S.T @ k[t])
            o[t] = S.T @ (scale * q[t])
        finals.append(S)
    return o, np.stack(finals)


def inputs(seed, T, K):
    """q, k (unit rows), v, g (log decay in (-1, 0)), beta for T packed tokens, one head, K = V,
    and an initial state for each of two sequences: float64 on the host."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((T, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return dict(
        q=rng.standard_normal((T, K)), k=k, v=rng.standard_normal((T, K)), g=-rng.uniform(0.0, 1.0, (T, K)),
        beta=rng.uniform(0.2, 0.9, T), h0=rng.standard_normal((2, K, K)),
    )  # fmt: skip


def call(chunk_kda, x, cu, device):
    """fla's chunk_kda on one packed row [1, T, 1, .] float32 with cu_seqlens (a tensor, handed
    over as it is); o [T, V] and the final states [N, K, V] as float64 arrays."""

    def dev(a):
        return torch.tensor(a, dtype=torch.float32, device=device)

    q, k, v, g = (dev(x[n])[None, :, None] for n in ("q", "k", "v", "g"))
    beta = dev(x["beta"])[None, :, None]
    h0 = dev(x["h0"])[:, None]  # [N, H, K, V]
    o, S = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    return o[0, :, 0].cpu().double().numpy(), S[:, 0].cpu().double().numpy()


def rel_rms(x, ref) -> float:
    return float(np.sqrt(((x - ref) ** 2).sum() / (ref**2).sum())) if np.isfinite(x).all() else float("inf")


def interpreter_fixes() -> None:
    """Under Triton's interpreter only (--device cpu), where Triton 3.6's interpreter and fla's
    files disagree; none of these touches the kernels' arithmetic:
    - an autotuned kernel keeps only its first configuration (the interpreter has no timer);
    - fla binds tl.exp, exp2, log and log2 to module names; each becomes a function that looks
      the tl function up when called (the interpreter patches tl's own for a launch);
    - with NumPy >= 2.4 the interpreter's int() of a runtime scalar raises: its __index__
      reads the one element;
    - fla/ops/common/chunk_delta_h.py casts its chunk loop's index with .to(); the interpreter
      runs that loop in Python over plain ints, so there range yields ints with a .to()."""
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner

    late = {
        id(tl.exp): lambda x: tl.exp(x),
        id(tl.math.exp2): lambda x: tl.math.exp2(x),
        id(tl.log): lambda x: tl.log(x),
        id(tl.log2): lambda x: tl.log2(x),
    }
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.") and module is not None:
            for attribute, value in list(vars(module).items()):
                if id(value) in late and not attribute.startswith("__"):
                    setattr(module, attribute, late[id(value)])
                for _ in range(6):  # heuristics around autotune around jit
                    if isinstance(value, Autotuner):
                        value.configs = value.configs[:1]
                    value = getattr(value, "fn", None)

    class CastableIndex(int):
        def to(self, *args, **kwargs):
            return self

    sys.modules["fla.ops.common.chunk_delta_h"].range = lambda *a: (CastableIndex(i) for i in range(*a))
    patch = interpreter._patch_lang_tensor

    def patch_with_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_with_index


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--K", type=int, default=16, help="key and value head size (default 16)")
    a = p.parse_args()
    if a.device == "cpu":  # Triton's interpreter, switched on before fla imports Triton
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FLA_DISABLE_BACKEND_DISPATCH"] = "1"  # fla's Triton kernels, read once at import
    try:
        import fla
        import fla.utils
        import triton
        from fla.ops.kda import chunk_kda
    except ImportError as e:
        print(f"fla-core is not importable ({e})", file=sys.stderr)
        return 2
    if a.device == "cpu":
        interpreter_fixes()
    print(f"fla {fla.__version__}, torch {torch.__version__}, triton {triton.__version__}, device {a.device}"
          + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))  # fmt: skip
    print(f"one head, K = V = {a.K}, float32, an initial state per sequence; first call cu_seqlens {FIRST},")
    print(f"then a second case with that cu_seqlens tensor refilled in place: {SECOND}\n")
    scale = a.K**-0.5
    first, second = inputs(0, FIRST[-1], a.K), inputs(1, SECOND[-1], a.K)
    ref = recurrence(*(second[n] for n in ("q", "k", "v", "g", "beta", "h0")), SECOND, scale)

    def report(label, got) -> bool:
        e_o, e_S = rel_rms(got[0], ref[0]), rel_rms(got[1], ref[1])
        ok = e_o <= TOLERANCE and e_S <= TOLERANCE
        print(f"  {label:52s} o {e_o:.3g}, final states {e_S:.3g} (rel RMS): {'ok' if ok else 'WRONG'}", flush=True)
        return ok

    def offsets(cu):
        return torch.tensor(cu, dtype=torch.long, device=a.device)

    control = report("second case, a new cu_seqlens tensor", call(chunk_kda, second, offsets(SECOND), a.device))
    fla.utils.FLA_DISABLE_TENSOR_CACHE = True  # read at each call (decorators.cache_disabled)
    cu = offsets(FIRST)
    call(chunk_kda, first, cu, a.device)
    cu.copy_(offsets(SECOND))
    control &= report("refilled in place, FLA_DISABLE_TENSOR_CACHE on", call(chunk_kda, second, cu, a.device))
    fla.utils.FLA_DISABLE_TENSOR_CACHE = False
    cu = offsets(FIRST)
    call(chunk_kda, first, cu, a.device)
    cu.copy_(offsets(SECOND))  # the same object, new offsets: the cached table is the first call's
    agrees = report("refilled in place (fla's default)", call(chunk_kda, second, cu, a.device))
    if not control:
        print("\na control differs too: not the defect described", flush=True)
        code = 2
    else:
        print(f"\n{'agrees' if agrees else 'FAILS'} (tolerance {TOLERANCE:g} relative RMS)", flush=True)
        code = 0 if agrees else 1
    os._exit(code)  # before any cleanup: the stale call may have written past a buffer's end


if __name__ == "__main__":
    sys.exit(main())
