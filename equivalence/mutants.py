"""Negative controls: deliberately wrong KDA implementations that the suite must reject.

Each stands for a bug seen in real kernels; the first line of its docstring says which.
They are small edits of the float32 reference (equivalence.adapters), made either by
changing what is passed in and out, or by swapping one named piece of the oracle (the
per-token scan, the chunk decay) for a wrong one for the duration of the call. `nox -s mutants` runs
every one through the conformance suite and prints which checks killed it
(equivalence.killtable); the correct control, the same reference behind the same adapter,
must pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
from kdaverify.reference import kda_chunkwise, kda_recurrent
from kdaverify.reference.kda import expand_heads
from kdaverify.reference.kda_backward import sum_groups

from .adapters import in_float32, reference_chunk_kda, reference_recurrent_kda
from .implementation import Capabilities
from .large_offsets import LIMIT
from .layouts import as_if_contiguous, read_past_end

correct_control = in_float32(kda_recurrent)
correct_control.__name__ = "correct_control"
correct_control.__doc__ = "The PyTorch recurrence in float32 behind the same adapter: correct, must pass."
correct_control.kdaverify_capabilities = Capabilities(backward=True)  # its gradients come from autograd
_calls = itertools.count()

CHUNK = 64  # the chunk size the chunk-structured bugs below assume


def _ref(q, k, v, g, beta, scale=None, initial_state=None, cu_seqlens=None, **_):
    return reference_recurrent_kda(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True, cu_seqlens=cu_seqlens
    )


def _mutant(fn):
    """Give a mutant the contract's keyword arguments (and honour output_final_state)."""

    def call(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
        o, S = fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
        return o, (S if output_final_state else None)

    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


def _swapping(target: str, piece, name: str, doc: str):
    """A mutant that runs the float32 reference with one named piece of the oracle (target,
    a dotted path) replaced by a wrong one for the duration of the call: the recurrence's
    per-token scan, or the chunkwise algorithm's chunk decay."""
    base = reference_recurrent_kda if target.startswith("kdaverify.reference.kda.") else reference_chunk_kda

    def call(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
        with mock.patch(target, piece):
            return base(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)

    call.__name__, call.__doc__ = name, doc
    return call


# ------------------------------------------------------------------ wrong per-token steps


def _scan_without_beta_write(q, k, v, g, beta, scale, S):
    outs = []
    for t in range(v.shape[1]):
        S = S * g[:, t, :, :, None].exp()
        kt = k[:, t]
        pred = (kt[..., None, :] @ S)[..., 0, :]
        S = S - (beta[:, t, :, None] * kt)[..., :, None] * pred[..., None, :] + kt[..., :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ S)[..., 0, :])
    return torch.stack(outs, dim=1), S


def _scan_decay_after_delta(q, k, v, g, beta, scale, S):
    outs = []
    for t in range(v.shape[1]):
        kt = k[:, t]
        err = v[:, t] - (kt[..., None, :] @ S)[..., 0, :]
        S = S + (beta[:, t, :, None] * kt)[..., :, None] * err[..., None, :]
        S = S * g[:, t, :, :, None].exp()
        outs.append(scale * (q[:, t, :, None, :] @ S)[..., 0, :])
    return torch.stack(outs, dim=1), S


# ------------------------------------------------------------------ wrong chunk decays


def _decay_anchored_on_last_row(g):
    """exp(G_r - G_i) formed as exp(G_r - G_C) * exp(G_C - G_i): the future row C enters."""
    G = g.cumsum(dim=-2)
    last = G[..., -1:, :]
    R = (G - last).exp()[..., :, None, :] * (last - G).exp()[..., None, :, :]
    C = g.shape[-2]
    return G, R * torch.ones(C, C, dtype=g.dtype, device=g.device).tril()[..., None]


def _decay_split_exponents(g):
    """Gam_r and 1 / Gam_i formed separately: exp(-G) overflows under strong decay."""
    G = g.cumsum(dim=-2)
    R = G.exp()[..., :, None, :] * (-G).exp()[..., None, :, :]
    C = g.shape[-2]
    return G, R * torch.ones(C, C, dtype=g.dtype, device=g.device).tril()[..., None]


# ------------------------------------------------------------------ the mutants

future_gate_leak = _swapping(
    "kdaverify.reference.chunkwise.chunk_decay", _decay_anchored_on_last_row, "future_gate_leak",
    "A future gate leaks into past outputs: intra-chunk ratios anchored on the chunk's last row.",
)  # fmt: skip
decay_overflow = _swapping(
    "kdaverify.reference.chunkwise.chunk_decay", _decay_split_exponents, "decay_overflow",
    "exp(G) and exp(-G) formed separately: Inf/NaN once a chunk's cumulative decay passes -88.",
)  # fmt: skip
write_missing_beta = _swapping(
    "kdaverify.reference.kda._scan_torch", _scan_without_beta_write, "write_missing_beta",
    "The write term missing beta: S += k v^T instead of beta k v^T.",
)  # fmt: skip
decay_after_delta = _swapping(
    "kdaverify.reference.kda._scan_torch", _scan_decay_after_delta, "decay_after_delta",
    "Decay applied after the delta-rule correction instead of before it.",
)  # fmt: skip


@_mutant
def reshaped_state(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """A [N, HV, V, K] state reshaped, not transposed, into the [N, HV, K, V] contract."""
    if initial_state is not None:
        initial_state = initial_state.transpose(-1, -2).reshape(initial_state.shape)
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return o, S.transpose(-1, -2).reshape(S.shape)


@_mutant
def nan_on_length_one(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """NaN for length-1 sequences in a packed batch (a 0/0 in a per-sequence normaliser)."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        for n, (a, n_tok) in enumerate(zip(cu_seqlens[:-1].tolist(), lens, strict=True)):
            if n_tok == 1:
                o[:, a] = float("nan")
                S[n] = float("nan")
    return o, S


@_mutant
def batch_rows_not_reset(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Batch rows run as one sequence: the state is not reset between rows (outputs depend on other rows)."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    B, T = q.shape[:2]
    if cu_seqlens is None and B > 1:
        flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
        h0 = None if initial_state is None else initial_state[:1]
        o_flat, _ = _ref(*flat, scale, h0, None)
        o = o_flat.reshape(o.shape)
    return o, S


@_mutant
def gate_off_by_one(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Exclusive instead of inclusive gate sum: token t is decayed by g[t - 1]."""
    shifted = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], dim=1)
    return _ref(q, k, v, shifted, beta, scale, initial_state, cu_seqlens)


@_mutant
def initial_state_ignored(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """The initial state ignored: every sequence starts from zeros."""
    return _ref(q, k, v, g, beta, scale, None, cu_seqlens)


@_mutant
def history_truncated(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """History truncated past 512 tokens: the state is reset every 512 tokens."""
    if cu_seqlens is not None or q.shape[1] <= 512:
        return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    outs, S = [], initial_state
    for s in range(0, q.shape[1], 512):
        o, S = _ref(*(x[:, s : s + 512] for x in (q, k, v, g, beta)), scale, initial_state if s == 0 else None, None)
        outs.append(o)
    return torch.cat(outs, dim=1), S


@_mutant
def state_lost_at_chunk_boundary(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """The state not handed across a 64-token chunk boundary: each chunk restarts from the initial state."""
    if cu_seqlens is not None:
        return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    outs = []
    for s in range(0, q.shape[1], CHUNK):
        o, S = _ref(*(x[:, s : s + CHUNK] for x in (q, k, v, g, beta)), scale, initial_state, None)
        outs.append(o)
    return torch.cat(outs, dim=1), S


@_mutant
def ragged_tail_dropped(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """The ragged tail chunk skipped when T is not a multiple of 64: its outputs never written."""
    T = q.shape[1]
    full = T // CHUNK * CHUNK
    if cu_seqlens is not None or full in (0, T):
        return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    o_full, S = _ref(*(x[:, :full] for x in (q, k, v, g, beta)), scale, initial_state, None)
    o = torch.empty(*v.shape, dtype=q.dtype, device=q.device)
    o[:, :full] = o_full
    return o, S


@_mutant
def given_scale_ignored(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """The default scale K ** -0.5 used even when a scale is given."""
    return _ref(q, k, v, g, beta, None, initial_state, cu_seqlens)


@_mutant
def bf16_matmuls_claiming_fp32(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Reduced internal precision (bf16 matmul operands) in an implementation that claims fp32."""
    run = in_float32(lambda *a, **kw: kda_chunkwise(*a, **kw, matmul_precision="bf16"))
    return run(q, k, v, g, beta, scale, initial_state, True, cu_seqlens)


@_mutant
def nondeterministic(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Nondeterminism: the last bit of one output depends on the call (an atomic-add order)."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if next(_calls) % 2:  # every other call: one element one ulp up, as a racing sum would
        flat = o.view(-1)
        i = int(flat.abs().argmax())
        flat[i] = flat[i] * (1 + torch.finfo(o.dtype).eps) + torch.finfo(o.dtype).tiny
    return o, S


@_mutant
def mutates_gate_input(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """An input mutated: the gate's cumulative sum written back into g in place."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    g.copy_(g.cumsum(dim=1))
    return o, S


@_mutant
def gva_heads_tiled(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """GVA head mapping j % H instead of j // G (heads tiled, not interleaved)."""
    G = v.shape[2] // q.shape[2]
    if G > 1:
        q, k = q.repeat(1, 1, G, 1), k.repeat(1, 1, G, 1)
    return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)


@_mutant
def varlen_state_leaks(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Packed sequences not separated: the state flows from one sequence into the next."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        h0 = None if initial_state is None else initial_state[:1]
        o, _ = _ref(q, k, v, g, beta, scale, h0, None)
    return o, S


# ------------------------------------------------- issue 12: argument paths


def final_state_flag_ignored(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None, **kw):  # fmt: skip
    """output_final_state ignored: the state is returned (and computed) even when not asked for."""
    return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)


def state_written_in_place(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, **kw):  # fmt: skip
    """Without output_final_state the final state is written back into initial_state in place."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if not output_final_state:
        if initial_state is not None:
            initial_state.copy_(S)
        return o, None
    return o, S


@_mutant
def falsy_scale(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """`scale = scale or K ** -0.5`: scale=0 is read as 'use the default'."""
    return _ref(q, k, v, g, beta, scale or None, initial_state, cu_seqlens)


def positional_options_ignored(q, k, v, g, beta, *args, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, **kw):  # fmt: skip
    """Options after beta taken by keyword only: positional scale and initial_state silently dropped."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return o, (S if output_final_state or args else None)


@_mutant
def default_scale_from_v(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """The default scale taken from the value size, V ** -0.5, instead of K ** -0.5."""
    return _ref(q, k, v, g, beta, v.shape[-1] ** -0.5 if scale is None else scale, initial_state, cu_seqlens)


# ------------------------------------------------- issue 12: inputs as callers pass them


@_mutant
def side_inputs_misread(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """g and beta read as if they had q's dtype: a float32 g or beta beside bf16 q is reinterpreted."""

    def misread(x):
        if x.dtype == q.dtype:
            return x
        return x.contiguous().view(q.dtype)[..., : x.shape[-1]]  # the first half of the bytes, as q's dtype

    return _ref(q, k, v, misread(g), misread(beta), scale, initial_state, cu_seqlens)


# ------------------------------------------------- issue 12: sizes kernels tile by

BLOCK = 64  # the K and V block a kernel tiles head sizes by


@_mutant
def k_block_past_64_dropped(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Only the first 64-lane K block is loaded: key channels past 64 are ignored."""
    K = q.shape[-1]
    if K <= BLOCK:
        return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    scale = K**-0.5 if scale is None else scale
    h0 = None if initial_state is None else initial_state[:, :, :BLOCK]
    o, S = _ref(q[..., :BLOCK], k[..., :BLOCK], v, g[..., :BLOCK], beta, scale, h0, cu_seqlens)
    full = torch.zeros(*S.shape[:2], K, S.shape[-1], dtype=S.dtype, device=S.device)
    full[:, :, :BLOCK] = S
    return o, full


@_mutant
def v_block_past_64_unwritten(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Output columns past the first 64-wide V block never stored (left at zero)."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    o[..., BLOCK:] = 0
    return o, S


@_mutant
def tiles_past_64_dropped(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """A grid of at most 64 (sequence, head) tiles: tiles past the 64th are never run (zeros)."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    HV = v.shape[2]
    if cu_seqlens is None:
        for b in range(q.shape[0]):
            for j in range(HV):
                if b * HV + j >= TILES:
                    o[b, :, j] = 0
                    S[b, j] = 0
    else:
        bounds = cu_seqlens.tolist()
        for n in range(len(bounds) - 1):
            for j in range(HV):
                if n * HV + j >= TILES:
                    o[0, bounds[n] : bounds[n + 1], j] = 0
                    S[n, j] = 0
    return o, S


TILES = 64


@_mutant
def gva_groups_past_2(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """GVA head index by a shift that is right for G <= 2 only: value head j reads j >> 1 (clamped)."""
    HV, H = v.shape[2], q.shape[2]
    idx = torch.tensor([min(j >> 1, H - 1) if HV // H > 2 else j // (HV // H) for j in range(HV)], device=q.device)
    return _ref(q[:, :, idx], k[:, :, idx], v, g, beta, scale, initial_state, cu_seqlens)


@_mutant
def packed_state_lost_at_chunk(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Packed sequences longer than a chunk: each 64-token chunk restarts from the sequence's initial state."""
    if cu_seqlens is None:
        return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for n in range(len(bounds) - 1):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        for s in range(bounds[n], bounds[n + 1], CHUNK):
            e = min(s + CHUNK, bounds[n + 1])
            o, S = _ref(*(x[:, s:e] for x in (q, k, v, g, beta)), scale, h0, None)
            outs.append(o)
        states.append(S)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


@_mutant
def one_token_tail_misplaced(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """T = 64k + 1 with k >= 2: the one-token tail chunk starts from the state one chunk too early."""
    T = q.shape[1]
    if cu_seqlens is not None or T % CHUNK != 1 or T < 2 * CHUNK + 1:
        return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    o, S = _ref(*(x[:, : T - 1] for x in (q, k, v, g, beta)), scale, initial_state, None)
    _, S_back = _ref(*(x[:, : T - 1 - CHUNK] for x in (q, k, v, g, beta)), scale, initial_state, None)
    o_tail, S = _ref(*(x[:, T - 1 :] for x in (q, k, v, g, beta)), scale, S_back, None)
    return torch.cat([o, o_tail], dim=1), S


# ------------------------------------------------- issue 12: the output contract

_buffers: dict = {}


@_mutant
def output_buffer_reused(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """o written into one cached buffer per shape and returned: the next call overwrites the last result."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    key = (tuple(o.shape), o.dtype, o.device)
    if key not in _buffers:
        _buffers[key] = torch.empty_like(o)
    return _buffers[key].copy_(o), S


_tables: list = []  # (cu_seqlens tensor, chunk counts), most recent last


@_mutant
def chunk_table_cached(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """A chunk table cached by cu_seqlens' identity: stale once cu_seqlens is refilled in place (graph replay)."""
    if cu_seqlens is None:
        return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    counts = next((c for t, c in _tables if t is cu_seqlens), None)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if counts is None:
        counts = [-(-n // CHUNK) for n in lens]
        _tables[:] = [*_tables[-7:], (cu_seqlens, counts)]  # holds the tensor, so its id is not reused
    # each sequence runs over the chunks the table lists for it, bounded by its own length:
    # the tokens of chunks the stale table lacks are never computed (o 0, state not advanced)
    ran = [min(n, c * CHUNK) for n, c in zip(lens, counts, strict=True)]
    starts = cu_seqlens[:-1].tolist()
    keep = torch.cat([torch.arange(s, s + r) for s, r in zip(starts, ran, strict=True)]).to(q.device)
    cu_ran = torch.tensor([0, *itertools.accumulate(ran)], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    o_ran, S = _ref(*(x[:, keep] for x in (q, k, v, g, beta)), scale, initial_state, cu_ran)
    o = o_ran.new_zeros(*q.shape[:2], *o_ran.shape[2:])
    o[:, keep] = o_ran
    return o, S


@_mutant
def state_in_input_dtype(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """The final state returned in the input dtype (bf16 for bf16 inputs), not float32."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return o, S.to(q.dtype)


# ------------------------------------------------- issue 12: precision under the budget


@_mutant
def output_scaled(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """A systematic 0.4% scale error in o (a scale folded in at low precision), inside the bf16 rel_rms budget."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return (o.double() * 1.004).to(o.dtype), S


@_mutant
def state_rounded_between_calls(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """The state kept in the input dtype between calls (bf16 for bf16 inputs) and returned as float32."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return o, S.to(q.dtype).float()


# ------------------------------------------------- issue 12: the domain


def _decay_without_reset(g):
    """exp(G_r - G_i) from the plain cumulative sum: -inf - -inf = NaN after a g = -inf reset."""
    G = g.cumsum(dim=-2)
    C = g.shape[-2]
    D = G[..., :, None, :] - G[..., None, :, :]
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return G, torch.where(causal[..., None], D, torch.full_like(D, float("-inf"))).exp()


reset_gate_nan = _swapping(
    "kdaverify.reference.chunkwise.chunk_decay", _decay_without_reset, "reset_gate_nan",
    "g = -inf (a hard reset) gives NaN: chunk ratios from the plain cumulative sum, -inf - -inf.",
)  # fmt: skip


MUTANTS = {
    f.__name__: f
    for f in (
        future_gate_leak,
        decay_overflow,
        reshaped_state,
        nan_on_length_one,
        batch_rows_not_reset,
        gate_off_by_one,
        write_missing_beta,
        decay_after_delta,
        initial_state_ignored,
        history_truncated,
        state_lost_at_chunk_boundary,
        ragged_tail_dropped,
        given_scale_ignored,
        bf16_matmuls_claiming_fp32,
        nondeterministic,
        mutates_gate_input,
        gva_heads_tiled,
        varlen_state_leaks,
        final_state_flag_ignored,
        state_written_in_place,
        falsy_scale,
        positional_options_ignored,
        default_scale_from_v,
        side_inputs_misread,
        k_block_past_64_dropped,
        v_block_past_64_unwritten,
        tiles_past_64_dropped,
        gva_groups_past_2,
        packed_state_lost_at_chunk,
        one_token_tail_misplaced,
        output_buffer_reused,
        chunk_table_cached,
        state_in_input_dtype,
        output_scaled,
        state_rounded_between_calls,
        reset_gate_nan,
    )
}


# ------------------------------------------------------------------ the bug classes that ship
# (issue 10): memory bugs of compiled kernels, simulated in PyTorch on the storage a kernel
# would read.


def _read_past_k(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] widened to next_power_of_2(K) lanes with what a load without its mask
    reads: the next head's (or token's) elements, and past the last row whatever follows x
    in memory (poison inside guard bands)."""
    K = x.shape[-1]
    BK = 1 << (K - 1).bit_length()
    if BK == K:
        return x
    x = x.contiguous()
    flat = torch.cat([x.reshape(-1), read_past_end(x, BK - K)])
    rows = x.numel() // K
    return flat.as_strided((rows, BK), (K, 1)).reshape(*x.shape[:-1], BK)


@_mutant
def reads_past_k(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """A load without its mask: q, k, g read next_power_of_2(K) lanes, those past K from the next head in memory."""
    K = q.shape[-1]
    wide = [_read_past_k(x) for x in (q, k, g)]
    h0 = initial_state
    if h0 is not None and wide[0].shape[-1] != K:  # the padding rows of the state start at zero
        h0 = torch.cat([h0, h0.new_zeros(*h0.shape[:-2], wide[0].shape[-1] - K, h0.shape[-1])], dim=-2)
    o, S = _ref(wide[0], wide[1], v, wide[2], beta, K**-0.5 if scale is None else scale, h0, cu_seqlens)
    return o, S[..., :K, :].contiguous()


@_mutant
def strided_as_contiguous(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Strides ignored: every input read from its storage as if contiguous (a fused projection's view misread)."""
    q, k, v, g, beta = (as_if_contiguous(x) for x in (q, k, v, g, beta))
    h0 = None if initial_state is None else as_if_contiguous(initial_state)
    return _ref(q, k, v, g, beta, scale, h0, cu_seqlens)


def _wrapped(x: torch.Tensor, row: int, a: int, b: int) -> torch.Tensor:
    """Tokens [a, b) of batch row `row` of x [B, T, ...] as read through 32-bit element
    offsets: each offset taken mod 2^31, so past 2^31 elements they point back into x."""
    x = x.contiguous()
    width = x[0, 0].numel()
    start = (row * x.shape[1] + a) * width
    pos = (start + torch.arange((b - a) * width, device=x.device)) % LIMIT
    return x.reshape(-1)[pos].reshape(1, b - a, *x.shape[2:])


@_mutant
def offsets_wrap_2_31(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Pointer offsets in 32 bits: past 2^31 elements they wrap (GPU only: showing it takes tens of GiB)."""
    big = max(x.numel() for x in (q, k, v, g)) >= LIMIT
    pool = initial_state is not None and initial_state.numel() >= LIMIT
    if not (big or pool):
        return _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    # Inputs this large are a large-offset check's: compute only the last sequence, which
    # is all that check holds to the oracle (the float32 recurrence over millions of tokens
    # would take hours), and leave every other output zero.
    B, T = q.shape[:2]
    n = B - 1 if cu_seqlens is None else len(cu_seqlens) - 2
    row, a, b = (B - 1, 0, T) if cu_seqlens is None else (0, int(cu_seqlens[-2]), T)
    tail = [_wrapped(x, row, a, b) for x in (q, k, v, g, beta)]
    S = torch.zeros(n + 1, v.shape[2], k.shape[-1], v.shape[-1], device=q.device)
    h0 = None
    if initial_state is not None:
        h0 = _wrapped(initial_state.reshape(1, -1, *initial_state.shape[1:]), 0, n, n + 1)[0]
    o_tail, S_tail = _ref(*tail, scale, h0, None)
    o = torch.zeros(*v.shape, dtype=q.dtype, device=q.device)
    o[row : row + 1, a:b] = o_tail
    at = (n * S[0].numel()) % LIMIT  # the final state written through a wrapped offset too
    S.reshape(-1)[at : at + S[0].numel()] = S_tail.reshape(-1)
    return o, S


@_mutant
def writes_past_state_end(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """An out-of-bounds write: the state updated in place one element past its end (a decode kernel off by one)."""
    o, S = _ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if initial_state is not None:
        after = initial_state.storage_offset() + initial_state.numel()
        if after < initial_state.untyped_storage().nbytes() // initial_state.element_size():
            torch.as_strided(initial_state, (1,), (1,), after).copy_(S.reshape(-1)[-1:])
    return o, S


GPU_ONLY = {"offsets_wrap_2_31": "its inputs past 2^31 elements need a GPU with 32 to 51 GiB free"}

for _m in (reads_past_k, strided_as_contiguous, offsets_wrap_2_31, writes_past_state_end):
    MUTANTS[_m.__name__] = _m
# ------------------------------------------------------------------ wrong backwards
# Correct forwards (the float32 recurrence) whose backward is wrong in one way each: a
# torch.autograd.Function that takes the recurrence's own autograd gradients and spoils them.


def _sum_groups(grads: dict, H: int) -> dict:
    """dq, dk per value head [B, T, HV, K] -> per query/key head [B, T, H, K] (the correct sum)."""
    return dict(grads, q=sum_groups(grads["q"], H), k=sum_groups(grads["k"], H))


class _WrongBackward(torch.autograd.Function):
    """forward: the float32 recurrence, q and k expanded to the value heads; backward: its
    autograd gradients, the final state's cotangent first passed through bug.seed(dS, info)
    and the gradients then through bug.grads(grads, info), which also reduces dq, dk from
    [B, T, HV, K] to [B, T, H, K]."""

    @staticmethod
    def forward(ctx, bug, scale, cu_seqlens, q, k, v, g, beta, initial_state):
        H, HV = q.shape[2], v.shape[2]
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (expand_heads(q, HV), expand_heads(k, HV), v, g, beta)]
            if initial_state is not None:
                leaves.append(initial_state.detach().requires_grad_())
            o, S = _ref(*leaves[:5], scale, leaves[5] if len(leaves) > 5 else None, cu_seqlens)
        ctx.bug, ctx.graph = bug, (o, S, leaves)
        ctx.info = dict(H=H, T=q.shape[1], scale=q.shape[-1] ** -0.5 if scale is None else scale, cu_seqlens=cu_seqlens)
        return o.detach(), S.detach()

    @staticmethod
    def backward(ctx, do, dS):
        o, S, leaves = ctx.graph
        grads = torch.autograd.grad((o, S), leaves, (do, ctx.bug.seed(dS, ctx.info)), allow_unused=True)
        names = ("q", "k", "v", "g", "beta", "initial_state")
        out = ctx.bug.grads(dict(zip(names, grads, strict=False)), ctx.info)
        return (None, None, None, *(out.get(n) for n in names))


@dataclass(frozen=True)
class _Bug:
    seed: Callable = lambda dS, info: dS
    grads: Callable = lambda grads, info: _sum_groups(grads, info["H"])


def _spans(info) -> list[tuple[int, int]]:
    cu = info["cu_seqlens"]
    return [(0, info["T"])] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))


def _tail_padding_unmasked(dS, info):
    """Each sequence runs in chunks of CHUNK; the padded rows of its ragged tail are loaded
    unmasked in the backward, as ones for q and do and zeros elsewhere, so each padded row
    adds scale q_p do_p^T to the cotangent of the last state (g = 0 and beta = 0 carry that
    state through the padding unchanged)."""
    dS = dS.clone()
    for n, (a, b) in enumerate(_spans(info)):
        dS[n] += info["scale"] * (-(b - a) % CHUNK)
    return dS


def _dh0_dropped(grads, info):
    return dict(_sum_groups(grads, info["H"]), initial_state=None)


def _last_dg_lost(grads, info):
    dg = grads["g"].clone()
    for _, end in _spans(info):
        dg[:, end - 1] = 0
    return dict(_sum_groups(grads, info["H"]), g=dg)


def _first_head_of_group(grads, info):
    H = info["H"]

    def first(x):
        B, T, HV, K = x.shape
        return x.reshape(B, T, H, HV // H, K)[:, :, :, 0]

    return dict(grads, q=first(grads["q"]), k=first(grads["k"]))


def _wrong_backward(bug: _Bug, name: str, doc: str):
    def call(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
        return _WrongBackward.apply(bug, scale, cu_seqlens, q, k, v, g, beta, initial_state)

    call.__name__, call.__doc__ = name, doc
    call.kdaverify_capabilities = Capabilities(backward=True)
    call.kdaverify_killtable_k = "grad_"  # its forward is the correct control's: only grad_* checks
    return call


backward_tail_unmasked = _wrong_backward(
    _Bug(seed=_tail_padding_unmasked), "backward_tail_unmasked",
    "A ragged tail's padded rows not masked in the backward: their garbage reaches dk, dv, dg, dbeta, dh0.",
)  # fmt: skip
backward_dh0_dropped = _wrong_backward(
    _Bug(grads=_dh0_dropped), "backward_dh0_dropped", "The initial-state gradient dropped: dh0 is None.",
)  # fmt: skip
backward_last_dg_lost = _wrong_backward(
    _Bug(grads=_last_dg_lost), "backward_last_dg_lost",
    "dg of each sequence's last token lost (a reverse cumulative sum started one token late).",
)  # fmt: skip
backward_gva_not_summed = _wrong_backward(
    _Bug(grads=_first_head_of_group), "backward_gva_not_summed",
    "GVA gradients not summed: dq and dk taken from the first value head of each group only.",
)  # fmt: skip

MUTANTS.update(
    (f.__name__, f)
    for f in (backward_tail_unmasked, backward_dh0_dropped, backward_last_dg_lost, backward_gva_not_summed)
)

# The check each negative control exists for: the kill table holds every mutant to being
# rejected by (at least one of) these, and `kdaverify mutants --targeted` (what CI runs) runs
# only these checks per mutant, so that the table's full run (every check for every mutant)
# need not fit CI's time.
MEANT_FOR = {
    "future_gate_leak": ("causality",),
    "decay_overflow": ("oracle",),
    "reshaped_state": ("oracle",),
    "nan_on_length_one": ("oracle_length_one",),
    "batch_rows_not_reset": ("batch_independence",),
    "gate_off_by_one": ("oracle",),
    "write_missing_beta": ("oracle",),
    "decay_after_delta": ("oracle",),
    "initial_state_ignored": ("oracle",),
    "history_truncated": ("oracle_long_history",),
    "state_lost_at_chunk_boundary": ("oracle_long_history", "oracle_block_edges"),
    "ragged_tail_dropped": ("every_output_written",),
    "given_scale_ignored": ("oracle",),
    "bf16_matmuls_claiming_fp32": ("oracle",),
    "nondeterministic": ("determinism",),
    "mutates_gate_input": ("inputs_not_mutated",),
    "gva_heads_tiled": ("gva_equals_repeated_heads",),
    "varlen_state_leaks": ("varlen_equals_separate",),
    "final_state_flag_ignored": ("final_state_not_requested",),
    "state_written_in_place": ("final_state_not_requested",),
    "falsy_scale": ("scale_zero",),
    "positional_options_ignored": ("call_forms",),
    "default_scale_from_v": ("default_scale",),
    "side_inputs_misread": ("mixed_input_dtypes",),
    "k_block_past_64_dropped": ("oracle_wide_heads",),
    "v_block_past_64_unwritten": ("oracle_wide_heads",),
    "tiles_past_64_dropped": ("oracle_many_tiles",),
    "gva_groups_past_2": ("oracle_many_tiles",),
    "packed_state_lost_at_chunk": ("oracle_packed_long",),
    "one_token_tail_misplaced": ("oracle_block_edges",),
    "output_buffer_reused": ("output_contract",),
    "chunk_table_cached": ("reused_buffers",),
    "state_in_input_dtype": ("output_contract",),
    "output_scaled": ("oracle",),
    "state_rounded_between_calls": ("state_precision_decode",),
    "reset_gate_nan": ("oracle",),
    "reads_past_k": ("guard_bands",),
    "strided_as_contiguous": ("strided_inputs",),
    "offsets_wrap_2_31": ("large_packed_offset", "large_row_offset", "large_state_pool"),
    "writes_past_state_end": ("guard_bands",),
    "backward_tail_unmasked": ("grad_ragged_tail",),
    "backward_dh0_dropped": ("grad_initial_state",),
    "backward_last_dg_lost": ("grad_oracle",),
    "backward_gva_not_summed": ("grad_gva",),
}
