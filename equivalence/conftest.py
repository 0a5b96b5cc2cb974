"""pytest wiring: the implementation under test, its declared capabilities, the Hypothesis
profile and the conformance report.

    pytest equivalence --impl=MODULE:FUNC [--impl-dtypes=float32,bfloat16]
        [--impl-head-sizes=64,128] [--impl-precision=ieee|tf32|tf32_rn|bf16] [--impl-state-layout=KV|VK]
        [--impl-gva=yes|no] [--impl-varlen=yes|no] [--impl-gate-in-kernel=yes|no]
        [--impl-l2norm-in-kernel=yes|no] [--impl-max-t=N] [--device=cpu|cuda]
        [--conformance-report=DIR]
"""

from __future__ import annotations

import pytest
import torch

from .adapters import DEFAULT_IMPL
from .implementation import load_implementation
from .profiles import load_default
from .report import ConformanceReport, Recorder

DEFAULT_PROFILE = load_default()

_YESNO = {"yes": True, "no": False}


def pytest_addoption(parser):
    g = parser.getgroup("kdaverify", "KDA conformance")
    g.addoption("--impl", default=DEFAULT_IMPL, help="MODULE:FUNC with the chunk_kda contract (default: %(default)s)")
    g.addoption("--impl-dtypes", default=None, help="comma list of input dtypes it accepts (float32,bfloat16,float16)")
    g.addoption("--impl-head-sizes", default=None, help="comma list of the K and V sizes it supports")
    g.addoption(
        "--impl-precision",
        default=None,
        choices=["ieee", "tf32", "tf32_rn", "bf16"],
        help="matmul precision class for fp32 inputs",
    )
    g.addoption("--impl-state-layout", default=None, choices=["KV", "VK"], help="state layout it reads and returns")
    for flag in ("gva", "varlen", "gate-in-kernel", "l2norm-in-kernel"):
        g.addoption(f"--impl-{flag}", default=None, choices=sorted(_YESNO), help=f"declare {flag} support")
    g.addoption("--impl-max-t", default=None, type=int, help="longest sequence to give it")
    g.addoption("--device", default=None, help="device for the implementation (default: cuda if present, else cpu)")
    g.addoption("--conformance-report", default=None, metavar="DIR", help="write report.json and report.md here")


def _options(config) -> dict:
    def split(x, cast=str):
        return None if x is None else tuple(cast(s) for s in x.split(",") if s)

    opt = config.getoption
    out = dict(
        dtypes=split(opt("--impl-dtypes")),
        head_sizes=split(opt("--impl-head-sizes"), int),
        precision=opt("--impl-precision"),
        state_layout=opt("--impl-state-layout"),
        max_T=opt("--impl-max-t"),
    )
    for flag in ("gva", "varlen", "gate-in-kernel", "l2norm-in-kernel"):
        v = opt(f"--impl-{flag}")
        out[flag.replace("-", "_")] = None if v is None else _YESNO[v]
    return out


def pytest_configure(config):
    device = config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        config.kda_impl = load_implementation(config.getoption("--impl"), _options(config), device)
    except ValueError as e:  # a bad --impl or --impl-* option: a usage error, not a crash
        raise pytest.UsageError(str(e)) from None
    if hasattr(config, "workerinput"):
        return  # a pytest-xdist worker: the controller collects its reports and writes the report
    # Hypothesis' own --hypothesis-profile option wins over the environment variable
    profile = config.getoption("hypothesis_profile", None) or DEFAULT_PROFILE
    config.kda_report = ConformanceReport(config.kda_impl, config.getoption("--conformance-report"), profile)
    config.pluginmanager.register(config.kda_report, "kdaverify-report")


@pytest.fixture(scope="session")
def impl(pytestconfig):
    return pytestconfig.kda_impl


@pytest.fixture
def record(request):
    """Collects the Verdicts of one test; its worst goes to the conformance report."""
    return Recorder(request.node)
