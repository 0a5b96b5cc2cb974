"""A/B of chunk_kda's block choices in one process, the method of kernels/NOTES.md: the same
inputs for every configuration, outputs compared with the baseline's, the whole list repeated
in rounds so that drift shows, and on a GPU the time of each chunk_* kernel.

    python -m kdaverify.perf.ab DIAG_COLS=1,0 DIAG_HEADS=1,4 [--B 1 --T 16384 --H 32 --K 128 --V 128]
        [--dtype bfloat16] [--mode fwd|fwdbwd] [--rounds 2] [--out FILE.jsonl] [--with-fla]

Each NAME=v1,v2,... names an integer field of kernels.kda_chunk.ChunkBlocks; the
configurations are the product of the lists, and the first value of each list makes the
baseline. Per configuration and round: one call (it compiles) whose outputs (o; with fwdbwd
also every gradient) are compared with the baseline's, bitwise and by relative RMS; the
median time of the call (perf.timing.median_ms: triton.testing.do_bench on a GPU); on a GPU,
torch.profiler's time per chunk_* kernel over five calls and `call_mib`, the memory the call
allocates at its peak beyond what was live before it (perf.timing.peak_mib less the inputs
and the outputs kept for comparison, so that configurations compare). Inputs are the perf sweep's
(perf.providers.inputs: DESIGN.md section 7). One line per configuration and round is printed
and, with --out, written as a JSON line. Name the card with every figure, and compare only
figures of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys

import torch

from .providers import Case, inputs
from .timing import kernel_ms, median_ms, peak_mib


def _assignment(text: str) -> tuple[str, list[int]]:
    from kdaverify.kernels.kda_chunk import blocks_assignment

    try:
        return blocks_assignment(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _call(t: dict, mode: str, fn=None):
    """The call to repeat, returning its outputs by name (o; with fwdbwd the gradients too).
    fn: the chunk_kda to call (default ours)."""
    from kdaverify.kernels import chunk_kda

    chunk_kda = fn or chunk_kda
    names = ("q", "k", "v", "g", "beta")
    if mode == "fwd":
        return lambda: {"o": chunk_kda(*(t[n] for n in names))[0]}
    leaves = {n: t[n].detach().requires_grad_() for n in names}
    do = torch.randn(t["v"].shape, generator=torch.Generator().manual_seed(1)).to(t["v"].device, t["v"].dtype)

    def step():
        for x in leaves.values():
            x.grad = None
        o, _ = chunk_kda(*(leaves[n] for n in names))
        o.backward(do)
        return {"o": o.detach(), **{f"d{n}": x.grad for n, x in leaves.items()}}

    return step


def _call_mib(call, device: str) -> float:
    """MiB the call allocates at its peak beyond what was live before it (a GPU only)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated() / 2**20
    return round(peak_mib(call, device) - before, 1)


def _rounded(ms: dict) -> dict:
    """Kernel times to 0.1 us, as the JSON lines print them."""
    return {k: round(v, 4) for k, v in ms.items()}


def _compare(out: dict, base: dict) -> dict:
    """Per output: 'bitwise', or its relative RMS distance from the baseline's (inf if not finite)."""
    diff = {}
    for n, x in out.items():
        ref = base[n]
        if torch.equal(x, ref):
            diff[n] = "bitwise"
        elif not torch.isfinite(x).all():
            diff[n] = float("inf")
        else:
            diff[n] = float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))
    return diff


def run(
    grid: dict[str, list[int]], case: Case, device: str, rounds: int, budget_s: float | None = None, other=None
) -> list[dict]:
    """Every configuration of grid (the product; first values = baseline) on case, `rounds`
    times; one row per configuration and round. other: (name, chunk_kda) of another
    implementation timed on the same inputs after each round, its row compared with the
    baseline by relative RMS and, on a GPU, with the time of every kernel it launches (so a
    gap to flash-linear-attention shows per kernel, in one process)."""
    from kdaverify.kernels import kda_chunk

    t = inputs(case, device)
    base_blocks = kda_chunk.BLOCKS
    configs = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    rows, baseline = [], None
    try:
        for r in range(1, rounds + 1):
            for cfg in configs:
                kda_chunk.BLOCKS = dataclasses.replace(base_blocks, **cfg)
                call = _call(t, case.mode)
                out = {n: x.detach().clone() for n, x in call().items()}
                baseline = baseline or out
                kw = {} if budget_s is None else {"budget_s": budget_s}
                ms, how = median_ms(call, device, **kw)
                row = {"round": r, **cfg, "ms": round(ms, 4), "timed": how, "vs_baseline": _compare(out, baseline)}
                if device == "cuda":
                    row["kernels_ms"] = _rounded(kernel_ms(call, prefix="chunk_"))
                    row["call_mib"] = _call_mib(call, device)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if other is not None:
                name, fn = other
                call = _call(t, case.mode, fn)
                out = {n: x.detach().clone() for n, x in call().items()}
                kw = {} if budget_s is None else {"budget_s": budget_s}
                ms, how = median_ms(call, device, **kw)
                row = {"round": r, "provider": name, "ms": round(ms, 4), "timed": how,
                       "vs_baseline": _compare(out, baseline)}  # fmt: skip
                if device == "cuda":
                    row["kernels_ms"] = _rounded(kernel_ms(call))
                    row["call_mib"] = _call_mib(call, device)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        kda_chunk.BLOCKS = base_blocks
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdaverify.perf.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("grid", nargs="+", type=_assignment, metavar="NAME=v1,v2", help="ChunkBlocks fields and values")
    for name, default in (("B", 1), ("T", 16384), ("H", 32), ("K", 128), ("V", 128)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--HV", type=int, default=None, help="value heads (default H)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--mode", default="fwd", choices=("fwd", "fwdbwd"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--out", default=None, help="also write the rows as JSON lines to this file")
    p.add_argument("--with-fla", action="store_true", help="also time flash-linear-attention's chunk_kda (fla-core) "
                   "on the same inputs, each round, with the time of each of its kernels")  # fmt: skip
    a = p.parse_args(argv)
    grid = dict(a.grid)
    if len(grid) != len(a.grid):
        p.error("a ChunkBlocks field is named twice")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    case = Case(B=a.B, T=a.T, H=a.H, HV=a.HV or a.H, K=a.K, V=a.V, op="chunk", provider="ours", mode=a.mode,
                dtype=a.dtype)  # fmt: skip
    if device == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    other = None
    if a.with_fla:
        from kdaverify.equivalence.adapters import fla_chunk_kda

        other = ("fla", fla_chunk_kda)
    rows = run(grid, case, device, a.rounds, other=other)
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
