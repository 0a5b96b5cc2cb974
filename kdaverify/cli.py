"""The kdaverify command: the nox sessions, for people who do not use nox.

    kdaverify verify MODULE:FUNC [--dtypes ... capability options] [--out DIR] [--junitxml FILE] [-- pytest args]
    kdaverify selfcheck
    kdaverify mutants [--jobs N] [--out DIR] [--only NAME ...]
    kdaverify perf [--preset quick|full|cpu|smoke] [--device cuda|cpu] [--providers A,B] [--out DIR] [-- pytest args]
    kdaverify report [FOLDER ...]
    kdaverify matrix [--device cuda|cpu] [--profile P] [--out DIR] [--only NAME ...] [-- verify options]

`kdaverify COMMAND --help` describes each. `verify` exits 0 if and only if the implementation
conforms; every other failure exits non-zero too (1: a check failed; 2: a usage error).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from kdaverify.equivalence.capabilities import option_specs

COMMANDS: dict[str, tuple[str, callable, callable]] = {}  # name -> (help, add_arguments, run)


def command(name: str, help: str, add_arguments=lambda p: None):
    def register(run):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


def report_dir(target: str) -> Path:
    """Where verify writes by default: ./kdaverify-reports/<target with safe characters>."""
    return Path("kdaverify-reports") / re.sub(r"[^A-Za-z0-9_.-]+", "-", target)


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", metavar="MODULE:FUNC", help="the callable to verify (flash-linear-attention's chunk_kda contract)"
    )
    caps = p.add_argument_group("what the implementation declares (default: its kdaverify_capabilities attribute)")
    for field, name, kw in option_specs():
        caps.add_argument(f"--{name}", dest=field, **kw)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--profile", default=None, help="Hypothesis profile: ci, dev, deep, gpu, mutants (default: "
                   "KDAVERIFY_PROFILE, else gpu on a CUDA device and dev elsewhere)")  # fmt: skip
    p.add_argument("--out", default=None, help="report folder (default: kdaverify-reports/<target>)")
    p.add_argument("--junitxml", default=None, metavar="FILE", help="also write a JUnit XML file for CI systems")
    p.add_argument(
        "-n", "--workers", default=None, help="pytest-xdist workers (a number or 'auto'; needs pytest-xdist)"
    )
    p.add_argument("--no-progress", action="store_true", help="pytest's own output instead of a progress bar")


@command("verify", "run the conformance suite against MODULE:FUNC and write a report", _verify_arguments)
def verify(args) -> int:
    import pytest

    from kdaverify.equivalence.plugin import SUITE

    out = Path(args.out) if args.out else report_dir(args.target)
    argv = [str(SUITE), f"--kda-impl={args.target}", f"--kda-report={out}", "-q", "-p", "no:cacheprovider"]
    # short tracebacks: each failure keeps its falsifying CaseSpec and @reproduce_failure blob,
    # which the report quotes; the one-screen summary still comes last
    argv += ["--no-header", "-rN", "--tb=short"]
    for field, name, _ in option_specs():
        value = getattr(args, field)
        if value is not None:
            argv.append(f"--kda-{name}={value}")
    if args.device:
        argv.append(f"--kda-device={args.device}")
    if args.profile:
        argv.append(f"--kda-profile={args.profile}")
    if args.junitxml:
        argv.append(f"--junitxml={args.junitxml}")
    if args.workers:
        argv += ["-n", str(args.workers)]
    if not args.no_progress:
        argv.append("--kda-progress")
    argv += args.pytest_args
    code = pytest.main(argv)
    path = out / "report.json"
    if code in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR) or not path.exists():
        return int(code) or 2
    return 0 if json.loads(path.read_text())["conforms"] else 1


@command("selfcheck", "the oracle checks itself: its tiers agree in float64, and its speed")
def selfcheck(args) -> int:
    from kdaverify.equivalence.selfcheck import main as run

    return run()


def _mutant_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=2, help="pytest runs at a time (default 2)")
    p.add_argument("--out", default=None, help="folder for the per-mutant reports and killtable.md")
    p.add_argument("--only", nargs="*", default=None, help="run only these mutants")
    p.add_argument("--targeted", action="store_true", help="each mutant runs only the checks it is meant for (CI)")


@command("mutants", "every negative control through the suite: the kill table", _mutant_arguments)
def mutants(args) -> int:
    from kdaverify.equivalence.killtable import main as run

    argv = ["--jobs", str(args.jobs)]
    if args.out:
        argv += ["--out", args.out]
    if args.only:
        argv += ["--only", *args.only]
    if args.targeted:
        argv.append("--targeted")
    return run(argv + args.pytest_args)


def _perf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="quick (DESIGN.md section 7 shapes), full, cpu or smoke "
                   "(default: quick on a GPU, cpu otherwise)")  # fmt: skip
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--providers", default=None, help="comma-separated provider names (default: all)")
    p.add_argument("--out", default=None, help="folder of perf.json; {slug} in it becomes the device's slug "
                   "(default: reports/{slug})")  # fmt: skip


@command("perf", "the roofline sweep: time every provider and write perf.json", _perf_arguments)
def perf(args) -> int:
    import pytest

    import kdaverify.perf

    out = args.out or "reports/{slug}"
    bench = Path(kdaverify.perf.__file__).with_name("bench_kda.py")
    argv = [str(bench), "-p", "kdaverify.perf.plugin", f"--perf-out={out}", "-q", "-p", "no:cacheprovider",
            "--no-header", "-rfs"]  # fmt: skip
    for name in ("preset", "device", "providers"):
        if getattr(args, name):
            argv.append(f"--perf-{name}={getattr(args, name)}")
    return int(pytest.main(argv + args.pytest_args))


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "folders", nargs="*", help="folders holding perf.json, or folders of such folders (default: reports)"
    )


@command("report", "turn every perf.json into README.md with figures", _report_arguments)
def report(args) -> int:
    from kdaverify.perf.report import main as run

    return run(args.folders)


def _tuning_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("export", "import"), help="export: the cache's results into FILE; "
                   "import: FILE's results into the cache")  # fmt: skip
    p.add_argument("file", help="a .tar.gz of autotuning results")
    p.add_argument("--cache-dir", default=None, help="Triton's cache folder (default: TRITON_CACHE_DIR, else "
                   "Triton's default)")  # fmt: skip


@command("tuning", "carry Triton's autotuning results (*.autotune.json) to a fresh machine", _tuning_arguments)
def tuning(args) -> int:
    from kdaverify.equivalence import tuning as t

    try:
        if args.action == "export":
            n = t.export(args.file, args.cache_dir)
            print(f"tuning: {n} autotuning results from {args.cache_dir or t.cache_dir()} into {args.file}")
        else:
            n = t.import_(args.file, args.cache_dir)
            print(f"tuning: {n} autotuning results from {args.file} into {args.cache_dir or t.cache_dir()}")
    except (OSError, ValueError) as e:
        raise SystemExit(f"tuning: {e}") from None
    return 0


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder for the merged report.json and report.md")
    p.add_argument("parts", nargs="+", help="report folders (or report.json files) of the runs to merge")


@command("merge-reports", "one conformance report from runs split by check (-k) or cut off", _merge_arguments)
def merge_reports(args) -> int:
    """Exit 0 when the merged report conforms, 1 otherwise (incomplete or a check failed)."""
    from kdaverify.equivalence.report import merge, save, verdict

    parts = []
    for name in args.parts:
        path = Path(name) / "report.json" if Path(name).is_dir() else Path(name)
        if not path.exists():
            raise SystemExit(f"merge-reports: parts: no report at {path}")
        parts.append(json.loads(path.read_text()))
    try:
        data = merge(parts)
    except ValueError as e:
        raise SystemExit(f"merge-reports: {e}") from None
    save(args.out, data)
    print(f"verdict: {verdict(data)}; report: {Path(args.out) / 'report.md'}")
    return 0 if data["conforms"] else 1


def _matrix_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--profile", default="gpu", help="Hypothesis profile of every verify run (default gpu)")
    p.add_argument(
        "--out", default=None, help="folder; {slug} becomes the device's slug (default reports/matrix/{slug})"
    )
    p.add_argument("--only", nargs="*", default=None, help="only these implementations (names of the matrix)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one implementation may take (default 3600)")
    p.add_argument("--build", metavar="DIR", default=None, help="only rebuild DIR/README.md from the reports in DIR")


@command("matrix", "every public KDA implementation through verify on one device: the matrix", _matrix_arguments)
def matrix(args) -> int:
    from kdaverify.equivalence import matrix as m

    if args.build:
        return m.main([args.build])
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = m.run(device, args.out or m.DEFAULT_OUT, args.profile, args.only, args.timeout, args.pytest_args)
    print(f"matrix: {folder / m.README}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdaverify", description=__doc__.splitlines()[0])
    from kdaverify import __version__

    p.add_argument("--version", action="version", version=f"kdaverify {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, add_arguments, _) in COMMANDS.items():
        epilog = "Arguments after a lone -- are passed to pytest." if name in ("verify", "mutants", "perf") else None
        if name == "matrix":
            epilog = "Arguments after a lone -- are passed to every kdaverify verify run."
        add_arguments(sub.add_parser(name, help=help, description=help, epilog=epilog))
    return p


def main(argv=None) -> int:
    """Everything after a lone `--` goes to pytest untouched (verify, mutants)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:cut])
    args.pytest_args = argv[cut + 1 :]
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
