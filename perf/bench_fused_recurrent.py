"""On a CUDA GPU: check kdaverify's fused_recurrent_kda against the float64 oracle at a few
shapes, then time decode (one token, fp32 state [N, 32, 128, 128]) next to a measured
device-to-device copy, and next to flash-linear-attention's fused_recurrent_kda when fla is
importable. Standalone, about a minute of GPU time:

    python -m kdaverify.perf.bench_fused_recurrent
    python -m kdaverify.perf.bench_fused_recurrent --configs   # every (BV, warps) of decode
    python -m kdaverify.perf.bench_fused_recurrent --tokens    # decode vs token-loop launch by T

`--configs` times the decode kernel at each N under every launch configuration (BV in 16 to
128, 1 to 8 warps, in place of `config_for`'s choice), each output compared with the default
configuration's: the sweep `config_for` was chosen from on an H100, to rerun on another card.
`--tokens` times calls of T tokens per sequence (N = 1, 8 and 64) under both of launch_config's
choices, config_for's and the token loop's, for the crossover TOKEN_LOOP_FROM.

Accuracy verdicts use the suite's tolerance rule (equivalence.relations.Harness). Decode
traffic is the state read once and written once (2 * N * 32 * 128 * 128 * 4 bytes) plus the
token's q, k, v, g, beta and o; bandwidth is that over the median time of
triton.testing.do_bench. The copy ceiling counts bytes read plus written.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")  # fla's own Triton kernels, before fla is imported

import torch  # noqa: E402

HV, K, V = 32, 128, 128  # the decode shape of DESIGN.md section 7
NS = (1, 64, 256)


def check_oracle(device: str = "cuda", cases=None) -> bool:
    """The kernel against the float64 oracle under the suite's tolerance rule (each verdict
    printed); cases: CaseSpecs (default: four GPU-sized ones)."""
    from kdaverify.equivalence.cases import CaseSpec
    from kdaverify.equivalence.implementation import DTYPES, Implementation
    from kdaverify.equivalence.relations import Harness
    from kdaverify.kernels import fused_recurrent_kda

    fn = fused_recurrent_kda
    impl = Implementation(fn, "fused_recurrent_kda", fn.kdaverify_capabilities, device)
    cases = cases or [
        CaseSpec(B=2, T=300, H=2, G=2, K=128, V=128, h0=True, gate="mild", seed=1),
        CaseSpec(T=700, H=1, G=2, K=100, V=70, h0=True, gate="safe", seqlens=(1, 299, 400), seed=2),
        CaseSpec(B=3, T=40, H=2, G=1, K=256, V=256, h0=True, gate="strong", seed=3),
        CaseSpec(B=64, T=1, H=32, G=1, K=K, V=V, h0=True, gate="logsigmoid", seed=4),  # decode
    ]
    ok = True
    for dtype in ("float32", "bfloat16"):
        h = Harness(impl, DTYPES[dtype], record=lambda v: print("   ", v))
        for spec in cases:
            print(f"  {dtype} {spec}")
            try:
                h.expect_oracle("oracle", h.inputs(spec.arrays()), spec.scale)
            except AssertionError:
                ok = False
    return ok


def check_large_pool() -> bool:
    """Slots past 2^31 / (HV K V) of a state pool: int64 state offsets (pool of ~8.8 GB)."""
    from kdaverify.equivalence.tolerance import errors, judge
    from kdaverify.kernels import fused_recurrent_kda
    from kdaverify.reference import kda_recurrent, kda_recurrent_np

    P, N = 4200, 4
    slots = torch.arange(P - N, P, device="cuda")  # slot * HV * K * V > 2^31
    assert int(slots[0]) * HV * K * V > 2**31
    pool = torch.empty(P, HV, K, V, device="cuda")
    pool[slots] = torch.randn(N, HV, K, V, device="cuda")
    q, k, v, g, beta = _decode_inputs(N, torch.float32)
    h0 = pool[slots].clone()
    o, S = fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, state_indices=slots, inplace_final_state=True)
    args = [x.cpu() for x in (q, k, v, g, beta)]
    gold = kda_recurrent_np(*args, initial_state=h0.cpu(), output_final_state=True)
    ref = kda_recurrent(*args, initial_state=h0.cpu(), output_final_state=True)  # float32: the budget's scale
    good = True
    pairs = {"o": (o, gold[0], ref[0]), "final_state": (S[slots], gold[1], ref[1])}
    for what, (x, want, r) in pairs.items():
        verdict = judge(
            f"large pool (P = {P}, slots {P - N}..{P - 1}): {what}", x, want, [errors(r, want)], torch.float32
        )
        print("   ", verdict)
        good = good and verdict.passed
    del pool
    torch.cuda.empty_cache()
    return good


def _decode_inputs(N: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(N, 1, HV, K, device="cuda", generator=gen).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(N, 1, HV, K, device="cuda", generator=gen), dim=-1).to(dtype)
    v = torch.randn(N, 1, HV, V, device="cuda", generator=gen).to(dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(N, 1, HV, K, device="cuda", generator=gen)).div(16).to(dtype)
    beta = torch.rand(N, 1, HV, device="cuda", generator=gen).to(dtype)
    return q, k, v, g, beta


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written per second."""
    from triton.testing import do_bench

    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def time_decode() -> None:
    try:
        from fla.ops.kda import fused_recurrent_kda as fla_kda
    except ImportError:
        fla_kda = None
    ceiling = copy_bandwidth()
    print(f"\ndecode, bf16 q/k/v/g/beta, fp32 state [N, {HV}, {K}, {V}]; copy ceiling {ceiling / 1e12:.2f} TB/s")
    print("| N | provider | median | state+token bytes | TB/s | % of copy | max diff vs ours |")
    print("|---|---|---|---|---|---|---|")
    for N in NS:
        _decode_rows(N, ceiling, fla_kda)


def _decode_rows(N: int, ceiling: float, fla_kda) -> None:
    from kdaverify.kernels import fused_recurrent_kda
    from triton.testing import do_bench

    q, k, v, g, beta = _decode_inputs(N, torch.bfloat16)
    h0 = torch.randn(N, HV, K, V, device="cuda")
    pool = h0.clone()
    idx = torch.arange(N, device="cuda")
    # state read and written, the token's inputs read, o (the size of v) written
    nbytes = 2 * h0.numel() * 4 + sum(x.numel() * x.element_size() for x in (q, k, v, g, beta, v))
    ours = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    runs = {
        "ours (state returned)": lambda: fused_recurrent_kda(
            q, k, v, g, beta, initial_state=h0, output_final_state=True),
        "ours (pool, in place; 1 host sync)": lambda: fused_recurrent_kda(
            q, k, v, g, beta, initial_state=pool, state_indices=idx, inplace_final_state=True),
    }  # fmt: skip
    if fla_kda is not None:
        runs["fla fused_recurrent_kda"] = lambda: fla_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    for name, fn in runs.items():
        o, S = fn()  # the first call is checked: the in-place one against ours, from the same state
        diff = max(float((o.float() - ours[0].float()).abs().max()), float((S - ours[1]).abs().max()))
        ms = do_bench(fn, warmup=25, rep=200)
        bw = nbytes / (ms * 1e-3)
        print(f"| {N} | {name} | {ms * 1e3:.1f} us | {nbytes / 1e6:.1f} MB | {bw / 1e12:.2f} | "
              f"{100 * bw / ceiling:.0f}% | {diff:.1e} |")  # fmt: skip


def sweep_configs(bvs=(16, 32, 64, 128), warps=(1, 2, 4, 8)) -> None:
    """Decode at each N of NS under every (BV, num_warps), against the copy ceiling."""
    from kdaverify.kernels import fused_recurrent_kda
    from kdaverify.kernels import kda_fused_recurrent as fr
    from triton.testing import do_bench

    ceiling = copy_bandwidth()
    default = fr.config_for
    print(f"\ndecode configurations, bf16 token, fp32 state [N, {HV}, {K}, {V}]; copy {ceiling / 1e12:.2f} TB/s")
    print("| N | BV | warps | median | % of copy | max diff vs config_for's | config_for's choice |")
    print("|---|---|---|---|---|---|---|")
    for N in NS:
        q, k, v, g, beta = _decode_inputs(N, torch.bfloat16)
        h0 = torch.randn(N, HV, K, V, device="cuda")
        nbytes = 2 * h0.numel() * 4 + sum(x.numel() * x.element_size() for x in (q, k, v, g, beta, v))
        chosen = default(K, V, N * HV)
        run = functools.partial(fused_recurrent_kda, q, k, v, g, beta, initial_state=h0, output_final_state=True)
        base = run()
        try:
            for bv in bvs:
                for w in warps:
                    fr.config_for = lambda *_, bv=bv, w=w: fr.RecurrentConfig(BV=bv, num_warps=w)
                    o, S = run()
                    diff = max(float((o.float() - base[0].float()).abs().max()), float((S - base[1]).abs().max()))
                    ms = do_bench(run, warmup=25, rep=200)
                    mark = "<-" if (bv, w) == (chosen.BV, chosen.num_warps) else ""
                    print(f"| {N} | {bv} | {w} | {ms * 1e3:.1f} us | {100 * nbytes / (ms * 1e-3) / ceiling:.0f}% | "
                          f"{diff:.1e} | {mark} |", flush=True)  # fmt: skip
        finally:
            fr.config_for = default


def sweep_tokens(ns=(1, 8, 64), ts=(1, 2, 4, 8, 16, 32, 64, 256)) -> None:
    """Calls of T tokens per sequence from a state, under config_for's launch and under the
    token loop's (token_loop_config, prefetch as launch_config sets it), median ms of each."""
    from kdaverify.kernels import kda_fused_recurrent as fr
    from triton.testing import do_bench

    default = fr.launch_config
    launches = {
        "config_for": lambda K_, V_, NHV, _: fr.config_for(K_, V_, NHV),
        "token loop": lambda K_, V_, NHV, _: default(K_, V_, NHV, fr.TOKEN_LOOP_FROM),
    }
    print(f"\ncalls of T tokens per sequence, bf16, fp32 state [N, {HV}, {K}, {V}]")
    print(f"TOKEN_LOOP_FROM = {fr.TOKEN_LOOP_FROM}")
    print("| N | T | config_for | token loop | token loop's launch | max diff |")
    print("|---|---|---|---|---|---|")
    try:
        for N in ns:
            for T in ts:
                ms, outs = {}, {}
                run = _tokens_call(N, T)
                for name, launch in launches.items():
                    fr.launch_config = launch
                    outs[name] = run()
                    ms[name] = do_bench(run, warmup=10, rep=100)
                a, b = outs.values()
                diff = max(float((a[0].float() - b[0].float()).abs().max()), float((a[1] - b[1]).abs().max()))
                cfg = default(K, V, N * HV, fr.TOKEN_LOOP_FROM)
                print(f"| {N} | {T} | {ms['config_for']:.4f} ms | {ms['token loop']:.4f} ms | {cfg} | {diff:.1e} |",
                      flush=True)  # fmt: skip
    finally:
        fr.launch_config = default


def _tokens_call(N: int, T: int):
    """A call of N sequences of T tokens (the decode token repeated) from a random state."""
    from kdaverify.kernels import fused_recurrent_kda

    q, k, v, g, beta = (x.expand(N, T, *x.shape[2:]).contiguous() for x in _decode_inputs(N, torch.bfloat16))
    h0 = torch.randn(N, HV, K, V, device="cuda")
    return functools.partial(fused_recurrent_kda, q, k, v, g, beta, initial_state=h0, output_final_state=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if argv == ["--configs"]:
        sweep_configs()
        return 0
    if argv == ["--tokens"]:
        sweep_tokens()
        return 0
    if argv:
        print(f"unknown arguments {argv}: expected none, --configs or --tokens")
        return 2
    print("accuracy against the float64 oracle (suite tolerance rule):")
    ok = check_oracle()
    ok = check_large_pool() and ok
    time_decode()
    print("\naccuracy:", "all ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
