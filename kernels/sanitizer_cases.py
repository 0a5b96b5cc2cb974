"""The small cases our kernels run under compute-sanitizer (issue 7's memory check), one
command for memcheck and racecheck alike:

    compute-sanitizer --tool memcheck --error-exitcode 9 python -m kdaverify.kernels.sanitizer_cases
    compute-sanitizer --tool racecheck --racecheck-report hazard python -m kdaverify.kernels.sanitizer_cases

Shapes chosen to reach the masks: ragged T (77: a last chunk of 13 tokens, not a multiple of
the 16-token sub-chunk), head sizes that are not powers of two (K = 20, V = 48; K = 100,
V = 70), GVA (H = 2, HV = 4), an initial state, a packed batch with a length-1 sequence and
an empty one, a reset (g = -inf) in the last chunk of one value head (the kernels split by
resets then run both launches, ChunkBlocks.RESET_SPLIT), and the decode pool with a padding
index (-1) and state_layout "vk", and the DPLR kernel at the same shapes; then decode
batches that launch one warp per program (130 rows at K = V = 128; V = 8). chunk_kda
runs forward and backward (every gradient, dh0 included) and a second backward through the
same graph (the path without the forward's kept operands), bf16 and fp32. With PyTorch's
caching allocator on, an out-of-bounds access that lands inside another cached block is not
seen: run with PYTORCH_NO_CUDA_MEMORY_CACHING=1. Prints one line per case; the sanitizer's
exit code is the verdict. Block choices not yet the default are checked by naming them after
the device, as perf.ab takes them (one value each):

    compute-sanitizer --tool memcheck python -m kdaverify.kernels.sanitizer_cases cuda GRADS_DIAG_COLS=0

`sweep` runs instead one forward + backward at the perf sweep's shape (run_sweep_shape), the
compile variants the cases above do not build: run it too before a block choice is taken.
"""

from __future__ import annotations

import torch

from .dplr_fused_recurrent import fused_recurrent_dplr_delta_rule
from .kda_chunk import chunk_kda
from .kda_fused_recurrent import fused_recurrent_kda

# (T, H, HV, K, V, cu_seqlens or None, with an initial state)
CASES = (
    (77, 2, 4, 20, 48, None, True),
    (131, 1, 2, 100, 70, (0, 1, 65, 65, 131), True),
)


def _inputs(T, H, HV, K, V, N, dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    q, k = rand(1, T, H, K).to(dtype), rand(1, T, H, K).to(dtype)
    v = rand(1, T, HV, V).to(dtype)
    g = (-torch.rand(1, T, HV, K, generator=gen) * 2).to(device, dtype)
    beta = torch.rand(1, T, HV, generator=gen).to(device, dtype)
    h0 = rand(N, HV, K, V) * 0.1
    return q, k, v, g, beta, h0


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(device: str = "cuda") -> None:
    for dtype in (torch.bfloat16, torch.float32):
        for T, H, HV, K, V, cu, with_h0 in CASES:
            N = 1 if cu is None else len(cu) - 1
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int64, device=device)
            q, k, v, g, beta, h0 = _inputs(T, H, HV, K, V, N, dtype, device, seed=T)
            g[0, T - 7, HV - 1, :3] = float("-inf")  # a reset: the last chunk of the last head
            h0 = h0 if with_h0 else None
            leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
            h0_leaf = None if h0 is None else h0.detach().requires_grad_()
            o, ht = chunk_kda(*leaves, initial_state=h0_leaf, output_final_state=True, cu_seqlens=cu_t)
            loss = o.float().square().sum() + ht.square().sum()
            loss.backward(retain_graph=True)
            loss.backward()  # the second finds the forward's kept operands freed (ChunkBlocks.DH_OPS)
            _sync(device)
            print(f"chunk_kda fwd+bwd {dtype} T={T} H={H} HV={HV} K={K} V={V} cu={cu}", flush=True)
            with torch.no_grad():
                fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_t)
                # decode: one token per sequence from a pool of 5 slots, padding included, "vk"
                pool = torch.randn(5, HV, V, K, device=device)
                idx = torch.tensor([3, -1, 0], dtype=torch.int64, device=device)
                qd, kd, vd, gd, bd, _ = _inputs(3, H, HV, K, V, 1, dtype, device, seed=3)
                rows = [x.reshape(3, 1, *x.shape[2:]) for x in (qd, kd, vd, gd, bd)]
                decode = dict(state_indices=idx, state_layout="vk", inplace_final_state=True)
                fused_recurrent_kda(*rows, initial_state=pool, **decode)
            _sync(device)
            print(f"fused_recurrent_kda + decode pool {dtype} T={T} K={K} V={V}", flush=True)
            with torch.no_grad():  # the DPLR kernel: a and b from k's shape, gk = g
                a = torch.randn(1, T, HV, K, device=device).to(dtype) * 0.1
                b = torch.randn(1, T, HV, K, device=device).to(dtype) * 0.1
                fused_recurrent_dplr_delta_rule(q, k, v, a, b, g.nan_to_num(neginf=-30.0), initial_state=h0,
                                                output_final_state=True, cu_seqlens=cu_t)  # fmt: skip
            _sync(device)
            print(f"fused_recurrent_dplr_delta_rule {dtype} T={T} K={K} V={V}", flush=True)
        # one-warp launches (config_for at a wide decode batch, and at V <= 8), whose sums over K
        # every lane holds a copy of (kda_fused_recurrent.col_sum): racecheck's case
        for N, HV, K, V in ((130, 4, 128, 128), (6, 2, 20, 8)):
            with torch.no_grad():
                qd, kd, vd, gd, bd, h0 = _inputs(N, HV, HV, K, V, N, dtype, device, seed=N)
                rows = [x.reshape(N, 1, *x.shape[2:]) for x in (qd, kd, vd, gd, bd)]
                fused_recurrent_kda(*rows, initial_state=h0, output_final_state=True)
            _sync(device)
            print(f"fused_recurrent_kda decode {dtype} N={N} HV={HV} K={K} V={V}", flush=True)


def run_sweep_shape(device: str = "cuda", T: int = 16384, H: int = 32, K: int = 128) -> None:
    """One chunk_kda forward + backward at the perf sweep's B1 T16384 H32 K = V = 128 bf16
    (perf.ab's case: no initial state, no final state, a finite gate, one sequence): the
    compile variants the small cases above never build (no dht, no dh0, RESETS off, not
    varlen). A candidate block choice that faulted there ran clean on the small cases
    (kernels/NOTES.md, nineteenth session: DH_STORED). About 3 GB of device memory. T, H, K
    smaller only for a smoke test under the interpreter."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    B = 1
    q, k, v = (torch.randn(B, T, H, K, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    k = k / k.float().norm(dim=-1, keepdim=True).to(k.dtype)
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=gen)) / 16).to(device, torch.bfloat16)
    beta = torch.rand(B, T, H, generator=gen).to(device, torch.bfloat16)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    o, _ = chunk_kda(*leaves)
    o.backward(torch.randn(o.shape, generator=gen).to(device, o.dtype))
    _sync(device)
    print(f"chunk_kda fwd+bwd bf16 B={B} T={T} H={H} K=V={K} (the perf sweep's shape)", flush=True)


def main(argv: list[str]) -> None:
    """Arguments, in any order: the device (cuda, default, or cpu), `sweep` (only the perf
    sweep's shape, run_sweep_shape), and block choices NAME=v (ChunkBlocks fields)."""
    from dataclasses import replace

    from . import kda_chunk

    device, sweep, choices = "cuda", False, {}
    for text in argv:
        if text in ("cuda", "cpu"):
            device = text
        elif text == "sweep":
            sweep = True
        else:
            try:
                name, values = kda_chunk.blocks_assignment(text)
            except ValueError as e:
                raise SystemExit(f"sanitizer_cases: {e}; or cuda, cpu, sweep") from None
            if len(values) != 1:
                raise SystemExit(f"sanitizer_cases: {name}: expected one value, got {values}")
            choices[name] = values[0]
    kda_chunk.BLOCKS = replace(kda_chunk.BLOCKS, **choices)
    if choices:
        print(f"block choices: {choices}", flush=True)
    run_sweep_shape(device) if sweep else run(device)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
