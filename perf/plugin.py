"""pytest plugin of the sweep (`pytest -p kdaverify.perf.plugin perf/bench_kda.py ...`; the
`kdaverify perf` command passes it). Options:

    --perf-preset quick|full|cpu|smoke   what to sweep (default: quick on a GPU, cpu otherwise)
    --perf-device cuda|cpu               default: cuda if present
    --perf-providers NAME,...            only these providers
    --perf-out DIR                       write DIR/perf.json at the end of the session; a
                                         "{slug}" in DIR becomes the device's slug
    --perf-merge                         keep the rows of an existing DIR/perf.json that this
                                         run did not redo (a sweep split with -k)

Ceilings are measured once per session, before the first row. A progress bar over the sweep
goes to stderr. Without pytest-benchmark installed, a stand-in `benchmark` fixture calls the
timed function once (the figures come from perf.timing either way).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("kdaverify-perf", "KDA performance sweep (kdaverify)")
    g.addoption("--perf-preset", default=None, help="quick, full, cpu or smoke (default: quick on a GPU, else cpu)")
    g.addoption("--perf-device", default=None, help="cuda or cpu (default: cuda if present)")
    g.addoption("--perf-providers", default=None, help="comma-separated provider names (default: all)")
    g.addoption("--perf-out", default=None, metavar="DIR", help="write DIR/perf.json")
    g.addoption("--perf-merge", action="store_true", default=False,
                help="keep the rows of an existing DIR/perf.json that this run did not redo (a sweep split "
                     "over several calls with -k)")  # fmt: skip


def _device(config) -> str:
    import torch

    device = config.getoption("perf_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise pytest.UsageError(f"--perf-device: expected cuda or cpu, got {device!r}")
    return device


def _preset(config) -> str:
    return config.getoption("perf_preset") or ("quick" if _device(config) == "cuda" else "cpu")


def pytest_generate_tests(metafunc):
    if "perf_case" not in metafunc.fixturenames:
        return
    from .sweep import cases

    config = metafunc.config
    names = config.getoption("perf_providers")
    try:
        todo = cases(_preset(config), _device(config), names.split(",") if names else None)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    metafunc.parametrize("perf_case", todo, ids=[c.id for c in todo])


class _State:
    def __init__(self, config):
        self.config, self.sweep, self.bar = config, None, None
        self.old: dict | None = None  # --perf-merge: the perf.json found before the first row was written
        self.read_old = False
        self.env: dict | None = None  # the run's environment, taken once (it asks the driver)

    def get(self):
        if self.sweep is None:
            from .sweep import Sweep, ceilings
            from .timing import CPU_BUDGET_S

            device = _device(self.config)
            smoke = _preset(self.config) == "smoke"
            self.sweep = Sweep(device, ceilings(device, smoke), 0.0 if smoke else CPU_BUDGET_S)
        return self.sweep


def pytest_configure(config):
    config._kda_perf = _STATE["state"] = _State(config)


@pytest.fixture(scope="session")
def perf_sweep(pytestconfig):
    return pytestconfig._kda_perf.get()


if "pytest_benchmark" not in sys.modules:
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:

        class _Once:
            """Stand-in for pytest-benchmark's fixture: one call, extra_info kept."""

            def __init__(self):
                self.extra_info = {}

            def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0):
                return fn()

        @pytest.fixture
        def benchmark():
            return _Once()


def pytest_collection_finish(session):
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU image: the sweep runs without its progress bar
        return
    n = sum(1 for item in session.items if "perf_case" in getattr(item, "fixturenames", ()))
    if n:
        session.config._kda_perf.bar = tqdm(total=n, desc="perf sweep", unit="row", file=sys.stderr)


def pytest_runtest_logstart(nodeid, location):
    state = _STATE.get("state")
    if state is not None and state.bar is not None and "[" in nodeid:
        state.bar.set_postfix_str("running " + nodeid.rsplit("[", 1)[-1].rstrip("]")[:70])


def pytest_runtest_logfinish(nodeid, location):
    state = _STATE.get("state")
    if state is None or "[" not in nodeid:
        return
    if state.bar is not None:
        state.bar.update(1)
    # perf.json after every row: a sweep stopped by a time limit keeps what it measured
    # (a cold flash-linear-attention backward autotunes for minutes on its first shape)
    _write(state, final=False)


_STATE: dict = {}  # the session's _State, for hooks that receive no config


def pytest_sessionfinish(session):
    state = session.config._kda_perf
    if state.bar is not None:
        state.bar.close()
    path = _write(state, final=session.testscollected == len(state.sweep.rows) if state.sweep else False)
    if path is not None:
        print(f"\nperf: {len(state.sweep.rows)} rows -> {path}", file=sys.stderr)


def _write(state, final: bool):
    """Write perf.json from the rows so far (complete only when final and every collected row
    ran); returns its path, or None when there is nothing to write."""
    out = state.config.getoption("perf_out")
    if out is None or state.sweep is None:
        return None
    from .sweep import environment

    if state.env is None:
        state.env = environment(state.sweep.device, _preset(state.config))
    env = state.env
    path = Path(out.replace("{slug}", env["slug"])) / "perf.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not state.read_old:
        state.read_old = True
        if state.config.getoption("perf_merge") and path.exists():
            state.old = json.loads(path.read_text())
            if state.old["environment"]["device"] != env["device"]:
                raise pytest.UsageError(
                    f"--perf-merge: {path} is of {state.old['environment']['device']}, not {env['device']}"
                )
    # a row still running when the sweep was interrupted (Ctrl-C, a SIGINT time limit) has no status yet
    stopped = "interrupted: the sweep stopped during this row"
    rows = [
        dict(r, run=env["date"]) if "status" in r else dict(r, status=stopped, run=env["date"])
        for r in state.sweep.rows
    ]
    complete = final
    if state.old is not None:
        redone = {_key(r) for r in rows}
        before = state.old["environment"]["date"]  # rows written before rows carried their run
        rows = [dict(r, run=r.get("run", before)) for r in state.old["rows"] if _key(r) not in redone] + rows
        complete = complete and state.old.get("complete", False)
    data = {"environment": env, "ceilings": state.sweep.ceilings, "rows": rows, "complete": complete}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def _key(row: dict) -> tuple:
    return tuple(row[n] for n in ("op", "provider", "mode", "B", "T", "H", "HV", "K", "V", "dtype"))
