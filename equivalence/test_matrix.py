"""The public-kernel adapters and the matrix (issue 11), on a machine without either engine:
declarations, the usage errors of a missing engine or module, the shim on a synthetic wheel,
the exact mapping of g and beta onto the decode kernels' inputs, and the matrix README built
from synthetic reports."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile

import pytest
import torch
from hypothesis import given, settings
from kdaverify.equivalence import matrix, public_kernels, shim
from kdaverify.equivalence.capabilities import Capabilities, options_from_strings
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.implementation import load_implementation
from kdaverify.equivalence.strategies import case_specs, fitted

ADAPTED = [e for e in public_kernels.MATRIX if e.adapter]
ENGINE_ENV = {"sglang": shim.SGLANG.env, "vllm": shim.VLLM.env}


def test_matrix_entries_are_complete():
    names = [e.name for e in public_kernels.MATRIX]
    assert len(names) == len(set(names))
    for e in public_kernels.MATRIX:
        if e.adapter:
            fn = getattr(public_kernels, e.adapter)
            assert isinstance(fn.kdaverify_capabilities, Capabilities), e.name
            assert callable(fn.kdaverify_available), e.name
        else:
            assert e.why_not, f"{e.name}: an implementation without an adapter must say why"


@pytest.mark.parametrize("entry", ADAPTED, ids=lambda e: e.name)
def test_declarations_are_valid(entry):
    """Each declaration survives a round trip through Capabilities' own validation, and the
    decode kernels that take beta through a sigmoid declare max_beta = 1."""
    caps = getattr(public_kernels, entry.adapter).kdaverify_capabilities
    assert Capabilities(**caps.declared()) == caps
    if "decode" in entry.name:
        assert caps.max_beta == 1.0 and caps.state_layout == "VK"


@pytest.fixture
def engines_missing(monkeypatch):
    """Neither engine installed and no environment variable naming its files."""
    real = importlib.util.find_spec
    for env in ENGINE_ENV.values():
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ENGINE_ENV else real(name, *a))


@pytest.mark.parametrize("entry", ADAPTED, ids=lambda e: e.name)
def test_missing_engine_is_a_usage_error_naming_the_install(entry, engines_missing):
    with pytest.raises(ValueError) as err:
        load_implementation(f"kdaverify.equivalence.public_kernels:{entry.adapter}")
    source = shim.SOURCES[entry.engine]
    msg = str(err.value)
    assert "--kda-impl" in msg and f"pip download {source.package}=={source.version} --no-deps" in msg
    assert source.env in msg


def test_wrong_engine_path_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(shim.SGLANG.env, str(tmp_path / "nowhere.whl"))
    with pytest.raises(ValueError, match=f"{shim.SGLANG.env}=.*expected a sglang wheel"):
        load_implementation("kdaverify.equivalence.public_kernels:sglang_chunk_kda")


@pytest.mark.parametrize(
    "adapter, module", [("sglang_helion_chunk_kda", "helion"), ("sglang_cutedsl_decode", "cutlass")]
)
def test_missing_kernel_language_names_its_extra(adapter, module, monkeypatch, tmp_path):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"not applicable: {module} is installed here, so its absence cannot be shown")
    (tmp_path / "sglang").mkdir()
    monkeypatch.setenv(shim.SGLANG.env, str(tmp_path))
    with pytest.raises(ValueError, match=rf"needs the module '{module}'.*pip install 'kdaverify\[sglang-"):
        load_implementation(f"kdaverify.equivalence.public_kernels:{adapter}")


def test_shim_loads_a_module_without_its_parents_init(tmp_path, monkeypatch):
    """A wheel whose package __init__ would fail: the shim unpacks it, runs only the module's
    file, and hands it the stubbed helper; a package named in run_init runs its __init__."""
    pkg = "kdaverify_fake_engine"
    wheel = tmp_path / f"{pkg}-1.2.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "raise ImportError('the whole engine')\n")
        zf.writestr(f"{pkg}/ops/__init__.py", "raise ImportError('the ops registry')\n")
        zf.writestr(f"{pkg}/ops/kernel.py", f"from {pkg}.utils import twice\n\nANSWER = twice(21)\n")
        # a kernel folder whose __init__ holds a constant its kernels import (SGLang's helion/)
        zf.writestr(f"{pkg}/ops/consts/__init__.py", "THRESHOLD = 12\n")
        zf.writestr(f"{pkg}/ops/consts/kernel.py", f"from {pkg}.ops.consts import THRESHOLD\n\nT2 = 2 * THRESHOLD\n")
        zf.writestr(f"{pkg}-1.2.3.dist-info/METADATA", "Name: fake\nVersion: 1.2.3\n")
    source = shim.Source(pkg, "KDAVERIFY_FAKE_ENGINE", "1.2.3")
    monkeypatch.setenv(source.env, str(wheel))
    monkeypatch.setenv(shim.CACHE_ENV, str(tmp_path / "cache"))
    try:
        mod = shim.load(source, f"{pkg}.ops.kernel", {f"{pkg}.utils": {"twice": lambda x: 2 * x}})
        assert mod.ANSWER == 42
        assert shim.version(source) == "1.2.3"
        with pytest.raises(ValueError, match="expected a module inside"):
            shim.load(source, "elsewhere.kernel")
        # run_init runs the named package's own __init__ (and only that one)
        assert shim.load(source, f"{pkg}.ops.consts.kernel", run_init=(f"{pkg}.ops.consts",)).T2 == 24
        assert sys.modules[f"{pkg}.ops.consts"].THRESHOLD == 12 and not hasattr(sys.modules[f"{pkg}.ops"], "THRESHOLD")
    finally:
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]


def test_gate_and_beta_map_exactly_onto_the_fused_forms():
    """-softplus(a) recovers g (softplus as the kernels form it: x itself past 20) and
    sigmoid(b) recovers beta, at the edges too; beta > 1 is refused with its reason."""
    g = torch.tensor([0.0, -1e-6, -0.3, -5.0, -19.9, -20.5, -1000.0, float("-inf")])
    a = public_kernels.raw_gate(g).double()
    softplus = torch.where(a > public_kernels.SOFTPLUS_THRESHOLD, a, torch.log1p(torch.exp(a)))
    assert torch.allclose(-softplus, g.double(), rtol=1e-6, atol=0) and (-softplus)[-1] == float("-inf")
    beta = torch.tensor([0.0, 1e-4, 0.5, 0.999, 1.0])
    assert torch.allclose(torch.sigmoid(public_kernels.beta_logit(beta).double()), beta.double(), rtol=1e-6)
    with pytest.raises(ValueError, match="beta must lie in \\[0, 1\\]"):
        public_kernels.beta_logit(torch.tensor([1.5]))


def test_token_by_token_runs_a_one_token_kernel_over_packed_sequences():
    """The decode driver with the float32 recurrence as its one-token kernel equals the
    recurrence over whole sequences, an empty sequence keeping its initial state."""
    from kdaverify.reference import kda_recurrent

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 7, 1, 3, generator=gen), torch.randn(1, 7, 1, 3, generator=gen) / 2
    v, g = torch.randn(1, 7, 2, 4, generator=gen), -torch.rand(1, 7, 2, 3, generator=gen)
    beta, h0 = torch.rand(1, 7, 2, generator=gen), torch.randn(3, 2, 4, 3, generator=gen)  # VK
    cu = torch.tensor([0, 3, 3, 7])

    def step(rows, pool, slots):
        flat = [x.reshape(-1, *x.shape[2:])[rows].unsqueeze(1) for x in (q, k, v, g, beta)]
        o, S = kda_recurrent(*flat, initial_state=pool[slots.long()].transpose(-1, -2), output_final_state=True)
        pool[slots.long()] = S.transpose(-1, -2)
        return o[:, 0]

    o, S = public_kernels.token_by_token(step, q, k, v, g, beta, h0, True, cu)
    o_ref, S_ref = kda_recurrent(q, k, v, g, beta, initial_state=h0.transpose(-1, -2), output_final_state=True,
                                 cu_seqlens=cu)  # fmt: skip
    assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(S.transpose(-1, -2), S_ref, atol=1e-5)
    assert torch.equal(S[1], h0[1])


class _VllmRecurrentKernel:
    """Stands in for vLLM's ops/kda.py where its fused_recurrent_kda meets the adapter (read
    from fused_recurrent.py with continuous batching and the final state in place): o is
    allocated like k and stored as [B, T, HV, V]; a sequence whose slot is 0 or below (the
    null block) is skipped; the slot of token t is read t elements past the index row's start
    in memory, whatever the index's token stride. Where the kernel would read or write past
    a buffer, this raises IndexError. The arithmetic is the float32 recurrence."""

    @staticmethod
    def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, inplace_final_state=True,
                            use_qk_l2norm_in_kernel=True, cu_seqlens=None, ssm_state_indices=None):  # fmt: skip
        from kdaverify.reference import kda_recurrent

        assert inplace_final_state and ssm_state_indices is not None and not use_qk_l2norm_in_kernel
        B, T = q.shape[:2]
        spans = [(n * T, n * T + T) for n in range(B)] if cu_seqlens is None else list(
            zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))  # fmt: skip
        idx = ssm_state_indices
        held = idx.untyped_storage().nbytes() // idx.element_size() - idx.storage_offset()
        memory = idx.as_strided((held,), (1,))  # the index as the kernel reads it: row start + t
        o = torch.full_like(k, float("nan")).reshape(-1)
        flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v, g, beta)]
        width = v.shape[2] * v.shape[3]
        for n, (bos, eos) in enumerate(spans):
            row = n * idx.stride(0)
            if eos == bos or int(memory[row]) <= 0:
                continue
            S = initial_state[int(memory[row])].transpose(-1, -2)[None]
            for t in range(eos - bos):
                step = [x[bos + t][None, None] for x in flat]
                out, S = kda_recurrent(*step, scale=scale, initial_state=S, output_final_state=True)
                if (bos + t + 1) * width > o.numel():
                    raise IndexError("o is written past its end")
                o[(bos + t) * width : (bos + t + 1) * width] = out.reshape(-1)
                slot = int(memory[row + t])  # IndexError where the kernel reads past the index
                if slot > 0:
                    initial_state[slot] = S[0].transpose(-1, -2)
        return o.reshape(k.shape), initial_state


@pytest.mark.parametrize("B, T, cu", [(1, 4, None), (3, 4, None), (1, 9, [0, 3, 3, 9]), (1, 5, [0, 0, 5])])
def test_vllm_recurrent_adapter_meets_its_kernels_conventions(B, T, cu, monkeypatch):
    """The vLLM fused_recurrent_kda adapter keeps slot 0 free (vLLM's null block) and gives
    the kernel a contiguous index with a column per token; every sequence then runs from
    its own initial state and returns its own final state. (Slots 0..N-1 as an expanded
    index skipped the first sequence and read past the index: issue 11's interpreter crash.)"""
    from kdaverify.reference import kda_recurrent

    monkeypatch.setattr(public_kernels, "vllm_module", lambda name: _VllmRecurrentKernel)
    gen = torch.Generator().manual_seed(B * T)
    N = B if cu is None else len(cu) - 1
    q, k = torch.randn(B, T, 1, 4, generator=gen), torch.randn(B, T, 1, 4, generator=gen) / 2
    v, g = torch.randn(B, T, 1, 4, generator=gen), -torch.rand(B, T, 1, 4, generator=gen)
    beta, h0 = torch.rand(B, T, 1, generator=gen), torch.randn(N, 1, 4, 4, generator=gen)  # VK
    cu = None if cu is None else torch.tensor(cu)
    o, S = public_kernels.vllm_fused_recurrent_kda(q, k, v, g, beta, None, h0, True, cu)
    o_ref, S_ref = kda_recurrent(q, k, v, g, beta, initial_state=h0.transpose(-1, -2), output_final_state=True,
                                 cu_seqlens=cu)  # fmt: skip
    assert S.shape == h0.shape
    assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(S.transpose(-1, -2), S_ref, atol=1e-5)


@pytest.mark.parametrize("HV, V", [(2, 4), (1, 8), (1, 2)])
def test_vllm_recurrent_adapter_refuses_shapes_its_o_does_not_hold(HV, V, monkeypatch):
    """vLLM's wrapper sizes o by k: GVA or V != K is refused before the kernel runs."""
    monkeypatch.setattr(public_kernels, "vllm_module", lambda name: _VllmRecurrentKernel)
    q = k = torch.zeros(1, 2, 1, 4)
    v, g, beta = torch.zeros(1, 2, HV, V), torch.zeros(1, 2, HV, 4), torch.zeros(1, 2, HV)
    with pytest.raises(ValueError, match="allocates o like k"):
        public_kernels.vllm_fused_recurrent_kda(q, k, v, g, beta)


@settings(max_examples=10, deadline=None, database=None)
@given(spec=case_specs(Capabilities(max_beta=1.0)))
def test_max_beta_bounds_every_draw(spec):
    assert spec.beta_max <= 1.0


def test_max_beta_bounds_explicit_examples_and_parses():
    assert fitted(CaseSpec(beta_max=2.0), Capabilities(max_beta=1.0)).beta_max == 1.0
    assert options_from_strings({"max_beta": "1"})["max_beta"] == 1.0
    with pytest.raises(ValueError, match="max_beta"):
        Capabilities(max_beta=3.0)


# ---------------------------------------------------------------- the README


def _report(name, checks, finished=True, caps=None):
    failed = any(c["outcome"] == "failed" for c in checks)
    return {
        "implementation": name, "capabilities": caps or Capabilities(precision="tf32", gva=False).declared(),
        "finished": finished, "conforms": finished and not failed,
        "counts": {"passed": sum(c["outcome"] == "passed" for c in checks)}, "checks": checks,
    }  # fmt: skip


def _check(name, outcome, used=None, dtype="bfloat16"):
    c = {"check": name, "dtype": dtype, "outcome": outcome}
    if used is not None:
        c["worst"] = {"what": "o", "budget_used": used, "measured": {}, "budget": {}}
    return c


def test_matrix_readme_from_synthetic_reports(tmp_path):
    folder = tmp_path / "reports" / "matrix" / "nvidia-h100-80gb-hbm3"
    a, b, c = public_kernels.MATRIX[0].name, public_kernels.MATRIX[1].name, public_kernels.MATRIX[2].name
    passed = [_check("oracle", "passed", 0.41), _check("causality", "passed"), _check("guard_bands", "passed", 0.9)]
    for name, rep in {
        a: _report(a, passed),
        b: _report(b, [_check("oracle", "passed", 0.2), _check("empty_sequences", "failed", dtype="float32")]),
        c: _report(c, [_check("oracle", "passed", 0.3)], finished=False),
    }.items():  # fmt: skip
        (folder / name).mkdir(parents=True)
        (folder / name / "report.json").write_text(json.dumps(rep))
    missing = "not applicable: vllm's kernel files are not available"
    rows = [{"name": n, "version": "0.5.23"} for n in (a, b, c)]
    rows.append({"name": "vllm-chunk_kda", "version": None, "reason": missing})
    (folder / matrix.RUN).write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "profile": "gpu", "rows": rows}))
    perf = {"environment": {"device": "NVIDIA H100 80GB HBM3"}, "notes": ["B8 row: a defect of the check"], "rows": [
        {"provider": a, "op": "chunk_kda", "mode": "fwd", "B": 1, "T": 4096, "H": 32, "K": 128, "dtype": "bfloat16",
         "status": "ok", "err_rel_rms": 4.5e-3, "ms": 1.02, "run": "2026-11-29 08:52:04 UTC"},
        {"provider": a, "op": "chunk_kda", "mode": "fwd", "B": 8, "T": 4096, "H": 32, "K": 128, "dtype": "bfloat16",
         "status": "unverified", "err_rel_rms": 0.27, "ms": 4.11},
        {"provider": "fla", "op": "chunk_kda", "mode": "fwd", "B": 1, "T": 4096, "H": 32, "K": 128, "dtype": "bfloat16",
         "status": "ok", "ms": 1.05},
    ]}  # fmt: skip
    (tmp_path / "reports" / folder.name).mkdir()
    (tmp_path / "reports" / folder.name / "perf.json").write_text(json.dumps(perf))

    text = matrix.build(folder).read_text()
    lines = {ln.split(" | ")[0].removeprefix("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "**conforms**" in lines[a] and "0.90 (guard_bands [bfloat16])" in lines[a]
    assert f"[report]({a}/report.md)" in lines[a] and "bfloat16 T4096: 0.0045;" in lines[a] and "1.02 ms;" in lines[a]
    assert "(sweep run 2026-11-29 08:52:04 UTC)" in lines[a] and "- B8 row: a defect of the check" in text
    assert "bfloat16 B8 T4096: 0.27 (unverified)" in lines[a] and "fwd B8 T4096: 4.11 ms (unverified)" in lines[a]
    assert "precision=tf32; gva=no" in lines[a]
    assert "**fails** 1: empty_sequences [float32]" in lines[b] and "not measured" in lines[b]
    assert "incomplete" in lines[c]
    assert missing in lines["vllm-chunk_kda"]
    flashkda = next(e for e in public_kernels.MATRIX if e.name == "flashkda")
    assert flashkda.why_not in lines["flashkda"] and "no adapter" in lines["flashkda"]
    assert "| fla | chunk_kda fwd |" in text and "1 conform, 1 fail at least one check, 1 did not finish" in text
    assert text.count("| not run |") and f", {text.count('| not run |')} not run yet." in text  # not "could not run"


def test_perf_sweep_times_adapted_kernels_under_their_matrix_names(engines_missing):
    """Every adapted matrix row is a perf provider of the same name (the matrix's error and
    time columns come from those rows), chunked kernels timed as chunk_kda forward and the
    rest as decode, with the declared precision; swept only when named; without its engine a
    row is unavailable with the install command, never a crash."""
    from kdaverify.perf import providers
    from kdaverify.perf.sweep import cases

    public = {p.name: p for p in providers.PROVIDERS if not p.default}
    assert set(public) == {e.name for e in ADAPTED}
    for e in ADAPTED:
        p = public[e.name]
        assert (p.op, p.modes) == (
            ("chunk_kda", ("fwd",)) if "chunk_kda" in e.adapter else ("recurrent_kda", ("decode",))
        )
        assert p.precision == getattr(public_kernels, e.adapter).kdaverify_capabilities.precision
        assert p.devices == ("cuda",)
    assert not any(c.provider in public for c in cases("quick", "cuda"))
    named = cases("quick", "cuda", ["vllm-chunk_kda", "sglang-triton-packed-decode"])
    assert {(c.provider, c.mode, c.B, c.T) for c in named} == {
        *(("vllm-chunk_kda", "fwd", B, T) for B, T in ((1, 4096), (1, 16384), (8, 4096), (1, 65536))),
        *(("sglang-triton-packed-decode", "decode", N, 1) for N in (1, 64, 256)),
    }
    with pytest.raises(
        providers.Unavailable, match=r"kernel files are not available; pip download vllm==0\.33\.0 --no-deps"
    ):
        providers.find("vllm-chunk_kda", "chunk_kda").callable()


def test_plan_on_a_cpu_marks_gpu_only_kernels(engines_missing):
    cpu_only = {e.name: matrix.plan(e, "cpu") for e in public_kernels.MATRIX}
    assert all(reason.startswith("not applicable: ") for reason in cpu_only.values())
    assert "needs a CUDA GPU" in cpu_only["sglang-helion-chunk_kda"]
    assert "pip download sglang==0.5.23" in cpu_only["sglang-triton-chunk_kda"]


def test_a_row_past_its_limit_stops_with_its_workers(tmp_path):
    """A verify run past the row's limit is stopped as a process group: its child processes
    (pytest-xdist workers) die with it instead of running beside the next row."""
    import os
    import time

    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    with open(tmp_path / "verify.log", "w") as log:
        assert matrix._verify([sys.executable, "-c", script], log, timeout_s=3) == "timeout"
    assert time.monotonic() - started < 40
    child = int(pid_file.read_text())

    def alive(pid: int) -> bool:  # a zombie (killed, not yet reaped by whatever adopted it) is dead
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return True

    for _ in range(50):
        if not alive(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the verify run's child process {child} outlived the row's limit")


def test_logs_name_no_machine_paths(tmp_path, monkeypatch):
    import sysconfig
    from pathlib import Path

    from kdaverify.equivalence import shim

    monkeypatch.setenv(shim.CACHE_ENV, str(tmp_path / "cache"))
    site = sysconfig.get_paths()["purelib"]
    ours = Path(matrix.__file__).resolve().parent.parent
    text = (
        f"{site}/pytest_benchmark/logger.py:44: warning\nreport: {tmp_path}/out/row/report.md\n"
        f"{tmp_path}/cache/wheels/sglang-0.5.23-py3-none-any/sglang/fla/kda.py:1304: in chunk_kda\n"
        f"{ours}/equivalence/cases.py:25\n[gw1] linux -- Python 3.12.3 {sys.executable}\n"
    )
    scrubbed = matrix.scrub_paths(text, tmp_path / "out")
    assert site not in scrubbed and str(tmp_path) not in scrubbed and str(ours) not in scrubbed
    assert "<site-packages>/pytest_benchmark/logger.py:44" in scrubbed
    assert "<wheels>/sglang-0.5.23-py3-none-any/sglang/fla/kda.py:1304" in scrubbed
    assert "<kdaverify>/equivalence/cases.py:25" in scrubbed and sys.executable not in scrubbed
    assert matrix.scrub_paths(f"report: {tmp_path}/row/report.md", tmp_path) == "report: <out>/row/report.md"


@settings(max_examples=30, deadline=None, database=None)
@given(spec=case_specs(Capabilities(reset_gates=False)))
def test_reset_gates_no_never_draws_minus_infinity(spec):
    assert spec.gate != "reset"


def test_reset_gates_no_moves_explicit_examples_to_finite_masks_and_parses():
    """An example written with g = -inf keeps its shape and takes g = -1000 instead, which
    decays as completely (exp(-1000) = 0) without the -inf."""
    spec = CaseSpec(B=2, T=19, H=2, G=2, K=5, V=7, gate="reset", seed=10, h0=True)
    assert fitted(spec, Capabilities(reset_gates=False)) == spec.with_(gate="masked")
    assert fitted(spec, Capabilities()) == spec
    assert options_from_strings({"reset_gates": "no"})["reset_gates"] is False


def test_rows_run_in_separate_sittings_accumulate_in_one_folder(tmp_path, monkeypatch):
    """`matrix --only A`, then `--only B`, into one folder: run.json holds both rows, each with
    its engine version, and the rows not run keep theirs too; another device or profile is
    refused rather than mixed in. A row that runs again loses its earlier report first."""
    import kdaverify.perf.sweep as sweep

    a, b = (e.name for e in ADAPTED[:2])
    monkeypatch.setattr(sweep, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(matrix, "plan", lambda entry, device: None)
    monkeypatch.setattr(matrix, "engine_version", lambda entry: "9.9")
    monkeypatch.setattr(matrix, "_verify", lambda cmd, log, timeout_s: 0)
    out = tmp_path / "m"
    matrix.run("cuda", str(out), "gpu", only=[a])
    (out / a / "report.md").write_text("a report")  # as if verify had written one
    matrix.run("cuda", str(out), "gpu", only=[b])
    rows = {r["name"]: r for r in json.loads((out / "run.json").read_text())["rows"]}
    assert rows[a]["exit"] == 0 and rows[b]["exit"] == 0 and "date" in rows[a]
    assert all(r["version"] == "9.9" for r in rows.values()) and len(rows) == len(public_kernels.MATRIX)
    assert (out / a / "report.md").exists()  # a row not redone keeps its report
    matrix.run("cuda", str(out), "gpu", only=[a])
    assert not (out / a / "report.md").exists()  # redone: the stale report is gone
    with pytest.raises(ValueError, match="out: .* holds a run on Fake GPU at profile gpu"):
        matrix.run("cuda", str(out), "ci", only=[a])
