"""Checks that any correct KDA implementation passes (DESIGN.md section 5).

Each check is written once, as a function of a Harness (an implementation, an input dtype
and a recorder) and a CaseSpec, so the same code checks the oracle in the normal test run
and any implementation under `pytest equivalence --impl=MODULE:FUNC`. A check raises
AssertionError with the measured errors and the budget it used; every comparison it makes
goes to the recorder, for the conformance report.

Comparisons are either exact (bitwise: causality, determinism, no mutation) or under the
one tolerance rule of tolerance.py, scaled by the same-precision reference's error on the
same case ("to rounding").
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import reject
from kdaverify.reference import exp_via_exp2, kda_chunkwise, kda_gate, kda_recurrent, kda_recurrent_np, l2norm

from . import large_offsets
from .cases import CaseSpec
from .implementation import DTYPES, Implementation
from .large_offsets import LargeCase
from .layouts import STRIDED_LAYOUTS, GuardBands
from .strategies import GPU_GRAD_STATE_ELEMENTS
from .tolerance import Verdict, as_f64, errors, judge

REFERENCE_CHUNKS = (64, 16)  # the chunk sizes kernels use (64) and their secondary chunks (16)
# Outputs of a few numbers. The rule compares the implementation's error with the worst of
# the references' errors, and over many elements each error is a tight estimate of its
# rounding's scale; over a handful it is one or two draws. If the implementation's and the
# references' errors were independent draws of one distribution (a correct kernel, rounding
# in another order), FACTOR = 3 would fail a correct kernel with probability P(r > 3), r = the
# implementation's rms over n rows / the largest of m references' (simulated, 4e5 draws):
# n = 1: 21% with m = 1, 6.4% with m = 2, 2.4% with m = 3, 0.26% with m = 6, 0.09% with m = 8;
# n = 4: 2.8% with m = 1, 0.03% with m = 3; n >= 16: below 1e-4 with one reference. Our
# chunk_kda's CPU verify (ci profile) failed in this regime: grad_initial_state bf16 at 1.03
# of its budget on a dh0 of one number (T = 15, where chunks of 64 and 16 are the same
# computation, so m was 2 there); with the rule below it passes at 0.70. (Its other failure
# there, beta_zero fp32 on a final state of four rows, is not sampling: the CPU references
# sum the gates in float64, README "Our kernels".) So
# when a case's state or o has fewer than FEW_ROWS rows (rows: the last axis, as tolerance's
# n_eff counts them), the references also run at FEW_CHUNKS: chunks of 8, 4, 2 and 1 tokens,
# each a legitimate order of the same arithmetic, which with the recurrence and 64 / 16
# gives m = 6 to 7 distinct references on exactly the cases that are cheap to reference.
FEW_ROWS = 8
FEW_CHUNKS = (8, 4, 2, 1)


def reference_chunks(t: dict | None) -> tuple[int, ...]:
    """The chunk sizes of the chunkwise references for the inputs t: REFERENCE_CHUNKS, and
    FEW_CHUNKS too when the final state [N, HV, K, V] has fewer than FEW_ROWS rows (N HV K),
    o [B, T, HV, V] has (B T HV), or t carries the gate parameters and A_log [HV] has (dA_log,
    one number per value head, is then judged)."""
    if t is None:
        return REFERENCE_CHUNKS
    B, T, HV, _ = t["v"].shape
    K = t["q"].shape[-1]
    N = B if t.get("cu_seqlens") is None else t["cu_seqlens"].numel() - 1
    rows = [N * HV * K, B * T * HV] + ([HV] if t.get("A_log") is not None else [])
    few = min(rows) < FEW_ROWS
    return REFERENCE_CHUNKS + (FEW_CHUNKS if few else ())


class Harness:
    """An implementation at one input dtype, with the oracle and the same-precision
    reference computed on exactly the rounded inputs the implementation saw."""

    def __init__(self, impl: Implementation, dtype: torch.dtype, record: Callable[[Verdict], None] = lambda v: None):
        self.impl, self.dtype, self.record = impl, dtype, record

    def inputs(self, arrays: dict, side_dtypes: dict | None = None) -> dict:
        return self.impl.tensors(arrays, self.dtype, side_dtypes)

    def run(self, t: dict, scale=None, **extra):
        """One call with output_final_state=True; o must have the input dtype, the state
        must be returned."""
        o, S = self.impl.call(t, scale=scale, **extra)
        if not isinstance(o, torch.Tensor) or o.dtype != self.dtype:
            raise AssertionError(
                f"o: expected a tensor of the input dtype {self.dtype}, got {getattr(o, 'dtype', type(o))}"
            )
        if S is None:
            raise AssertionError("final_state: output_final_state=True returned None")
        return o, S

    @staticmethod
    def oracle(t: dict, scale=None):
        """The float64 NumPy recurrence on the rounded inputs; on a GPU its PyTorch twin in
        float64 on the device (equal to it to ~1e-12, DESIGN.md section 5), so GPU-sized
        cases never cross to the host to be checked."""
        if t["q"].device.type != "cpu":
            return oracle_on_device(t, scale)
        return kda_recurrent_np(
            t["q"], t["k"], t["v"], t["g"], t["beta"], scale=scale, output_final_state=True,
            initial_state=None if t["initial_state"] is None else as_f64(t["initial_state"]),
            cu_seqlens=None if t["cu_seqlens"] is None else as_f64(t["cu_seqlens"]).astype(np.int64),
        )  # fmt: skip

    def representable(self, oracle):
        """The oracle's (o, final_state), if o fits the output dtype; otherwise the case is
        outside what any implementation can return at this dtype (o past float16's 65504 at
        input scale 100, say), and Hypothesis draws another instead (hypothesis.reject).
        Half the largest finite value leaves room for the final rounding."""
        limit = torch.finfo(self.dtype).max / 2
        if float(torch.as_tensor(oracle[0]).abs().max()) > limit:
            reject()
        return oracle

    def references(self, scale=None, t: dict | None = None, chunks=None) -> list[Callable[[dict], tuple]]:
        """Same-precision references, as functions of the inputs: what correct kernels of
        this class achieve. The chunkwise oracle in float32 with the declared matmul
        precision at chunk sizes 64 and 16 (and FEW_CHUNKS for outputs of a few rows:
        reference_chunks), and the float32 recurrence with its decays formed
        as GPU kernels form them (reference.exp_via_exp2: under strong gates its error is
        about |g| unit roundoffs per decay, which torch.exp's is not; with torch.exp the
        budget failed flash-linear-attention's fused_recurrent_kda at 1.02 of it on beta_zero,
        an H200, 17 tokens of g to -20), each output rounded to the input dtype. The worst
        of them scales a budget: one reference's error on a small case is a noisy estimate
        (a chunking can be lucky), and each is a legitimate way to compute KDA at this
        precision, so a correct kernel may land where any does."""
        precision = self.impl.caps.matmul_precision(self.dtype)

        def make(chunk):
            def ref(t):
                cpu = {n: (None if x is None else x.detach()) for n, x in t.items()}  # on the device
                args = [cpu[n].float() for n in ("q", "k", "v", "g", "beta")]
                kw = dict(scale=scale, output_final_state=True, cu_seqlens=cpu["cu_seqlens"])
                h0 = cpu["initial_state"]
                h0 = None if h0 is None else h0.float()
                if chunk is None:
                    o, S = kda_recurrent(*args, initial_state=h0, exp=exp_via_exp2, **kw)
                else:
                    o, S = kda_chunkwise(*args, initial_state=h0, chunk_size=chunk, matmul_precision=precision, **kw)
                return o.to(self.dtype), S

            return ref

        return [make(c) for c in ((*reference_chunks(t), None) if chunks is None else chunks)]

    def _judge_pair(self, what, x, target, scales_o, scales_S):
        verdicts = [
            judge(f"{what}: o", x[0], target[0], scales_o, self.dtype),
            judge(f"{what}: final_state", x[1], target[1], scales_S, torch.float32),
        ]
        for v in verdicts:
            self.record(v)
        failed = [str(v) for v in verdicts if not v.passed]
        if failed:
            raise AssertionError("\n".join(failed))

    def expect_oracle(self, what: str, t: dict, scale=None, meaning: dict | None = None, **extra):
        """Run the implementation on t (with extra keyword arguments) and hold (o,
        final_state) to the float64 oracle on `meaning` (the plain inputs t stands for when
        an in-kernel option transforms them; default t itself), the budget scaled by the
        references' own distance from that oracle."""
        self.expect_oracle_of(what, self.run(t, scale, **extra), t if meaning is None else meaning, scale)

    def expect_oracle_of(self, what: str, x, meaning: dict, scale=None, chunks=None):
        """Hold a result x = (o, final_state) to the float64 oracle on `meaning`, the budget
        scaled by the references (chunkwise at the given chunk sizes; None: the float32
        recurrence) on the same inputs."""
        oracle = self.representable(self.oracle(meaning, scale))
        refs = [f(meaning) for f in self.references(scale, meaning, chunks)]
        self._judge_pair(
            what, x, oracle, [errors(r[0], oracle[0]) for r in refs], [errors(r[1], oracle[1]) for r in refs]
        )

    def expect_relation(self, what: str, lhs, rhs, t: dict, scale=None):
        """A metamorphic relation lhs(f) == rhs(f) "to rounding", where f maps inputs to
        (o, final_state). Measured on the implementation; the budget is scaled by the worst
        of the references' own defect on the same relation and their distance from the
        oracle on t, so cancellation in the relation is not blamed on the implementation."""
        oracle = self.representable(self.oracle(t, scale))
        so, sS = [], []
        for f in self.references(scale, t):
            left, right, whole = lhs(f), rhs(f), f(t)
            so += [errors(left[0], right[0]), errors(whole[0], oracle[0])]
            sS += [errors(left[1], right[1]), errors(whole[1], oracle[1])]

        def run(x):
            return self.run(x, scale)

        self._judge_pair(what, lhs(run), rhs(run), so, sS)

    def expect_equal(self, what: str, x, y):
        """Bitwise equality of two (o, final_state) pairs. NaN equals NaN in the same place:
        a NaN is the oracle checks' business; here only a difference between calls counts."""
        for name, a, b in (("o", x[0], y[0]), ("final_state", x[1], y[1])):
            bitwise_equal(f"{what}: {name}", a, b)


def oracle_on_device(t: dict, scale=None):
    """The PyTorch recurrence in float64 on the inputs' device (the oracle of GPU runs)."""
    f64 = {n: None if x is None or n == "cu_seqlens" else x.double() for n, x in t.items()}
    return kda_recurrent(
        *(f64[n] for n in ("q", "k", "v", "g", "beta")), scale=scale, output_final_state=True,
        initial_state=f64["initial_state"], cu_seqlens=t["cu_seqlens"],
    )  # fmt: skip


def bitwise_equal(what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    try:
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=0, atol=0, equal_nan=True)
    except AssertionError as e:
        raise AssertionError(f"{what}: not bitwise equal\n{e}") from None


def _tokens(arrays: dict, a: int, b: int) -> dict:
    """Tokens [a, b) of an unpacked batch, keeping initial_state."""
    out = {n: arrays[n][:, a:b] for n in ("q", "k", "v", "g", "beta")}
    return dict(out, initial_state=arrays["initial_state"], cu_seqlens=None)


def _with_tokens_from(arrays: dict, other: dict, t0: int) -> dict:
    """arrays with every per-token input at positions >= t0 taken from other."""
    out = dict(arrays)
    for n in ("q", "k", "v", "g", "beta"):
        x = arrays[n].copy()
        x[:, t0:] = other[n][:, t0:]
        out[n] = x
    return out


# ---------------------------------------------------------------------------- the checks


def matches_oracle(h: Harness, spec: CaseSpec):
    """o and the final state agree with the float64 oracle on the same rounded inputs."""
    h.expect_oracle("oracle", h.inputs(spec.arrays()), spec.scale)


def causality(h: Harness, spec: CaseSpec):
    """Changing every input at t >= t0 (q, k, v, g, beta) leaves o[:, :t0] bitwise unchanged."""
    t0 = 1 + spec.seed % (spec.T - 1)
    base = spec.arrays()
    changed = _with_tokens_from(base, spec.with_(seed=spec.seed + 1).arrays(), t0)
    o1, _ = h.run(h.inputs(base), spec.scale)
    o2, _ = h.run(h.inputs(changed), spec.scale)
    bitwise_equal(f"causality: o[:, :{t0}] after changing every token >= {t0}", o1[:, :t0], o2[:, :t0])


def state_split(h: Harness, spec: CaseSpec):
    """Running [0, t) and then [t, T) from the returned state equals one run of [0, T)."""
    cut = 1 + spec.seed % (spec.T - 1)
    arrays = spec.arrays()
    t = h.inputs(arrays)
    first, second = h.inputs(_tokens(arrays, 0, cut)), h.inputs(_tokens(arrays, cut, spec.T))

    def split(f):
        o1, S1 = f(first)
        o2, S2 = f(dict(second, initial_state=S1.to(torch.float32)))
        return torch.cat([o1, o2], dim=1), S2

    h.expect_relation(f"state split at {cut}", split, lambda f: f(t), t, spec.scale)


def _per_sequence(f, pieces):
    outs = [f(p) for p in pieces]
    return torch.cat([o for o, _ in outs], dim=1), torch.cat([S for _, S in outs], dim=0)


def varlen_equals_separate(h: Harness, spec: CaseSpec):
    """A packed batch equals each of its sequences run alone from its own initial state."""
    arrays = spec.arrays()
    t = h.inputs(arrays)
    cu, h0 = arrays["cu_seqlens"], arrays["initial_state"]
    pieces = []
    for n in range(spec.N):
        one = _tokens(arrays, int(cu[n]), int(cu[n + 1]))
        pieces.append(h.inputs(dict(one, initial_state=None if h0 is None else h0[n : n + 1])))
    h.expect_relation("varlen vs separate", lambda f: f(t), lambda f: _per_sequence(f, pieces), t, spec.scale)


def batch_independence(h: Harness, spec: CaseSpec):
    """Each batch row alone gives what it gives inside the batch."""
    arrays = spec.arrays()
    t = h.inputs(arrays)
    h0 = arrays["initial_state"]
    rows = [
        h.inputs(dict({n: arrays[n][b : b + 1] for n in ("q", "k", "v", "g", "beta")},
                      initial_state=None if h0 is None else h0[b : b + 1], cu_seqlens=None))
        for b in range(spec.B)
    ]  # fmt: skip

    def alone(f):
        outs = [f(r) for r in rows]
        return torch.cat([o for o, _ in outs], dim=0), torch.cat([S for _, S in outs], dim=0)

    h.expect_relation("rows alone vs in batch", alone, lambda f: f(t), t, spec.scale)


def gva_equals_repeated_heads(h: Harness, spec: CaseSpec):
    """HV = G * H value heads equal the same call with q and k repeated to HV heads."""
    arrays = spec.arrays()
    t = h.inputs(arrays)
    rep = h.inputs(dict(arrays, q=np.repeat(arrays["q"], spec.G, axis=2), k=np.repeat(arrays["k"], spec.G, axis=2)))
    h.expect_relation("GVA vs repeated heads", lambda f: f(t), lambda f: f(rep), t, spec.scale)


def linearity_in_q(h: Harness, spec: CaseSpec):
    """o is linear in q: with q = qa + qb split over disjoint elements (exact in any dtype),
    o(2 qa + qb) = 2 o(qa) + o(qb); the final state does not depend on q at all."""
    arrays = spec.arrays()
    mask = np.random.default_rng(spec.seed + 3).uniform(size=arrays["q"].shape) < 0.5
    t = h.inputs(arrays)
    qa, qb = t["q"] * torch.as_tensor(mask, device=t["q"].device), t["q"] * torch.as_tensor(~mask, device=t["q"].device)
    ta, tb, tc = dict(t, q=qa), dict(t, q=qb), dict(t, q=2 * qa + qb)

    def combined(f):
        (oa, S), (ob, _) = f(ta), f(tb)
        return (2 * oa.double() + ob.double()), S

    h.expect_relation("o(2 qa + qb) vs 2 o(qa) + o(qb)", lambda f: f(tc), combined, tc, spec.scale)


def determinism(h: Harness, spec: CaseSpec):
    """Two calls on the same inputs are bitwise equal."""
    t = h.inputs(spec.arrays())
    h.expect_equal("two calls", h.run(t, spec.scale), h.run(t, spec.scale))


def inputs_not_mutated(h: Harness, spec: CaseSpec):
    """No input tensor (initial_state and cu_seqlens included) is written by the call."""
    t = h.inputs(spec.arrays())
    before = {n: x.clone() for n, x in t.items() if x is not None}
    h.run(t, spec.scale)
    for n, x in before.items():
        bitwise_equal(f"inputs not mutated: {n}", t[n], x)


def every_output_written(h: Harness, spec: CaseSpec):
    """Memory the allocator hands out is poisoned with NaN first: an output element the
    implementation forgets to write shows up as NaN and fails the oracle comparison.
    (Reliable on CUDA, whose caching allocator hands the poisoned blocks straight back; on
    the CPU, malloc reuses them for small outputs only.)"""
    t = h.inputs(spec.arrays())
    _poison_allocator(h, spec)
    h.expect_oracle("poisoned allocator", t, spec.scale)


def raw_qk_inputs(h: Harness, spec: CaseSpec) -> dict:
    """The spec's inputs with a k that is not L2-normalised (for the in-kernel L2 norm)."""
    return h.inputs(dict(spec.arrays(), k=spec.with_(seed=spec.seed + 1).arrays()["q"]))


def gate_inputs(h: Harness, spec: CaseSpec):
    """Inputs for use_gate_in_kernel=True: (t with g replaced by a raw gate projection z,
    A_log [HV] and dt_bias [HV * K] float32 on the CPU, lower_bound: -5 for the spec's
    "safe" gate, else None)."""
    rng = np.random.default_rng(spec.seed + 2)
    arrays = spec.arrays()
    t = h.inputs(dict(arrays, g=rng.standard_normal(arrays["g"].shape)))
    A_log = torch.as_tensor(rng.uniform(-1, 1, spec.HV), dtype=torch.float32)
    dt_bias = torch.as_tensor(rng.uniform(-1, 1, spec.HV * spec.K), dtype=torch.float32)
    return t, A_log, dt_bias, -5.0 if spec.gate == "safe" else None


def l2norm_in_kernel(h: Harness, spec: CaseSpec):
    """use_qk_l2norm_in_kernel=True on raw q, k equals the oracle on l2norm(q), l2norm(k)."""
    raw = raw_qk_inputs(h, spec)
    normed = dict(raw, q=l2norm(raw["q"].double()).to(h.dtype), k=l2norm(raw["k"].double()).to(h.dtype))
    h.expect_oracle("l2norm in kernel", raw, spec.scale, meaning=normed, use_qk_l2norm_in_kernel=True)


def gate_in_kernel(h: Harness, spec: CaseSpec):
    """use_gate_in_kernel=True with z, A_log, dt_bias (and the safe lower_bound when the
    spec's gate is "safe") equals the oracle on g = kda_gate(z, ...)."""
    t, A_log, dt_bias, lower_bound = gate_inputs(h, spec)
    gated = dict(t, g=kda_gate(t["g"].float().cpu(), A_log, dt_bias, lower_bound).to(t["g"].device))
    dev = h.impl.device
    extra = dict(use_gate_in_kernel=True, A_log=A_log.to(dev), dt_bias=dt_bias.to(dev), lower_bound=lower_bound)
    h.expect_oracle("gate in kernel", t, spec.scale, meaning=gated, **extra)


# ------------------------------------------------------------ argument paths (issue 12)


def final_state_not_requested(h: Harness, spec: CaseSpec):
    """output_final_state=False: o bitwise equal to the call that asks for the state, None
    returned for the state, and no input (initial_state included) written."""
    t = h.inputs(spec.arrays())
    o, _ = h.run(t, spec.scale)
    before = {n: x.clone() for n, x in t.items() if x is not None}
    o2, S2 = h.impl.call(t, scale=spec.scale, output_final_state=False)
    if S2 is not None:
        raise AssertionError(f"final_state: output_final_state=False returned {type(S2).__name__}, expected None")
    bitwise_equal("output_final_state=False: o against output_final_state=True", o2, o)
    for n, x in before.items():
        bitwise_equal(f"output_final_state=False: input {n} written", t[n], x)


def initial_state_zeros(h: Harness, spec: CaseSpec):
    """initial_state=None equals an explicit all-zero initial state (to rounding)."""
    t = h.inputs(spec.arrays())
    zero_state = torch.zeros(spec.N, spec.HV, spec.K, spec.V, dtype=torch.float32, device=h.impl.device)
    none, zeros = dict(t, initial_state=None), dict(t, initial_state=zero_state)
    h.expect_relation("initial_state None vs zeros", lambda f: f(none), lambda f: f(zeros), none, spec.scale)


def default_scale(h: Harness, spec: CaseSpec):
    """scale=None equals the explicit default scale K ** -0.5 (to rounding: the budget is
    scaled by the references' distance from the oracle on the same inputs)."""
    t = h.inputs(spec.arrays())
    explicit = spec.K**-0.5
    oracle = h.oracle(t, None)
    refs = [f(t) for f in h.references(None, t)]
    h._judge_pair(
        f"scale=None vs scale={explicit:.6g}",
        h.run(t, None),
        h.run(t, explicit),
        [errors(r[0], oracle[0]) for r in refs],
        [errors(r[1], oracle[1]) for r in refs],
    )


def scale_zero(h: Harness, spec: CaseSpec):
    """scale=0 gives o exactly zero (0 is a scale, not 'use the default'), and the same
    final state as the oracle; or, declared scale_zero=no, a loud refusal that names the
    scale (an assert in the implementation's own code counts as loud)."""
    t = h.inputs(spec.arrays())
    if not h.impl.caps.scale_zero:
        _expect_refusal("scale = 0", lambda: h.impl.call(t, scale=0.0), ("scale",), implementation_asserts=True)
        return
    o, S = h.run(t, 0.0)
    bitwise_equal("scale=0: o", o, torch.zeros_like(o))
    h.expect_oracle_of("scale=0", (o, S), t, 0.0)


def call_forms(h: Harness, spec: CaseSpec):
    """The contract's arguments passed all by position (scale, initial_state,
    output_final_state after beta) and all by name give what the usual call gives, bitwise."""
    t = h.inputs(spec.arrays())
    usual = h.run(t, spec.scale)
    for form in ("positional", "keyword"):
        h.expect_equal(f"{form} form vs the usual call", h.impl.call(t, scale=spec.scale, form=form), usual)


def mixed_input_dtypes(h: Harness, spec: CaseSpec):
    """g and beta in each declared dtype beside q, k, v of the tested dtype (16-bit q, k, v
    with float32 g and beta is flash-linear-attention's usual call) agree with the oracle on
    the exact values passed."""
    caps, arrays = h.impl.caps, spec.arrays()
    combos = {
        tuple(None if d == "input" else DTYPES[d] for d in pair)
        for pair in itertools.product(caps.g_dtypes, caps.beta_dtypes)
    }
    combos = {c for c in combos if any(d not in (None, h.dtype) for d in c)}
    for g_dtype, beta_dtype in sorted(combos, key=str):
        side = {n: d for n, d in (("g", g_dtype), ("beta", beta_dtype)) if d is not None}
        names = ", ".join(f"{n} {str(d).removeprefix('torch.')}" for n, d in side.items())
        h.expect_oracle(f"inputs with {names}", h.inputs(arrays, side), spec.scale)


# ------------------------------------------------------------ the output contract


def _storage(x: torch.Tensor) -> tuple[int, int]:
    """The [start, end) byte range of x's storage."""
    st = x.untyped_storage()
    return st.data_ptr(), st.data_ptr() + st.nbytes()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _storage(a), _storage(b)
    return a0 < b1 and b0 < a1


def output_contract(h: Harness, spec: CaseSpec):
    """o is [B, T, HV, V] in the input dtype, final_state is float32 [N, HV, K, V]; neither
    shares memory with an input or with the other; and a returned result stays valid: kept
    across three more calls with the same shapes, it is bitwise what it was."""
    t = h.inputs(spec.arrays())
    o, S = h.run(t, spec.scale)
    want_o, want_S = (spec.B, spec.T, spec.HV, spec.V), (spec.N, spec.HV, spec.K, spec.V)
    if tuple(o.shape) != want_o:
        raise AssertionError(f"o: expected shape [B, T, HV, V] = {want_o}, got {tuple(o.shape)}")
    if not isinstance(S, torch.Tensor) or S.dtype != torch.float32 or tuple(S.shape) != want_S:
        got = (getattr(S, "dtype", type(S)), tuple(getattr(S, "shape", ())))
        raise AssertionError(f"final_state: expected float32 [N, HV, K, V] = {want_S}, got {got}")
    for n, x in t.items():
        for what, out in (("o", o), ("final_state", S)):
            if x is not None and _overlaps(out, x):
                raise AssertionError(f"{what}: shares memory with the input {n}")
    if _overlaps(o, S):
        raise AssertionError("o and final_state share memory")
    kept = (o.clone(), S.clone())
    for i in range(1, 4):
        h.run(h.inputs(spec.with_(seed=spec.seed + i).arrays()), spec.scale)
    h.expect_equal("a result kept across three more calls", (o, S), kept)


# ------------------------------------------------------------ state precision


def state_precision_decode(h: Harness, spec: CaseSpec):
    """A chained decode (one call per token, the returned state carried into the next
    call) agrees with the oracle over a few hundred tokens, against references that keep
    the state in float32 between tokens: the float32 recurrence and the chunkwise
    algorithm with one-token chunks at the declared matmul precision. A state rounded
    between calls drifts (a slow decay stalls in bf16), and no single probe shows it."""
    t = h.inputs(spec.arrays())
    S, outs = t["initial_state"], []
    for i in range(spec.T):
        step = {n: t[n][:, i : i + 1].contiguous() for n in ("q", "k", "v", "g", "beta")}
        o, S = h.run(dict(step, initial_state=S, cu_seqlens=None), spec.scale)
        outs.append(o)
    h.expect_oracle_of(f"{spec.T} chained one-token calls", (torch.cat(outs, dim=1), S), t, spec.scale, (1, None))


@dataclass(frozen=True)
class Check:
    """A named check: a function, the family of cases it draws (a key of
    strategies.CASE_FAMILIES) and the declared capability it needs, if any."""

    name: str
    fn: Callable[[Harness, CaseSpec], None]
    cases: str
    needs: str | None = None  # a boolean field of Capabilities
    about: str | None = None  # what this use of fn checks, where its docstring is too general
    guards: str | None = None  # the bug class it guards against (default: BUG_CLASSES[name])
    # why it cannot run on an implementation at a dtype (a torch dtype), or None if it can
    applies: Callable[[Implementation, torch.dtype], str | None] | None = None

    @property
    def bug_class(self) -> str:
        return self.guards or BUG_CLASSES.get(self.name, "")

    # at most this many drawn examples (explicit ones always run): for the families whose one
    # example costs hundreds of calls or a thousand tokens, where the explicit examples carry
    # the classes and the CI budget (2 cores, 20 minutes with every mutant) is the limit
    max_examples: int | None = None
    # the most elements of a GPU case's state pool (None: strategies.GPU_STATE_ELEMENTS)
    state_elements: int | None = None

    @property
    def description(self) -> str:
        return self.about or (self.fn.__doc__ or "").strip().splitlines()[0]


CHECKS = {
    c.name: c
    for c in (
        Check("oracle", matches_oracle, "general"),
        Check(
            "oracle_long_history",
            matches_oracle,
            "long",
            about="The oracle agrees over 1024 to 3072 tokens (small heads).",
            max_examples=6,  # every draw is >= 1024 tokens; it was a third of a run's CPU at 12
        ),
        Check(
            "oracle_length_one",
            matches_oracle,
            "length_one",
            about="The oracle agrees on T = 1 and on packed length-1 sequences.",
        ),
        Check(
            "gated_deltanet_gate",
            matches_oracle,
            "shared_gate",
            about="The oracle agrees when one gate is shared by all K channels (Gated DeltaNet).",
        ),
        Check(
            "beta_zero",
            matches_oracle,
            "zero_beta",
            about="The oracle agrees when beta = 0: the initial state only decays.",
        ),
        Check("causality", causality, "multi_token"),
        Check("state_split", state_split, "unpacked"),
        Check("varlen_equals_separate", varlen_equals_separate, "varlen", needs="varlen"),
        Check("batch_independence", batch_independence, "batch"),
        Check("gva_equals_repeated_heads", gva_equals_repeated_heads, "gva", needs="gva"),
        Check("linearity_in_q", linearity_in_q, "general"),
        Check("determinism", determinism, "general"),
        Check("inputs_not_mutated", inputs_not_mutated, "general"),
        Check("every_output_written", every_output_written, "general"),
        Check("l2norm_in_kernel", l2norm_in_kernel, "general", needs="l2norm_in_kernel"),
        Check("gate_in_kernel", gate_in_kernel, "general", needs="gate_in_kernel"),
        Check("final_state_not_requested", final_state_not_requested, "general"),
        Check("initial_state_zeros", initial_state_zeros, "general"),
        Check("default_scale", default_scale, "general"),
        Check("scale_zero", scale_zero, "general"),
        Check("call_forms", call_forms, "general", needs="positional"),
        Check("mixed_input_dtypes", mixed_input_dtypes, "general"),
        Check("output_contract", output_contract, "general"),
        Check("state_precision_decode", state_precision_decode, "decode_chain", needs="state_float32", max_examples=3),
        Check(
            "oracle_wide_heads",
            matches_oracle,
            "wide_heads",
            about="The oracle agrees on K and V of 16 to 130 (past one 64-lane block) at short T.",
        ),
        Check(
            "oracle_many_tiles",
            matches_oracle,
            "many_tiles",
            about="The oracle agrees with G in {1, 2, 3, 4, 8}, H up to 3 and more than 64 (sequence, head) tiles.",
        ),
        Check(
            "oracle_block_edges",
            matches_oracle,
            "block_edges",
            about="The oracle agrees for T across 1 to 1024, on both sides of block edges 64k.",
            max_examples=6,
        ),
        Check(
            "oracle_packed_long",
            matches_oracle,
            "packed_long",
            needs="varlen",
            about="The oracle agrees on packed sequences longer than one chunk, lengths next to 64k.",
            max_examples=6,
        ),
    )
}


# ---------------------------------------------------------------- the bug classes that ship
# (issue 10): checks that see the out-of-bounds, stride, offset, empty-sequence and stale
# buffer bugs of real kernels, which small contiguous power-of-two cases pass.


def _check_bands(bands: GuardBands, what: str) -> None:
    changed = bands.changed()
    if changed:
        raise AssertionError(f"{what}: the bands around {', '.join(changed)} were written (an out-of-bounds write)")


def guard_bands(h: Harness, spec: CaseSpec):
    """Every input inside poisoned guard bands (NaN, then 1e30): outputs still match the
    oracle, and the bands are bitwise unchanged after the call."""
    t = h.inputs(spec.arrays())
    for kind in ("nan", "huge"):
        bands = GuardBands(t, kind)
        try:
            h.expect_oracle(f"inputs inside {kind} guard bands", bands.guarded, spec.scale)
        except AssertionError as e:
            written = bands.changed()
            raise AssertionError(f"{e}\nguard bands written: {', '.join(written) or 'none'}") from None
        _check_bands(bands, f"{kind} guard bands")


def strided_inputs(h: Harness, spec: CaseSpec):
    """q, k, v (and g, beta) as views of one fused projection, in a transposed-and-back
    layout, and as a batch slice with stride 2: the oracle's answer, or (declared
    strided=error) a clear error that names the layout problem."""
    t = h.inputs(spec.arrays())
    for name, layout in STRIDED_LAYOUTS.items():
        views = layout(t)
        if h.impl.caps.strided == "error":
            _expect_refusal(f"strided inputs ({name})", lambda v=views: h.run(v, spec.scale), ("contiguous", "stride"))
        else:
            h.expect_oracle(f"strided inputs ({name})", views, spec.scale)


def _expect_refusal(what: str, call, words: tuple[str, ...], implementation_asserts: bool = False) -> None:
    """call() must raise an error whose message contains one of words. An AssertionError is
    the harness's own failure and passes through, unless implementation_asserts (call() is
    then the implementation alone, Implementation.call, which the harness does not check)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - any exception type is a refusal; its message is checked
        if isinstance(e, AssertionError) and not implementation_asserts:
            raise
        if not any(w in str(e).lower() for w in words):
            raise AssertionError(f"{what}: refused, but the error does not say why ({' / '.join(words)}): {e!r}") from e
        return
    raise AssertionError(f"{what}: declared to refuse this input with an error, but the call returned")


def empty_sequences(h: Harness, spec: CaseSpec):
    """Zero-length sequences in a packed batch (repeated offsets in cu_seqlens): the
    oracle's answer, and each empty sequence's final state is exactly its initial state
    (zeros without one), written even where the allocator's memory held NaN."""
    t = h.inputs(spec.arrays())
    if not h.impl.caps.empty_sequences:
        _expect_refusal("empty sequences", lambda: h.run(t, spec.scale), ("cu_seqlens", "empty", "length"))
        return
    _poison_allocator(h, spec)
    _, S = h.run(t, spec.scale)
    h0 = t["initial_state"]
    for n, length in enumerate(spec.seqlens):
        if length == 0:
            want = torch.zeros_like(S[n]) if h0 is None else h0[n]
            bitwise_equal(f"empty sequence {n}: final state vs its initial state", S[n].float(), want.float())
    h.expect_oracle("packed batch with empty sequences", t, spec.scale)


def _poison_allocator(h: Harness, spec: CaseSpec) -> None:
    """Hand the allocator NaN-filled blocks of about the outputs' sizes, so an output it
    returns unwritten holds NaN (see every_output_written)."""
    numel = 4 * (spec.B * spec.T * spec.HV * spec.V + spec.N * spec.HV * spec.K * spec.V)
    for size in (numel, numel // 2, numel // 4, 64):
        poison = torch.full((max(size, 1),), float("nan"), device=h.impl.device)
        del poison


def _second_case(spec: CaseSpec) -> CaseSpec:
    """Another case of the same shapes: new values, and (packed) the same number of
    sequences with other lengths, so cu_seqlens changes too."""
    lens = spec.seqlens
    if lens is not None:
        lens = lens[::-1] if lens[::-1] != lens else lens[1:] + lens[:1]
    return spec.with_(seed=spec.seed + 1, seqlens=lens)


def reused_buffers(h: Harness, spec: CaseSpec):
    """Two calls on the same tensor objects, refilled in place (cu_seqlens included) with a
    second case of the same shapes, as a CUDA graph replay does: the second result matches
    the oracle of the second case."""
    second = _second_case(spec)
    t = h.inputs(spec.arrays())
    h.run(t, spec.scale)
    fresh = h.inputs(second.arrays())
    for name, x in t.items():
        if x is not None:
            x.copy_(fresh[name])
    h.expect_oracle("second call on refilled buffers", t, spec.scale)


# ------------------------------------------------------------- large offsets (GPU only)


def _large_case(name: str, impl: Implementation) -> LargeCase:
    sizes = sorted(impl.caps.head_sizes) if impl.caps.head_sizes else [16, 128]
    big = 128 if 128 in sizes else sizes[-1]
    return large_offsets.cases(big, big, sizes[0])[name]


def _large_applies(name: str):
    def applies(impl: Implementation, dtype: torch.dtype) -> str | None:
        c = _large_case(name, impl)
        if c.seqlens is not None and not impl.caps.varlen:
            return "not applicable: varlen not declared"
        if impl.caps.max_T is not None and max(c.seqlens or (c.T,)) > impl.caps.max_T:
            return f"not applicable: needs T = {max(c.seqlens or (c.T,))} > max_T"
        # the device's capacity here: what is free is read again once the case holds the
        # device alone (device_memory_lock), when the other workers have let go of theirs
        total = torch.cuda.mem_get_info(impl.device)[1] if impl.device.type == "cuda" else None
        return large_offsets.not_applicable(c, dtype, impl.device, free=total)

    return applies


def large_offset(h: Harness, name: str, seed: int):
    """One large-offset case (large_offsets.py): a call past 2^31 elements or 65535 grid
    blocks, whose short tail (the last sequence) is held to the float64 oracle from the
    state it starts from, and must equal the same sequence run alone."""
    c = _large_case(name, h.impl)
    with device_memory_lock(h.impl.device, exclusive=True):
        in_batch, tail = _large_call_or_skip(h, c, seed)
    alone = h.run(tail)
    oracle = h.oracle(tail)
    refs = [f(tail) for f in h.references(None, tail)]
    so, sS = [errors(r[0], oracle[0]) for r in refs], [errors(r[1], oracle[1]) for r in refs]
    h._judge_pair(f"{name}: tail of the large call vs oracle", in_batch, oracle, so, sS)
    h._judge_pair(f"{name}: tail run alone vs oracle", alone, oracle, so, sS)
    h._judge_pair(f"{name}: tail of the large call vs tail run alone", in_batch, alone, so, sS)


@contextlib.contextmanager
def device_memory_lock(device: torch.device, exclusive: bool = False):
    """Share a CUDA device's memory between the processes of one run (pytest-xdist workers):
    every check holds a shared lock while it runs, and a large-offset case (tens of GiB) an
    exclusive one, so it runs only while no other check holds memory. Each holder hands its
    cached blocks back (empty_cache) before letting go: PyTorch's caching allocator would
    otherwise keep them from the other processes. On an H100, 12 workers without this (and
    without the state-pool cap of strategies.GPU_STATE_ELEMENTS) ran the card out of memory
    and failed 41 checks. No lock on the CPU. A waiting exclusive holder may wait until the
    other workers run out of checks: the large cases then run last."""
    if device.type != "cuda":
        yield
        return
    import fcntl
    import tempfile
    from pathlib import Path

    index = device.index if device.index is not None else torch.cuda.current_device()
    path = Path(tempfile.gettempdir()) / f"kdaverify-memory-{_physical_device(index)}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            torch.cuda.empty_cache()
            fcntl.flock(f, fcntl.LOCK_UN)


def _physical_device(index: int) -> str:
    """The card behind CUDA device `index` of this process, as its UUID: the index alone
    names another card in a process with another CUDA_VISIBLE_DEVICES. Keyed by the index,
    two runs on the two GPUs of one host (one verify per GPU, each with CUDA_VISIBLE_DEVICES
    set) share one lock file, so one run's large-offset checks, which hold it alone, stop the
    other run's workers too. Seen on two H200s (2026-11-28, twelfth session): the gradient
    run on the second GPU finished no check in 561 s beside the first GPU's run (the lock is
    the likely cause; not isolated)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"cuda-{uuid}" if uuid else f"cuda{index}"


def _large_call_or_skip(h: Harness, c: LargeCase, seed: int):
    import pytest

    if h.impl.device.type == "cuda":  # free memory again, now that this process holds the lock
        reason = large_offsets.not_applicable(c, h.dtype, h.impl.device)
        if reason:
            pytest.skip(reason)
    try:
        return _large_call(h, c, seed)
    except torch.cuda.OutOfMemoryError as e:
        need = large_offsets.gib(large_offsets.need_bytes(c, h.dtype))
        pytest.skip(f"not applicable: ran out of device memory (estimated need {need:.0f} GiB): {e}"[:300])
    finally:
        if h.impl.device.type == "cuda":
            torch.cuda.empty_cache()


def _large_call(h: Harness, c: LargeCase, seed: int):
    """The big call of case c; returns ((o, final_state) of its tail, the tail's inputs as
    a call of their own). Only the tail is kept when this returns."""
    t = large_offsets.generate(c, h.dtype, h.impl.device, seed)
    o, S = h.run(t)
    row, a, b = c.tail_span()
    start = None if t["initial_state"] is None else t["initial_state"][-1:].clone()
    if c.tail is not None:  # the tail starts from the state the prefix leaves
        prefix = {n: t[n][:, :a] for n in ("q", "k", "v", "g", "beta")}
        start = h.run(dict(prefix, initial_state=None, cu_seqlens=None))[1].float()
    return (o[row : row + 1, a:b].clone(), S[-1:].clone()), large_offsets.tail_inputs(c, t, start)


def _large_check(name: str, what: str) -> Check:
    def fn(h: Harness, spec: CaseSpec):
        large_offset(h, name, spec.seed)

    fn.__name__ = f"large_offset_{name}"
    return Check(
        f"large_{name}", fn, "one_case", about=what, applies=_large_applies(name),
        guards="32-bit offsets that wrap past 2^31 elements, grids past 65535 blocks",
    )  # fmt: skip


# What each check guards against: the bug class it exists for (shown per check in the
# conformance report). Checks registered with guards= carry their own.
BUG_CLASSES = {
    "oracle": "wrong math: any departure from the KDA recurrence",
    "oracle_long_history": "lost or truncated history, drift and overflow over thousands of tokens",
    "oracle_length_one": "NaN or garbage for length-1 sequences and T = 1",
    "gated_deltanet_gate": "per-channel gate indexing (a gate broadcast from the wrong channel)",
    "beta_zero": "the delta-rule correction applied when beta = 0, or the initial state ignored",
    "causality": "future tokens or gates leaking into past outputs (future-anchored exponents)",
    "state_split": "state not handed across calls or chunks; a wrong final state",
    "varlen_equals_separate": "state leaking between packed sequences; wrong sequence offsets",
    "batch_independence": "batch rows not reset, or outputs that depend on other rows",
    "gva_equals_repeated_heads": "the GVA head mapping (j // G vs j % H)",
    "linearity_in_q": "q entering nonlinearly (a stale or mis-scaled q)",
    "determinism": "races and atomic-add order that change bits between calls",
    "inputs_not_mutated": "kernels writing into their inputs",
    "every_output_written": "output elements never written (an uncovered tail or head)",
    "l2norm_in_kernel": "the fused q/k L2 norm",
    "gate_in_kernel": "the fused gate activation (A_log, dt_bias, lower_bound)",
    "final_state_not_requested": "output_final_state=False taking another code path (o changed, state written)",
    "initial_state_zeros": "initial_state=None read as garbage instead of zeros",
    "default_scale": "scale=None resolved to something other than K ** -0.5",
    "scale_zero": "scale=0 treated as 'not given' (a falsy-value check)",
    "call_forms": "positional arguments bound in the wrong order",
    "mixed_input_dtypes": "float32 g or beta beside 16-bit q, k, v misread or rounded to 16 bits",
    "output_contract": "wrong output dtype or shape, outputs aliasing inputs, results overwritten by later calls",
    "state_precision_decode": "a state kept in bf16 between tokens (error that grows over a chained decode)",
    "oracle_wide_heads": "K or V past one 64-lane block (a second K block ignored or misindexed)",
    "oracle_many_tiles": "tile indices past 32 or 64 (grid and GVA group mapping at G = 3, 4, 8)",
    "oracle_block_edges": "T at block edges 64k - 1, 64k, 64k + 1 (off-by-one tails)",
    "oracle_packed_long": "packed sequences longer than one chunk (chunk offsets inside a sequence)",
}

for _c in (
    Check(
        "guard_bands", guard_bands, "guard_bands",
        guards="loads and stores without their mask: reads past K when K is not a power of two, "
        "past the ragged tail of a chunk, past the last state; writes past an input's end",
    ),
    Check(
        "strided_inputs", strided_inputs, "strided",
        applies=lambda impl, dtype: "not applicable: strided=no declared" if impl.caps.strided == "no" else None,
        guards="kernels that assume contiguous inputs and read the wrong strides of views",
    ),
    Check(
        "empty_sequences", empty_sequences, "empty_sequences", needs="varlen",
        guards="zero-length sequences in cu_seqlens: states left unwritten, offsets off by one",
    ),
    Check(
        "reused_buffers", reused_buffers, "reused",
        guards="anything cached by tensor identity or address (CUDA graph replays refill inputs)",
    ),
    _large_check("packed_offset", "A packed batch whose last sequence starts past 2^31 / (HV * K) tokens."),
    _large_check("row_offset", "An unpacked batch whose last row starts past 2^31 elements; B * HV > 65535."),
    _large_check("state_pool", "A state pool of N * HV * K * V > 2^31 elements; N * HV > 65535."),
    _large_check("many_chunks", "One sequence of more than 65535 chunks of 64 tokens."),
):  # fmt: skip
    CHECKS[_c.name] = _c


# ------------------------------------------------------------------ gradient checks
# (gradients.py; they need an implementation whose outputs carry autograd)

from . import gradients as _grad  # noqa: E402  (gradients imports relations lazily)


def _grad_check(name, fn, cases, about=None, needs_too=()):
    """A grad_* check: needs backward (and the capabilities in needs_too). Every declared
    matmul precision has a gradient reference (gradients.py)."""

    def applies(impl: Implementation, dtype: torch.dtype) -> str | None:
        for need in needs_too:
            if not getattr(impl.caps, need):
                return f"not applicable: {need} not declared"
        return None

    guards = "wrong backwards: unmasked ragged tails, dropped dh0, lost dg, GVA gradients not summed"
    return Check(
        name, fn, cases, needs="backward", about=about, applies=applies, guards=guards,
        state_elements=GPU_GRAD_STATE_ELEMENTS,  # the host-side oracle's cost (strategies.py)
    )  # fmt: skip


CHECKS.update(
    (c.name, c)
    for c in (
        _grad_check("grad_oracle", _grad.grad_matches_oracle, "general"),
        _grad_check("grad_output_only", _grad.grad_output_only, "general"),
        _grad_check("grad_final_state_only", _grad.grad_final_state_only, "general"),
        _grad_check(
            "grad_initial_state", _grad.grad_matches_oracle, "with_initial_state",
            about="Every gradient, dh0 included, agrees with the float64 oracle when an initial state is given.",
        ),
        _grad_check(
            "grad_ragged_tail", _grad.grad_matches_oracle, "ragged",
            about="Every gradient agrees with the float64 oracle when T is not a multiple of the chunk size 64.",
        ),
        _grad_check(
            "grad_length_one", _grad.grad_matches_oracle, "length_one",
            about="Every gradient agrees with the float64 oracle on T = 1 and on packed length-1 sequences.",
        ),
        _grad_check(
            "grad_gva", _grad.grad_matches_oracle, "gva", needs_too=("gva",),
            about="With HV > H, dq and dk (summed over each group's value heads) agree with the float64 oracle.",
        ),
        _grad_check(
            "grad_varlen", _grad.grad_matches_oracle, "varlen", needs_too=("varlen",),
            about="In a packed batch every gradient, per-sequence dh0 included, agrees with the float64 oracle.",
        ),
        _grad_check(
            "grad_gate_in_kernel", _grad.grad_gate_in_kernel, "general", needs_too=("gate_in_kernel",),
        ),
        _grad_check(
            "grad_l2norm_in_kernel", _grad.grad_l2norm_in_kernel, "general", needs_too=("l2norm_in_kernel",),
        ),
        _grad_check("grad_vjp_directions", _grad.grad_vjp_directions, "general"),
        _grad_check("grad_determinism", _grad.grad_determinism, "general"),
    )
)  # fmt: skip
