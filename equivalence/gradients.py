"""Gradient checks (grad_*) for any implementation whose outputs carry autograd
(Capabilities.backward; DESIGN.md section 5, "Gradients").

The loss is L = <o, do> + <final_state, dht> with random cotangents (or one of the two
terms alone). The implementation's gradients with respect to q, k, v, g, beta and
initial_state, taken by torch.autograd, are held to the float64 adjoint oracle
(reference.kda_recurrent_backward_np) on the very inputs and cotangents it saw, each
gradient separately, under the tolerance rule of tolerance.py.

The same-precision references of a gradient are autograd through the float32 recurrence
(its decays formed as GPU kernels form them, reference.exp_via_exp2) and through the
float32 chunkwise oracle at chunk sizes 64 and 16 (the forward's set,
relations.Harness.references), each gradient rounded to the dtype of the input it belongs
to; the worst of them scales the budget, as in the forward. Both ways are legitimate at
this precision and their errors differ: over 70 tokens with strong gates the chunkwise
oracle's gradients at chunk size 64 sit 12-78x further from the float64 oracle than the
recurrence's (dg the most: the triangular inverse and the in-chunk cumulative sums cancel;
measured on the CPU, rel_rms 6e-6 against 8e-8), so a budget of the recurrence alone
failed the correct chunked kernel kernels.chunk_kda_ieee (dg at 5e-6).

For float32 inputs with declared precision "ieee" every product is full fp32. For a reduced matmul precision ("bf16" for
16-bit inputs, "tf32" or "tf32_rn" for float32 inputs of a kernel that declares it) the
chunkwise references round their matmul operands with reference.round_operand, which
autograd goes through: the gradient passing back through each rounding point is rounded the
same way, a stand-in for a kernel's backward dots rounding their own operands. Before this,
gradients of reduced-precision kernels had no reference: bf16 ones were checked only for
determinism and finiteness, which cannot see a backward whose bf16 dots miscompiled
(gradients off by 25% to 120% on an H100: kernels/NOTES.md), and tf32 ones not at all.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from kdaverify.reference import (
    exp_via_exp2,
    kda_chunkwise,
    kda_gate,
    kda_gate_backward_np,
    kda_recurrent,
    kda_recurrent_backward_np,
    kda_recurrent_np,
    l2norm,
    l2norm_backward_np,
)

from .cases import CaseSpec
from .tolerance import as_f64, errors, judge

GRAD_INPUTS = ("q", "k", "v", "g", "beta", "initial_state")
LOSSES = {"o and final_state": (True, True), "o only": (True, False), "final_state only": (False, True)}
# Central differences of the float64 oracle along directions scaled to each input's size:
# the truncation error is ~ FD_STEP^2 |L'''| (L is linear in q, v and initial_state, a
# low-degree polynomial in k and beta, exp-like in g: |L'''| is of the order of |L'|), the
# rounding error ~ u64 |L| / FD_STEP ~ 1e-11 |L|. Both stay near 1e-10 of the derivative,
# three orders below the float32 reference's own error (~1e-7) that scales the budget.
FD_STEP = 1e-5


def _precision(h) -> str:
    """The matmul precision of h's same-precision references (Capabilities.matmul_precision)."""
    return h.impl.caps.matmul_precision(h.dtype)


def cotangents(spec: CaseSpec, dtype: torch.dtype, device, loss: str):
    """(do [B, T, HV, V] in dtype or None, dht [N, HV, K, V] float32 or None) for a loss of
    LOSSES, standard normal, drawn from the spec's seed."""
    use_o, use_state = LOSSES[loss]
    rng = np.random.default_rng(spec.seed + 17)
    do = rng.standard_normal((spec.B, spec.T, spec.HV, spec.V))
    dht = rng.standard_normal((spec.N, spec.HV, spec.K, spec.V))
    return (
        torch.as_tensor(do).to(device, dtype) if use_o else None,
        torch.as_tensor(dht).to(device, torch.float32) if use_state else None,
    )


def autograd_grads(fn, t: dict, do, dht, names=GRAD_INPUTS, timer=contextlib.nullcontext) -> dict:
    """Gradients of <o, do> + <final_state, dht> (a None cotangent: that term left out) with
    respect to the inputs of t named in names (those not None), where fn(t) -> (o,
    final_state). An input the outputs do not depend on gets zeros, so a dropped gradient
    is compared, not hidden."""
    leaves = {n: t[n].detach().clone().requires_grad_() for n in names if t[n] is not None}
    o, S = fn(dict(t, **leaves))
    if S is None:
        raise AssertionError("final_state: output_final_state=True returned None")
    pairs = [(x, c) for x, c in ((o, do), (S, dht)) if c is not None]
    with timer():  # an implementation's backward pass is its time (Implementation.timed), not the suite's
        grads = torch.autograd.grad(
            [x for x, _ in pairs], list(leaves.values()), [c for _, c in pairs], allow_unused=True
        )
    return {n: torch.zeros_like(x) if d is None else d for (n, x), d in zip(leaves.items(), grads, strict=True)}


def oracle_grads(t: dict, do, dht, scale, torch_twin: bool | None = None) -> dict:
    """The float64 adjoint oracle on the rounded inputs and cotangents, keyed as GRAD_INPUTS
    (initial_state only when one is given), as float64 NumPy arrays. With inputs on a GPU,
    its PyTorch twin there: autograd through the float64 recurrence on the device
    (relations.oracle_on_device, the forward checks' oracle of GPU runs; equal to the adjoint
    to ~1e-12, test_oracle_backward), so a GPU-sized case is not checked on the host. There,
    one NumPy adjoint at B1 T64 HV64 K = V = 256 took 25 s on one core of the development
    machine and the float32 references 15 s more, and two H200 runs of our chunk_kda's
    gradient checks (16 workers on 32 cores, 2026-11-28, twelfth session) finished no check
    in 500 and 561 s. torch_twin: the PyTorch way (default: on a GPU only; tests take it on
    the host too)."""
    device = _device(t)
    if torch_twin is None:
        torch_twin = device.type != "cpu" and _fits_on_device(t, device)
    if torch_twin:
        from .relations import oracle_on_device  # relations registers these checks: import it late

        x = _f64_on({n: t[n] for n in (*GRAD_INPUTS, "cu_seqlens")}, device)
        do, dht = (None if c is None else torch.as_tensor(c, device=device).to(torch.float64) for c in (do, dht))
        grads = autograd_grads(lambda y: oracle_on_device(y, scale), x, do, dht)
        return {n: d.cpu().numpy() for n, d in grads.items()}
    h0, cu = t["initial_state"], t["cu_seqlens"]
    grads = kda_recurrent_backward_np(
        t["q"], t["k"], t["v"], t["g"], t["beta"], do, dht, scale=scale,
        initial_state=None if h0 is None else as_f64(h0),
        cu_seqlens=None if cu is None else as_f64(cu).astype(np.int64),
    )  # fmt: skip
    return {n: d for n, d in zip(GRAD_INPUTS, grads, strict=True) if t[n] is not None}


def _fits_on_device(t: dict, device) -> bool:
    """Whether autograd through the float64 recurrence fits in half the device's free memory.
    It keeps about three states a token for the backward (the state before and after its
    decay, and after its update: reference.kda._scan_torch), so T * 3 * N * HV * K * V * 8
    bytes; at the gradient checks' largest draws (a state pool of GPU_GRAD_STATE_ELEMENTS =
    2^22, T = 129) about 13 GB per worker, and several workers share one card. A case that
    does not fit goes to the host's NumPy adjoint instead: slower, never out of memory."""
    B, T, HV, V = t["v"].shape
    K = t["q"].shape[-1]
    N = B if t.get("cu_seqlens") is None else len(t["cu_seqlens"]) - 1
    need = 3 * T * N * HV * K * V * 8
    free, _ = torch.cuda.mem_get_info(device)
    return need <= free // 2


def _device(t: dict) -> torch.device:
    """Where the inputs t live: the device of its tensors (some may be NumPy arrays already,
    such as the normalised q and k of grad_l2norm_in_kernel); the host if none is a tensor."""
    return next((x.device for x in t.values() if isinstance(x, torch.Tensor)), torch.device("cpu"))


def _f64_on(t: dict, device) -> dict:
    """t's arrays or tensors as float64 tensors on device (cu_seqlens as integers)."""

    def one(n, x):
        if x is None:
            return None
        x = torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else x, device=device)
        return x if n == "cu_seqlens" else x.to(torch.float64)

    return {n: one(n, x) for n, x in t.items()}


def reference_calls(scale, precision: str | None = None, t: dict | None = None) -> list:
    """fn(t) -> (o, final_state) of each same-precision gradient reference (module
    docstring): the float32 recurrence, then the float32 chunkwise oracle at each of
    relations.reference_chunks(t) with the matmul precision (None or "ieee": full fp32; "bf16", "tf32",
    "tf32_rn": operands rounded by reference.round_operand, which is differentiable).
    Gradients come back in each input's dtype, as an implementation returns them."""
    from .relations import reference_chunks  # relations registers these checks: import it late

    def make(chunk):
        def fn(t):
            args = (t["q"], t["k"], t["v"], t["g"], t["beta"])
            kw = dict(scale=scale, initial_state=t["initial_state"], output_final_state=True)
            if chunk is None:  # decays formed as GPU kernels form them (relations.Harness.references)
                o, S = kda_recurrent(*(x.float() for x in args), cu_seqlens=t["cu_seqlens"], exp=exp_via_exp2, **kw)
                return o.to(t["q"].dtype), S
            o, S = kda_chunkwise(
                *(x.float() for x in args), cu_seqlens=t["cu_seqlens"], chunk_size=chunk, matmul_precision=precision,
                **kw,
            )  # fmt: skip
            return o.to(t["q"].dtype), S

        return fn

    return [make(c) for c in (None, *reference_chunks(t))]


def reference_grads(scale, t: dict, do, dht, transform=None, names=GRAD_INPUTS, precision=None) -> list[dict]:
    """The gradients of every same-precision reference (matmul precision as
    reference_calls) on the inputs' device, as the forward's references run (on a GPU, there:
    see oracle_grads for what the host cost; on the host where the oracle's autograd would
    not fit, _fits_on_device), the inputs passed through transform (an in-kernel option's
    meaning, as a differentiable function of them) first."""
    device = _device(t)
    if device.type != "cpu" and not _fits_on_device(t, device):
        t, do, dht = ({n: _host(x) for n, x in t.items()}, _host(do), _host(dht))
    return [
        autograd_grads(lambda x, fn=fn: fn(x if transform is None else transform(x)), t, do, dht, names)
        for fn in reference_calls(scale, precision, t)
    ]


def _host(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def sensitivity(t: dict, want: dict) -> float:
    """The largest |x * dL/dx| over the inputs x other than g (q, k, v, beta, initial_state;
    want: the oracle's gradients, t: the inputs they belong to): the size, in units of the
    loss, of the terms a gate gradient is made of.

    dg is dL/dg with g a log-decay, which has the units of x * dL/dx (a loss change per
    relative change of x). A chunked kernel does not form dg as the oracle does
    (rowsum(dS'_t o S'_t), reference.kda_backward) but from products of that kind that cancel:
    with the gate folded into q and k (q_t e^{G_t}, k_s e^{-G_s}), dG_t takes q_t o dq_t and
    k_t o dk_t terms of opposite signs, and the final state's e^{G_T} its own. Where the
    exact dg is identically zero (T = 1 with no initial state: S'_1 = 0), such a kernel
    returns their rounding residue. Measured: flash-linear-attention 0.6.0's chunk_kda on an
    H200, B1 T1 HV4 K = V = 256, float32: max |dg| 4.5e-13 where the cancelling terms reach
    0.087 (|k o dk|) and 0.34 (|rowsum S_T o dht|), a residue of 5e-12 of them, far under a
    float32 rounding; the suite held it to an exact 0 and failed it."""
    products = [
        np.abs(as_f64(t[n]) * as_f64(want[n])).max(initial=0.0)
        for n in ("q", "k", "v", "beta", "initial_state")
        if n in want and t.get(n) is not None
    ]
    return float(max(products, default=0.0))


def judge_gradients(
    h, what: str, got: dict, want: dict, refs: list[dict], t: dict, zero_scales: dict | None = None
) -> None:
    """Each gradient in want (the float64 oracle) against the implementation's (got) under
    the tolerance rule, scaled by the reference's (ref) error on the same gradient, in the
    dtype of the input it belongs to. zero_scales: per gradient name, the scale its errors
    are measured against where its oracle is identically zero (tolerance.errors' zero_scale;
    default: dg's, sensitivity); any other all-zero gradient must be matched exactly.
    Records every verdict; raises AssertionError listing the failures."""
    zero_scales = {"g": sensitivity(t, want)} if zero_scales is None else zero_scales
    failed = []
    for name, target in want.items():
        zs = zero_scales.get(name)
        verdict = judge(
            f"{what}: d{name}", got[name], target, [errors(r[name], target, zs) for r in refs], t[name].dtype, zs
        )
        h.record(verdict)
        if not verdict.passed:
            failed.append(str(verdict))
    if failed:
        raise AssertionError("\n".join(failed))


def expect_gradients(h, what: str, spec: CaseSpec, loss: str = "o and final_state"):
    """Every gradient of the implementation (h: a relations.Harness) on the spec's inputs
    against the float64 oracle, each under the tolerance rule with the float32 recurrence's
    error on the same gradient as its scale."""
    t = h.inputs(spec.arrays())
    do, dht = cotangents(spec, h.dtype, h.impl.device, loss)
    got = autograd_grads(lambda x: h.impl.call(x, scale=spec.scale), t, do, dht, timer=h.impl.timed)
    want = oracle_grads(t, do, dht, spec.scale)
    judge_gradients(
        h, f"{what} ({loss})", got, want, reference_grads(spec.scale, t, do, dht, precision=_precision(h)), t
    )


def _loss(t: dict, do, dht, scale, device, torch_twin: bool) -> float:
    """<o, do> + <final_state, dht> of the float64 oracle on t (float64 arrays): NumPy, or
    with torch_twin its PyTorch twin on device (oracle_grads)."""
    if not torch_twin:
        o, S = kda_recurrent_np(
            t["q"], t["k"], t["v"], t["g"], t["beta"], scale=scale, initial_state=t["initial_state"],
            output_final_state=True, cu_seqlens=t["cu_seqlens"],
        )  # fmt: skip
        return float((o * do).sum() + (S * dht).sum())
    from .relations import oracle_on_device  # relations registers these checks: import it late

    o, S = oracle_on_device(_f64_on(t, device), scale)
    do, dht = (torch.as_tensor(c, device=device) for c in (do, dht))
    return float((o * do).sum() + (S * dht).sum())


def directional_derivatives(t: dict, do, dht, scale, directions: dict, torch_twin: bool | None = None) -> np.ndarray:
    """Central differences of the float64 oracle's loss along each direction (one per
    input, FD_STEP apart): [dL/dx_n . u_n for n in directions], on the inputs' device
    (torch_twin as oracle_grads)."""
    device = _device(t)
    torch_twin = device.type != "cpu" if torch_twin is None else torch_twin
    x = {n: None if v is None else as_f64(v) for n, v in t.items()}
    if x["cu_seqlens"] is not None:
        x["cu_seqlens"] = x["cu_seqlens"].astype(np.int64)
    do, dht = as_f64(do), as_f64(dht)
    out = []
    for n, u in directions.items():
        up = _loss(dict(x, **{n: x[n] + FD_STEP * u}), do, dht, scale, device, torch_twin)
        down = _loss(dict(x, **{n: x[n] - FD_STEP * u}), do, dht, scale, device, torch_twin)
        out.append((up - down) / (2 * FD_STEP))
    return np.array(out)


# ---------------------------------------------------------------------------- the checks


def grad_matches_oracle(h, spec: CaseSpec):
    """Every gradient of <o, do> + <final_state, dht> agrees with the float64 adjoint oracle.

    dq, dk, dv, dg, dbeta and dh0, each under the tolerance rule."""
    expect_gradients(h, "gradients", spec)


def grad_output_only(h, spec: CaseSpec):
    """Every gradient of a loss on o alone (no final-state term) agrees with the float64 oracle."""
    expect_gradients(h, "gradients", spec, "o only")


def grad_final_state_only(h, spec: CaseSpec):
    """Every gradient of a loss on the final state alone (dht only) agrees with the float64 oracle."""
    expect_gradients(h, "gradients", spec, "final_state only")


def grad_gate_in_kernel(h, spec: CaseSpec):
    """With use_gate_in_kernel=True, every gradient (dz, dA_log, ddt_bias included) agrees with the oracle.

    The oracle's dz, dA_log, ddt_bias are kda_gate_backward_np on top of its dg; the
    reference is autograd through the float32 kda_gate and recurrence."""
    from .relations import gate_inputs  # relations registers these checks: import it late

    t, A_log, dt_bias, lower_bound = gate_inputs(h, spec)
    dev = h.impl.device
    t = dict(t, A_log=A_log.to(dev), dt_bias=dt_bias.to(dev))
    names = (*GRAD_INPUTS, "A_log", "dt_bias")
    do, dht = cotangents(spec, h.dtype, dev, "o and final_state")

    def run(x):
        extra = dict(A_log=x["A_log"], dt_bias=x["dt_bias"], lower_bound=lower_bound)
        return h.impl.call(x, scale=spec.scale, use_gate_in_kernel=True, **extra)

    def meaning(x):
        return dict(x, g=kda_gate(x["g"].float(), x["A_log"], x["dt_bias"], lower_bound))

    z, a, b = (as_f64(x) for x in (t["g"], A_log, dt_bias))
    g = kda_gate(torch.as_tensor(z), torch.as_tensor(a), torch.as_tensor(b), lower_bound).numpy()
    want = oracle_grads(dict(t, g=g), do, dht, spec.scale)
    # dz, dA_log, ddt_bias are linear in dg: where it is identically zero, so are they, and
    # their scales are dg's (sensitivity) carried through the gate's backward (for dA_log and
    # ddt_bias, sums whose terms may differ in sign: a lower estimate, so the check stays strict)
    carried = kda_gate_backward_np(z, a, b, lower_bound, np.full_like(z, sensitivity(t, want)))
    zero_scales = {
        n: float(np.abs(x).max()) for n, x in zip(("g", "A_log", "dt_bias"), carried, strict=True) if x is not None
    }
    want["g"], want["A_log"], want["dt_bias"] = kda_gate_backward_np(z, a, b, lower_bound, want["g"])
    got = autograd_grads(run, t, do, dht, names, timer=h.impl.timed)
    refs = reference_grads(spec.scale, t, do, dht, meaning, names, _precision(h))
    judge_gradients(h, "gate in kernel (dg is dz)", got, want, refs, t, zero_scales)


def grad_l2norm_in_kernel(h, spec: CaseSpec):
    """With use_qk_l2norm_in_kernel=True on raw q, k, every gradient (dq, dk through the norm) agrees with the oracle.

    The oracle's dq, dk are l2norm_backward_np on top of its gradients at the normalised
    q, k; the reference is autograd through the float32 l2norm and recurrence."""
    from .relations import raw_qk_inputs  # relations registers these checks: import it late

    t = raw_qk_inputs(h, spec)
    do, dht = cotangents(spec, h.dtype, h.impl.device, "o and final_state")

    def meaning(x):
        return dict(x, q=l2norm(x["q"].float()), k=l2norm(x["k"].float()))

    q, k = as_f64(t["q"]), as_f64(t["k"])
    normed = dict(t, q=l2norm(torch.as_tensor(q)).numpy(), k=l2norm(torch.as_tensor(k)).numpy())
    want = oracle_grads(normed, do, dht, spec.scale)
    want["q"], want["k"] = l2norm_backward_np(q, want["q"]), l2norm_backward_np(k, want["k"])
    got = autograd_grads(
        lambda x: h.impl.call(x, scale=spec.scale, use_qk_l2norm_in_kernel=True), t, do, dht, timer=h.impl.timed
    )
    judge_gradients(
        h, "l2norm in kernel", got, want, reference_grads(spec.scale, t, do, dht, meaning, precision=_precision(h)), t
    )


def grad_vjp_directions(h, spec: CaseSpec):
    """Vector-Jacobian consistency: <gradient, u> equals the oracle's central difference along u.

    One random direction u per input; the target comes from the float64 forward alone, so
    this check does not lean on the adjoint oracle."""
    t = h.inputs(spec.arrays())
    do, dht = cotangents(spec, h.dtype, h.impl.device, "o and final_state")
    rng = np.random.default_rng(spec.seed + 29)
    # unit directions: L is linear in q, v and initial_state (any step is exact but for
    # rounding), and k, beta and g are of unit scale (g in log space)
    directions = {n: rng.standard_normal(tuple(t[n].shape)) for n in GRAD_INPUTS if t[n] is not None}

    def along(grads):
        return np.array([float((as_f64(grads[n]) * u).sum()) for n, u in directions.items()])

    target = directional_derivatives(t, do, dht, spec.scale, directions)
    got = along(autograd_grads(lambda x: h.impl.call(x, scale=spec.scale), t, do, dht, timer=h.impl.timed))
    scales = [errors(along(r), target) for r in reference_grads(spec.scale, t, do, dht, precision=_precision(h))]
    verdict = judge(f"<gradient, u> for u along {', '.join(directions)}", got, target, scales, h.dtype)
    h.record(verdict)
    if not verdict.passed:
        raise AssertionError(str(verdict))


def grad_determinism(h, spec: CaseSpec):
    """Two backward passes on the same inputs and cotangents give bitwise equal gradients."""
    from .relations import bitwise_equal  # relations registers these checks: import it late

    t = h.inputs(spec.arrays())
    do, dht = cotangents(spec, h.dtype, h.impl.device, "o and final_state")

    def call(x):
        return h.impl.call(x, scale=spec.scale)

    first, second = (autograd_grads(call, t, do, dht, timer=h.impl.timed) for _ in range(2))
    for n in first:
        bitwise_equal(f"two backward passes: d{n}", first[n], second[n])
