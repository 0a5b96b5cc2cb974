"""Finding 002: flash-linear-attention 0.6.0's chunk_kda returns non-finite output when a gate
entry is g = -inf (a hard reset: exp(-inf) = 0 wipes that channel of the state).

Seen in the conformance suite on an H100 (fla_chunk_kda, profile ci, 2026-11-28): every
failing check had the `reset` gate regime, and measured rel RMS inf. Reproduced by this
script in a fresh process on an H100 the same day (002-fla_chunk_kda-reset_gate.md). The float64
recurrence is finite there: a reset only zeroes the decayed state before the token's write.

The script runs one sequence of T tokens where token 0 has g = -inf on every channel, then
the same inputs with g = -1000 at token 0 (exp(-1000) is also 0 in float64 and float32, so
both must give the same answer), and compares both with the float64 recurrence written out
below. It also runs fla's fused_recurrent_kda on the -inf input as a second opinion.

    FLA_DISABLE_BACKEND_DISPATCH=1 python 002-fla_chunk_kda-reset_gate.py [--device cuda]

Needs torch, NumPy and fla-core. Exits 1 while chunk_kda's output at g = -inf is non-finite
or off the oracle, 0 once it agrees, 2 when fla cannot be imported.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

# Relative to the oracle's largest magnitude: float32 inputs through TF32 dots (fla's chunk
# kernels) stay near 1e-3 at these sizes; a reset bug gives inf or NaN, not 1e-2.
TOLERANCE = 1e-2


def recurrence(q, k, v, g, beta, scale, h0):
    """KDA in float64, one head: S = exp(g_t) * S; S += beta_t k_t (v_t - S^T k_t)^T; o_t = S^T (scale q_t)."""
    S = h0.copy()
    o = np.zeros((q.shape[0], v.shape[1]))
    for t in range(q.shape[0]):
        S = np.exp(g[t])[:, None] * S
        S = S + beta[t] * np.outer(k[t], v[t] - S.T @ k[t])
        o[t] = S.T @ (scale * q[t])
    return o, S


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--T", type=int, default=4, help="tokens (default 4)")
    parser.add_argument("--K", type=int, default=64, help="key and value head size (default 64)")
    args = parser.parse_args()
    os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    try:
        import fla
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except ImportError as error:
        print(f"cannot import fla: {error}")
        return 2
    print(f"fla {getattr(fla, '__version__', '?')}, torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))  # fmt: skip

    T, K = args.T, args.K
    rng = np.random.default_rng(0)
    q = rng.standard_normal((T, K))
    k = rng.standard_normal((T, K))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    v = rng.standard_normal((T, K))
    g = -np.log1p(np.exp(-rng.standard_normal((T, K))))  # logsigmoid: finite, < 0
    beta = rng.uniform(0.2, 0.9, T)
    h0 = rng.standard_normal((K, K))
    scale = K**-0.5

    def torch_in(x):  # [T, ...] -> [1, T, 1, ...] float32 on the device
        return torch.tensor(x, dtype=torch.float32, device=args.device)[None, :, None]

    failed = False
    for label, first in (("g = -inf at token 0", -np.inf), ("g = -1000 at token 0", -1000.0)):
        g_case = g.copy()
        g_case[0] = first
        o_ref, s_ref = recurrence(q, k, v, g_case, beta, scale, h0)
        h0_t = torch.tensor(h0, dtype=torch.float32, device=args.device)[None, None]
        for name, fn in (("chunk_kda", chunk_kda), ("fused_recurrent_kda", fused_recurrent_kda)):
            o, s = fn(torch_in(q), torch_in(k), torch_in(v), torch_in(g_case), torch_in(beta), scale=scale,
                      initial_state=h0_t.clone(), output_final_state=True)  # fmt: skip
            o = o[0, :, 0].double().cpu().numpy()
            s = s[0, 0].double().cpu().numpy()
            err_o = np.abs(o - o_ref).max() / np.abs(o_ref).max()
            err_s = np.abs(s - s_ref).max() / np.abs(s_ref).max()
            finite = bool(np.isfinite(o).all() and np.isfinite(s).all())
            ok = finite and err_o <= TOLERANCE and err_s <= TOLERANCE
            print(f"{label:22s} {name:20s} o finite {np.isfinite(o).all()!s:5s} state finite "
                  f"{np.isfinite(s).all()!s:5s} max rel error o {err_o:.2e} state {err_s:.2e}: "
                  f"{'ok' if ok else 'WRONG'}")  # fmt: skip
            if not ok:
                print(f"  oracle o[0, :4] {o_ref[0, :4]}\n  {name} o[0, :4] {o[0, :4]}")
                failed |= name == "chunk_kda"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
