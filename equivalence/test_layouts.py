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
    GPU_HEAD_SIZES,
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


@pytest.mark.parametrize("family", ["general", "varlen", "guard_bands", "gva", "length_one"])
@given(data=st.data())
def test_gpu_draws_stay_in_the_buckets(family, data):
    """On a GPU every case's (K, V, H, HV) is one of the run's buckets (so Triton compiles a
    handful of kernels), packed batches reach up to 2000 sequences of 1 to 3 tokens."""
    caps = Capabilities()
    buckets = sizes_for("cuda").buckets
    spec = data.draw(strategy_for(family, caps, "cuda"))
    assert (spec.K, spec.V, spec.H) in {b[:3] for b in buckets}
    assert spec.HV in {b[3] for b in buckets if b[:3] == (spec.K, spec.V, spec.H)} or family == "gva"
    if spec.seqlens is not None:
        assert len(spec.seqlens) <= 2000
    if family == "guard_bands":
        assert not (is_power_of_two(spec.K) and is_power_of_two(spec.V)) and spec.T % 64


@given(spec=strategy_for("empty_sequences", Capabilities()))
def test_empty_sequence_cases_have_empty_sequences(spec):
    assert 0 in spec.seqlens and sum(spec.seqlens) == spec.T and any(spec.seqlens)
