"""How a recurrence runs over batch rows and packed sequences (one copy for every oracle).

A scan function takes per-token arrays [B, T, HV, *], a scale and a state [B, HV, K, V],
and returns (o [B, T, HV, V], final state). Without cu_seqlens the batch rows are the
sequences; with cu_seqlens (B == 1) each span [start, end) runs from its own initial state,
so every token is still visited exactly once: the spans of one length are stacked as the
rows of one batch and scanned together (each row its own sequence, as without cu_seqlens),
so a scan runs once per distinct length, not once per sequence. An empty span (a repeated
offset) runs no scan: its final state is its initial state.
"""

from __future__ import annotations

import numpy as np
import torch


def run_np(scan, arrays, scale, dims, initial_state, spans, packed):
    """NumPy float64 driver. arrays are already float64 and head-expanded."""
    if initial_state is None:
        S = np.zeros((dims.N, dims.HV, dims.K, dims.V))
    else:
        S = np.array(initial_state, dtype=np.float64)  # a copy: the caller's state is not mutated
    if not packed:
        return scan(*arrays, scale, S)
    o = np.empty((1, dims.T, dims.HV, dims.V))
    for ns in same_length(spans).values():
        o_rows, S[ns] = scan(*stack_spans(arrays, spans, ns), scale, S[ns])
        for i, n in enumerate(ns):
            o[0, spans[n][0] : spans[n][1]] = o_rows[i]
    return o, S


def same_length(spans) -> dict[int, list[int]]:
    """The non-empty spans grouped by length: length -> the indices of its spans, in order.
    A GPU run packs up to 2000 sequences of 1 to 3 tokens; scanned one by one, each oracle
    and reference call launched some 10^4 small operations (the suite's side took 82% of the
    check time of an H200 run of fla's fused_recurrent_kda, 2026-11-28); grouped, a few."""
    groups: dict[int, list[int]] = {}
    for n, (a, b) in enumerate(spans):
        if b > a:
            groups.setdefault(b - a, []).append(n)
    return groups


def stack_spans(arrays, spans, ns) -> list[np.ndarray]:
    """The spans ns (of one length) of each [1, T, ...] array as the rows of one [len(ns), L, ...]."""
    return [np.concatenate([x[:, spans[n][0] : spans[n][1]] for n in ns]) for x in arrays]


def run_torch(scan, tensors, scale, dims, initial_state, spans, packed):
    """PyTorch driver: tensors are in the compute dtype and head-expanded; differentiable."""
    ref = tensors[0]
    if initial_state is None:
        S0 = ref.new_zeros(dims.N, dims.HV, dims.K, dims.V)
    else:
        S0 = initial_state.to(device=ref.device, dtype=ref.dtype)
    if not packed:
        return scan(*tensors, scale, S0)
    # One split per input, not a slice per sequence: the backward of a slice writes a zero
    # tensor of the whole input, so slicing N sequences out of an initial state of N
    # sequences cost O(N^2) in the backward (323 sequences, K = 80, V = 192, one CPU thread:
    # 15.6 s per reference gradient before, 1.7 s after). The spans tile [0, T) exactly
    # (check_cu_seqlens), and the gradients are bitwise the same.
    lengths = [b - a for a, b in spans]
    pieces = [x.split(lengths, dim=1) for x in tensors]
    states = list(S0.split(1, dim=0))
    outs = [ref.new_zeros(1, 0, dims.HV, dims.V)] * len(spans)  # an empty span's (no scan)
    for ns in same_length(spans).values():
        # the group's sequences as rows; split (not sliced) back, for the same reason as above
        rows = [torch.cat([p[n] for n in ns], dim=0) for p in pieces]
        o_rows, S_rows = scan(*rows, scale, torch.cat([states[n] for n in ns], dim=0))
        for n, o_n, S_n in zip(ns, o_rows.split(1, dim=0), S_rows.split(1, dim=0), strict=True):
            outs[n], states[n] = o_n, S_n
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)
