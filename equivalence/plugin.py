"""The kdaverify pytest plugin (entry point `pytest11: kdaverify`).

In any project that has kdaverify installed:

    pytest --kda-impl=mypkg.ops:my_kda [--kda-dtypes=float32,bfloat16] [--kda-head-sizes=64,128]
        [--kda-precision=ieee|tf32|tf32_rn|bf16] [--kda-state-layout=KV|VK] [--kda-gva=yes|no]
        [--kda-varlen=yes|no] [--kda-gate-in-kernel=yes|no] [--kda-l2norm-in-kernel=yes|no]
        [--kda-max-t=N] [--kda-strided=yes|no|error] [--kda-empty-sequences=yes|no]
        [--kda-g-dtypes=input,float32] [--kda-beta-dtypes=input,float32]
        [--kda-positional=yes|no] [--kda-state-dtype=float32|bfloat16] [--kda-backward=yes|no]
        [--kda-device=cpu|cuda] [--kda-profile=ci|dev|deep|gpu|mutants]
        [--kda-report=DIR]

runs the whole conformance suite (kdaverify/equivalence/test_conformance.py, from the
installed package) against that callable: alone when no test paths are given, beside the
host's own tests when they are. Every option is prefixed --kda- so it cannot clash with the
host project's own. Without --kda-impl the plugin registers its options and does nothing
else: nothing heavy (torch) is imported and no Hypothesis setting of the host is touched.

Host tests can reuse one check on their own callable through a marker and a fixture:

    @pytest.mark.kdaverify(impl="mypkg.ops:my_kda", dtype="bfloat16", head_sizes=(64,))
    def test_state_split(kda_check):
        kda_check("state_split")                   # Hypothesis cases of that check's family
        kda_check("state_split", spec=CaseSpec(T=130, K=64, V=64))   # or one explicit case
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .capabilities import option_specs, options_from_strings

SUITE = Path(__file__).with_name("test_conformance.py")
CONFORMANCE_TEST = "test_conformance"


def pytest_addoption(parser):
    g = parser.getgroup("kdaverify", "KDA conformance (kdaverify)")
    g.addoption(
        "--kda-impl", default=None, metavar="MODULE:FUNC", help="run the conformance suite against this callable"
    )
    for field, name, kw in option_specs():
        g.addoption(f"--kda-{name}", dest=f"kda_{field}", **kw)
    g.addoption("--kda-device", default=None, help="device for the implementation (default: cuda if present, else cpu)")
    g.addoption("--kda-profile", default=None, help="Hypothesis profile of the suite: ci, dev, deep, gpu, mutants")
    g.addoption("--kda-report", default=None, metavar="DIR", help="write report.json and report.md here")
    g.addoption("--kda-progress", action="store_true", default=False, help="a progress bar instead of pytest's dots")


def pytest_configure(config):
    config.addinivalue_line("markers", "kdaverify(impl, dtype='float32', device=None, **capabilities): the callable "
                            "the kda_check fixture runs kdaverify's checks on")  # fmt: skip
    target = config.getoption("kda_impl")
    if target is None:
        return
    _add_suite(config)
    from .profiles import resolve

    try:
        config.kda_profile = resolve(config.getoption("kda_profile"), _device_kind(config))
        config.kda_impl = _load(config, target)
    except ValueError as e:  # a bad --kda-* option: a usage error, not a crash
        raise pytest.UsageError(str(e)) from None
    if hasattr(config, "workerinput"):
        return  # a pytest-xdist worker: the controller collects its reports and writes the report
    from .report import ConformanceReport

    config.kda_report = ConformanceReport(config.kda_impl, config.getoption("kda_report"), config.kda_profile)
    config.pluginmanager.register(config.kda_report, "kdaverify-report")
    if config.getoption("kda_progress"):
        config.pluginmanager.register(_Progress(), "kdaverify-progress")


def _add_suite(config) -> None:
    """Collect the installed suite: alone if the user named no test paths, else beside them
    (pytest drops a path collected twice, so naming the suite's folder too is harmless)."""
    suite = str(SUITE)
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        if suite not in config.args:
            config.args.append(suite)
    else:
        config.args[:] = [suite]


def _device_kind(config) -> str:
    """The --kda-device option, else cuda if a GPU is present, else cpu."""
    import torch

    return config.getoption("kda_device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _device(config) -> str:
    import torch

    device = _device_kind(config)
    if device == "cuda":
        _prepare_gpu_run()
        worker = getattr(config, "workerinput", {}).get("workerid", "")
        if worker.startswith("gw") and torch.cuda.device_count() > 1:
            # one xdist worker per GPU (and round robin beyond that): -n <number of GPUs>
            device = f"cuda:{int(worker[2:]) % torch.cuda.device_count()}"
    return device


# Triton writes the result of each autotuning to its on-disk cache only when asked; with it,
# xdist workers and later runs reuse one tuning instead of benchmarking every config again
# per process (Triton >= 3.4 reads TRITON_CACHE_AUTOTUNING when a kernel is first tuned).
# Set it before workers start, so they inherit it; a value the user set is kept.
GPU_RUN_ENV = {"TRITON_CACHE_AUTOTUNING": "1"}


def _prepare_gpu_run() -> None:
    import os

    for k, v in GPU_RUN_ENV.items():
        os.environ.setdefault(k, v)


def _load(config, target):
    from .implementation import load_implementation

    raw = {field: config.getoption(f"kda_{field}") for field, _, _ in option_specs()}
    return load_implementation(target, options_from_strings(raw), _device(config))


@pytest.fixture(scope="session")
def impl(pytestconfig):
    """The implementation under test: --kda-impl, or this project's default implementation
    when the suite runs in kdaverify's own repository without one."""
    if not hasattr(pytestconfig, "kda_impl"):
        from .adapters import DEFAULT_IMPL

        pytestconfig.kda_impl = _load(pytestconfig, DEFAULT_IMPL)
    return pytestconfig.kda_impl


@pytest.fixture(scope="session")
def kda_profile(pytestconfig):
    """The Hypothesis settings the conformance tests run under."""
    from .profiles import PROFILES, resolve

    name = getattr(pytestconfig, "kda_profile", None) or resolve(
        pytestconfig.getoption("kda_profile"), _device_kind(pytestconfig)
    )
    return PROFILES[name]


@pytest.fixture
def record(request):
    """Collects the Verdicts of one test; its worst goes to the conformance report."""
    from .report import Recorder

    return Recorder(request.node)


@pytest.fixture
def kda_check(request, kda_profile):
    """Run one named check of relations.CHECKS on the callable of the test's
    @pytest.mark.kdaverify marker: kda_check(name) draws that check's Hypothesis cases under
    the suite's profile; kda_check(name, spec=CaseSpec(...)) runs one case. Raises
    AssertionError (with the measured errors and budget) when the check fails."""
    marker = request.node.get_closest_marker("kdaverify")
    if marker is None:
        raise pytest.UsageError("kda_check: mark the test with @pytest.mark.kdaverify(impl=...)")
    kw = dict(marker.kwargs)
    target = kw.pop("impl", marker.args[0] if marker.args else None)
    if target is None:
        raise pytest.UsageError("@pytest.mark.kdaverify: expected impl=MODULE:FUNC or a callable")
    dtype_name = kw.pop("dtype", "float32")
    device = kw.pop("device", None) or _device(request.config)
    from .implementation import DTYPES, load_implementation
    from .relations import CHECKS, Harness
    from .report import Recorder
    from .strategies import cases_for

    implementation = load_implementation(target, kw, device)
    harness = Harness(implementation, DTYPES[dtype_name], Recorder(request.node))

    def run(name: str, spec=None):
        if name not in CHECKS:
            raise ValueError(f"kda_check: expected a check name from {sorted(CHECKS)}, got {name!r}")
        check = CHECKS[name]
        if spec is not None:
            return check.fn(harness, spec)
        kda_profile(
            cases_for(check.cases, implementation.caps, implementation.device)(lambda spec: check.fn(harness, spec))
        )()

    return run


class _Progress:
    """A progress bar over the conformance tests (tqdm, on stderr), in place of pytest's
    per-test letters; the verdict of each check still goes to the report and the summary."""

    def __init__(self):
        self.bar = None

    def _start(self, ids) -> None:
        if self.bar is None:
            from tqdm import tqdm

            total = sum(1 for i in ids if CONFORMANCE_TEST in i)
            self.bar = tqdm(total=total, unit="check", dynamic_ncols=True, leave=True, desc="kdaverify")

    def pytest_collection_finish(self, session):
        self._start([item.nodeid for item in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        """Under pytest-xdist the controller collects nothing itself: size the bar from the
        first worker's collection."""
        self._start(ids)

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report, config):
        if CONFORMANCE_TEST in report.nodeid and (report.when == "call" or report.skipped):
            return report.outcome, "", report.outcome.upper()
        return None

    def pytest_runtest_logreport(self, report):
        if self.bar is None or CONFORMANCE_TEST not in report.nodeid:
            return
        if report.when == "call" or (report.skipped and report.when == "setup"):
            name = report.nodeid.rsplit("[", 1)[-1].rstrip("]")
            self.bar.set_postfix_str(f"{name}: {report.outcome}", refresh=False)
            self.bar.update(1)

    def pytest_sessionfinish(self, session):
        if self.bar is not None:
            self.bar.close()
