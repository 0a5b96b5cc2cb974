"""kdaverify's sessions. `nox -l` lists them; heavy ones are not run by default.

    nox -s verify [-- MODULE:FUNC [kdaverify verify options]]   conformance run and report (the main job)
    nox -s tests                                      the CPU test suite (what CI runs)
    nox -s mutants [-- --targeted]                    negative controls and the kill table (CI: --targeted)
    nox -s lint                                       ruff
    nox -s fuzz [-- pytest options]                   the same tests under the deep Hypothesis profile
    nox -s perf [-- kdaverify perf options]           roofline sweep -> reports/<device-slug>/perf.json
    nox -s report [-- FOLDER ...]                     every perf.json -> README.md with figures
    nox -s matrix [-- kdaverify matrix options]       GPU: every public KDA kernel through verify -> reports/matrix/

The CPU sessions pin what the tests run against: torch 2.13.0 (CPU build) and triton 3.6.0,
the Triton of the GPU machines. Override with the environment variables KDAVERIFY_TORCH and
KDAVERIFY_TRITON (pip requirement strings, e.g. KDAVERIFY_TORCH="torch==2.11.0").
"""

from __future__ import annotations

import glob
import os
import re

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("KDAVERIFY_TORCH", "torch==2.13.0")
TRITON = os.environ.get("KDAVERIFY_TRITON", "triton==3.6.0")
PYTHON = os.environ.get("KDAVERIFY_PYTHON")  # None: the interpreter nox runs under
REPORTS = "reports/conformance"
# what `nox -s verify` checks without an argument: the project's own chunked kernel, compiled
# on a GPU, under Triton's interpreter on a CPU (kernels/runtime.py); the pytest plugin's default
# (equivalence.adapters.DEFAULT_IMPL, the float32 chunkwise reference) stays what `nox -s tests`
# runs the conformance tests against, since the interpreted kernel takes half an hour
VERIFY_DEFAULT = "kdaverify.kernels:chunk_kda"


def _install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH, TRITON)
    session.install("-e", f".[{','.join(('test', *extras))}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The CPU test suite under the bounded `ci` Hypothesis profile, on 2 workers."""
    _install(session)
    # one torch thread per xdist worker: two workers already fill two cores
    # loadgroup: the packaging tests share one built wheel on one worker
    session.run(
        "pytest", "-n", "2", "--dist=loadgroup", "--kda-profile=ci", *session.posargs, env={"OMP_NUM_THREADS": "1"}
    )  # fmt: skip


@nox.session(python=PYTHON)
def verify(session: nox.Session) -> None:
    """Oracle self-check, then the conformance suite against MODULE:FUNC (default: the
    project's own implementation) with a markdown and JSON report in reports/conformance/.
    Everything after MODULE:FUNC goes to `kdaverify verify` (see `kdaverify verify --help`)."""
    args = list(session.posargs)
    target = args.pop(0) if args and not args[0].startswith("-") else VERIFY_DEFAULT
    # the built-in flash-linear-attention adapters need fla-core in the session
    _install(session, *(("fla",) if ":fla_" in target else ()))
    session.run("kdaverify", "selfcheck")
    name = "default" if target == VERIFY_DEFAULT else target
    out = f"{REPORTS}/{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}"
    # one xdist worker per core unless told (-n / --workers), one torch thread each
    told = any(a in ("-n", "--workers") or a.startswith(("-n", "--workers=")) for a in args)
    workers = [] if told else ["-n", "auto"]
    session.run(
        "kdaverify", "verify", target, f"--out={out}", "--profile=ci", *workers, *args, env={"OMP_NUM_THREADS": "1"}
    )  # fmt: skip


@nox.session(python=PYTHON)
def mutants(session: nox.Session) -> None:
    """Every negative control through the conformance suite; prints the kill table and fails
    if any wrong implementation survives or the correct control is rejected."""
    _install(session)
    session.run("kdaverify", "mutants", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON, default=False)
def fuzz(session: nox.Session) -> None:
    """The whole suite under the `deep` profile: many examples, for nightly runs."""
    _install(session)
    session.run("pytest", "-n", "auto", "--kda-profile=deep", *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session(python=PYTHON, default=False)
def perf(session: nox.Session) -> None:
    """The roofline sweep: on a GPU the quick preset (DESIGN.md section 7 shapes, under 10
    minutes), otherwise a short CPU sweep of the reference implementations (about 2 minutes).
    Writes reports/<device-slug>/perf.json; arguments go to `kdaverify perf`."""
    _install(session, "perf")
    session.run("kdaverify", "perf", *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session(python=PYTHON, default=False)
def report(session: nox.Session) -> None:
    """reports/<device-slug>/README.md and figures from every perf.json. Needs no torch: the
    report reads perf.json and draws with matplotlib."""
    session.install("--no-deps", "-e", ".")
    session.install("matplotlib>=3.7")
    session.run("kdaverify", "report", *session.posargs)


ENGINES = {"sglang": ("KDAVERIFY_SGLANG", "sglang==0.5.23"), "vllm": ("KDAVERIFY_VLLM", "vllm==0.33.0")}


@nox.session(python=PYTHON, default=False)
def matrix(session: nox.Session) -> None:
    """GPU: every public KDA implementation (SGLang's and vLLM's kernels, FlashKDA; see
    equivalence/public_kernels.py) through `kdaverify verify` on one card, each in its own
    process, then reports/matrix/<slug>/README.md. The engines' kernel files come from the
    wheels in .whl/ (git-ignored: copy sglang-0.5.23-*.whl and vllm-0.33.0-*.whl there for a
    machine without a registry), else from pip without their dependencies. Helion and the
    CuTe DSL are optional: where they do not install, their rows say so."""
    _install(session)
    env = {}
    for package, (var, requirement) in ENGINES.items():
        wheels = sorted(glob.glob(f".whl/{package}-*.whl"))
        if os.environ.get(var):
            continue
        if wheels:
            env[var] = os.path.abspath(wheels[-1])
        else:
            session.install("--no-deps", requirement)
    for extra in ("sglang-helion", "sglang-cutedsl"):
        session.run("pip", "install", f".[{extra}]", success_codes=[0, 1])  # a missing one becomes its rows' reason
    session.run("kdaverify", "matrix", *session.posargs, env=env)
