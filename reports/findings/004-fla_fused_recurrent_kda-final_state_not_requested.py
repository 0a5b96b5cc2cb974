"""Finding 004: flash-linear-attention 0.6.0's fused_recurrent_kda returns a different o with
output_final_state=True than with output_final_state=False, on the same inputs.

    python 004-fla_fused_recurrent_kda-final_state_not_requested.py [SEEDS]

Needs torch, Triton, a CUDA GPU and fla-core 0.6.0 (the script sets
FLA_DISABLE_BACKEND_DISPATCH=1, so fla's Triton kernel is what runs). For each seed (default
20), one bf16 case of the suite's failing shape (B1 T7 H16 HV64 K = V = 100, an initial
state) is run twice, asking for the final state and not; o is compared bit for bit, and
where it differs both are compared with the float64 recurrence written out below. Exits 1
when o differs on any seed (the defect is there), 0 when it is equal on every seed.
"""

import os
import sys

os.environ["FLA_DISABLE_BACKEND_DISPATCH"] = "1"  # before fla is imported: it reads the switch once

import fla  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from fla.ops.kda import fused_recurrent_kda  # noqa: E402

B, T, H, HV, K, V = 1, 7, 16, 64, 100, 100


def recurrent64(q, k, v, g, beta, scale, h0):
    """KDA by its recurrence in float64, per value head (q, k shared by HV / H value heads):
    S_t = Diag(exp g_t) S_{t-1};  S_t += beta_t k_t (v_t - S_t^T k_t)^T;  o_t = scale S_t^T q_t."""
    q, k = (x.double().repeat_interleave(HV // H, dim=2) for x in (q, k))
    v, g, beta = v.double(), g.double(), beta.double()
    S = h0.double().clone()
    o = torch.empty(B, T, HV, V, dtype=torch.float64, device=q.device)
    for t in range(T):
        S = S * g[:, t].exp()[..., None]
        u = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * u)
        o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o


def rel_rms(o, ref):
    return float((o.double() - ref).norm() / ref.norm())


def main(seeds: int) -> int:
    scale = K**-0.5
    differs = 0
    for seed in range(seeds):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        r = lambda *shape, gen=gen: torch.randn(*shape, generator=gen, device="cuda")  # noqa: E731

        q, k = r(B, T, H, K).bfloat16(), F.normalize(r(B, T, H, K), dim=-1).bfloat16()
        v, g = r(B, T, HV, V).bfloat16(), F.logsigmoid(r(B, T, HV, K)).bfloat16()
        beta = torch.rand(B, T, HV, generator=gen, device="cuda").bfloat16()
        h0 = r(B, HV, K, V)
        o_f, _ = fused_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=h0.clone(), output_final_state=False)
        o_t, _ = fused_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=h0.clone(), output_final_state=True)
        torch.cuda.synchronize()
        n = int((o_f != o_t).sum())
        if not n:
            print(f"seed {seed}: o bitwise equal")
            continue
        differs += 1
        ref = recurrent64(q, k, v, g, beta, scale, h0)
        i = tuple((o_f != o_t).nonzero()[0].tolist())
        print(f"seed {seed}: o differs in {n} of {o_f.numel()} elements; first at {list(i)}: "
              f"False -> {o_f[i].item()!r}, True -> {o_t[i].item()!r}, float64 recurrence {ref[i].item()!r}; "
              f"rel RMS vs float64: False {rel_rms(o_f, ref):.3e}, True {rel_rms(o_t, ref):.3e}")  # fmt: skip
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"fla {fla.__version__}: o differed on {differs} of {seeds} seeds")  # fmt: skip
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
