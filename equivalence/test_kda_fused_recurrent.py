"""Our Triton fused_recurrent_kda (kernels/kda_fused_recurrent.py) against the float64 oracle,
under the suite's one tolerance rule (relations.Harness, tolerance.judge), plus what only a
decode kernel has: a state pool with padding slots, in-place updates, the "vk" layout, empty
sequences, and bad input.

Without a GPU it runs under Triton's interpreter, one program at a time, so shapes stay small
(the interpreter pays per operation, per token, per program). Sizes are chosen where kernels
break: K and V not powers of two, K != V, K = 256 (the limit), V wider than one tile (several
programs per head), T = 1, ragged packed batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.implementation import DTYPES, Implementation
from kdaverify.equivalence.relations import CHECKS, Harness, bitwise_equal
from kdaverify.kernels import fused_recurrent_kda
from kdaverify.kernels.runtime import INTERPRET
from kdaverify.reference import beta_activation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAPS = fused_recurrent_kda.kdaverify_capabilities
NAMES = ("q", "k", "v", "g", "beta")


def harness(dtype: str = "float32", fn=fused_recurrent_kda) -> Harness:
    return Harness(Implementation(fn, getattr(fn, "__name__", "fn"), CAPS, DEVICE), DTYPES[dtype])


# ------------------------------------------------------------------ against the oracle

CASES = {
    "T1-K1-V1": CaseSpec(T=1, K=1, V=1),
    "T2-K3-V20-gva-h0": CaseSpec(B=2, T=2, H=2, G=2, K=3, V=20, h0=True, gate="strong"),  # head j reads j // 2
    "T17-K16-V3-masked": CaseSpec(T=17, H=2, K=16, V=3, gate="masked", beta_max=2.0, input_scale=10.0),
    "T65-K20-V16": CaseSpec(T=65, K=20, V=16, gate="mild", h0=True, scale=0.3),
    "T17-K64-V64-varlen": CaseSpec(T=17, G=2, K=64, V=64, h0=True, seqlens=(5, 1, 11), gate="safe"),
    "T2-K100-V70-tiles": CaseSpec(T=2, K=100, V=70, h0=True, input_scale=0.01),  # 3 V tiles of 32
    "T1-K256-V33": CaseSpec(B=2, T=1, K=256, V=33, h0=True, shared_gate=True),  # K at the limit, 2 V tiles
}
HALF_CASES = ("T2-K3-V20-gva-h0", "T17-K16-V3-masked", "T17-K64-V64-varlen")


@pytest.mark.parametrize("case", CASES)
def test_oracle_float32(case):
    spec = CASES[case]
    h = harness()
    h.expect_oracle(case, h.inputs(spec.arrays()), spec.scale)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_oracle_half(case, dtype):
    spec = CASES[case]
    h = harness(dtype)
    h.expect_oracle(case, h.inputs(spec.arrays()), spec.scale)


@pytest.mark.parametrize("case", ["T17-K16-V3-masked", "T17-K64-V64-varlen"])
def test_prefetch_change_no_bit(monkeypatch, case):
    """RecurrentConfig.prefetch (each token's rows loaded one step ahead) flipped from what
    launch_config chose leaves o and the final state bitwise unchanged under the interpreter
    (the same values and arithmetic), and holds to the oracle compiled; a packed batch whose
    short sequence ends the loop early (config_for's launch), and 17 tokens of one sequence
    (token_loop_config's)."""
    from dataclasses import replace

    from kdaverify.kernels import kda_fused_recurrent as fr

    spec = CASES[case]
    h = harness()
    t = h.inputs(spec.arrays())
    plain = h.impl.call(t, spec.scale)
    default = fr.launch_config
    flipped = lambda *a: replace(default(*a), prefetch=not default(*a).prefetch)  # noqa: E731
    monkeypatch.setattr(fr, "launch_config", flipped)
    h.expect_oracle(f"{case} prefetch", t, spec.scale)
    if INTERPRET:
        h.expect_equal("prefetch vs in-step loads", h.impl.call(t, spec.scale), plain)


@pytest.mark.parametrize(
    "spec",
    [
        CaseSpec(T=3, G=2, K=5, V=3, gate="safe", h0=True, seed=1),
        CaseSpec(T=4, K=20, V=7, gate="logsigmoid", seqlens=(1, 3), seed=2),
    ],
    ids=["safe-gate", "softplus-gate-varlen"],
)
@pytest.mark.parametrize("check", ["gate_in_kernel", "l2norm_in_kernel"])
def test_in_kernel_options(check, spec):
    """The fused gate (both forms) and q/k L2 norm: the suite's own checks, on chosen cases."""
    CHECKS[check].fn(harness(), spec)


@pytest.mark.parametrize("neg", [False, True], ids=["sigmoid", "2-sigmoid"])
def test_beta_sigmoid_in_kernel(neg):
    spec = CaseSpec(T=5, G=2, K=6, V=5, h0=True, seed=3)
    h = harness()
    raw = h.inputs(dict(spec.arrays(), beta=np.random.default_rng(4).normal(0, 3, (1, 5, 2))))
    meaning = dict(raw, beta=beta_activation(raw["beta"].double(), neg).float())
    h.expect_oracle("beta in kernel", raw, meaning=meaning, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=neg)


# ------------------------------------------------ decode: state pool, padding, in place


def _sequences(t: dict) -> list[dict]:
    """The sequences of a call, each as inputs [1, L, ...]."""
    if t["cu_seqlens"] is None:
        return [{n: t[n][b : b + 1] for n in NAMES} for b in range(t["q"].shape[0])]
    cu = t["cu_seqlens"].tolist()
    return [{n: t[n][:, a:b] for n in NAMES} for a, b in zip(cu, cu[1:], strict=False)]


def _join(seqs: list[dict], packed: bool) -> dict:
    """Sequences back into one call: packed along T with cu_seqlens, or as batch rows."""
    out = {n: torch.cat([s[n] for s in seqs], dim=1 if packed else 0) for n in NAMES}
    lens = [s["q"].shape[1] for s in seqs]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int64, device=out["q"].device)
    return dict(out, cu_seqlens=cu if packed else None)


def _junk_like(seq: dict, gen: torch.Generator) -> dict:
    """A padding sequence: random tokens of the same length (none of them may be read)."""
    return {n: torch.randn(x.shape, generator=gen).to(x.device, x.dtype) for n, x in seq.items()}


def pooled(pad_at: tuple[int, ...], inplace: bool, P: int = 7, seed: int = 0):
    """fused_recurrent_kda behind the plain contract, run from a state pool: the sequences of
    the call get random slots of a random pool [P, HV, K, V], padding sequences (index -1)
    are inserted at positions pad_at. Checks on the way: padding rows of o are exactly zero;
    in place, every slot no sequence owns is bitwise unchanged and the pool equals the
    returned state of a second, not in-place call on a copy (o bitwise equal too); not in
    place, the pool is not written and padding rows of the final state are zero. Returns the
    live sequences' (o, final_state) for the oracle."""

    def fn(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
        t = dict(q=q, k=k, v=v, g=g, beta=beta, cu_seqlens=cu_seqlens)
        seqs, packed = _sequences(t), cu_seqlens is not None
        gen = torch.Generator().manual_seed(seed)
        N, HV, K, V = len(seqs), v.shape[2], q.shape[3], v.shape[3]
        slots = torch.randperm(P, generator=gen)[:N]
        pool = torch.randn(P, HV, K, V, generator=gen).to(q.device)
        pool[slots.to(q.device)] = 0.0 if initial_state is None else initial_state
        order = list(seqs)
        for p in sorted(pad_at):
            order.insert(p, _junk_like(seqs[min(p, N - 1)], gen))
        pads = set(pad_at)
        live = [i for i in range(len(order)) if i not in pads]  # position of live sequence n
        idx = [-1] * len(order)
        for n, i in enumerate(live):
            idx[i] = int(slots[n])
        call = _join(order, packed)
        args = [call[n] for n in NAMES]
        indices = torch.tensor(idx, dtype=torch.int64, device=q.device)
        before = pool.clone()
        o, S = fused_recurrent_kda(
            *args, scale=scale, initial_state=pool, output_final_state=True, cu_seqlens=call["cu_seqlens"],
            state_indices=indices, inplace_final_state=inplace, **kw,
        )  # fmt: skip
        o_rows = _sequences(dict(dict.fromkeys(NAMES, o), cu_seqlens=call["cu_seqlens"]))
        for i in pads:
            assert bool((o_rows[i]["q"] == 0).all()), f"o: padding sequence {i} has nonzero rows"
        owned = torch.zeros(P, dtype=torch.bool)
        owned[slots] = True
        if inplace:
            assert S is pool, "final_state: with inplace_final_state the pool itself is returned"
            bitwise_equal("slots no sequence owns", pool[~owned.to(pool.device)], before[~owned.to(pool.device)])
            o2, S2 = fused_recurrent_kda(
                *args, scale=scale, initial_state=before.clone(), output_final_state=True,
                cu_seqlens=call["cu_seqlens"], state_indices=indices, **kw,
            )  # fmt: skip
            bitwise_equal("o, in place vs returned", o, o2)
            bitwise_equal("pool slots vs returned state", pool[slots.to(pool.device)], S2[live])
            S_live = pool[slots.to(pool.device)]
        else:
            bitwise_equal("the pool (not in place)", pool, before)
            for i in pads:
                assert bool((S[i] == 0).all()), f"final_state: padding sequence {i} has a nonzero row"
            S_live = S[live]
        o_live = _join([o_rows[i] for i in live], packed)["q"] if live else o[:, :0]
        return o_live, S_live

    return fn


DECODE_CASES = {
    "decode-T1": CaseSpec(B=3, T=1, G=2, K=20, V=16, h0=True, gate="logsigmoid", seed=5),
    "decode-packed": CaseSpec(T=6, K=3, V=5, h0=True, seqlens=(1, 3, 2), gate="safe", seed=6),
    "decode-no-h0": CaseSpec(B=2, T=1, K=16, V=3, seed=7),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["returned", "inplace"])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_state_pool(case, inplace):
    spec = DECODE_CASES[case]
    h = harness(fn=pooled(pad_at=(0, 2), inplace=inplace))
    h.expect_oracle(case, h.inputs(spec.arrays()), spec.scale)


def vk_layout(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    """fused_recurrent_kda with state_layout="vk", behind the plain ("kv") contract."""
    h0 = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    o, S = fused_recurrent_kda(
        q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, state_layout="vk", **kw,
    )  # fmt: skip
    return o, (None if S is None else S.transpose(-1, -2))


@pytest.mark.parametrize("case", ["T2-K3-V20-gva-h0", "T2-K100-V70-tiles"])
def test_vk_layout(case):
    """The "vk" layout agrees with the oracle; under the interpreter it equals "kv" transposed bitwise
    (both run the same operations; compiled, the tile's register layout may follow the memory
    layout and change the order of the sums, so only the oracle check holds there)."""
    spec = CASES[case]
    h = harness(fn=vk_layout)
    t = h.inputs(spec.arrays())
    h.expect_oracle(f"{case} vk", t, spec.scale)
    if INTERPRET:
        kv = h.impl.call(t, spec.scale)
        h.expect_equal("vk vs kv", harness().impl.call(t, spec.scale), kv)


def test_empty_sequences():
    """Repeated offsets are empty sequences: their final state is their initial state
    (bitwise), or zeros without one, and the other sequences are unaffected."""
    spec = CaseSpec(T=5, G=2, K=4, V=3, seqlens=(2, 3), h0=True, seed=8)
    h = harness()
    t = h.inputs(spec.arrays())
    o_ref, S_ref = h.run(t, spec.scale)
    cu = torch.tensor([0, 0, 2, 2, 2, 5, 5], device=DEVICE)  # empties at 0, 2, 3 and 5
    h0 = torch.randn(6, 2, 4, 3).to(DEVICE)
    h0[[1, 4]] = t["initial_state"]
    o, S = fused_recurrent_kda(*(t[n] for n in NAMES), scale=spec.scale, initial_state=h0,
                               output_final_state=True, cu_seqlens=cu)  # fmt: skip
    h.expect_equal("with empty sequences", (o, S[[1, 4]]), (o_ref, S_ref))
    bitwise_equal("final state of empty sequences", S[[0, 2, 3, 5]], h0[[0, 2, 3, 5]])
    _, S0 = fused_recurrent_kda(*(t[n] for n in NAMES), output_final_state=True, cu_seqlens=cu)
    assert bool((S0[[0, 2, 3, 5]] == 0).all()), "final_state: an empty sequence without initial state is not zero"


# ------------------------------------------------------------------------ bad input

B_, T_, H_, HV_, K_, V_ = 2, 3, 1, 2, 3, 2


def good_call() -> dict:
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(shape, generator=gen).to(DEVICE)

    return dict(
        q=r(B_, T_, H_, K_), k=r(B_, T_, H_, K_), v=r(B_, T_, HV_, V_), g=-r(B_, T_, HV_, K_).abs(),
        beta=r(B_, T_, HV_).sigmoid(), initial_state=r(B_, HV_, K_, V_), output_final_state=True,
    )  # fmt: skip


def packed(c: dict) -> dict:
    return dict({n: c[n][:1] for n in NAMES}, initial_state=c["initial_state"], output_final_state=True)


def pool_call(c: dict, **kw) -> dict:
    return dict(c, initial_state=z(4, HV_, K_, V_), **kw)


def idx(*values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def z(*shape):
    return torch.zeros(shape, device=DEVICE)


BAD = [
    ("q", lambda c: dict(c, q=c["q"].double(), k=c["k"].double(), v=c["v"].double()), "q float64"),
    ("k", lambda c: dict(c, k=c["k"].half()), "k dtype of its own"),
    ("q", lambda c: dict(c, q=c["q"].to(torch.int32)), "q int32"),
    ("g", lambda c: dict(c, g=c["g"].double()), "g float64"),
    ("k", lambda c: dict(c, k=c["k"].to("meta")), "k on another device"),
    ("initial_state", lambda c: dict(c, initial_state=c["initial_state"].to("meta")), "state on another device"),
    ("initial_state", lambda c: dict(c, initial_state=c["initial_state"].double()), "state float64"),
    ("initial_state", lambda c: dict(c, initial_state=c["initial_state"].transpose(-1, -2)), "state [V, K] as kv"),
    (
        "q",
        lambda c: dict(c, q=z(B_, T_, H_, 257), k=z(B_, T_, H_, 257), g=z(B_, T_, HV_, 257), initial_state=None),
        "K 257",
    ),
    ("q", lambda c: dict(c, v=z(B_, T_, HV_, 300), initial_state=None), "V 300"),
    ("cu_seqlens", lambda c: dict(packed(c), cu_seqlens=idx(0, 2, 1, 3)), "decreasing"),
    ("cu_seqlens", lambda c: dict(packed(c), cu_seqlens=idx(0, 1, 2)), "not ending at T"),
    ("cu_seqlens", lambda c: dict(packed(c), cu_seqlens=idx(1, 2, 3)), "not starting at 0"),
    ("cu_seqlens", lambda c: dict(c, cu_seqlens=idx(0, 1, 3)), "B > 1"),
    ("cu_seqlens", lambda c: dict(packed(c), cu_seqlens=torch.tensor([0.0, 1.0, 3.0], device=DEVICE)), "float"),
    ("state_indices", lambda c: pool_call(c, state_indices=idx(0, 4)), "index = P"),
    ("state_indices", lambda c: pool_call(c, state_indices=idx(-2, 0)), "index -2"),
    ("state_indices", lambda c: pool_call(c, state_indices=idx(0, 1, 2)), "one index too many"),
    ("state_indices", lambda c: pool_call(c, state_indices=torch.tensor([0.0, 1.0], device=DEVICE)), "float"),
    ("state_indices", lambda c: pool_call(c, state_indices=idx(1, 1), inplace_final_state=True), "shared slot"),
    ("initial_state", lambda c: dict(c, initial_state=None, state_indices=idx(0, 1)), "indices, no pool"),
    ("initial_state", lambda c: dict(c, initial_state=None, inplace_final_state=True), "in place, no state"),
    (
        "initial_state",
        lambda c: dict(c, initial_state=z(B_, HV_, V_, K_).transpose(-1, -2), inplace_final_state=True),
        "in place, strided",
    ),
    ("state_layout", lambda c: dict(c, state_layout="KV"), "layout KV"),
    ("A_log", lambda c: dict(c, use_gate_in_kernel=True), "gate without A_log"),
    ("A_log", lambda c: dict(c, use_gate_in_kernel=True, A_log=z(3)), "A_log [3]"),
    ("dt_bias", lambda c: dict(c, use_gate_in_kernel=True, A_log=z(HV_), dt_bias=z(HV_, K_)), "dt_bias [HV, K]"),
    ("lower_bound", lambda c: dict(c, use_gate_in_kernel=True, A_log=z(HV_), lower_bound=-6.0), "lower_bound -6"),
    ("A_log", lambda c: dict(c, A_log=z(HV_)), "A_log without the gate"),
    ("scale", lambda c: dict(c, scale=float("nan")), "scale nan"),
]


@pytest.mark.parametrize(("name", "change"), [pytest.param(n, f, id=i) for n, f, i in BAD])
def test_bad_input(name, change):
    with pytest.raises(ValueError, match=rf"^{name}: "):  # the message starts with the argument's name
        fused_recurrent_kda(**change(good_call()))


def test_good_call_runs():
    """The call the bad-input cases start from is itself accepted."""
    o, S = fused_recurrent_kda(**good_call())
    assert o.shape == (B_, T_, HV_, V_) and S.shape == (B_, HV_, K_, V_)


def test_launch_config_dispatch():
    """Decode-like calls take config_for's launch, walks over many tokens token_loop_config's,
    with prefetch only while the grid is small (launch_config's measurements)."""
    from kdaverify.kernels import kda_fused_recurrent as fr

    assert fr.launch_config(128, 128, 64 * 32, 1) == fr.config_for(128, 128, 64 * 32)
    walk = fr.launch_config(128, 128, 32, fr.TOKEN_LOOP_FROM)
    assert (walk.BV, walk.num_warps, walk.prefetch) == (8, 1, True)
    wide = fr.launch_config(128, 128, 256, 4096)
    assert (wide.BV, wide.num_warps, wide.prefetch) == (16, 1, False)
