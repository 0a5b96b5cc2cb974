"""The kill table: every negative control through the conformance suite.

    kdaverify mutants [--jobs N] [--out DIR] [-- extra pytest options]
    python -m kdaverify.equivalence.killtable (the same)

Runs the conformance suite with `--kda-impl=kdaverify.equivalence.mutants:NAME` for the correct
control and each mutant (N at a time), reads each conformance report, and prints which
checks rejected which mutant. Exits 1 if the correct control fails, or if a mutant is not
rejected by a check it is meant for (mutants.MEANT_FOR).

With --targeted (what CI runs) each mutant runs only the checks it is meant for, and the
correct control every check: that proves the same verdicts in a fraction of the time. The
full run, every check for every mutant, is the table committed in reports/killtable.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .mutants import GPU_ONLY, MEANT_FOR, MUTANTS, correct_control
from .plugin import SUITE


def selection(checks: tuple[str, ...]) -> str:
    """A pytest -k expression for exactly these checks (test ids are test_conformance[CHECK-DTYPE])."""
    return " or ".join(f"[{c}-" for c in checks)


def run_one(name: str, out: Path, extra: list[str], targeted: bool = False) -> dict:
    report = out / name
    cmd = [
        sys.executable, "-m", "pytest", str(SUITE), "-q", "-p", "no:cacheprovider",
        f"--kda-impl=kdaverify.equivalence.mutants:{name}", f"--kda-report={report}", "--kda-profile=mutants", *extra,
    ]  # fmt: skip
    # a mutant whose forward is the correct control's by construction (a wrong backward only)
    # names the checks that can tell it apart; the rest would only repeat the control's run
    only = getattr(MUTANTS.get(name), "kdaverify_killtable_k", None)
    if targeted and name in MEANT_FOR:
        cmd += ["-k", selection(MEANT_FOR[name])]
    elif only:
        cmd += ["-k", only]
    started = time.perf_counter()
    # one thread per run: the runs themselves fill the cores, and oversubscribed torch
    # thread pools made each run ~8x slower on a 2-core machine
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    path = report / "report.json"
    if not path.exists():  # the run broke before any check ran: show why
        raise RuntimeError(f"{name}: no report (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(path.read_text())
    failed = sorted({r["check"] for r in data["checks"] if r["outcome"] == "failed"})
    return {"name": name, "conforms": data["conforms"], "killed_by": failed, "seconds": time.perf_counter() - started}


def _on_gpu(extra: list[str]) -> bool:
    """Whether the suite's runs will use a CUDA device (--kda-device, else cuda if present)."""
    for a in extra:
        if a.startswith("--kda-device="):
            return a.split("=", 1)[1].startswith("cuda")
    import torch

    return torch.cuda.is_available()


def table(rows: list[dict]) -> str:
    lines = [
        "| implementation | the bug it stands for | meant for | rejected by | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        doc = (MUTANTS.get(r["name"], correct_control).__doc__ or "").strip().splitlines()[0]
        if r.get("gpu_only"):
            verdict = f"GPU only, not run here ({GPU_ONLY[r['name']]})"
        elif r["name"] == "correct_control":
            verdict = "passes (correct)" if r["conforms"] else "REJECTED: false alarm"
        else:
            verdict = _verdict(r)
        meant = ", ".join(MEANT_FOR.get(r["name"], ())) or "-"
        lines.append(f"| `{r['name']}` | {doc} | {meant} | {', '.join(r['killed_by']) or '-'} | {verdict} |")
    return "\n".join(lines)


def _verdict(r: dict) -> str:
    if not r["killed_by"]:
        return "SURVIVED"
    if not set(MEANT_FOR.get(r["name"], ())) & set(r["killed_by"]):
        return "killed, but NOT by the check meant for it"
    return "killed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="pytest runs at a time (default 2)")
    p.add_argument("--out", default=None, help="folder for the per-mutant reports and killtable.md")
    p.add_argument("--only", nargs="*", default=None, help="run only these mutants")
    p.add_argument("--targeted", action="store_true", help="each mutant runs only the checks it is meant for")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    names = ["correct_control", *(args.only or MUTANTS)]
    out = Path(args.out or tempfile.mkdtemp(prefix="kdaverify-mutants-"))
    gpu_only = [n for n in names if n in GPU_ONLY and not _on_gpu(extra)]
    names = [n for n in names if n not in gpu_only]
    print(f"running {len(names)} implementations through the conformance suite, {args.jobs} at a time", flush=True)
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(lambda n: run_one(n, out, extra, args.targeted), names):
            status = "conforms" if r["conforms"] else f"rejected by {', '.join(r['killed_by'])}"
            print(f"  {r['name']:<32} {r['seconds']:6.1f} s  {status}", flush=True)
            rows.append(r)
    rows += [{"name": n, "conforms": None, "killed_by": [], "gpu_only": True} for n in gpu_only]
    text = table(rows)
    print("\n" + text)
    (out / "killtable.md").write_text("# Kill table\n\n" + text + "\n")
    print(f"\nreports in {out}")
    control_ok = rows[0]["conforms"]
    survivors = [r["name"] for r in rows[1:] if _verdict(r) != "killed" and not r.get("gpu_only")]
    if not control_ok:
        print("FAIL: the correct control was rejected: the suite raises a false alarm")
    if survivors:
        print(f"FAIL: {len(survivors)} wrong implementation(s) not rejected by the check meant for them: "
              f"{', '.join(survivors)}")  # fmt: skip
    ok = control_ok and not survivors
    killed = len(rows) - 1 - len(survivors) - len(gpu_only)
    print(
        f"{killed} killed by the check meant for them, {len(survivors)} not, {len(gpu_only)} GPU-only not run; "
        f"correct control {'passed' if control_ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
