"""The sweep's machinery on the CPU: the smoke preset through `kdaverify perf` (pytest-benchmark
tests run once, --benchmark-disable) and `kdaverify report`; and the negative controls of the
check before timing: a wrong provider is timed but marked unverified, a missing one is
unavailable with its reason, never a crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kdaverify.equivalence.adapters import reference_recurrent_kda
from kdaverify.perf import providers
from kdaverify.perf.providers import Case, Provider
from kdaverify.perf.sweep import Sweep, cases

CEILINGS = {"measured": {"copy_gbs": 1.0, "bfloat16": 1e-3, "tf32": 1e-2, "float32": 1e-2}, "datasheet": None}


def test_smoke_sweep_and_report(tmp_path):
    """About 15 s on an idle 2-core machine: a process that imports torch and runs 14 tiny rows,
    then the report in this process."""
    out = tmp_path / "cpu"
    run = subprocess.run([sys.executable, "-m", "kdaverify", "perf", "--preset=smoke", "--device=cpu", f"--out={out}",
                          "--", "--benchmark-disable"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "perf.json").read_text())
    assert data["complete"] and len(data["rows"]) == len(cases("smoke", "cpu"))
    by = {(r["op"], r["provider"], r["mode"], r["T"]): r for r in data["rows"]}
    for op, provider, T in [("chunk_kda", "reference-chunkwise", 300), ("recurrent_kda", "reference-numpy", 32),
                            ("chunk_dplr", "reference-dplr", 300), ("attention", "sdpa", 300)]:  # fmt: skip
        row = by[(op, provider, "fwd", T)]  # T = 300 > the verified tail: the state hand-off path
        assert row["status"] == "ok" and row["verified"] and row["ms"] > 0 and 0 < row["roofline_fraction"]
        assert row["check"] == "sampled tail: o" and row["err_rel_rms"] <= row["budget_rel_rms"]
    assert by[("chunk_kda", "ours", "fwd", 32)]["status"].startswith("excluded: Triton interpreter")
    assert by[("chunk_kda", "fla", "fwd", 32)]["status"].startswith("unavailable:")
    assert by[("recurrent_kda", "reference-recurrent", "decode", 1)]["verified"]
    assert "ms" not in by[("chunk_kda", "ours", "fwd", 32)]
    pytest.importorskip("matplotlib", reason="the report needs matplotlib: pip install 'kdaverify[perf]'")
    from kdaverify.perf.report import build

    readme = build(out).read_text()
    for name in ("roofline.png", "latency.png", "decode.png", "precision.png"):
        assert f"]({name})" in readme and (out / name).stat().st_size > 1000
    assert "excluded: Triton interpreter" in readme and "speedup" in readme.lower()


@pytest.fixture
def fake(monkeypatch):
    """Register providers for one test."""

    def add(name, op, modes, load):
        monkeypatch.setattr(providers, "PROVIDERS", [*providers.PROVIDERS, Provider(name, op, modes, load)])

    return add


def _off_by(factor):
    def wrong(*args, **kwargs):
        o, S = reference_recurrent_kda(*args, **kwargs)
        return o * factor, S

    return wrong


def _forgets_state(q, k, v, g, beta, initial_state=None, **kw):
    return reference_recurrent_kda(q, k, v, g, beta, initial_state=None, **kw)


@pytest.mark.parametrize(
    "name, mode, T, load",
    [
        ("off-by-1e-4", "fwd", 300, lambda: _off_by(1 + 1e-4)),  # 100x a float32 budget, within bf16's
        ("forgets-state", "decode", 1, lambda: _forgets_state),
    ],
)
def test_wrong_provider_is_timed_but_unverified(fake, name, mode, T, load):
    fake(name, "recurrent_kda", (mode,), load)
    row, call = Sweep("cpu", CEILINGS, 0.0).run(
        Case(2, T, 2, 2, 8, 8, op="recurrent_kda", provider=name, mode=mode, dtype="float32")
    )
    assert row["status"] == "unverified" and row["verified"] is False and call is not None
    assert row["err_rel_rms"] > row["budget_rel_rms"] and row["ms"] > 0


def _vk(q, k, v, g, beta, initial_state=None, output_final_state=False, **kw):
    """reference_recurrent_kda with its states in the "VK" layout, as most engines keep them."""
    h0 = None if initial_state is None else initial_state.transpose(-1, -2)
    o, S = reference_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=output_final_state, **kw)
    return o, None if S is None else S.transpose(-1, -2).contiguous()


@pytest.mark.parametrize("mode, T", [("decode", 1), ("fwd", 300)])  # fwd T = 300: the tail starts from its state
def test_a_vk_provider_gets_and_is_checked_in_its_layout(monkeypatch, mode, T):
    """A provider declaring state_layout "VK" gets its initial state in that layout and its
    final state is read back in it: a correct one verifies, and the same kernel declared "KV"
    (the layout ignored) does not."""
    base = providers.PROVIDERS
    for layout, ok in (("VK", True), ("KV", False)):
        p = Provider("vk", "recurrent_kda", (mode,), lambda: _vk, state_layout=layout)
        monkeypatch.setattr(providers, "PROVIDERS", [*base, p])
        row, _ = Sweep("cpu", CEILINGS, 0.0).run(
            Case(2, T, 2, 2, 8, 8, op="recurrent_kda", provider="vk", mode=mode, dtype="float32")
        )
        assert row["verified"] is ok, (layout, row["err_rel_rms"])


def _strides_ignored(q, k, v, g, beta, **kw):
    """The reference reading q, k, v, g, beta from their storage as if contiguous."""
    from kdaverify.equivalence.layouts import as_if_contiguous

    return reference_recurrent_kda(*(as_if_contiguous(x) for x in (q, k, v, g, beta)), **kw)


def test_the_check_before_timing_hands_contiguous_prefixes(fake):
    """At B > 1 the check's prefix [:, :cut] is a strided slice; a kernel that is right on the
    contiguous inputs it is timed on must not be marked unverified for how it reads strides."""
    fake("contiguous-only", "recurrent_kda", ("fwd",), lambda: _strides_ignored)
    row, _ = Sweep("cpu", CEILINGS, 0.0).run(
        Case(2, 300, 2, 2, 8, 8, op="recurrent_kda", provider="contiguous-only", mode="fwd", dtype="float32")
    )
    assert row["verified"], row["err_rel_rms"]


def test_missing_provider_is_unavailable(fake):
    def load():
        raise NotImplementedError("chunk_kda: not written yet")

    fake("stub", "chunk_kda", ("fwd",), load)
    row, call = Sweep("cpu", CEILINGS, 0.0).run(
        Case(1, 8, 1, 1, 4, 4, op="chunk_kda", provider="stub", mode="fwd", dtype="float32")
    )
    assert call is None and row["status"] == "unavailable: NotImplementedError: chunk_kda: not written yet"
    assert "ms" not in row and "verified" not in row


def test_a_crashing_provider_is_not_hidden(fake):
    """Only a missing provider (ImportError, NotImplementedError) is 'unavailable'; any other
    exception is a failure of the row."""

    def broken(*args, **kwargs):
        raise RuntimeError("illegal memory access")

    fake("broken", "chunk_kda", ("fwd",), lambda: broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        Sweep("cpu", CEILINGS, 0.0).run(
            Case(1, 8, 1, 1, 4, 4, op="chunk_kda", provider="broken", mode="fwd", dtype="float32")
        )


def test_presets_cover_design_section_7():
    quick = cases("quick", "cuda")
    shapes = {(c.B, c.T) for c in quick if c.mode == "fwd"}
    assert shapes == {(1, 4096), (1, 16384), (8, 4096), (1, 65536)}
    assert all((c.H, c.K, c.V, c.dtype) == (32, 128, 128, "bfloat16") for c in quick)
    for op, mode in [("chunk_kda", "fwd"), ("chunk_kda", "fwdbwd"), ("chunk_dplr", "fwd"), ("attention", "fwd")]:
        assert {(c.B, c.T) for c in quick if (c.op, c.mode, c.provider) == (op, mode, "fla" if "kda" in op or
                "dplr" in op else "sdpa")} == shapes  # fmt: skip
    assert {c.B for c in quick if c.mode == "decode" and c.provider == "ours"} == {1, 64, 256}
    with pytest.raises(ValueError, match="preset"):
        cases("huge", "cpu")


def test_inputs_are_what_the_design_times():
    t = providers.inputs(Case(1, 64, 2, 2, 16, 16, op="chunk_kda", provider="x", mode="fwd", dtype="bfloat16"), "cpu")
    assert t["q"].dtype == torch.bfloat16 and torch.allclose(
        t["k"].float().norm(dim=-1), torch.ones(1, 64, 2), atol=1e-2
    )
    assert (t["g"] <= 0).all() and ((t["beta"] >= 0) & (t["beta"] <= 1)).all()


def test_perf_json_is_written_row_by_row(tmp_path):
    """A sweep stopped mid-way (a time limit's SIGINT) keeps the rows it finished, marks the
    row it was running as interrupted, and says it is incomplete; --perf-merge keeps the
    earlier file's rows that this run did not redo."""
    from kdaverify.perf import plugin

    class Config:
        options = {"perf_out": str(tmp_path / "{slug}"), "perf_merge": False, "perf_device": "cpu",
                   "perf_preset": "smoke"}  # fmt: skip

        def getoption(self, name):
            return self.options[name]

    state = plugin._State(Config())
    state.sweep = Sweep("cpu", CEILINGS)
    done = dict(Case(1, 32, 2, 2, 16, 16, op="chunk_kda", provider="p", mode="fwd", dtype="float32").as_dict(),
                status="ok", ms=1.0)  # fmt: skip
    running = Case(1, 64, 2, 2, 16, 16, op="chunk_kda", provider="p", mode="fwd", dtype="float32").as_dict()
    state.sweep.rows += [done, running]
    path = plugin._write(state, final=False)
    data = json.loads(path.read_text())
    first_run = data["environment"]["date"]
    assert not data["complete"] and data["rows"][0] == dict(done, run=first_run)
    assert data["rows"][1]["status"].startswith("interrupted")
    # a second run merging into it redoes the T = 64 row only
    Config.options["perf_merge"] = True
    again = plugin._State(Config())
    again.sweep = Sweep("cpu", CEILINGS)
    again.sweep.rows.append(dict(running, status="ok", ms=2.0))
    data = json.loads(plugin._write(again, final=True).read_text())
    assert [r["T"] for r in data["rows"]] == [32, 64] and data["rows"][1]["ms"] == 2.0
    assert not data["complete"]  # the merged-in file was incomplete
    assert data["rows"][0]["run"] == first_run and data["rows"][1]["run"] == data["environment"]["date"]


def test_speedups_compare_only_rows_of_one_run():
    """Rows merged from several runs: 'vs FLA' pairs a row only with FLA's row of the same run."""
    from kdaverify.perf.report import speedups

    row = dict(op="chunk_kda", mode="fwd", B=1, T=64, H=2, HV=2, K=16, V=16, dtype="float32")
    ours, fla = dict(row, provider="ours", ms=1.0, run="a"), dict(row, provider="fla", ms=2.0, run="a")
    assert speedups([ours, fla]) == [(ours, 2.0)]
    assert speedups([dict(ours, run="b"), fla]) == []


@pytest.mark.parametrize(("kind", "load", "busy"), [("cuda", 30.0, True), ("cuda", 4.0, False), ("cpu", 30.0, False)])
def test_report_flags_a_busy_host_on_a_gpu_run(kind, load, busy):
    """A GPU run whose host was loaded past half its cores says so in bold (its launch-bound
    rows may be slow); an idle one, and a CPU run, state the load plainly."""
    from kdaverify.perf.report import _host_line

    text = " ".join(_host_line(dict(kind=kind, load_average=load, cpu_count=32, torch_threads=16)))
    assert f"load average {load:.1f}" in text
    assert ("**Busy host.**" in text) == busy


@pytest.mark.parametrize(("gpu_ms", "cell"), [(0.5, "0.5 (71%) **launch-bound**"), (0.69, "0.69 (99%)"), (None, "")])
def test_table_marks_launch_bound_rows(gpu_ms, cell):
    """A row whose kernels filled less than LAUNCH_BOUND of its time is marked launch-bound in
    the table; a row from a run without kernel times leaves the cell blank."""
    from kdaverify.perf.report import _table

    row = dict(op="chunk_kda", provider="fla", mode="fwd", B=1, T=4096, H=2, HV=2, K=16, V=16, dtype="bfloat16",
               ms=0.7, gpu_ms=gpu_ms, status="ok", verified=True)  # fmt: skip
    line = _table([row], {})[2]
    assert f"| 0.7 | {cell} |" in line


@pytest.mark.parametrize(("err", "verified", "cell"), [(0.0041, True, "yes (rel RMS 0.0041 <= 0.018)"),
                                                       (0.27, False, "**no** (rel RMS 0.27 > 0.018)")])  # fmt: skip
def test_table_states_the_error_against_its_budget(err, verified, cell):
    from kdaverify.perf.report import _table

    row = dict(op="chunk_kda", provider="x", mode="fwd", B=8, T=4096, H=2, HV=2, K=16, V=16, dtype="bfloat16",
               ms=4.1, status="ok" if verified else "unverified", verified=verified, err_rel_rms=err,
               budget_rel_rms=0.018)  # fmt: skip
    assert f"| {cell} |" in _table([row], {})[2]


def test_report_shows_notes_added_after_the_run():
    from kdaverify.perf.report import markdown

    data = json.loads((Path(__file__).parents[1] / "reports" / "nvidia-h200" / "perf.json").read_text())
    assert "- a note |x|" in markdown(dict(data, notes=["a note |x|"]), [])


def test_accuracy_command_measures_against_the_oracle():
    """perf.accuracy at a small size: the reference chunkwise adapter in float32 sits at
    float32 rounding of the oracle (a mix-up of outputs, inputs or the oracle would not)."""
    from kdaverify.perf.accuracy import measure

    r = measure("kdaverify.equivalence.adapters:reference_chunk_kda", 200, 1, 16, 8, "float32", None, "cpu")
    assert r["o"].rel_rms < 1e-5 and r["final_state"].rel_rms < 1e-5 and r["seconds"] > 0


def test_accuracy_command_measures_gradients_against_the_oracle():
    """perf.accuracy --grad: the float32 recurrence's autograd gradients sit at float32
    rounding of the float64 adjoint recurrence; a gradient of the wrong input would not."""
    from kdaverify.perf.accuracy import GRAD_NAMES, measure_grads

    r = measure_grads("kdaverify.equivalence.adapters:reference_recurrent_kda", 100, 1, 16, 8, "float32", None, "cpu")
    assert all(r[f"d{n}"].rel_rms < 1e-5 for n in GRAD_NAMES) and r["seconds"] > 0


def test_timers_run_without_the_scratch_poisoning(monkeypatch):
    """This repository's conftest NaN-fills our kernels' scratch (runtime.POISON_SCRATCH) and
    the sweep runs as tests: every timer must call with it off, or a row times the fills (0.3
    ms of chunk_kda's 2.2 at B1 T16384 on an H200 went unnoticed for a session), and restore
    it after."""
    from kdaverify.kernels import runtime
    from kdaverify.perf import timing

    monkeypatch.setattr(runtime, "POISON_SCRATCH", True)
    seen = []

    def call():
        seen.append(runtime.POISON_SCRATCH)

    timing.median_ms(call, "cpu", budget_s=0.0)
    timing.peak_mib(call, "cpu")
    timing.synchronized(call, "cpu")()
    assert seen and not any(seen), seen
    assert runtime.POISON_SCRATCH is True
