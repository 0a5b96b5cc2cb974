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
    empty = ref.new_zeros(1, 0, dims.HV, dims.V)
    parts = [
        scan(*(x[:, a:b] for x in tensors), scale, S0[n : n + 1]) if b > a else (empty, S0[n : n + 1])
        for n, (a, b) in enumerate(spans)
    ]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=0)
