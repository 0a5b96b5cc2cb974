"""The large-offset checks in logic, on the CPU (they run for real only on a GPU with tens of
GiB free): the cases cross the limits they are meant to cross, the memory they need and the
"not applicable" path, seeded generation on the device, and the check itself end to end on
a miniature case, where the 32-bit wrap mutant (with its limit scaled down) is caught."""

from __future__ import annotations

import pytest
import torch
from kdaverify.equivalence import large_offsets, mutants, relations
from kdaverify.equivalence.adapters import DEFAULT_IMPL
from kdaverify.equivalence.implementation import load_implementation
from kdaverify.equivalence.large_offsets import GRID, LIMIT, LargeCase, cases, need_bytes, not_applicable
from kdaverify.equivalence.relations import Harness

CASES = cases(128, 128, 16)


def test_cases_cross_their_limits():
    a, b, c, d = (CASES[n] for n in ("packed_offset", "row_offset", "state_pool", "many_chunks"))
    row, start, _ = a.tail_span()
    assert start * a.HV * a.K > LIMIT and start * a.H * a.K > LIMIT  # the tail's first token offset
    assert (b.B - 1) * b.T * b.H * b.K > LIMIT and b.B * b.HV > GRID
    assert (c.N - 1) * c.HV * c.K * c.V > LIMIT and c.N * c.HV > GRID
    assert d.T > GRID * 64 and d.seqlens is None
    for x in CASES.values():
        assert x.tail_span()[2] - x.tail_span()[1] <= 193  # only a short tail meets the oracle


def test_memory_need_and_not_applicable():
    gib = {n: large_offsets.gib(need_bytes(c, torch.bfloat16)) for n, c in CASES.items()}
    # the figures documented in large_offsets.py
    assert [round(gib[n]) for n in ("packed_offset", "row_offset", "state_pool")] == [40, 51, 32]
    assert 1 < gib["many_chunks"] < 2
    c = CASES["packed_offset"]
    assert not_applicable(c, torch.bfloat16, torch.device("cpu")).startswith("not applicable: needs 40 GiB")
    cuda = torch.device("cuda", 0)
    assert not_applicable(c, torch.bfloat16, cuda, free=30 * 2**30) == (
        "not applicable: needs 40 GiB, cuda:0 has 30 GiB free"
    )
    assert not_applicable(c, torch.bfloat16, cuda, free=80 * 2**30) is None


def test_large_checks_are_not_applicable_on_the_cpu():
    impl = load_implementation(DEFAULT_IMPL)
    for name in ("packed_offset", "row_offset", "state_pool", "many_chunks"):
        reason = relations.CHECKS[f"large_{name}"].applies(impl, torch.float32)
        assert reason.startswith("not applicable: needs ") and "GiB" in reason


MINI = LargeCase(1, 40, 1, 2, 3, 5, "packed_offset", (33, 7), True)


def test_generate_is_seeded_and_well_formed():
    t1, t2 = (large_offsets.generate(MINI, torch.float32, torch.device("cpu"), 5) for _ in range(2))
    for n in ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens"):
        assert torch.equal(t1[n], t2[n]), n
    assert torch.allclose(t1["k"].square().sum(-1), torch.ones(1, 40, 1), atol=1e-5)
    assert (t1["g"] <= 0).all() and ((t1["beta"] >= 0) & (t1["beta"] < 1)).all()
    assert t1["cu_seqlens"].tolist() == [0, 33, 40] and t1["initial_state"].shape == (2, 2, 3, 5)


@pytest.mark.parametrize("name", ["packed_offset", "row_offset", "state_pool", "many_chunks"])
def test_large_check_logic_on_a_miniature(monkeypatch, name):
    """The whole check on a miniature of each case: the default implementation passes, and
    the wrap mutant, with 2^31 scaled down to 64 elements, is caught on the tail."""
    mini = {
        "packed_offset": MINI,
        "row_offset": LargeCase(5, 9, 1, 2, 3, 4, "row_offset", None, False),
        "state_pool": LargeCase(1, 12, 1, 2, 2, 3, "state_pool", (1,) * 6 + (6,), True),
        "many_chunks": LargeCase(1, 70, 1, 1, 2, 2, "many_chunks", None, False, tail=6),
    }[name]
    monkeypatch.setattr(relations, "_large_case", lambda n, impl: mini)
    relations.large_offset(Harness(load_implementation(DEFAULT_IMPL), torch.float32), name, seed=3)
    if name == "many_chunks":
        return  # its bug class is the grid, which the wrap mutant does not model
    monkeypatch.setattr(mutants, "LIMIT", 64)
    wrap = load_implementation(mutants.offsets_wrap_2_31)
    with pytest.raises(AssertionError, match="tail of the large call vs oracle"):
        relations.large_offset(Harness(wrap, torch.float32), name, seed=3)


def test_device_memory_lock_is_shared_by_checks_and_taken_alone_by_large_cases(tmp_path, monkeypatch):
    """relations.device_memory_lock on a (pretended) CUDA device: two checks hold it at once,
    a large-offset case cannot take it while any check does; the lock is the card's (its
    UUID), so the same CUDA index in a process that sees another card is another lock; on the
    CPU it is no lock."""
    import fcntl
    import tempfile
    import types

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    card = {"card": "cuda-GPU-aaaa"}  # what CUDA index 0 is in this process
    monkeypatch.setattr(relations, "_physical_device", lambda index: card["card"])
    dev = types.SimpleNamespace(type="cuda", index=0)
    path = tmp_path / "kdaverify-memory-cuda-GPU-aaaa.lock"
    with relations.device_memory_lock(dev), relations.device_memory_lock(dev):  # two workers' checks
        with open(path) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with relations.device_memory_lock(dev, exclusive=True):
        with open(path) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        card["card"] = "cuda-GPU-bbbb"  # another process, CUDA_VISIBLE_DEVICES=1: index 0 is the other card
        with relations.device_memory_lock(dev, exclusive=True):
            pass  # not blocked by the first card's lock
    with relations.device_memory_lock(torch.device("cpu")):
        assert not list(tmp_path.glob("*cpu*"))
