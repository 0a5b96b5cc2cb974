"""The conformance report: every check with pass / fail / not applicable, the worst errors
measured with the budget each comparison used, and the smallest failing example Hypothesis
found. A pytest plugin (registered by conftest.py) collects it; with --conformance-report=DIR
it is written as report.json and report.md.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
from collections import defaultdict
from pathlib import Path

import hypothesis
import pytest
import torch

from .tolerance import FACTOR, FLOOR_UNITS

CONFORMANCE_TEST = "test_conformance"
WORST = "kdaverify_worst"  # the user_properties key a test's worst comparison travels under
IMPL_SECONDS = "kdaverify_impl_seconds"  # ... and the time spent inside the implementation's calls
COMPILES = "kdaverify_compiles"  # ... and how much of it compiled or autotuned Triton kernels (compiles.CompileClock)


class Recorder:
    """Keeps the comparison of a test that used the largest share of its budget, and hands
    it to the report through the test's user_properties (which also cross pytest-xdist)."""

    def __init__(self, node):
        self.node, self.worst = node, None

    def impl_seconds(self, seconds: float, clock=None) -> None:
        """The wall time of the check spent inside the implementation's calls and the backward
        passes through its outputs (Implementation.timed; compiles and autotuning included),
        and, from a compiles.CompileClock, how many Triton kernels compiled in it and in
        how many seconds, and how many autotunings timed their configs and for how long."""
        self.node.user_properties.append((IMPL_SECONDS, round(seconds, 3)))
        if clock is not None and (clock.compiles or clock.tunes):
            tunes = sum(clock.tunes.values())
            counts = [clock.compiles, round(clock.seconds, 3), tunes, round(clock.tune_seconds, 3)]
            self.node.user_properties.append((COMPILES, counts))

    def __call__(self, verdict) -> None:
        if self.worst is None or verdict.ratio >= self.worst.ratio:
            self.worst = verdict
            entry = {
                "what": verdict.what,
                "measured": vars(verdict.measured),
                "budget": vars(verdict.budget),
                "same_precision_reference": vars(verdict.reference),
                "budget_used": verdict.ratio,
            }
            self.node.user_properties[:] = [p for p in self.node.user_properties if p[0] != WORST]
            self.node.user_properties.append((WORST, entry))


def parse_id(nodeid: str) -> tuple[str, str] | None:
    """'...::test_conformance[causality-float32]' -> ('causality', 'float32')."""
    m = re.search(CONFORMANCE_TEST + r"\[(.+)-([a-z0-9]+)\]$", nodeid)
    return (m.group(1), m.group(2)) if m else None


def _error_lines(text: str) -> list[str]:
    return [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E")]


def _example_start(lines: list[str]) -> int:
    starts = ("Falsifying example", "Failing test case", "Draw 1:")
    return next((i for i, ln in enumerate(lines) if ln.startswith(starts)), len(lines))


# A sub-exception's header in pytest's rendering of an exception group: "+-+---- 1 ----".
_GROUP_PART = re.compile(r"^\s*\+[-+]*\s+\d+\s+-+\s*$")


def _group_parts(text: str) -> list[list[str]]:
    """The sub-exceptions of an exception group, each as its lines without the box drawing
    (indentation inside a part kept). Hypothesis raises one when a test fails in more than
    one distinct way ("Hypothesis found 2 distinct failures"), and pytest prints it with no
    "E" lines: before this, such a failure reached the report with no example and no message
    (18 of 49 failures of the H200 matrix row vllm-fused_recurrent_kda, fourteenth session)."""
    parts: list[list[str]] = []
    for ln in text.splitlines():
        if _GROUP_PART.match(ln):
            parts.append([])
        elif parts:
            body = ln.strip()
            if body.startswith("+-"):  # the group's closing line
                continue
            parts[-1].append(body[2:] if body.startswith("| ") else body.lstrip("|"))
    return parts


def _example(lines: list[str]) -> str:
    keep = []
    for ln in lines[_example_start(lines) :]:
        keep.append(ln.strip())
        if ln.strip() == ")":
            break
    keep += [ln.strip() for ln in lines if "reproduce_failure" in ln]
    return " ".join(keep).replace("( ", "(").replace(" )", ")")


def _message(lines: list[str]) -> str:
    """The exception's own lines before the example: not the traceback's frames and source
    lines (indented in an exception group's parts)."""
    head = lines[: _example_start(lines)]
    return "\n".join(ln for ln in head if ln and not ln[0].isspace() and not ln.startswith("Traceback"))


def falsifying_example(text: str) -> str:
    """The lines of a Hypothesis failure that rebuild the failing case: the example up to its
    closing parenthesis, and the @reproduce_failure blob. A failure in several distinct ways
    gives each way's example, numbered."""
    lines = _error_lines(text)
    if lines:
        return _example(lines)
    parts = _group_parts(text)
    return " ".join(f"[{i}] {_example(p)}" for i, p in enumerate(parts, 1) if _example(p))


def failure_message(text: str) -> str:
    """The assertion message of a failure, without the traceback and the example (of each
    distinct failure, numbered, when there are several)."""
    lines = _error_lines(text)
    if lines:
        return "\n".join(ln for ln in lines[: _example_start(lines)] if ln)[:2000]
    parts = _group_parts(text)
    return "\n".join(f"[{i}] {_message(p)}" for i, p in enumerate(parts, 1) if _message(p))[:2000]


def environment(impl, profile: str | None) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hypothesis": hypothesis.__version__,
        "profile": profile,
        "device": str(impl.device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if impl.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(impl.device)
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def expected() -> list[tuple[str, str]]:
    """Every (check, dtype) pair of a whole run: the suite's parametrisation."""
    from .implementation import DTYPES
    from .relations import CHECKS

    return [(c, d) for c in CHECKS for d in DTYPES]


def missing(rows) -> list[str]:
    """The (check, dtype) pairs of a whole run that have no row: deselected (-k) or not reached."""
    have = {(r["check"], r["dtype"]) for r in rows}
    return [f"{c} [{d}]" for c, d in expected() if (c, d) not in have]


def verdict(data: dict) -> str:
    """The one-line verdict of a report (one run's or a merge's). A failure is never hidden by
    a gap, and a gap (a pair deselected with -k, or not reached before a time limit) never
    reads as "conforms": an interrupted run whose every finished check passed says so, with
    how many pairs it did not reach."""
    counts = data.get("counts", {})
    failed, passed = counts.get("failed", 0), counts.get("passed", 0)
    gaps = data.get("missing", [])
    not_run = f"{len(gaps)} of {len(expected())} (check, dtype) pairs not run"
    if failed:
        whole = data["finished"] and not gaps
        return f"does not conform: {failed} failed" + ("" if whole else f"; incomplete: {not_run}")
    if not data["finished"]:
        ran = f"the {passed} checks that ran passed" if passed else "no check passed"
        stopped = (
            "the merged runs did not reach every check" if "parts" in data else "the run stopped before every check ran"
        )
        return f"incomplete: {stopped}; {not_run}; {ran}"
    if not passed:
        return "does not conform: no check applied"
    if gaps:  # a selection (-k) conforms only on what it ran: say so, never a bare "conforms"
        return f"conforms on the checks that ran; {not_run}"
    return "conforms"


def merge(parts: list[dict]) -> dict:
    """One report from the reports of runs of one implementation split by check (pytest -k, or
    runs cut off by a time limit): its rows are the union of theirs, and it is finished when
    every (check, dtype) pair has a row. The parts must agree on the implementation, its
    declaration, the tolerance rule and the environment (all but the date), else ValueError.
    A pair run twice keeps its worst outcome (failed, then passed, then not applicable); of
    two failures, the one further past its budget (a failure with no finite share, a
    non-finite output or an error, counts as furthest), so that a rerun that finds an
    order-1 error is not hidden behind an earlier run's failure on a margin.

    Runs split by dtype (`--dtypes float32`, `--dtypes bfloat16`: one per GPU) differ in the
    declaration's dtypes only: the merge declares their union, and a pair's row comes from
    the parts that declared its dtype (another part's "not declared" row does not count)."""
    if not parts:
        raise ValueError("parts: expected at least one report")
    first = parts[0]
    same = ("implementation", "capabilities", "tolerance_rule")

    def rest(caps):  # the declaration but its dtypes
        return {k: v for k, v in caps.items() if k != "dtypes"}

    for i, part in enumerate(parts[1:], 1):
        for key in same:
            a, b = (rest(part[key]), rest(first[key])) if key == "capabilities" else (part[key], first[key])
            if a != b:
                raise ValueError(f"parts[{i}]: {key} differs from parts[0]'s: {part[key]!r} vs {first[key]!r}")
        env = {k: v for k, v in part["environment"].items() if k != "date"}
        env0 = {k: v for k, v in first["environment"].items() if k != "date"}
        if env != env0:
            diff = sorted(k for k in env.keys() | env0.keys() if env.get(k) != env0.get(k))
            raise ValueError(f"parts[{i}]: environment differs from parts[0]'s in {', '.join(diff)}")
    rank = {"failed": 0, "passed": 1, "not applicable": 2}

    def share(r):  # how far a failed row is past its budget
        used = (r.get("worst") or {}).get("budget_used")
        return used if isinstance(used, (int, float)) and math.isfinite(used) else math.inf

    declared = {d: [p for p in parts if d in p["capabilities"].get("dtypes", ())] for _, d in expected()}
    rows = {}
    for part in parts:
        for r in part["checks"]:
            key = (r["check"], r["dtype"])
            if declared.get(r["dtype"]) and part not in declared[r["dtype"]]:
                continue  # "not declared" here; a part that declared the dtype says what it did
            if key not in rows or rank.get(r["outcome"], 0) < rank.get(rows[key]["outcome"], 0):
                rows[key] = r
            elif r["outcome"] == rows[key]["outcome"] == "failed" and share(r) > share(rows[key]):
                rows[key] = r
    checks = [rows[k] for k in sorted(rows)]
    counts = defaultdict(int)
    for r in checks:
        counts[r["outcome"]] += 1
    gaps = missing(checks)
    env = dict(first["environment"], date=", ".join(p["environment"].get("date", "?") for p in parts))
    caps = first["capabilities"]
    capabilities = dict(caps, dtypes=[d for d in declared if declared[d]]) if "dtypes" in caps else caps
    return dict(
        {k: first[k] for k in same},
        capabilities=capabilities,
        environment=env,
        finished=not gaps,
        conforms=not gaps and counts["failed"] == 0 and counts["passed"] > 0,
        counts=dict(counts),
        seconds=round(sum(p["seconds"] for p in parts), 1),
        checks=checks,
        missing=gaps,
        backward_timed=all(p.get("backward_timed", False) for p in parts),
        parts=[
            {
                "date": p["environment"].get("date"),
                "seconds": p["seconds"],
                "finished": p["finished"],
                "rows": len(p["checks"]),
            }
            for p in parts
        ],  # fmt: skip
    )


# how a report's impl_seconds treat a gradient check's backward pass (reports written before
# Implementation.timed counted it as the suite's time)
BACKWARD_TIMING = {
    True: " (a gradient check's backward passes through the implementation count as its).",
    False: " (a gradient check's backward pass counts as the suite's).",
}


def time_line(rows: list[dict]) -> str:
    """Where the checks' time went: inside the implementation's calls and the backward passes
    through its outputs (Implementation.timed; its compiles included) or in the suite
    (inputs, the oracle, the references, Hypothesis). Summed over checks, so with
    pytest-xdist workers it exceeds the wall time."""
    total = sum(r.get("seconds", 0.0) for r in rows)
    inside = sum(r.get("impl_seconds", 0.0) for r in rows)
    share = f" ({100 * inside / total:.0f}%)" if total else ""
    line = f"check time: {total:.1f} s, of which {inside:.1f} s{share} inside the implementation's calls"
    compiles = sum(r.get("compiles", 0) for r in rows)
    if compiles:
        seconds = sum(r.get("compile_seconds", 0.0) for r in rows)  # waits for other workers excluded
        line += f", {seconds:.1f} s of it compiling {compiles} Triton kernels"
    tunes = sum(r.get("autotunes", 0) for r in rows)
    if tunes:
        seconds = sum(r.get("autotune_seconds", 0.0) for r in rows)
        line += f", {seconds:.1f} s autotuning {tunes} times (the configs' compiles included)"
    return line


def save(out_dir, data: dict) -> None:
    """report.json and report.md of `data` in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "report.md").write_text(markdown(data))


def markdown(data: dict) -> str:
    """report.md of a report's data."""
    env = data["environment"]
    lines = [
        f"# Conformance report: `{data['implementation']}`",
        "",
        f"Verdict: **{verdict(data)}** "
        f"({', '.join(f'{v} {k}' for k, v in sorted(data['counts'].items()))}; {data['seconds']} s).",
        "",
        f"Environment: {', '.join(f'{k} {v}' for k, v in env.items() if v is not None)}.",
        "",
        f"Declared capabilities: `{json.dumps(data['capabilities'])}`.",
        "",
        f"Tolerance rule: {data['tolerance_rule']}.",
        "",
        time_line(data["checks"]) + BACKWARD_TIMING[data.get("backward_timed", False)],
        "",
        "| check | dtype | outcome | worst comparison | measured (rel RMS / rel max) | budget | share of budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["checks"]:
        w = r.get("worst")
        if w:
            m, b = w["measured"], w["budget"]
            measured = f"{m['rel_rms']:.2e} / {m['rel_max']:.2e}"
            budget = f"{b['rel_rms']:.2e} / {b['rel_max']:.2e}"
            cells = f"{w['what']} | {measured} | {budget} | {w['budget_used']:.2f}"
        else:
            cells = "exact comparison | | |" if r["outcome"] != "not applicable" else f"{r.get('reason', '')} | | |"
        lines.append(f"| {r['check']} | {r['dtype']} | {r['outcome']} | {cells} |")
    failures = [r for r in data["checks"] if r["outcome"] == "failed"]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            lines += [
                f"### {r['check']} [{r['dtype']}]",
                "",
                r["description"],
                "",
                f"Guards against: {r.get('guards', '')}.",
                "",
                "```",
                r.get("message", ""),
                r.get("example", ""),
                "```",
                "",
            ]
    if data.get("missing"):
        lines += [
            "",
            "## Not run",
            "",
            "These (check, dtype) pairs have no outcome (deselected, or the run stopped first):",
            "",
        ]
        lines += [", ".join(data["missing"])]
    if data.get("parts"):
        lines += ["", "## Parts", "", "Merged from the reports of these runs (kdaverify merge-reports):", ""]
        lines += [
            f"- {p['date']}: {p['rows']} rows, {p['seconds']} s, finished: {p['finished']}" for p in data["parts"]
        ]
    lines += ["", "## Checks", ""]
    from .relations import CHECKS

    lines += [f"- `{c.name}`: {c.description} Guards against: {c.bug_class}." for c in CHECKS.values()]
    return "\n".join(lines) + "\n"


class ConformanceReport:
    """pytest plugin: one row per (check, dtype)."""

    def __init__(self, impl, out_dir: str | None, profile: str | None = None):
        self.impl, self.out_dir, self.profile = impl, out_dir, profile
        self.rows = {}
        self.started = time.perf_counter()
        self.finished = False  # until pytest's summary: a run cut short never "conforms"

    def pytest_runtest_logreport(self, report):
        key = parse_id(report.nodeid)
        if key is None or (report.when != "call" and not report.skipped and not report.failed):
            return
        check, dtype = key
        row = {"check": check, "dtype": dtype, "outcome": report.outcome, "seconds": round(report.duration, 3)}
        if report.skipped:
            row["outcome"] = "not applicable"
            row["reason"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            row["reason"] = row["reason"].removeprefix("Skipped: ")
        elif report.failed:
            text = report.longreprtext
            row["example"] = falsifying_example(text)
            row["message"] = failure_message(text)
        worst = [v for k, v in report.user_properties if k == WORST]
        if worst:
            row["worst"] = worst[-1]
        inside = [v for k, v in report.user_properties if k == IMPL_SECONDS]
        if inside:
            row["impl_seconds"] = inside[-1]
        compiled = [v for k, v in report.user_properties if k == COMPILES]
        if compiled:
            row["compiles"], row["compile_seconds"], *tuned = compiled[-1]
            if tuned and tuned[0]:
                row["autotunes"], row["autotune_seconds"] = tuned
        self.rows[(check, dtype)] = row
        self.write()  # after every check, so a run stopped by a time limit still leaves its report

    def as_dict(self) -> dict:
        from .relations import CHECKS

        rows = []
        for (check, _), row in sorted(self.rows.items()):
            c = CHECKS.get(check)
            rows.append(dict(row, description=c.description if c else "", guards=c.bug_class if c else ""))
        counts = defaultdict(int)
        for r in rows:
            counts[r["outcome"]] += 1
        return {
            "implementation": self.impl.name,
            "capabilities": self.impl.caps.declared(),
            "environment": environment(self.impl, self.profile),
            "tolerance_rule": f"error <= {FACTOR:g} x same-precision reference error + {FLOOR_UNITS:g} unit roundoffs "
            "of the output dtype, for relative RMS and relative max-abs error; NaN/Inf never passes",
            "finished": self.finished,
            "conforms": self.finished and counts["failed"] == 0 and counts["passed"] > 0,
            "counts": dict(counts),
            "seconds": round(time.perf_counter() - self.started, 1),
            "checks": rows,
            "missing": missing(rows),
            "backward_timed": True,  # impl_seconds include the backward passes (Implementation.timed)
        }

    def pytest_terminal_summary(self, terminalreporter, exitstatus):
        # a run stopped by Ctrl-C or `timeout -s INT` still reaches this summary: it is not
        # finished, so it never reads "conforms" nor, with nothing failed, "does not conform"
        self.finished = exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
        if not self.rows:
            return
        tr = terminalreporter
        tr.section(f"kdaverify conformance: {self.impl.name}")
        for line in self.summary_lines(self.as_dict()):
            tr.write_line(line)

    def summary_lines(self, data: dict) -> list[str]:
        """One screen: the failed checks, the counts, the check nearest its budget, the verdict
        and where the report is."""
        lines = []
        for r in data["checks"]:
            if r["outcome"] == "failed":
                first = (r.get("message") or "").splitlines()[:1]
                lines.append(f"  FAILED {r['check']} [{r['dtype']}]: {first[0] if first else ''}"[:200])
        counts = data["counts"]
        lines.append(
            f"checks: {counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
            f"{counts.get('not applicable', 0)} not applicable"
        )
        judged = [r for r in data["checks"] if r.get("worst") and r["outcome"] == "passed"]
        if judged:
            w = max(judged, key=lambda r: r["worst"]["budget_used"])
            lines.append(
                f"worst share of budget among passed checks: {w['worst']['budget_used']:.2f} "
                f"({w['check']} [{w['dtype']}], {w['worst']['what']})"
            )
        lines.append(time_line(data["checks"]))
        lines.append(f"verdict: {verdict(data)}  ({data['seconds']} s, profile {data['environment']['profile']})")
        if self.out_dir:
            self.write()
            lines.append(f"report: {Path(self.out_dir) / 'report.md'} (and report.json)")
        return lines

    def write(self) -> None:
        if not self.out_dir:
            return
        save(self.out_dir, self.as_dict())
