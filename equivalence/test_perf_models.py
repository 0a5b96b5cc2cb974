"""The FLOP and byte models of perf/models.py against explicit counts on small cases.

Each count comes from running the algorithm the model describes, written out with one
product per step, under torch's FlopCounterMode (2 FLOPs per multiply-add of every mm), or
from a scalar loop that counts its operations one by one; each counted algorithm is first
checked to compute the op (against the float64 oracle), so the count is of the real thing.
Small, odd sizes (T not a multiple of the chunk, K != V) so that no term hides behind another.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kdaverify.perf import models
from kdaverify.perf.models import Shape
from kdaverify.perf.providers import Case, inputs, runner
from kdaverify.reference import dplr_recurrent_np, kda_as_dplr, kda_recurrent_np, l2norm
from torch.utils.flop_counter import FlopCounterMode

T, K, V, C = 21, 5, 3, 16  # a full chunk of 16 and a tail of 5


def _kda_inputs(seed=0, T=T):
    gen = torch.Generator().manual_seed(seed)
    q, k = (l2norm(torch.randn(1, T, 1, K, generator=gen, dtype=torch.float64)) for _ in range(2))
    v = torch.randn(1, T, 1, V, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, 1, K, generator=gen, dtype=torch.float64)) / 4
    beta = torch.sigmoid(torch.randn(1, T, 1, generator=gen, dtype=torch.float64))
    S0 = torch.randn(1, 1, K, V, generator=gen, dtype=torch.float64)
    return q, k, v, g, beta, S0


def _solve_rows(L, diag):
    """(I + L)^{-1} Diag(diag) for a strictly lower L [c, c], row by row; row r multiplies the
    finished r x r block (one mm of 1 x r by r x r)."""
    c = L.shape[0]
    rows = []
    for r in range(c):
        head = -(L[r : r + 1, :r] @ torch.stack(rows)[:, :r])[0] if r else L.new_zeros(0)
        rows.append(torch.cat([head, diag[r : r + 1], L.new_zeros(c - r - 1)]))
    return torch.stack(rows)


def counted_chunk_kda(q, k, v, g, beta, S):
    """One head: q, k, g [T, K], v [T, V], beta [T], S [K, V]; the steps of chunk_kda_flops."""
    outs = []
    for s in range(0, q.shape[0], C):
        qc, kc, vc, gc, bc = (x[s : s + C] for x in (q, k, v, g, beta))
        Gam = gc.cumsum(0).exp()
        L = (bc[:, None] * ((Gam * kc) @ (kc / Gam).T)).tril(-1)
        M = _solve_rows(L, bc)
        W, U = M @ (Gam * kc), M @ vc
        Vp = U - W @ S
        A = ((Gam * qc) @ (kc / Gam).T).tril()
        outs.append(K**-0.5 * ((Gam * qc) @ S + A @ Vp))
        S = Gam[-1][:, None] * S + ((Gam[-1] / Gam) * kc).T @ Vp
    return torch.cat(outs), S


def counted_chunk_dplr(q, k, v, a, b, gk, S):
    """One head of the DPLR rule, the steps of chunk_dplr_flops (x_i = a_i^T S_{i-1})."""
    outs = []
    for s in range(0, q.shape[0], C):
        qc, kc, vc, ac, bc, gc = (x[s : s + C] for x in (q, k, v, a, b, gk))
        Gam = gc.cumsum(0).exp()
        ag = ac * Gam / gc.exp()  # a_i * Gam_{i-1}: a reads the state before token i's decay
        A_ab, A_ak = (ag @ (bc / Gam).T).tril(-1), (ag @ (kc / Gam).T).tril(-1)
        A_qk, A_qb = ((Gam * qc) @ (kc / Gam).T).tril(), ((Gam * qc) @ (bc / Gam).T).tril()
        Tinv = _solve_rows(-A_ab, torch.ones_like(gc[:, 0]))  # (I - A_ab)^{-1}
        W, U = Tinv @ ag, Tinv @ (A_ak @ vc)
        x = W @ S + U
        outs.append(K**-0.5 * ((Gam * qc) @ S + A_qk @ vc + A_qb @ x))
        tail = Gam[-1] / Gam
        S = Gam[-1][:, None] * S + (tail * bc).T @ x + (tail * kc).T @ vc
    return torch.cat(outs), S


def _count(fn, backward=False):
    leaves = [x.requires_grad_() for x in fn.args]
    with FlopCounterMode(display=False) as counter:
        o, S = fn.func(*leaves)
        if backward:
            (o.sum() + S.sum()).backward()
    return counter.get_total_flops(), o.detach()


class _Call:
    def __init__(self, func, *args):
        self.func, self.args = func, [x.detach().clone() for x in args]


def _one_head(x):
    return x[0, :, 0]


def test_chunk_kda_model_counts_the_algorithm():
    q, k, v, g, beta, S0 = _kda_inputs()
    call = _Call(counted_chunk_kda, *(_one_head(x) for x in (q, k, v, g)), beta[0, :, 0], S0[0, 0])
    flops, o = _count(call)
    gold, _ = kda_recurrent_np(q, k, v, g, beta, initial_state=S0)
    np.testing.assert_allclose(o.numpy(), gold[0, :, 0], rtol=0, atol=1e-12)
    s = Shape(1, T, 1, 1, K, V, 8)
    assert models.chunk_kda_flops(s, C) == flops
    # forward + backward: every product's two gradient products, 3x the forward
    assert models.flops("chunk_kda", "fwdbwd", s) == 3 * models.flops("chunk_kda", "fwd", s)
    assert _count(_Call(counted_chunk_kda, *call.args), backward=True)[0] == 3 * models.chunk_kda_flops(s, C)


def test_chunk_dplr_model_counts_the_algorithm():
    q, k, v, g, beta, S0 = _kda_inputs(seed=1)
    d = kda_as_dplr(q, k, v, g, beta)
    call = _Call(counted_chunk_dplr, *(_one_head(d[n]) for n in ("q", "k", "v", "a", "b", "gk")), S0[0, 0])
    flops, o = _count(call)
    gold, _ = dplr_recurrent_np(**d, initial_state=S0)
    np.testing.assert_allclose(o.numpy(), gold[0, :, 0], rtol=0, atol=1e-12)
    assert models.chunk_dplr_flops(Shape(1, T, 1, 1, K, V, 8), C) == flops


def test_recurrent_model_counts_scalar_operations():
    q, k, v, g, beta, S0 = (x.numpy() for x in _kda_inputs(seed=2, T=4))
    S = S0[0, 0].copy()
    scale, n = K**-0.5, 0
    o = np.zeros((4, V))
    for t in range(4):
        qt, kt, vt, gt, bt = q[0, t, 0], k[0, t, 0], v[0, t, 0], g[0, t, 0], beta[0, t, 0]
        for i in range(K):
            for j in range(V):
                S[i, j] *= math.exp(gt[i])
                n += 1
        e = np.zeros(V)
        for j in range(V):
            acc = 0.0
            for i in range(K):
                acc += kt[i] * S[i, j]
                n += 2
            e[j] = vt[j] - acc
            n += 1
        bk = [bt * kt[i] for i in range(K)]
        n += K
        for i in range(K):
            for j in range(V):
                S[i, j] += bk[i] * e[j]
                n += 2
        qs = [scale * qt[i] for i in range(K)]
        n += K
        for j in range(V):
            for i in range(K):
                o[t, j] += S[i, j] * qs[i]
                n += 2
    gold, _ = kda_recurrent_np(q, k, v, g, beta, initial_state=S0)
    np.testing.assert_allclose(o, gold[0, :, 0], rtol=0, atol=1e-12)
    assert models.recurrent_kda_flops(Shape(1, 4, 1, 1, K, V, 8)) == n
    assert models.flops("recurrent_kda", "decode", Shape(1, 1, 1, 1, K, V, 8)) == n // 4


def test_attention_model_counts_causal_products():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(T, K, generator=gen, dtype=torch.float64) for _ in range(3))

    def causal(q, k, v):
        rows = [((q[i : i + 1] @ k[: i + 1].T) * K**-0.5).softmax(-1) @ v[: i + 1] for i in range(q.shape[0])]
        return torch.cat(rows), q.new_zeros(())

    flops, o = _count(_Call(causal, q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    torch.testing.assert_close(o, sdpa, rtol=0, atol=1e-12)
    assert models.attention_flops(Shape(1, T, 1, 1, K, K, 8)) == flops


@pytest.mark.parametrize("op", ["chunk_kda", "recurrent_kda", "chunk_dplr", "attention"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_byte_model_is_the_tensors_the_sweep_moves(op, dtype):
    """fwd bytes: every input the sweep builds read once and o written once; decode adds the
    state read and the new state written; fwdbwd adds do read and one gradient per input."""
    mode = "decode" if op == "recurrent_kda" else "fwd"
    provider = "sdpa" if op == "attention" else "reference-recurrent"
    sizes = (2, 1 if mode == "decode" else 9, 2, 2, 3, 3 if op == "attention" else 5)
    case = Case(*sizes, op=op, provider=provider, mode=mode, dtype=dtype)
    t = inputs(case, "cpu")
    o = torch.empty(case.B, case.T, case.HV, case.V, dtype=t["q"].dtype)
    moved = sum(x.nbytes for x in t.values()) + o.nbytes + (t["initial_state"].nbytes if mode == "decode" else 0)
    assert models.nbytes(op, mode, case.shape) == moved
    if mode == "fwd":
        inputs_bytes = sum(x.nbytes for x in t.values())
        fwdbwd = moved + (inputs_bytes + o.nbytes) + inputs_bytes
        assert models.nbytes(op, "fwdbwd", case.shape) == fwdbwd


def test_models_refuse_unknown_ops_and_ceilings():
    s = Shape(1, 8, 1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match="op, mode"):
        models.flops("chunk_gla", "fwd", s)
    with pytest.raises(ValueError, match="peak_tflops"):
        models.floor_ms("chunk_kda", "fwd", s, 0.0, 1.0)


def test_design_memory_floor():
    """DESIGN.md section 7: the B1 T65536 bf16 forward moves q, k, v, g (and o) in about 0.65 ms
    at 4.2 TB/s (beta adds 1/(5 x 128) to it)."""
    s = Shape(1, 65536, 32, 32, 128, 128, 2)
    ms = models.nbytes("chunk_kda", "fwd", s) / (4200 * 1e6)
    assert 0.63 < ms < 0.66


def test_runner_fwdbwd_needs_a_backward():
    from kdaverify.perf.providers import Unavailable

    case = Case(1, 4, 1, 1, 2, 2, op="chunk_kda", provider="x", mode="fwdbwd", dtype="float32")
    t = inputs(case, "cpu")
    with pytest.raises(Unavailable, match="no backward"):
        runner(lambda *a, **kw: (torch.zeros(1, 4, 1, 2), None), case, t)
