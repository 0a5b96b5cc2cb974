"""How a recurrence runs over batch rows and packed sequences (one copy for every oracle).

A scan function takes per-token arrays [B, T, HV, *], a scale and a state [B, HV, K, V],
and returns (o [B, T, HV, V], final state). Without cu_seqlens the batch rows are the
sequences; with cu_seqlens (B == 1) each span [start, end) runs alone from its own
initial state, so every token is still visited exactly once. An empty span (a repeated
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
    for n, (a, b) in enumerate(spans):
        o[:, a:b], S[n : n + 1] = scan(*(x[:, a:b] for x in arrays), scale, S[n : n + 1])
    return o, S


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
    states = S0.split(1, dim=0)
    empty = ref.new_zeros(1, 0, dims.HV, dims.V)
    parts = [
        scan(*(p[n] for p in pieces), scale, states[n]) if lengths[n] else (empty, states[n]) for n in range(len(spans))
    ]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=0)
