"""Finding 011 (011-fla_chunk_kda-long_history_bias.md): flash-linear-attention 0.6.0's
chunk_kda scales its bf16 output o by about 1 - 2.6e-4 on average, against the float64
recurrence on the same (rounded) inputs; its own fused_recurrent_kda does not.

    python 011-fla_chunk_kda-long_history_bias.py [--seeds 8] [--K 100] [--T 1024] [--f32-default tf32|ieee]

Needs torch, Triton, NumPy, a CUDA GPU and fla-core 0.6.0 (the script sets
FLA_DISABLE_BACKEND_DISPATCH=1, so fla's Triton kernels are what runs). The inputs are those
of the suite's failing example (oracle_long_history, bf16): B1 T1024, 16 query heads and 64
value heads (GVA), K = V = 100, q and v normal times 0.01, k unit rows, g = logsigmoid(z) / 16
(the "mild" gate), beta uniform in (0, 1), all rounded to bf16; seed 0 draws the example
itself. For each seed the script prints the bias <o - o64, o64> / |o64|^2 and the relative
RMS error of o for chunk_kda and fused_recurrent_kda, o64 being the float64 recurrence
written out below, then each one's mean bias with its standard error. `--f32-default ieee`
sets TRITON_F32_DEFAULT before Triton compiles anything, so every float32 `tl.dot` that does
not name its precision multiplies in full fp32 instead of tf32 (dots that name 'tf32'
explicitly are not affected). Exits 1 while chunk_kda's mean bias is more than 5 standard
errors from zero and larger than 1e-4 in size, 0 otherwise.

Measured on an H200 (4 seeds, fresh processes): chunk_kda -2.579e-4 +- 2.2e-6 by default (tf32
products), -4.944e-5 +- 1.8e-6 with --f32-default ieee; fused_recurrent_kda -2.4e-6 both
times. At --K 128: -2.614e-4 +- 2.6e-6 and -4.987e-5 +- 1.9e-6. The finding's page has the
per-seed figures and the likely cause.
"""

import argparse
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--K", type=int, default=100, help="K = V")
    ap.add_argument("--f32-default", choices=("tf32", "ieee"), default=None)
    ap.add_argument("--T", type=int, default=1024, help="tokens (for reducing the case by hand)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    os.environ["FLA_DISABLE_BACKEND_DISPATCH"] = "1"  # before fla is imported: it reads the switch once
    if args.f32_default:
        os.environ["TRITON_F32_DEFAULT"] = args.f32_default  # before Triton compiles anything

    import numpy as np
    import torch
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    B, T, H, HV, K = 1, args.T, 16, 64, args.K
    V = K
    dev = args.device

    def recurrence64(q, k, v, g, beta, scale):
        """o_t = scale S_t^T q_t with S_t = Diag(exp g_t) S_{t-1} + beta_t k_t (v_t - (Diag(exp g_t)
        S_{t-1})^T k_t)^T, per value head hv (q, k of head hv // (HV / H)), in float64."""
        q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
        rep = HV // H
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
        S = torch.zeros(B, HV, K, V, dtype=torch.float64, device=dev)
        o = torch.empty(B, T, HV, V, dtype=torch.float64, device=dev)
        for t in range(T):
            S = S * g[:, t].exp()[..., None]
            kt = k[:, t]
            u = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt)
            S = S + beta[:, t][..., None, None] * kt[..., None] * u[..., None, :]
            o[:, t] = scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t])
        return o

    def bias_and_rms(x, ref):
        d = x.double() - ref
        n2 = (ref * ref).sum()
        return float((d * ref).sum() / n2), float(d.norm() / n2.sqrt())

    rows = {"chunk_kda": [], "fused_recurrent_kda": []}
    card = torch.cuda.get_device_name() if dev == "cuda" else dev
    print(f"{card}, torch {torch.__version__}, TRITON_F32_DEFAULT="
          f"{os.environ.get('TRITON_F32_DEFAULT', '(unset: tf32)')}; B{B} T{T} H{H} HV{HV} K=V={K} bf16")  # fmt: skip
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        q = 0.01 * rng.standard_normal((B, T, H, K))
        k = rng.standard_normal((B, T, H, K))
        k /= np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
        v = 0.01 * rng.standard_normal((B, T, HV, V))
        g = -np.logaddexp(0.0, -rng.standard_normal((B, T, HV, K))) / 16
        rng.uniform(size=(B, T, HV, K))  # (the suite draws a second gate array it does not use here)
        beta = rng.uniform(0.0, 1.0, size=(B, T, HV))
        q, k, v, g, beta = (torch.tensor(x, device=dev).to(torch.bfloat16) for x in (q, k, v, g, beta))
        scale = K**-0.5
        ref = recurrence64(q, k, v, g, beta, scale)
        line = [f"seed {seed}"]
        for name, fn in (("chunk_kda", chunk_kda), ("fused_recurrent_kda", fused_recurrent_kda)):
            o, _ = fn(q, k, v, g, beta, scale=scale, output_final_state=True)
            b, r = bias_and_rms(o, ref)
            rows[name].append(b)
            line.append(f"{name}: bias {b:+.3e} rel RMS {r:.3e}")
        print("  ".join(line), flush=True)
    status = 0
    for name, b in rows.items():
        b = np.array(b)
        se = b.std(ddof=1) / np.sqrt(len(b)) if len(b) > 1 else float("inf")
        print(f"{name}: mean bias {b.mean():+.3e} +- {se:.1e} (standard error, {len(b)} seeds)")
        if name == "chunk_kda" and abs(b.mean()) > 5 * se and abs(b.mean()) > 1e-4:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
