"""The memory layouts of issue 10 (equivalence/layouts.py) and the GPU draws
(strategies.sizes_for, compile buckets), checked on the CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.implementation import Capabilities
from kdaverify.equivalence.layouts import (
    GUARD,
    STRIDED_LAYOUTS,
    GuardBands,
    as_if_contiguous,
    read_past_end,
)
from kdaverify.equivalence.strategies import (
    CHUNK_BOUNDARY_T,
    GPU_GRAD_STATE_ELEMENTS,
    GPU_HEAD_SIZES,
    GPU_STATE_ELEMENTS,
    compile_buckets,
    is_power_of_two,
    sizes_for,
    strategy_for,
)

T_INPUTS = CaseSpec(B=2, T=5, H=2, G=2, K=3, V=5, h0=True).arrays()


def tensors():
    return {n: None if x is None else torch.as_tensor(x, dtype=torch.float32) for n, x in T_INPUTS.items()}


@pytest.mark.parametrize("kind", ["nan", "huge"])
def test_guard_bands_catch_writes_and_hold_poison(kind):
    t = tensors()
    bands = GuardBands(t, kind)
    for n, x in t.items():
        if x is not None:
            assert torch.equal(bands.guarded[n], x) and bands.guarded[n].is_contiguous()
    assert bands.changed() == []
    after = read_past_end(bands.guarded["initial_state"], 3)
    assert (after.isnan() if kind == "nan" else after == 1e30).all()  # what a read past the end sees
    s = bands.guarded["initial_state"]
    torch.as_strided(s, (1,), (1,), s.storage_offset() + s.numel()).fill_(0.0)  # one element past the end
    assert bands.changed() == ["initial_state"]
    v = bands.guarded["v"]
    torch.as_strided(v, (1,), (1,), GUARD - 1).fill_(0.0)  # one element before the start
    assert bands.changed() == ["v", "initial_state"]


@pytest.mark.parametrize("layout", sorted(STRIDED_LAYOUTS))
def test_strided_layouts_are_views_with_the_same_values(layout):
    t = tensors()
    views = STRIDED_LAYOUTS[layout](t)
    for n in ("q", "k", "v", "g", "beta"):
        assert torch.equal(views[n], t[n]), n
    assert not all(views[n].is_contiguous() for n in ("q", "k", "v"))
    misread = [n for n in ("q", "k", "v") if not torch.equal(as_if_contiguous(views[n]), t[n])]
    assert misread, "a kernel ignoring strides must read something else"


def test_read_past_end_pads_with_zeros_where_storage_ends():
    x = torch.arange(6.0)
    assert read_past_end(x[:4], 3).tolist() == [4.0, 5.0, 0.0]


def test_gpu_sizes_and_buckets():
    cpu, gpu = sizes_for("cpu"), sizes_for("cuda:0")
    assert cpu.buckets is None and max(cpu.heads) <= 12
    assert gpu.heads == GPU_HEAD_SIZES and gpu.max_heads == 64 and gpu.max_B == 16 and gpu.many_seqs == 2000
    b = compile_buckets(GPU_HEAD_SIZES, seed=0)
    assert len(b) == 4 and b[0][:2] == (256, 256)
    assert not is_power_of_two(b[1][0]) and not is_power_of_two(b[1][1]) and b[1][3] == 64
    assert all(HV % H == 0 and HV <= 64 and K in GPU_HEAD_SIZES and V in GPU_HEAD_SIZES for K, V, H, HV in b)
    assert compile_buckets(GPU_HEAD_SIZES, seed=0) == b != compile_buckets(GPU_HEAD_SIZES, seed=1)
    assert sizes_for("cuda", head_sizes=(64, 128)).heads == (64, 128)
    assert set(CHUNK_BOUNDARY_T) >= {15, 16, 17, 33, 63, 64, 65, 129}


@pytest.mark.parametrize(
    "caps",
    [Capabilities(), Capabilities(head_sizes=GPU_HEAD_SIZES, gva=False), Capabilities(head_sizes=(64, 128, 256))],
    ids=["default", "no-gva", "three-sizes"],
)
def test_gpu_examples_stay_in_the_buckets(caps):
    """On a GPU the explicit examples of every family take the run's buckets too (each other
    (K, V, H, HV) is one more compile and autotuning key per kernel), keeping their T, B,
    packing, gate and seed, and GVA where they have it and it is declared; on the CPU they
    are as written (fitted to the declaration)."""
    from kdaverify.equivalence.strategies import EXAMPLES, examples_for, fitted

    buckets = sizes_for("cuda", caps.head_sizes).buckets
    for family in EXAMPLES:
        cpu, gpu = examples_for(family, caps, "cpu"), examples_for(family, caps, "cuda")
        assert cpu == list(dict.fromkeys(s for s in map(lambda x: fitted(x, caps), EXAMPLES[family]()) if s))
        assert len(gpu) <= len(cpu) and (gpu or not cpu)
        for spec in gpu:  # without GVA declared, a bucket's (K, V, H) with HV = H, as the draws take it
            shape = (spec.K, spec.V, spec.H, spec.HV) if caps.gva else (spec.K, spec.V, spec.H)
            assert shape in {b if caps.gva else b[:3] for b in buckets} and (caps.gva or spec.G == 1), (family, spec)
        for a, b in zip(cpu, gpu, strict=False) if len(gpu) == len(cpu) else ():
            assert (a.T, a.B, a.seqlens, a.gate, a.seed, a.h0) == (b.T, b.B, b.seqlens, b.gate, b.seed, b.h0)
            assert (a.G > 1) <= (b.G > 1) or not caps.gva


@pytest.mark.parametrize("family", ["general", "varlen", "guard_bands", "gva", "length_one"])
@pytest.mark.parametrize("cap", [None, GPU_GRAD_STATE_ELEMENTS], ids=["forward", "gradient"])
@given(data=st.data())
def test_gpu_draws_stay_in_the_buckets(family, cap, data):
    """On a GPU every case's (K, V, H, HV) is one of the run's buckets (so Triton compiles a
    handful of kernels), packed batches reach up to 2000 sequences of 1 to 3 tokens, and the
    state pool [N, HV, K, V] stays within GPU_STATE_ELEMENTS (the float64 oracle holds it), or
    within GPU_GRAD_STATE_ELEMENTS for the gradient checks (their oracle runs on the host); a
    packed batch keeps at least 2 sequences."""
    caps = Capabilities()
    buckets = sizes_for("cuda").buckets
    spec = data.draw(strategy_for(family, caps, "cuda", cap))
    assert (spec.K, spec.V, spec.H) in {b[:3] for b in buckets}
    assert spec.HV in {b[3] for b in buckets if b[:3] == (spec.K, spec.V, spec.H)}
    if spec.seqlens is not None:
        assert len(spec.seqlens) <= 2000
    N = spec.B if spec.seqlens is None else len(spec.seqlens)
    row, most = spec.HV * spec.K * spec.V, cap or GPU_STATE_ELEMENTS
    assert N * row <= most or (N <= 2 and row <= most), f"state pool {N} x {row} elements over {most}"
    if family == "guard_bands":
        assert not (is_power_of_two(spec.K) and is_power_of_two(spec.V)) and spec.T % 64


@given(spec=strategy_for("empty_sequences", Capabilities()))
def test_empty_sequence_cases_have_empty_sequences(spec):
    assert 0 in spec.seqlens and sum(spec.seqlens) == spec.T and any(spec.seqlens)


# ------------------------------------------------------------- declared refusals


def _refusing(words: str, when):
    """The default implementation, except that it raises ValueError(words) when when(args)."""
    from kdaverify.equivalence.adapters import reference_chunk_kda

    def fn(q, k, v, g, beta, **kw):
        if when(q, k, v, g, beta, kw):
            raise ValueError(words)
        return reference_chunk_kda(q, k, v, g, beta, **kw)

    return fn


def _harness(fn, **caps):
    from kdaverify.equivalence.implementation import Implementation
    from kdaverify.equivalence.relations import Harness

    return Harness(Implementation(fn, "refusing", Capabilities(**caps)), torch.float32)


def _strided(q, k, v, g, beta, kw):
    return not all(x.is_contiguous() for x in (q, k, v, g, beta))


def _empty(q, k, v, g, beta, kw):
    cu = kw.get("cu_seqlens")
    return cu is not None and bool((cu[1:] == cu[:-1]).any())


SPEC = CaseSpec(B=2, T=9, H=1, G=2, K=3, V=4, h0=True)
EMPTY = CaseSpec(T=9, H=1, K=3, V=4, h0=True, seqlens=(0, 4, 0, 5, 0))


def test_strided_error_declared_and_given():
    from kdaverify.equivalence.relations import strided_inputs

    strided_inputs(_harness(_refusing("q: expected a contiguous tensor", _strided), strided="error"), SPEC)
    with pytest.raises(AssertionError, match="does not say why"):
        strided_inputs(_harness(_refusing("bad input", _strided), strided="error"), SPEC)
    with pytest.raises(AssertionError, match="but the call returned"):
        strided_inputs(_harness(_refusing("", lambda *a: False), strided="error"), SPEC)
    with pytest.raises(ValueError, match="contiguous"):  # refusing without declaring it is a failure
        strided_inputs(_harness(_refusing("q: expected a contiguous tensor", _strided)), SPEC)


def test_empty_sequences_refused_when_declared():
    from kdaverify.equivalence.relations import empty_sequences

    refuses = _refusing("cu_seqlens: empty sequences are not supported", _empty)
    empty_sequences(_harness(refuses, empty_sequences=False), EMPTY)
    with pytest.raises(ValueError, match="empty sequences"):
        empty_sequences(_harness(refuses), EMPTY)
    empty_sequences(_harness(_refusing("", lambda *a: False)), EMPTY)  # the default implementation passes


def _asserting(message: str):
    """The default implementation with an `assert scale > 0` in front, as SGLang's decode
    wrappers have."""
    from kdaverify.equivalence.adapters import reference_chunk_kda

    def fn(q, k, v, g, beta, scale=None, **kw):
        assert scale is None or scale > 0, message
        return reference_chunk_kda(q, k, v, g, beta, scale=scale, **kw)

    return fn


def test_scale_zero_refused_when_declared():
    """scale_zero=no: an assert in the implementation that names the scale is a loud refusal
    and passes; undeclared, the same assert fails the check; declared, a refusal that does
    not name the scale, or no refusal at all, fails."""
    from kdaverify.equivalence.relations import scale_zero

    scale_zero(_harness(_asserting("scale must be positive"), scale_zero=False), SPEC)
    with pytest.raises(AssertionError, match="scale must be positive"):
        scale_zero(_harness(_asserting("scale must be positive")), SPEC)
    with pytest.raises(AssertionError, match="does not say why"):
        scale_zero(_harness(_asserting("bad input"), scale_zero=False), SPEC)
    with pytest.raises(AssertionError, match="but the call returned"):
        scale_zero(_harness(_refusing("", lambda *a: False), scale_zero=False), SPEC)
    scale_zero(_harness(_refusing("", lambda *a: False)), SPEC)  # the default implementation passes


def test_empty_sequence_state_must_be_written():
    """An implementation that leaves an empty sequence's final state as NaN fails."""
    from kdaverify.equivalence.adapters import reference_chunk_kda
    from kdaverify.equivalence.relations import empty_sequences

    def unwritten(q, k, v, g, beta, cu_seqlens=None, **kw):
        o, S = reference_chunk_kda(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kw)
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        S[[n for n, length in enumerate(lens) if length == 0]] = float("nan")
        return o, S

    with pytest.raises(AssertionError, match="empty sequence 0: final state"):
        empty_sequences(_harness(unwritten), EMPTY)


@given(spec=strategy_for("varlen", Capabilities()) | strategy_for("general", Capabilities()))
def test_oracle_on_device_equals_the_numpy_gold(spec):
    """The oracle GPU runs use (the float64 PyTorch recurrence where the inputs are), here on
    CPU tensors in bfloat16 as an implementation sees them, equals the NumPy gold."""
    from kdaverify.equivalence.implementation import DTYPES, load_implementation
    from kdaverify.equivalence.relations import Harness, oracle_on_device
    from kdaverify.equivalence.tolerance import errors

    t = Harness(load_implementation("kdaverify.equivalence.adapters:reference_chunk_kda"), DTYPES["bfloat16"]).inputs(
        spec.arrays()
    )
    for got, want in zip(oracle_on_device(t, spec.scale), Harness.oracle(t, spec.scale), strict=True):
        e = errors(got, want)
        assert e.rel_rms <= 1e-12 and e.rel_max <= 1e-12, e  # two float64 evaluations (see test_oracle.SELF_TOL)


def test_every_check_names_its_bug_class():
    from kdaverify.equivalence.relations import CHECKS

    assert [n for n, c in CHECKS.items() if not c.bug_class] == []
