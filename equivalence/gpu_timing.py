"""Where the time of a GPU conformance run goes (issue 10): Triton compiles, autotuning, the
references, process start-up.

    python -m kdaverify.equivalence.gpu_timing MODULE:FUNC --out DIR [--device cuda]

Runs three fresh processes on one empty Triton cache folder (DIR/triton-cache):
  cold     autotuning results cached on disk (TRITON_CACHE_AUTOTUNING=1), nothing cached yet:
           what the first worker of a first run pays per compile bucket;
  warm     the same again, on the cache the cold process filled: what every later worker
           and every later run pays;
  retune   compiled kernels cached but autotuning results not (TRITON_CACHE_AUTOTUNING=0):
           what each worker paid before this lever (autotuning alone).
Each process times its start-up (imports), then for each compile bucket of the run
(strategies.sizes_for) and dtype the first call (compile + autotune), a second call (the
kernel alone), and the float64 oracle plus the same-precision references on the device and
on the CPU for the same case. Writes DIR/timing.json and DIR/timing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PHASES = {"cold": "1", "warm": "1", "retune": "0"}  # phase -> TRITON_CACHE_AUTOTUNING


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(target: str, device: str, started: float, path: Path) -> dict:
    """One process's measurements (see the module docstring), written to path after every
    case, so a process stopped by its time limit still leaves what it measured."""
    import torch

    from .cases import CaseSpec
    from .implementation import DTYPES, load_implementation
    from .relations import Harness
    from .strategies import sizes_for

    impl = load_implementation(target, device=device)
    out = {"imports_s": time.time() - started, "calls": []}
    sizes = sizes_for(device, impl.caps.head_sizes)
    for K, V, H, HV in sizes.buckets or [(8, 8, 2, 2)]:
        for dtype in impl.caps.dtypes:
            for packed in (False, True):
                seqlens = (37, 1, 62) if packed else None
                spec = CaseSpec(B=1 if packed else 2, T=100, H=H, G=HV // H, K=K, V=V, h0=True, seqlens=seqlens)
                h = Harness(impl, DTYPES[dtype])
                t = h.inputs(spec.arrays())
                row = dict(K=K, V=V, H=H, HV=HV, dtype=dtype, packed=packed)
                row["first_call_s"] = _timed(lambda t=t, h=h: h.run(t), device)
                row["second_call_s"] = _timed(lambda t=t, h=h: h.run(t), device)
                row["references_device_s"] = _timed(lambda t=t, h=h: [f(t) for f in h.references()], device)
                row["oracle_device_s"] = _timed(lambda t=t, h=h: h.oracle(t), device)
                cpu = {n: None if x is None else x.cpu() for n, x in t.items()}
                row["references_cpu_s"] = _timed(lambda c=cpu, h=h: [f(c) for f in h.references()], "cpu")
                row["oracle_cpu_s"] = _timed(lambda c=cpu, h=h: h.oracle(c), "cpu")
                out["calls"].append(row)
                path.write_text(json.dumps(out, indent=2))
                del t, cpu
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
    return out


def markdown(results: dict) -> str:
    lines = ["# Where the time of a GPU conformance run goes", ""]
    for phase, r in results["phases"].items():
        calls = r["calls"]
        first = sum(c["first_call_s"] for c in calls)
        second = sum(c["second_call_s"] for c in calls)
        refs = sum(c["references_device_s"] + c["oracle_device_s"] for c in calls)
        refs_cpu = sum(c["references_cpu_s"] + c["oracle_cpu_s"] for c in calls)
        lines += [
            f"## {phase} (TRITON_CACHE_AUTOTUNING={PHASES[phase]}): process {r['process_s']:.1f} s{r['note']}",
            "",
            f"imports {r['imports_s']:.1f} s; first calls (compile + autotune) {first:.1f} s; second calls "
            f"{second:.2f} s; oracle + references on the device {refs:.1f} s, on the CPU {refs_cpu:.1f} s "
            f"({len(calls)} cases: every compile bucket x dtype x packed/unpacked)",
            "",
            "| K | V | H | HV | dtype | packed | first call s | second call s | refs+oracle device s | on CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in calls:
            dev, cpu = c["references_device_s"] + c["oracle_device_s"], c["references_cpu_s"] + c["oracle_cpu_s"]
            lines.append(
                f"| {c['K']} | {c['V']} | {c['H']} | {c['HV']} | {c['dtype']} | {c['packed']} | "
                f"{c['first_call_s']:.2f} | {c['second_call_s']:.4f} | {dev:.2f} | {cpu:.2f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", metavar="MODULE:FUNC")
    p.add_argument("--out", required=True, help="folder for timing.json, timing.md and the Triton cache")
    p.add_argument("--device", default="cuda")
    p.add_argument("--phase-timeout", type=float, default=150.0, help="seconds each measuring process may run")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: one measuring process
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.phase:
        measure(args.target, args.device, float(os.environ["KDAVERIFY_STARTED"]), out / f"{args.phase}.json")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    results = {"target": args.target, "device": args.device, "phases": {}}
    for phase, autotune_cache in PHASES.items():
        env = dict(
            os.environ, TRITON_CACHE_DIR=str(out / "triton-cache"), TRITON_CACHE_AUTOTUNING=autotune_cache,
            KDAVERIFY_STARTED=str(time.time()),
        )  # fmt: skip
        if phase == "retune":  # compiled kernels stay cached; the autotuning results go
            for f in (out / "triton-cache").rglob("*.autotune.json"):
                f.unlink()
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "kdaverify.equivalence.gpu_timing",
            args.target,
            f"--out={out}",
            f"--phase={phase}",
        ]
        try:
            subprocess.run([*cmd, f"--device={args.device}"], env=env, check=True, timeout=args.phase_timeout)
            note = ""
        except subprocess.TimeoutExpired:
            note = f" (stopped at its {args.phase_timeout:g} s limit: the cases below are those it finished)"
        path = out / f"{phase}.json"
        r = json.loads(path.read_text()) if path.exists() else {"imports_s": float("nan"), "calls": []}
        r["process_s"] = time.perf_counter() - t0
        r["note"] = note
        results["phases"][phase] = r
        print(f"{phase}: {r['process_s']:.1f} s", flush=True)
    (out / "timing.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "timing.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
