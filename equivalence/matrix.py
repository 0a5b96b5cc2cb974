"""The conformance and speed matrix of the public KDA implementations (issue 11).

    kdaverify matrix [--device cuda] [--profile gpu] [--out reports/matrix/{slug}] [--only NAME ...]

runs every adapter of public_kernels.MATRIX through `kdaverify verify` on one device, each in
a process of its own (an engine's kernel that crashes or hangs costs its row, not the run),
writing DIR/<name>/report.json and report.md (the usual conformance report) and DIR/run.json
(what ran, versions, and why the others could not), then builds DIR/README.md: one row per
implementation with its version, declaration, verdict, worst share of budget, its error
against the float64 oracle and its time at the shapes of DESIGN.md section 7 where the perf
sweep (reports/<slug>/perf.json) has rows of it, and a link to its report.

`python -m kdaverify.equivalence.matrix DIR` rebuilds README.md from what DIR holds. The
builder reads JSON only: it imports neither torch nor an engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kdaverify.perf.report import slug

from . import public_kernels, shim
from .capabilities import Capabilities
from .report import verdict as report_verdict

RUN = "run.json"
README = "README.md"
DEFAULT_OUT = "reports/matrix/{slug}"
PERF_T = (4096, 16384)  # the error columns: prefill rows at these lengths (DESIGN.md section 7)
ENGINES = {"sglang": shim.SGLANG, "vllm": shim.VLLM}


# ---------------------------------------------------------------- running


def plan(entry, device: str) -> str | None:
    """Why entry cannot run on device ("not applicable: ..."), or None when it can."""
    if entry.adapter is None:
        return f"not applicable: {entry.why_not}"
    if device != "cuda" and not entry.cpu:
        return f"not applicable: needs a CUDA GPU ({entry.needs}; {device} run)"
    fn = getattr(public_kernels, entry.adapter)
    try:
        fn.kdaverify_available()
    except ImportError as e:
        return f"not applicable: {e}"
    return None


def engine_version(entry) -> str | None:
    source = ENGINES.get(entry.engine)
    return shim.version(source) if source else None


def _verify(cmd: list[str], log, timeout_s: float):
    """Run one `kdaverify verify` in a process group of its own; its exit code, or "timeout".
    At the limit pytest gets SIGINT, as `timeout -s INT` gives it (it stops its xdist workers
    and the suite's report keeps the checks that finished), then, 30 s later or once it has
    exited, the whole group gets SIGKILL. Killing only the parent left its workers running
    beside the next row (H100 run of 2026-11-28: every row after the first timed out)."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group: workers, the parent
        proc.wait()
        return "timeout"


def scrub_paths(text: str, out: Path) -> str:
    """A log made fit to commit: the output folder, the interpreter's library folders, the
    folder of kdaverify's own sources, the shim's unpacked wheels, the Python executable and the
    home folder written as placeholders (reports name no machine's paths)."""
    import sysconfig

    places = {str(out.resolve()): "<out>", str(out): "<out>"}
    places[str(Path(__file__).resolve().parent.parent)] = "<kdaverify>"  # the checkout or site-packages/kdaverify
    places[str(shim._cache_dir())] = "<wheels>"
    for key, mark in (("purelib", "<site-packages>"), ("platlib", "<site-packages>"), ("stdlib", "<stdlib>"),
                      ("platstdlib", "<stdlib>")):  # fmt: skip
        places[sysconfig.get_paths()[key]] = mark
    places[sys.executable] = "<python>"
    places[os.path.expanduser("~")] = "<home>"
    for path, mark in sorted(places.items(), key=lambda item: -len(item[0])):
        if len(path) > 1:
            text = text.replace(path, mark)
    return text


def run(device: str, out: str, profile: str, only=None, timeout_s: float = 3600, extra=()) -> Path:
    """Every entry (or those named in `only`) through `kdaverify verify` on device; returns the
    folder (README.md built). A folder that already holds a run keeps the rows this run does
    not redo, so a matrix too long for one sitting is made row by row (--only) into one folder;
    every row records its engine's version, read where the engines are."""
    from kdaverify.perf.sweep import device_name

    name = device_name(device)
    folder = Path(out.replace("{slug}", slug(name)))
    folder.mkdir(parents=True, exist_ok=True)
    before = json.loads((folder / RUN).read_text()) if (folder / RUN).exists() else {}
    if before and (before.get("device"), before.get("profile")) != (name, profile):
        raise ValueError(
            f"out: {folder} holds a run on {before.get('device')} at profile {before.get('profile')}, "
            f"not {name} at {profile}: expected an empty folder or one of the same device and profile"
        )
    kept = {r["name"]: r for r in before.get("rows", [])}
    rows = []
    for entry in public_kernels.MATRIX:
        if only and entry.name not in only:
            rows.append(kept.get(entry.name) or {"name": entry.name, "version": engine_version(entry)})
            continue
        row = {"name": entry.name, "version": engine_version(entry), "reason": plan(entry, device)}
        if row["reason"] is None:
            target = f"kdaverify.equivalence.public_kernels:{entry.adapter}"
            cmd = [sys.executable, "-m", "kdaverify.cli", "verify", target, f"--device={device}",
                   f"--profile={profile}", f"--out={folder / entry.name}", "--no-progress", *extra]  # fmt: skip
            started = time.monotonic()
            print(f"matrix: {entry.name}: {' '.join(cmd[2:])}", flush=True)
            log = folder / entry.name / "verify.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            for stale in ("report.json", "report.md"):  # an earlier run's report must not stand for this one
                (log.parent / stale).unlink(missing_ok=True)
            with open(log, "w") as f:
                code = _verify(cmd, f, timeout_s)
            log.write_text(scrub_paths(log.read_text(errors="replace"), folder))
            row.update(exit=code, seconds=round(time.monotonic() - started, 1))
        row["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        rows.append(row)
        print(f"matrix: {entry.name}: {row.get('reason') or row.get('exit')}", flush=True)
    meta = {"device": name, "kind": device, "profile": profile, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
            time.gmtime()), "rows": rows}  # fmt: skip
    (folder / RUN).write_text(json.dumps(meta, indent=2) + "\n")
    build(folder)
    return folder


# ---------------------------------------------------------------- the README


def declaration(caps: dict) -> str:
    """The fields of a declaration that differ from the defaults, compactly."""
    default = Capabilities().declared()
    parts = []
    for key, value in caps.items():
        if key not in default or default[key] == (tuple(value) if isinstance(value, list) else value):
            continue
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        parts.append(f"{key}={value}")
    return "; ".join(parts) or "defaults"


def verdict(report: dict) -> tuple[str, str]:
    """(verdict, worst share of budget among passed checks) of one conformance report: the
    report's own verdict (report.verdict), with the failed checks named and the outcome in
    bold where the run was whole."""
    checks = report.get("checks", [])
    failed = sorted({f"{c['check']} [{c['dtype']}]" for c in checks if c["outcome"] == "failed"})
    text = report_verdict(report)
    if failed:
        gaps = len(report.get("missing", []))
        whole = report.get("finished") and not gaps
        text = f"**fails** {len(failed)}: {', '.join(failed)}" + (
            "" if whole else f" (incomplete: {gaps} pairs not run)"
        )
    elif text == "conforms":
        counts = report.get("counts", {})
        text = f"**conforms** ({counts.get('passed', 0)} passed, {counts.get('not applicable', 0)} not applicable)"
    judged = [c for c in checks if c.get("worst") and c["outcome"] == "passed"]
    worst = max(judged, key=lambda c: c["worst"]["budget_used"]) if judged else None
    share = f"{worst['worst']['budget_used']:.2f} ({worst['check']} [{worst['dtype']}])" if worst else ""
    return text, share


def perf_cells(rows: list[dict], names: tuple[str, ...]) -> tuple[str, str]:
    """(error vs float64 at T = 4096 / 16384 per dtype, time at the DESIGN.md section 7 shapes)
    from the perf sweep's rows of this implementation, or "not measured"."""
    mine = [r for r in rows if r.get("provider") in names and r.get("status") in ("ok", "unverified")]

    def flag(r):  # a row whose output failed the check before timing says so wherever it is shown
        return " (unverified)" if r["status"] == "unverified" else ""

    def where(r):
        return f"{r['dtype']}{'' if r['B'] == 1 else ' B' + str(r['B'])} T{r['T']}"

    errs = [f"{where(r)}: {r['err_rel_rms']:.2g}{flag(r)}" for r in mine
            if r.get("T") in PERF_T and r.get("mode") == "fwd" and r.get("err_rel_rms") is not None]  # fmt: skip
    times = [f"{r['mode']} B{r['B']} T{r['T']}: {r['ms']:.3g} ms{flag(r)}" for r in mine if r.get("ms") is not None]
    runs = sorted({r["run"] for r in mine if r.get("ms") is not None and r.get("run")})
    timed = "; ".join(times) + (f" (sweep run {', '.join(runs)})" if runs else "")
    return "; ".join(errs) or "not measured", timed or "not measured"


def reference_times(rows: list[dict]) -> list[str]:
    """flash-linear-attention's and our kernels' times from the same perf.json, for comparison,
    each with the sweep run it comes from: compare only times of one run."""
    out = []
    for r in rows:
        if r.get("provider") in ("fla", "ours") and r.get("ms") is not None and r.get("status") == "ok":
            out.append(f"| {r['provider']} | {r['op']} {r['mode']} | B{r['B']} T{r['T']} H{r['H']} K{r['K']} "
                       f"{r['dtype']} | {r['ms']:.3g} | {r.get('run', '')} |")  # fmt: skip
    return out


def _perf_rows(folder: Path, device: str | None) -> tuple[list[dict], Path | None]:
    """The rows of reports/<slug>/perf.json for this device (folder is reports/matrix/<slug>)."""
    path = folder.parent.parent / folder.name / "perf.json"
    if not path.exists():
        return [], None
    data = json.loads(path.read_text())
    if device and data.get("environment", {}).get("device") not in (device, None):
        return [], None
    return data.get("rows", []), path


def build(folder: Path) -> Path:
    """DIR/README.md from DIR/run.json, DIR/<name>/report.json and the device's perf.json."""
    folder = Path(folder)
    meta = json.loads((folder / RUN).read_text()) if (folder / RUN).exists() else {"rows": []}
    ran = {r["name"]: r for r in meta["rows"]}
    perf, perf_path = _perf_rows(folder, meta.get("device"))
    lines = [
        f"# Public KDA kernels through the suite: {meta.get('device', folder.name)}",
        "",
        f"Generated by `kdaverify matrix` (equivalence/matrix.py); profile {meta.get('profile', '?')}, "
        f"{meta.get('date', 'no run recorded')}. Each row is the implementation's own conformance report "
        "(linked), under the declaration read from its code (equivalence/public_kernels.py says why each field). "
        "A failed check is a candidate finding until it reproduces in a fresh process (reports/findings/).",
        "",
        "| implementation | what | version | declaration | verdict | worst share of budget | "
        f"error vs float64 (T {' / '.join(map(str, PERF_T))}) | time (DESIGN.md section 7 shapes) | report |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    counts = {"conforms": 0, "fails": 0, "other": 0, "not applicable": 0, "not run": 0}
    for entry in public_kernels.MATRIX:
        row = ran.get(entry.name, {})
        version = row.get("version") or (engine_version(entry) if entry.engine in ENGINES else None) or ""
        path = folder / entry.name / "report.json"
        link, share = "", ""
        if path.exists():
            report = json.loads(path.read_text())
            decl = declaration(report.get("capabilities", {}))
            text, share = verdict(report)
            link = f"[report]({entry.name}/report.md)"
            key = "conforms" if "**conforms**" in text else "fails" if "**fails**" in text else "other"
        else:
            adapter = getattr(public_kernels, entry.adapter) if entry.adapter else None
            decl = declaration(adapter.kdaverify_capabilities.declared()) if adapter else "no adapter"
            if row.get("reason"):
                text, key = row["reason"], "not applicable"
            elif "exit" in row:
                text, key = (
                    f"error: verify ended ({row['exit']}) without a report; see {entry.name}/verify.log",
                    "other",
                )
            elif entry.adapter is None:
                text, key = f"not applicable: {entry.why_not}", "not applicable"
            else:
                text, key = "not run", "not run"  # runnable, not selected in any sitting so far
        counts[key] += 1
        err, ms = perf_cells(perf, (entry.name, entry.adapter or entry.name))
        lines.append(f"| {entry.name} | {entry.what} | {version} | {decl} | {text} | {share} | {err} | {ms} | {link} |")
    lines += [
        "",
        f"Summary: {counts['conforms']} conform, {counts['fails']} fail at least one check, "
        f"{counts['other']} did not finish, {counts['not applicable']} could not run here"
        + (f", {counts['not run']} not run yet." if counts["not run"] else "."),
        "",
    ]
    if perf_path:
        ref = reference_times(perf)
        if ref:
            lines += ["Reference times from the same perf.json (compare times of one sweep run only):",
                      "", "| provider | op | shape | ms | run |", "|---|---|---|---|---|", *ref, ""]  # fmt: skip
        notes = json.loads(perf_path.read_text()).get("notes") or []
        if notes:  # what was learnt about the perf run after it (perf.report shows them too)
            lines += ["Notes on that perf.json:", "", *(f"- {n}" for n in notes), ""]
    else:
        lines += ["No perf.json for this device: error and time columns are not measured "
                  "(`kdaverify perf` writes reports/<slug>/perf.json).", ""]  # fmt: skip
    (folder / README).write_text("\n".join(lines))
    return folder / README


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m kdaverify.equivalence.matrix DIR [DIR ...]  (rebuilds DIR/README.md)", file=sys.stderr)
        return 2
    for d in argv:
        if not os.path.isdir(d):
            print(f"matrix: {d}: not a folder", file=sys.stderr)
            return 2
        print(f"matrix: {build(Path(d))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
