"""Check a provider's output before it is timed, by the suite's one tolerance rule
(equivalence/tolerance.py): the error against a float64 oracle may be at most 3x that of
same-precision references plus two unit roundoffs of the output dtype.

Long sequences are checked on a sampled tail: one (batch row, value head) slice, the last
TAIL tokens. The provider runs [0, T - TAIL) with output_final_state; the oracle and the
references run the tail from the state it returned there, and the tail of the provider's
full-length output (the call that is timed) must match them. A kernel that loses its state
on the way, reads a neighbouring head or writes garbage into the tail fails; an error that
the provider makes identically in its prefix run and in its full run is not seen.

Slices are the last batch row and the last head: where offset arithmetic goes wrong first.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from kdaverify.equivalence.capabilities import Capabilities
from kdaverify.equivalence.implementation import Implementation
from kdaverify.equivalence.relations import Harness
from kdaverify.equivalence.tolerance import Verdict, errors, judge
from kdaverify.reference import dplr_recurrent, dplr_recurrent_np

from .providers import DTYPES, Case, forward, inputs

TAIL = 256  # four 64-token chunks: the chunk hand-off is exercised, and the float64 oracle stays cheap


def _slice(t: dict, b: int, h: int, hq: int, start: int) -> dict:
    """One batch row b, value head h (query/key head hq), tokens [start, T), as [1, *, 1, *]."""
    out = {}
    for n, x in t.items():
        if n == "initial_state":
            continue
        head = hq if n in ("q", "k") else h
        out[n] = x[b : b + 1, start:, head : head + 1]
    return out


def _state_at(fn, case: Case, t: dict, cut: int, b: int, h: int):
    """The provider's own state after tokens [0, cut) of row b, head h: [1, 1, K, V] on the CPU,
    or the initial state (decode), or None (cut == 0 without one)."""
    h0 = t.get("initial_state")
    if cut == 0:
        return None if h0 is None else h0[b : b + 1, h : h + 1].detach().cpu()
    # contiguous: at B > 1 the slice [:, :cut] is a strided view, and the timed call had
    # contiguous inputs; how a kernel takes strided ones is the conformance suite's check
    # (relations.strided_inputs), not this one's. Without it an H200 run (2026-11-29) marked
    # SGLang's and vLLM's chunk_kda unverified at B8 T4096 only, which pass their tails at B1.
    prefix = {n: (x if n == "initial_state" else x[:, :cut].contiguous()) for n, x in t.items()}
    _, S = forward(fn, case.op, prefix, output_final_state=True)
    if S is None:
        raise AssertionError("final_state: output_final_state=True returned None")
    return S[b : b + 1, h : h + 1].detach().float().cpu()


def _kda_reference_errors(t, h0, precision, dtype, cut, b, h, hq) -> list:
    """Errors of the suite's same-precision references (Harness.references: the chunkwise
    oracle with the declared matmul precision at chunk sizes 64 and 16, and the float32
    recurrence) on the KDA tail of t from state h0, each against the float64 oracle."""
    tail = {n: x.detach().cpu() for n, x in _slice(t, b, h, hq, cut).items()}
    tail["initial_state"], tail["cu_seqlens"] = h0, None
    harness = Harness(Implementation(None, "reference", Capabilities(precision=precision), "cpu"), dtype)
    gold = harness.oracle(tail)[0]
    return gold, [errors(ref(tail)[0], gold) for ref in harness.references()]


def _kda(fn, case, t, o, precision, dtype, cut, b, h, hq) -> Verdict:
    h0 = _state_at(fn, case, t, cut, b, h)
    gold, refs = _kda_reference_errors(t, h0, precision, dtype, cut, b, h, hq)
    return judge("sampled tail: o", o, gold, refs, dtype)


def _dplr(fn, case, t, o, precision, dtype, cut, b, h) -> Verdict:
    """The sweep feeds DPLR the KDA inputs written as DPLR (providers.inputs), so besides the
    float32 DPLR recurrence (output rounded to dtype) the budget also scales with the KDA
    same-precision references on the same tokens from the same state: a chunked kernel of this
    precision rounds its intra-chunk products as they do, which the recurrence alone does not."""
    tail = {n: x.detach().cpu() for n, x in _slice(t, b, h, h, cut).items()}
    h0 = _state_at(fn, case, t, cut, b, h)
    args = [tail[n] for n in ("q", "k", "v", "a", "b", "gk")]
    gold = dplr_recurrent_np(*args, initial_state=None if h0 is None else h0.double().numpy())[0]
    ref = dplr_recurrent(*(x.float() for x in args), initial_state=h0)[0].to(dtype)
    kda = inputs(replace(case, op="chunk_kda"), "cpu")  # the same draws, before the DPLR mapping
    _, refs = _kda_reference_errors(kda, h0, precision, dtype, cut, b, h, h)
    return judge("sampled tail: o", o, gold, [errors(ref, gold), *refs], dtype)


def _attention(case, t, o, dtype, cut, b, h) -> Verdict:
    """Causal attention for queries [cut, T) of one head over all their keys, in float64 on the
    device, against the same in float32 rounded to dtype as the same-precision reference."""

    def attend(precision):
        q, k, v = (t[n][b, :, h].to(precision) for n in ("q", "k", "v"))
        s = (q[cut:] @ k.T) * case.K**-0.5
        pos = torch.arange(case.T, device=q.device)
        s = s.masked_fill(pos[None, :] > pos[cut:, None], float("-inf"))
        return (s.softmax(-1) @ v).cpu()

    gold = attend(torch.float64).numpy()
    return judge("sampled tail: o", o, gold, [errors(attend(torch.float32).to(dtype), gold)], dtype)


def verify(fn, case: Case, t: dict, out, precision: str) -> Verdict:
    """Judge out (the (o, state) of one call of fn on t, the inputs of case) on a sampled tail.
    precision: the provider's matmul precision class for float32 inputs."""
    dtype = DTYPES[case.dtype]
    o = out[0]
    if not isinstance(o, torch.Tensor) or o.dtype != dtype:
        raise AssertionError(f"o: expected a tensor of the input dtype {dtype}, got {getattr(o, 'dtype', type(o))}")
    cut = max(case.T - TAIL, 0)
    b, h = case.B - 1, case.HV - 1
    hq = h // (case.HV // case.H)
    o_tail = o.detach()[b : b + 1, cut:, h : h + 1].cpu()
    if case.op == "attention":
        return _attention(case, t, o_tail[0, :, 0], dtype, cut, b, h)
    if case.op == "chunk_dplr":
        return _dplr(fn, case, t, o_tail, precision, dtype, cut, b, h)
    return _kda(fn, case, t, o_tail, precision, dtype, cut, b, h, hq)


def summary(v: Verdict) -> dict:
    """The verdict as report fields."""
    m, b = v.measured, v.budget
    finite = bool(np.isfinite(m.rel_rms))
    return {
        "verified": v.passed,
        "check": v.what,
        "err_rel_rms": m.rel_rms if finite else None,
        "err_rel_max": m.rel_max if finite else None,
        "budget_rel_rms": b.rel_rms,
        "budget_rel_max": b.rel_max,
    }
