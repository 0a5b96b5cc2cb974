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
    """Give a mutant the contract's keyword arguments."""

    def call(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
        return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)

    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


def _swapping(target: str, piece, name: str, doc: str):
    """A mutant that runs the float32 reference with one named piece of the oracle (target,
    a dotted path) replaced by a wrong one for the duration of the call: the recurrence's
    per-token scan, or the chunkwise algorithm's chunk decay."""
    base = reference_recurrent_kda if target.startswith("kdaverify.reference.kda.") else reference_chunk_kda

    def call(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
        with mock.patch(target, piece):
            return base(q, k, v, g, beta, scale, initial_state, True, cu_seqlens)

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
    )
}


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
