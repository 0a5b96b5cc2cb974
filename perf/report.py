"""perf.json -> README.md with figures, one page per device (reports/<device-slug>/).

Figures (PNG, labelled axes with units), each with the table behind it in the markdown:
    roofline.png   achieved TFLOP/s against arithmetic intensity (FLOP/byte) under the
                   measured ceilings
    latency.png    latency against T, log-log, per provider (one panel per op and mode)
    speedup.png    speedup over flash-linear-attention per shape (when its rows exist)
    decode.png     decode bandwidth against batch size (sequences), with the copy ceiling
    precision.png  verification error (relative RMS of the sampled tail) against T per
                   provider and dtype
Only verified rows are plotted; unverified, unavailable and excluded rows are listed with
their status and never drawn as results. perf.json may carry `notes`, a list of sentences
written after the run by whoever reviewed it (a row measured in unusual conditions, say):
the page shows them under the host line, as notes, never as measurements.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

INSTALL = "pip install 'kdaverify[perf]'"
MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward+backward", "decode": "decode"}
DPI = 80  # figures of about 800 x 500 pixels: small PNGs that still read in a browser


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"the report needs matplotlib: {INSTALL}") from e
    return plt


def slug(device_name: str) -> str:
    """reports/<slug>/ of a device: its name (a GPU's, or "CPU <model name>") lower case with
    runs of other characters as '-' (torch-free: the matrix generator uses it too)."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def plotted(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("verified") is True


def _series(rows, key):
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def _label(r) -> str:
    return f"{r['provider']} {r['op']} {r['dtype']}"


def _fmt(x, spec=".3g"):
    return "" if x is None else format(x, spec)


def _log_axes(ax, xs=None) -> None:
    """Log-log axes with a grid; xs: label exactly these x values (no crowded minor labels)."""
    ax.set(xscale="log", yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    if xs:
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(sorted(set(xs)), [_tick(x) for x in sorted(set(xs))])
        ax.xaxis.set_minor_formatter(NullFormatter())


def _tick(x: int) -> str:
    return f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def roofline(plt, data, rows, path):
    m = data["ceilings"]["measured"]
    fig, ax = plt.subplots(figsize=(10, 5))
    ai = [r["flops"] / r["bytes"] for r in rows] or [1.0]
    xs = [min(ai) / 4, max(ai) * 4]
    for cls, style in (("bfloat16", "-"), ("tf32", "--"), ("float32", ":")):
        ridge = m[cls] * 1e3 / m["copy_gbs"]  # FLOP/byte where the compute roof meets the memory slope
        pts = sorted({xs[0], xs[1], ridge})
        ax.plot(pts, [min(m[cls], x * m["copy_gbs"] / 1e3) for x in pts], "k" + style, lw=1,
                label=f"ceiling: {m['copy_gbs']:.0f} GB/s copy, {m[cls]:.3g} TFLOP/s {cls} matmul")  # fmt: skip
    for label, rs in _series(rows, lambda r: (r["provider"], r["op"], r["mode"])).items():
        ax.scatter([r["flops"] / r["bytes"] for r in rs], [r["tflops"] for r in rs], s=18, label=" ".join(label))
    ax.set(xlabel="arithmetic intensity (FLOP / byte, model)", ylabel="achieved (TFLOP/s, model FLOPs / time)",
           title=f"Roofline: {data['environment']['device']}")  # fmt: skip
    _log_axes(ax)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def latency(plt, data, rows, path):
    panels = _series([r for r in rows if r["mode"] != "decode"], lambda r: (r["op"], r["mode"]))
    n = max(len(panels), 1)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.6 * ((n + cols - 1) // cols)),
                             squeeze=False)  # fmt: skip
    for ax, ((op, mode), rs) in zip(axes.flat, sorted(panels.items()), strict=False):
        for label, s in _series(rs, lambda r: (r["provider"], r["dtype"], r["B"], r["H"], r["K"])).items():
            s = sorted(s, key=lambda r: r["T"])
            ax.plot([r["T"] for r in s], [r["ms"] for r in s], "o-", ms=3,
                    label=f"{label[0]} {label[1]} B{label[2]} H{label[3]} K{label[4]}")  # fmt: skip
        ax.set(xlabel="T (tokens)", ylabel="latency (ms)", title=f"{op} {MODE_NAMES[mode]}")
        _log_axes(ax, [r["T"] for r in rs])
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    _save(fig, path)


def shape_key(r) -> tuple:
    return (r["op"], r["mode"], r["B"], r["T"], r["H"], r["HV"], r["K"], r["V"], r["dtype"])


def same_run(a: dict, b: dict | None) -> bool:
    """Whether two rows were timed in one run (rows merged from several runs with --perf-merge
    carry their run's date; timings of different runs are never compared)."""
    return b is not None and a.get("run") == b.get("run")


def speedups(rows) -> list[tuple[dict, float]]:
    """(row, FLA's ms / this row's ms) for every non-FLA row with a verified FLA row of the same
    shape from the same run."""
    fla = {shape_key(r): r for r in rows if r["provider"] == "fla"}
    return [(r, fla[shape_key(r)]["ms"] / r["ms"]) for r in rows
            if r["provider"] != "fla" and same_run(r, fla.get(shape_key(r)))]  # fmt: skip


def speedup(plt, data, rows, path):
    pairs = speedups(rows)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.7 * len(pairs) + 2), 5))
    labels = [f"{r['provider']} {r['op']} {r['mode']}\nB{r['B']} T{r['T']} H{r['H']} K{r['K']}" for r, _ in pairs]
    ax.bar(range(len(pairs)), [s for _, s in pairs])
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(range(len(pairs)), labels, fontsize=7, rotation=45, ha="right")
    ax.set(xlabel="provider, op, mode and shape", ylabel="speedup (x): FLA ms / this ms",
           title="Speedup over flash-linear-attention, same shape and dtype")  # fmt: skip
    _save(fig, path)


def decode(plt, data, rows, path):
    m = data["ceilings"]["measured"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rs in _series(rows, lambda r: (r["provider"], r["dtype"], r["H"], r["K"])).items():
        rs = sorted(rs, key=lambda r: r["B"])
        ax.plot(
            [r["B"] for r in rs], [r["gbs"] for r in rs], "o-", label=f"{label[0]} {label[1]} H{label[2]} K{label[3]}"
        )
    ax.axhline(m["copy_gbs"], color="k", ls="--", lw=1, label=f"copy ceiling {m['copy_gbs']:.0f} GB/s")
    ax.set(xlabel="decode batch (sequences N, one token each)", ylabel="bandwidth (GB/s, model bytes / time)",
           title="Decode: fp32 state read and written")  # fmt: skip
    _log_axes(ax, [r["B"] for r in rows])
    ax.legend(fontsize=7)
    _save(fig, path)


def precision(plt, data, rows, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in rows if r["mode"] != "decode" and r.get("err_rel_rms") is not None]
    for label, rs in _series(rows, lambda r: (r["provider"], r["op"], r["dtype"])).items():
        rs = sorted(rs, key=lambda r: r["T"])
        ax.plot([r["T"] for r in rs], [max(r["err_rel_rms"], 1e-17) for r in rs], "o-", ms=3, label=" ".join(label))
    ax.set(xlabel="T (tokens)", ylabel="relative RMS error of o (sampled tail, vs float64)",
           title="Precision against the float64 oracle")  # fmt: skip
    _log_axes(ax, [r["T"] for r in rows])
    ax.legend(fontsize=7)
    _save(fig, path)


# A row is launch-bound when the GPU spent less than this share of its median time in kernels
# (torch.profiler's kernel times, perf.json's gpu_ms): the rest it sat idle waiting for the
# host's launches. Seen on an H200 (fourteenth session): fla's chunk_kda forward at B1 T4096
# took 0.64-0.70 ms by do_bench for 0.50 ms of kernels (72-78%), ours 0.725 for 0.719 (99%).
LAUNCH_BOUND = 0.9


def _gpu(r) -> str:
    """The table's 'in kernels' cell: GPU ms per call and its share of ms, marked when launch-bound."""
    if r.get("gpu_ms") is None or not r.get("ms"):
        return ""
    share = r["gpu_ms"] / r["ms"]
    mark = " **launch-bound**" if share < LAUNCH_BOUND else ""
    return f"{_fmt(r['gpu_ms'])} ({100 * min(share, 1.0):.0f}%){mark}"


def _table(rows, fla: dict) -> list[str]:
    head = ("| op | provider | mode | B | T | H | HV | K | V | dtype | ms | in kernels | TFLOP/s | GB/s | "
            "floor ms | of roofline | vs FLA | peak MiB | verified | status |")  # fmt: skip
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ref = fla.get(shape_key(r))
        ok = same_run(r, ref) and r.get("ms") and r["provider"] != "fla" and plotted(r)
        vs = f"{ref['ms'] / r['ms']:.2f}x" if ok else ""
        err = ""
        if r.get("err_rel_rms") is not None:
            within = "<=" if r["err_rel_rms"] <= r["budget_rel_rms"] else ">"
            err = f" (rel RMS {r['err_rel_rms']:.2g} {within} {r['budget_rel_rms']:.2g})"
        verified = {True: "yes" + err, False: "**no**" + err, None: ""}[r.get("verified")]
        frac = "" if r.get("roofline_fraction") is None else f"{100 * r['roofline_fraction']:.1f}%"
        out.append(
            f"| {r['op']} | {r['provider']} | {r['mode']} | {r['B']} | {r['T']} | {r['H']} | {r['HV']} | {r['K']} | "
            f"{r['V']} | {r['dtype']} | {_fmt(r.get('ms'))} | {_gpu(r)} | {_fmt(r.get('tflops'))} | "
            f"{_fmt(r.get('gbs'), '.4g')} | "
            f"{_fmt(r.get('floor_ms'))} | {frac} | {vs} | {_fmt(r.get('peak_mib'), '.0f')} | {verified} | "
            f"{r['status']} |"
        )
    return out


def conformance_rows(folder: Path, device: str) -> list[str]:
    """Table rows of the oracle checks in the conformance reports run on this device
    (reports/conformance/*/report.json beside folder): the worst error each implementation
    reached against the float64 oracle, per dtype, with its budget."""
    out = []
    for path in sorted((folder.parent / "conformance").glob("*/report.json")):
        rep = json.loads(path.read_text())
        if rep.get("environment", {}).get("gpu") != device:
            continue
        for c in rep.get("checks", []):
            w = c.get("worst")
            if c["check"].startswith("oracle") and w:
                m, b = w["measured"], w["budget"]
                out.append(f"| {path.parent.name} | {c['check']} | {c['dtype']} | {m['rel_rms']:.2g} | "
                           f"{b['rel_rms']:.2g} | {c['outcome']} |")  # fmt: skip
    return out


def markdown(data: dict, figures: list[tuple[str, str]]) -> str:
    env, ceil = data["environment"], data["ceilings"]
    m, sheet = ceil["measured"], ceil.get("datasheet")
    rows = data["rows"]
    good = [r for r in rows if plotted(r)]
    fla = {shape_key(r): r for r in good if r["provider"] == "fla"}
    lines = [f"# Performance: {env['device']}", ""]
    if env["kind"] != "cuda":
        lines += ["A CPU run: it times the reference implementations (the oracle tiers), which shows their cost",
                  "growing with T. Triton kernels run here only under the interpreter and are excluded: their",
                  "timings mean nothing. GPU-only providers are listed as unavailable.", ""]  # fmt: skip
    if not data.get("complete", True):
        lines += ["**Incomplete run**: the sweep stopped before every row ran.", ""]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "kdaverify", "fla-core", "flash-kda", "numpy",
                                                     "python", "cuda", "driver") if env.get(k))  # fmt: skip
    lines += [f"Run of {env['date']}, preset `{env['preset']}`; {versions}.", ""]
    runs = sorted({r["run"] for r in rows if r.get("run")})
    if len(runs) > 1:
        lines += [f"Rows from {len(runs)} runs on this device, merged with --perf-merge: {', '.join(runs)} (the",
                  "run above is the last). Each row's floor and roofline fraction use its own run's ceilings;",
                  "'vs FLA' and the speedup figure compare only rows of the same run.", ""]  # fmt: skip
    if env.get("load_average") is not None:
        lines += _host_line(env)
    if data.get("notes"):
        lines += ["Notes on this run, added after it (perf.json's `notes`):", "",
                  *(f"- {n}" for n in data["notes"]), ""]  # fmt: skip
    lines += ["## Ceilings", "", "| ceiling | measured | datasheet |", "|---|---|---|"]
    sizes = {"copy": f"{m['copy_bytes'] / 2**20:.0f} MiB device-to-device copy, read + written",
             "bfloat16": f"{m.get('bf16_matmul_n', m['matmul_n'])}^3 bf16 matmul",
             "tf32": f"{m['matmul_n']}^3 fp32 matmul, TF32 allowed",
             "float32": f"{m['matmul_n']}^3 fp32 matmul, TF32 off"}  # fmt: skip
    lines.append(f"| {sizes['copy']} | {m['copy_gbs']:.4g} GB/s | {sheet['copy_gbs'] if sheet else 'n/a'} GB/s |")
    for cls in ("bfloat16", "tf32", "float32"):
        lines.append(f"| {sizes[cls]} | {m[cls]:.4g} TFLOP/s | {sheet[cls] if sheet else 'n/a'} TFLOP/s |")
    lines += ["", f"Timer: {m['timer']}. Datasheet: {sheet['source'] if sheet else 'no entry for this device'}.", ""]
    lines += ["## How to read the tables", "",
              "ms is the median time of one call (do_bench on a GPU); TFLOP/s and GB/s divide the models of",
              "perf/models.py (useful FLOPs and bytes that must move at least once) by it; the floor is",
              "max(FLOPs / matmul ceiling, bytes / copy ceiling) under the ceilings above, and 'of roofline'",
              "is floor / ms. 'vs FLA' is flash-linear-attention's ms over this row's, same shape and run.",
              "'in kernels' is the GPU's time inside the call's kernels (torch.profiler, per call) and its",
              f"share of ms; below {100 * LAUNCH_BOUND:.0f}% the row is launch-bound: the GPU waited for the host's",
              "launches, so the row times the host as much as the kernels (and moves with the host's speed",
              "and load). Rows of runs before this column existed leave it blank.",
              "'verified' is the check that ran before timing: the last 256 tokens of one (batch row, head)",
              "slice against the float64 oracle, under the suite's tolerance rule (relative RMS shown with",
              "its budget); forward+backward rows verify the forward output only (gradients are judged",
              "by the conformance suite's grad_* checks, not in the sweep).",
              "Only verified rows are plotted.", ""]  # fmt: skip
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    for mode in ("fwd", "fwdbwd", "decode"):
        rs = [r for r in rows if r["mode"] == mode]
        if rs:
            lines += [f"## Table: {MODE_NAMES[mode]}", "", *_table(rs, fla), ""]
    return "\n".join(lines)


def build(folder: Path) -> Path:
    """Write folder/README.md and its figures from folder/perf.json; returns the README path."""
    plt = _plt()
    data = json.loads((folder / "perf.json").read_text())
    good = [r for r in data["rows"] if plotted(r)]
    figures = []
    specs = [
        ("Roofline", "roofline.png", roofline, good),
        ("Latency against T", "latency.png", latency, [r for r in good if r["mode"] != "decode"]),
        ("Speedup over flash-linear-attention", "speedup.png", speedup, good if speedups(good) else []),
        ("Decode bandwidth against batch size", "decode.png", decode, [r for r in good if r["mode"] == "decode"]),
        ("Precision against T", "precision.png", precision, [r for r in good if r["mode"] != "decode"]),
    ]
    for title, name, draw, rows in specs:
        target = folder / name
        if not rows:
            target.unlink(missing_ok=True)
            continue
        draw(plt, data, rows, target)
        plt.close("all")
        figures.append((title, name))
    if not speedups(good):
        figures.append(("Speedup over flash-linear-attention", "(no verified flash-linear-attention rows in this run)"))
    readme = folder / "README.md"
    text = markdown(data, [(t, n) for t, n in figures if n.endswith(".png")])
    conf = conformance_rows(folder, data["environment"]["device"]) if data["environment"]["kind"] == "cuda" else []
    if conf:
        text += ("\n## Precision in the conformance reports of this device\n\n"
                 "The worst error against the float64 oracle over each report's oracle checks (varied T up to a\n"
                 "few thousand tokens, see reports/conformance/), relative RMS, with the suite's budget.\n\n"
                 "| report | check | dtype | rel RMS | budget | outcome |\n|---|---|---|---|---|---|\n"
                 + "\n".join(conf) + "\n")  # fmt: skip
    readme.write_text(text + _missing(figures))
    return readme


def _missing(figures) -> str:
    notes = [f"- {t}: {n.strip('()')}" for t, n in figures if not n.endswith(".png")]
    return ("\n## Not drawn\n\n" + "\n".join(notes) + "\n") if notes else ""


def main(argv=None) -> int:
    """Build README.md for every reports/<slug>/perf.json under the given folders (default reports/)."""
    roots = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or [Path("reports")]
    found = sorted({p.parent for root in roots for p in ([root / "perf.json"] if (root / "perf.json").exists()
                    else root.glob("*/perf.json"))})  # fmt: skip
    if not found:
        print(f"report: no perf.json under {', '.join(map(str, roots))}; run `kdaverify perf` first", file=sys.stderr)
        return 1
    try:
        for folder in found:
            print(f"report: {build(folder)}")
    except ImportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    return 0


# A GPU run's host is busy when its 1-minute load average passes half its cores: a launch-bound
# row then waits for the CPU. Seen on an H200 (thirteenth session): beside three jobs holding
# about 30 of 64 cores, fla's chunk_kda at B1 T4096 went from 0.598 to 0.975 ms forward and
# from 2.58 to 8.06 ms forward + backward, while the GPU-bound rows (T >= 16384) moved < 0.5%.
BUSY_HOST_LOAD = 0.5


def _host_line(env: dict) -> list[str]:
    """The report's line on the host's load during the run (perf.json's environment)."""
    load, cores = env["load_average"], env.get("cpu_count")
    head = (f"Host: {cores} cores, {env.get('torch_threads')} torch thread(s), 1-minute load average "
            f"{load:.1f} at the end of the run")  # fmt: skip
    if env["kind"] != "cuda":
        return [head + " (a load above the core count means other processes shared the cores, and CPU timings "
                "are slower and noisier for it).", ""]  # fmt: skip
    if cores and load > BUSY_HOST_LOAD * cores:
        return [f"**Busy host.** {head}: other processes held the CPU, so rows whose time is bound by kernel "
                "launches (small T, few sequences, decode, and providers that launch many kernels) may read "
                "slower than on an idle host; rows bound by the GPU are not affected.", ""]  # fmt: skip
    return [head + ".", ""]
