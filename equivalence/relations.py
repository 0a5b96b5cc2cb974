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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from kdaverify.reference import kda_chunkwise, kda_gate, kda_recurrent, kda_recurrent_np, l2norm

from .cases import CaseSpec
from .implementation import Capabilities, Implementation
from .tolerance import Verdict, as_f64, errors, judge

REFERENCE_CHUNKS = (64, 16)  # the chunk sizes kernels use (64) and their secondary chunks (16)


class Harness:
    """An implementation at one input dtype, with the oracle and the same-precision
    reference computed on exactly the rounded inputs the implementation saw."""

    def __init__(self, impl: Implementation, dtype: torch.dtype, record: Callable[[Verdict], None] = lambda v: None):
        self.impl, self.dtype, self.record = impl, dtype, record

    def inputs(self, arrays: dict) -> dict:
        return self.impl.tensors(arrays, self.dtype)

    def run(self, t: dict, scale=None, **extra):
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
        """The float64 NumPy recurrence on the rounded inputs."""
        return kda_recurrent_np(
            t["q"], t["k"], t["v"], t["g"], t["beta"], scale=scale, output_final_state=True,
            initial_state=None if t["initial_state"] is None else as_f64(t["initial_state"]),
            cu_seqlens=None if t["cu_seqlens"] is None else as_f64(t["cu_seqlens"]).astype(np.int64),
        )  # fmt: skip

    def references(self, scale=None) -> list[Callable[[dict], tuple]]:
        """Same-precision references, as functions of the inputs: what correct kernels of
        this class achieve. The chunkwise oracle in float32 with the declared matmul
        precision at chunk sizes 64 and 16, and the float32 recurrence, each output rounded
        to the input dtype. The worst of them scales a budget: one reference's error on a
        small case is a noisy estimate (a chunking can be lucky), and each is a legitimate
        way to compute KDA at this precision, so a correct kernel may land where any does."""
        precision = self.impl.caps.matmul_precision(self.dtype)

        def make(chunk):
            def ref(t):
                cpu = {n: (None if x is None else x.detach().to("cpu")) for n, x in t.items()}
                args = [cpu[n].float() for n in ("q", "k", "v", "g", "beta")]
                kw = dict(scale=scale, output_final_state=True, cu_seqlens=cpu["cu_seqlens"])
                h0 = cpu["initial_state"]
                h0 = None if h0 is None else h0.float()
                if chunk is None:
                    o, S = kda_recurrent(*args, initial_state=h0, **kw)
                else:
                    o, S = kda_chunkwise(*args, initial_state=h0, chunk_size=chunk, matmul_precision=precision, **kw)
                return o.to(self.dtype), S

            return ref

        return [make(c) for c in (*REFERENCE_CHUNKS, None)]

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
        meaning = t if meaning is None else meaning
        oracle = self.oracle(meaning, scale)
        refs = [f(meaning) for f in self.references(scale)]
        x = self.run(t, scale, **extra)
        self._judge_pair(
            what, x, oracle, [errors(r[0], oracle[0]) for r in refs], [errors(r[1], oracle[1]) for r in refs]
        )

    def expect_relation(self, what: str, lhs, rhs, t: dict, scale=None):
        """A metamorphic relation lhs(f) == rhs(f) "to rounding", where f maps inputs to
        (o, final_state). Measured on the implementation; the budget is scaled by the worst
        of the references' own defect on the same relation and their distance from the
        oracle on t, so cancellation in the relation is not blamed on the implementation."""
        oracle = self.oracle(t, scale)
        so, sS = [], []
        for f in self.references(scale):
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
    numel = 4 * (spec.B * spec.T * spec.HV * spec.V + spec.N * spec.HV * spec.K * spec.V)
    for size in (numel, numel // 2, numel // 4, 64):
        poison = torch.full((max(size, 1),), float("nan"), device=h.impl.device)
        del poison
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


@dataclass(frozen=True)
class Check:
    """A named check: a function, the family of cases it draws (a key of
    strategies.CASE_FAMILIES) and the declared capability it needs, if any."""

    name: str
    fn: Callable[[Harness, CaseSpec], None]
    cases: str
    needs: str | None = None  # a boolean field of Capabilities
    about: str | None = None  # what this use of fn checks, where its docstring is too general
    # why the check does not apply to a declaration at an input dtype (None: it applies)
    not_applicable: Callable[[Capabilities, str], str | None] | None = None

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
    )
}


# ------------------------------------------------------------------ gradient checks
# (gradients.py; they need an implementation whose outputs carry autograd)

from . import gradients as _grad  # noqa: E402  (gradients imports relations lazily)


def _grad_check(name, fn, cases, about=None, needs_too=()):
    """A grad_* check: needs backward (and the capabilities in needs_too), and a gradient
    reference of the declared precision unless it compares bitwise."""

    def missing(caps, dtype_name):
        for need in needs_too:
            if not getattr(caps, need):
                return f"{need} not declared"
        return None if fn is _grad.grad_determinism else _grad.gradient_reference_missing(caps, dtype_name)

    return Check(name, fn, cases, needs="backward", about=about, not_applicable=missing)


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
