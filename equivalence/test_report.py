"""The conformance report's verdict and merge (equivalence/report.py, `kdaverify merge-reports`):
a run of a selection never reads as a bare "conforms", and runs split by check merge into one
verdict only when every (check, dtype) pair has an outcome and the runs are of one
implementation in one environment."""

from __future__ import annotations

import json
import threading
import time
import types

import numpy as np
import pytest
import torch
from kdaverify.equivalence.compiles import CompileClock
from kdaverify.equivalence.report import expected, merge, time_line, verdict
from kdaverify.equivalence.tolerance import errors

from kdaverify.cli import main

ENV = {"torch": "2.11", "triton": "3.6", "gpu": "NVIDIA H100 80GB HBM3", "profile": "gpu"}


def part(pairs, date, outcome="passed", finished=True, **env):
    checks = [{"check": c, "dtype": d, "outcome": outcome, "seconds": 1.0} for c, d in pairs]
    return {
        "implementation": "pkg:impl", "capabilities": {"dtypes": ["float32"]}, "tolerance_rule": "rule",
        "environment": dict(ENV, date=date, **env), "finished": finished, "conforms": finished,
        "counts": {outcome: len(pairs)} if pairs else {},
        "seconds": 10.0, "checks": checks,
    }  # fmt: skip


def halves():
    pairs = expected()
    return pairs[: len(pairs) // 2], pairs[len(pairs) // 2 :]


def test_a_selection_says_what_did_not_run():
    a, _ = halves()
    data = dict(part(a, "d1"), missing=[f"{c} [{d}]" for c, d in halves()[1]])
    assert verdict(data).startswith("conforms on the checks that ran;")
    assert f"{len(halves()[1])} of {len(expected())}" in verdict(data)


def test_two_halves_merge_into_one_verdict(tmp_path):
    a, b = halves()
    data = merge([part(a, "d1"), part(b, "d2", finished=False)])
    assert data["finished"] and data["conforms"] and not data["missing"]
    assert verdict(data) == "conforms" and data["environment"]["date"] == "d1, d2"
    assert [p["rows"] for p in data["parts"]] == [len(a), len(b)]


def test_a_gap_leaves_the_merge_incomplete():
    a, b = halves()
    data = merge([part(a, "d1"), part(b[1:], "d2")])
    assert not data["finished"] and not data["conforms"]
    assert data["missing"] == [f"{b[0][0]} [{b[0][1]}]"]
    assert verdict(data).startswith("incomplete: the merged runs did not reach every check; 1 of ")


def test_a_pair_run_twice_keeps_its_worst_outcome():
    a, b = halves()
    data = merge([part(a, "d1"), part(b, "d2"), part(a[:1], "d3", outcome="failed")])
    assert data["finished"] and not data["conforms"] and data["counts"]["failed"] == 1
    assert verdict(data) == "does not conform: 1 failed"


def test_of_two_failures_the_merge_keeps_the_one_further_past_its_budget():
    """A rerun that finds an order-1 error replaces an earlier failure on a margin, whichever
    part comes first; a failure without a finite share (non-finite output, an error) counts
    as furthest."""
    a, b = halves()
    key = a[0]

    def failed(date, used):
        p = part([key], date, outcome="failed")
        if used is not None:
            p["checks"][0]["worst"] = {"budget_used": used}
        return p

    def kept(*used):
        parts = [part(a[1:], "d0"), part(b, "d0"), *(failed(f"d{i}", u) for i, u in enumerate(used, 1))]
        row = next(r for r in merge(parts)["checks"] if (r["check"], r["dtype"]) == key)
        return (row.get("worst") or {}).get("budget_used")

    assert kept(1.2, 2547.0) == kept(2547.0, 1.2) == 2547.0
    assert kept(1.2, float("inf")) == float("inf")
    assert kept(1.2, None) is None and kept(None, 1.2) is None


@pytest.mark.parametrize(
    "changes,named",
    [({"implementation": "pkg:other"}, "implementation"),
     ({"capabilities": {"dtypes": ["float32"], "gva": True}}, "capabilities"),
     ({"environment": dict(ENV, date="d2", triton="3.5")}, "triton")],
)  # fmt: skip
def test_runs_of_different_things_do_not_merge(changes, named):
    a, b = halves()
    with pytest.raises(ValueError, match=rf"parts\[1\]: .*{named}"):
        merge([part(a, "d1"), dict(part(b, "d2"), **changes)])


def test_merge_reports_command(tmp_path, capsys):
    a, b = halves()
    for name, data in (("p1", part(a, "d1")), ("p2", part(b, "d2"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(data))
    assert main(["merge-reports", str(tmp_path / "out"), str(tmp_path / "p1"), str(tmp_path / "p2")]) == 0
    assert "verdict: conforms" in capsys.readouterr().out
    assert "## Parts" in (tmp_path / "out" / "report.md").read_text()
    assert main(["merge-reports", str(tmp_path / "gap"), str(tmp_path / "p1")]) == 1
    with pytest.raises(SystemExit, match="no report"):
        main(["merge-reports", str(tmp_path / "x"), str(tmp_path / "nothing")])


def test_time_line_splits_implementation_from_suite():
    rows = [{"seconds": 3.0, "impl_seconds": 2.5}, {"seconds": 1.0, "impl_seconds": 0.5}, {"seconds": 0.0}]
    assert time_line(rows) == "check time: 4.0 s, of which 3.0 s (75%) inside the implementation's calls"
    assert time_line([]) == "check time: 0.0 s, of which 0.0 s inside the implementation's calls"
    rows[0].update(compiles=7, compile_seconds=2.0)
    assert time_line(rows).endswith("inside the implementation's calls, 2.0 s of it compiling 7 Triton kernels")
    rows[1].update(autotunes=2, autotune_seconds=1.5)
    assert time_line(rows).endswith("7 Triton kernels, 1.5 s autotuning 2 times (the configs' compiles included)")


def test_compile_clock_times_what_triton_compiles(tmp_path, monkeypatch):
    """The clock counts each compile between Triton's two JIT hooks, per kernel name, logs it
    where KDAVERIFY_COMPILE_LOG says, calls the hooks it replaced and puts them back."""
    knobs = pytest.importorskip("triton").knobs
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: seen.append("before") or False)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append("after"))
    monkeypatch.setenv("KDAVERIFY_COMPILE_LOG", str(tmp_path / "compiles.log"))
    fn = types.SimpleNamespace(name="chunk_grads")
    with CompileClock() as clock:
        for key in ("a", "b"):
            assert knobs.runtime.jit_cache_hook(key=key, repr=f"chunk_grads[{key}]", fn=fn) is False
            time.sleep(0.01)
            knobs.runtime.jit_post_compile_hook(key=key, repr=f"chunk_grads[{key}]", fn=fn)
    assert clock.compiles == 2 and clock.kernels == {"chunk_grads": 2} and clock.seconds >= 0.02
    assert seen == ["before", "after"] * 2
    assert knobs.runtime.jit_cache_hook is not clock._before  # put back
    assert " chunk_grads " in (tmp_path / "compiles.log").read_text().splitlines()[1]


def test_workers_compile_one_specialization_once(tmp_path, monkeypatch):
    """While one compile of a (kernel, specialization) runs, another of the same waits for it
    (then finds Triton's disk cache filled); a different specialization does not wait."""
    knobs = pytest.importorskip("triton").knobs
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    fn, events = types.SimpleNamespace(name="chunk_grads"), []

    def compile_(clock, key, tag):
        clock._before(key=key, repr="", fn=fn)
        events.append(tag)
        clock._after(key=key, repr="", fn=fn)

    with CompileClock() as clock:
        clock._before(key="x", repr="", fn=fn)  # this thread compiles x
        waiter = threading.Thread(target=compile_, args=(clock, "x", "second x"))
        other = threading.Thread(target=compile_, args=(clock, "y", "y"))
        waiter.start(), other.start()
        other.join(timeout=10)
        time.sleep(0.3)
        assert events == ["y"]  # the second compile of x is still waiting
        clock._after(key="x", repr="", fn=fn)
        waiter.join(timeout=10)
    assert events == ["y", "second x"] and clock.compiles == 3


def test_an_interrupted_run_is_incomplete_not_failed():
    """A run stopped by a time limit (timeout -s INT) with nothing failed reads "incomplete",
    with the number of pairs it did not reach and whether what ran passed; one with a failure
    reads "does not conform" and still says it is incomplete."""
    a, _ = halves()
    data = dict(
        part(a, "d1", finished=False), counts={"passed": len(a)}, missing=[f"{c} [{d}]" for c, d in halves()[1]]
    )
    text = verdict(data)
    assert text.startswith("incomplete:") and f"{len(halves()[1])} of {len(expected())}" in text
    assert text.endswith(f"the {len(a)} checks that ran passed")
    data = dict(data, counts={"passed": len(a) - 1, "failed": 1})
    assert verdict(data).startswith("does not conform: 1 failed; incomplete:")
    nothing = dict(part([], "d1", finished=False), counts={}, missing=[f"{c} [{d}]" for c, d in expected()])
    assert verdict(nothing).endswith("no check passed")


def test_the_report_of_an_interrupted_pytest_run_is_unfinished(tmp_path):
    """pytest reaches its terminal summary after Ctrl-C too: the report must then stay unfinished."""
    from kdaverify.equivalence.report import ConformanceReport

    class Impl:
        name, device = "pkg:impl", torch.device("cpu")

    rep = ConformanceReport(Impl(), None)
    for status, finished in ((pytest.ExitCode.INTERRUPTED, False), (pytest.ExitCode.OK, True)):
        rep.pytest_terminal_summary(terminalreporter=None, exitstatus=status)
        assert rep.finished is finished


def test_the_backward_timing_convention_is_recorded():
    """A report says whether its impl_seconds include the backward passes; a merge says so only
    when every part's do, so an older run's figures are never relabelled."""
    from kdaverify.equivalence.report import markdown

    a, b = halves()
    new, old = dict(part(a, "d1"), backward_timed=True), part(b, "d2")
    assert merge([new, dict(part(b, "d2"), backward_timed=True)])["backward_timed"]
    mixed = merge([new, old])
    assert not mixed["backward_timed"] and "backward pass counts as the suite's" in markdown(mixed)


def test_bias_noise_counts_rows_not_elements():
    """The bias budget's noise term counts the rows along the last axis that carry the target
    (an error shared by a row's elements is one piece of noise), not its elements."""
    target = np.ones((2, 3, 5, 64))
    assert errors(target, target).n_eff == pytest.approx(30)
    target[0] *= 2  # half the rows carry 4x the weight: fewer effective rows
    assert errors(target, target).n_eff == pytest.approx(30 * 25 / 34)
    assert errors(np.ones(7), np.ones(7)).n_eff == pytest.approx(1)  # one row


def test_compile_clock_without_a_writable_cache_still_counts(tmp_path, monkeypatch):
    """A Triton cache folder that cannot be written to costs the lock, not the check."""
    knobs = pytest.importorskip("triton").knobs
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path / "file" / "cache"))  # under a file: mkdir fails
    fn = types.SimpleNamespace(name="chunk_pairs")
    with CompileClock() as clock:
        clock._before(key="x", repr="", fn=fn)
        clock._after(key="x", repr="", fn=fn)
    assert clock.compiles == 1 and clock._lock_dir is None


def test_workers_autotune_one_key_once(tmp_path, monkeypatch):
    """While one worker times the configs of a (kernel, tuning key), another asking for the same
    key waits (then reads Triton's disk cache); another key does not wait. Tunings that timed
    configs are counted, and the autotuner's method is put back."""
    pytest.importorskip("triton")
    from triton import knobs
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    disk, events, release = set(), [], threading.Event()

    def check_disk_cache(tuner, tuning_key, configs, bench_fn):  # Triton's, without a GPU
        if tuning_key in disk:
            events.append(f"read {tuning_key}")
            return True
        events.append(f"tune {tuning_key}")
        bench_fn()
        disk.add(tuning_key)
        return False

    monkeypatch.setattr(Autotuner, "check_disk_cache", check_disk_cache)
    tuner = types.SimpleNamespace(base_fn=types.SimpleNamespace(__name__="chunk_fwd"))
    with CompileClock() as clock:
        first = threading.Thread(target=Autotuner.check_disk_cache, args=(tuner, "x", [], lambda: release.wait(10)))
        first.start()
        time.sleep(0.2)
        second = threading.Thread(target=Autotuner.check_disk_cache, args=(tuner, "x", [], lambda: None))
        other = threading.Thread(target=Autotuner.check_disk_cache, args=(tuner, "y", [], lambda: None))
        second.start(), other.start()
        other.join(timeout=10)
        time.sleep(0.3)
        assert events == ["tune x", "tune y"]  # the second x still waits for the first
        release.set()
        first.join(timeout=10), second.join(timeout=10)
    assert events == ["tune x", "tune y", "read x"]
    assert clock.tunes == {"chunk_fwd": 2} and clock.tune_seconds >= 0.2
    assert Autotuner.check_disk_cache is check_disk_cache


_TWO_WAYS = """
from hypothesis import given, settings, strategies as st


@settings(derandomize=True, max_examples=50, database=None)
@given(st.integers(0, 100))
def test_case(x):
    if x > 50:
        raise ValueError("refused")
    assert x < 10, "too big"
"""


@pytest.mark.parametrize("ways", [1, 2])
def test_failures_keep_example_and_message(tmp_path, ways):
    """A Hypothesis failure reaches the report with its falsifying example and its message,
    also when the test fails in two distinct ways (an exception group, which pytest prints
    without "E" lines)."""
    import subprocess
    import sys

    from kdaverify.equivalence.report import failure_message, falsifying_example

    source = _TWO_WAYS if ways == 2 else _TWO_WAYS.replace('        raise ValueError("refused")', "        pass")
    (tmp_path / "test_case.py").write_text(source)
    (tmp_path / "conftest.py").write_text(
        "def pytest_runtest_logreport(report):\n"
        "    if report.when == 'call' and report.failed:\n"
        "        open('longrepr.txt', 'w').write(report.longreprtext)\n"
    )
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_case.py"],
                   cwd=tmp_path, capture_output=True, check=False)  # fmt: skip
    text = (tmp_path / "longrepr.txt").read_text()
    example, message = falsifying_example(text), failure_message(text)
    assert "test_case(x=10" in example and "too big" in message
    if ways == 2:
        assert "test_case(x=51" in example and "ValueError: refused" in message
        assert example.startswith("[1] ") and "[2] " in example


def test_runs_split_by_dtype_merge_with_the_union_declared():
    """One run per dtype (`--dtypes`): each part's rows of the other dtype read "not
    declared"; the merge declares both and keeps the rows of the part that ran them, the
    failure included."""
    pairs = expected()
    fp32, bf16 = ([p for p in pairs if p[1] == d] for d in ("float32", "bfloat16"))
    rest = [p for p in pairs if p[1] not in ("float32", "bfloat16")]

    def run(dtype, ran, other, outcome="passed"):
        data = part(ran, "d", outcome=outcome)
        data["capabilities"] = {"dtypes": [dtype], "gva": True}
        data["checks"] += [{"check": c, "dtype": d, "outcome": "not applicable", "seconds": 0.0} for c, d in other]
        return data

    a = run("float32", fp32, bf16 + rest)
    b = run("bfloat16", bf16[1:], fp32 + rest)
    b["checks"].append({"check": bf16[0][0], "dtype": "bfloat16", "outcome": "failed", "seconds": 1.0})
    data = merge([a, b])
    assert data["capabilities"] == {"dtypes": ["float32", "bfloat16"], "gva": True}
    assert data["finished"] and data["counts"] == {"passed": len(pairs) - len(rest) - 1, "failed": 1,
                                                   "not applicable": len(rest)}  # fmt: skip
    with pytest.raises(ValueError, match=r"parts\[1\]: capabilities"):
        merge([a, dict(b, capabilities={"dtypes": ["bfloat16"], "gva": False})])
